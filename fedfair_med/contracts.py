"""What crosses the boundaries between tasks, methods and runtimes: the ground floor.

Every other module may import this one; it imports nothing from ``fedfair_med`` (only the
standard library, numpy and torch), so a task, a method and a runtime can agree on these names
without knowing each other.

* :data:`StateDict` — everything that crosses the wire is a ``dict[str, torch.Tensor]``.
* :class:`Objective` — the task's loss, per-sample risk and risk mask, handed to methods.
* :class:`LocalSettings`, :class:`SiteContext` — one site's round, as the runtime sets it up.
* :class:`ClientState` — a site's client-side memory, held by the runtime, passed to the hooks.
* :class:`ClientUpdate` — what a site sends back.
* :data:`MISSING`, :func:`is_missing`, :func:`age_band` — the missing-value and age-band rules.
* :data:`SEGMENTATION`, :data:`CLASSIFICATION` — the two task kinds.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

StateDict = dict[str, torch.Tensor]

# ---- task kinds ------------------------------------------------------------------------------
#: a task whose network outputs one foreground logit per pixel (B, 1, ...); metric Dice
SEGMENTATION = "segmentation"
#: a task whose network outputs two class logits (B, 2), class 1 positive; metric accuracy
CLASSIFICATION = "classification"
TASK_KINDS = (SEGMENTATION, CLASSIFICATION)

# ---- missing values and age bands -------------------------------------------------------------
#: an unknown sensitive attribute, as datasets yield it and predictions store it
MISSING = ""


def is_missing(value: Any) -> bool:
    """True for the package's 'unknown attribute' markers: ``""`` (or blank), ``None``, NaN,
    pandas NA / NaT.

    pandas is consulted only when it is already imported (a pandas value can only come from a
    program that imported it), so this module stays free of it.
    """
    if value is None:
        return True
    if isinstance(value, str):
        return value.strip() == ""
    if isinstance(value, float):
        return math.isnan(value)
    pandas = sys.modules.get("pandas")
    if pandas is not None:
        try:
            missing = pandas.isna(value)
            return bool(missing) if np.ndim(missing) == 0 else False
        except (TypeError, ValueError):
            return False
    if isinstance(value, np.floating):
        return bool(np.isnan(value))
    return False


def age_band(age: Any, edges: Sequence[float] = (60,)) -> str:
    """Band label for an age: with edges (60,) → '<=60' or '>60'; :data:`MISSING` when the age
    is missing or not a number."""
    try:
        value = float(age)
    except (TypeError, ValueError):
        return MISSING
    if value != value:  # NaN
        return MISSING
    lower = None
    for edge in edges:
        if value <= edge:
            return f"<={edge:g}" if lower is None else f"{lower:g}-{edge:g}"
        lower = edge
    return f">{edges[-1]:g}"


# ---- one site's round ----------------------------------------------------------------------------
@dataclass
class Objective:
    """The task-specific pieces of a site's local loss, supplied by the task.

    ``task_loss(logits, batch)`` is the mean task loss of a batch; ``sample_risk(logits, batch)``
    is the per-sample risk FlexFair and FairFed average per group (Dice loss or CE for equal
    accuracy, P(y=1) for demographic parity / equal opportunity); ``risk_mask(batch)`` says which
    samples count toward that risk (all, or y = 1 only for equal opportunity).
    """

    task_loss: Callable[[torch.Tensor, Mapping[str, Any]], torch.Tensor]
    sample_risk: Callable[[torch.Tensor, Mapping[str, Any]], torch.Tensor]
    risk_mask: Callable[[Mapping[str, Any]], torch.Tensor] = lambda batch: torch.ones(
        len(batch["group"]), dtype=torch.bool
    )


@dataclass
class LocalSettings:
    """Hyper-parameters of one site's local training; identical across runtimes."""

    epochs: int = 1
    lr: float = 1e-3
    optimizer: str = "adam"  # "adam" or "sgd"
    momentum: float = 0.0
    weight_decay: float = 0.0
    max_steps: int | None = None  # cap on optimiser steps per round (None: full epochs)
    #: Cosine decay of the local learning rate across rounds, from ``lr`` in the first round to
    #: ``lr_final`` in the last; None keeps ``lr`` constant. Late rounds then take small steps,
    #: which limits client drift where a constant rate leaves the global model oscillating.
    lr_final: float | None = None
    #: "reset": a fresh optimiser every round (the usual FedAvg client). "keep": the site keeps
    #: its optimiser's state (Adam's moments, SGD's momentum) from its last round and resumes
    #: from it; the state never leaves the site. Adam restarted every round re-learns its
    #: step sizes from zero each time, which on skin costs far more than the averaging does.
    optimizer_state: str = "reset"

    def for_round(self, round_index: int, rounds: int) -> "LocalSettings":
        """These settings with the learning rate of round ``round_index`` (1-based) of ``rounds``."""
        if self.lr_final is None or rounds <= 1:
            return self
        progress = min(max(round_index - 1, 0), rounds - 1) / (rounds - 1)
        lr = self.lr_final + 0.5 * (self.lr - self.lr_final) * (1.0 + math.cos(math.pi * progress))
        return replace(self, lr=lr)


@dataclass
class ClientState:
    """One site's client-side memory. The runtime keeps one per site (the in-process runtime one
    per :class:`~fedfair_med.runtime.site.SiteRunner`, an OpenFL collaborator its own) and hands
    it to the method through :attr:`SiteContext.state`; a method instance keeps only its
    parameters, so one instance can serve any number of sites in any order.

    ``kept`` lasts across rounds and never leaves the site (SCAFFOLD's c_i, FlexFair's own exact
    statistics); the client hooks also receive it as their ``site_state`` argument. ``round``
    holds the round in progress, from the statistics pass to the update (FedProx's w_g,
    SCAFFOLD's c − c_i, FlexFair's running group sums and live estimate, FairFed's statistics);
    :meth:`~fedfair_med.algorithms.base.Algorithm.client_update` empties it when it returns.
    """

    kept: StateDict = field(default_factory=dict)
    round: dict[str, Any] = field(default_factory=dict)


@dataclass
class SiteContext:
    """What a site holds for one round: its name, data and the round's settings."""

    site: str
    site_index: int
    loader: Iterable[Mapping[str, Any]]
    objective: Objective
    settings: LocalSettings
    round: int
    num_groups: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    #: forward-pass precision of the local loop: "32", "bf16" or "fp16" (autocast; fp16 scaled)
    precision: str = "32"
    #: DP-SGD hook set by the runtime (``fedfair_med.privacy.dpsgd.DPSGDSession``), else None:
    #: ``attach(model, optimizer, loader)`` returns private replacements, ``detach(model)`` undoes.
    private_training: Any = None
    #: the site's client-side memory, held by the runtime across rounds (a fresh one by default)
    state: ClientState = field(default_factory=ClientState)


@dataclass
class ClientUpdate:
    """What a site sends back: new weights, its sample count and fixed-size extras."""

    state: StateDict
    num_samples: int
    extras: StateDict = field(default_factory=dict)
