"""Federated methods, one module each; :data:`REGISTRY` maps a method's name to its class.

Adding a method is one module with an :class:`~fedfair_med.algorithms.base.Algorithm` subclass
and one line here.
"""

from __future__ import annotations

from typing import Any

from fedfair_med.algorithms.base import Algorithm
from fedfair_med.algorithms.dynamicfl import DynamicFL
from fedfair_med.algorithms.fairfed import FairFed
from fedfair_med.algorithms.fairmixup import FairMixup
from fedfair_med.algorithms.fedavg import FedAvg
from fedfair_med.algorithms.fedavgm import FedAvgM
from fedfair_med.algorithms.fednova import FedNova
from fedfair_med.algorithms.fedprox import FedProx
from fedfair_med.algorithms.flexfair import FlexFair
from fedfair_med.algorithms.scaffold import Scaffold

REGISTRY: dict[str, type[Algorithm]] = {
    "fedavg": FedAvg,
    "fedavgm": FedAvgM,
    "fedprox": FedProx,
    "fednova": FedNova,
    "scaffold": Scaffold,
    "flexfair": FlexFair,
    "fairfed": FairFed,
    "fairmixup": FairMixup,
    "dynamicfl": DynamicFL,
}


def build_algorithm(name: str, **params: Any) -> Algorithm:
    """Instantiate a method by registry name, with a clear error for unknown names."""
    try:
        cls = REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(REGISTRY)}") from None
    return cls(**params)
