"""FedNova — Wang, Liu, Liang, Joshi and Poor, "Tackling the Objective Inconsistency Problem in
Heterogeneous Federated Optimization", NeurIPS 2020.

Sites that take more local steps move further, so FedAvg's plain average drifts toward the
objective of the sites with most steps (objective inconsistency). FedNova divides each site's
update by how much gradient it accumulated before averaging.

Site i runs τ_i steps of SGD with momentum ρ (PyTorch form: b ← ρ b + g, w ← w − η b). The
gradient of step k then enters the final weights with coefficient η (1 − ρ^{τ_i − k})/(1 − ρ),
whose sum over k is η a_i with

    a_i = [τ_i − ρ (1 − ρ^{τ_i}) / (1 − ρ)] / (1 − ρ)        (a_i = τ_i when ρ = 0).

The server, with p_i = n_i / N:

    d_i = (w_g − w_i) / a_i,     τ_eff = Σ_i p_i a_i,     w_new = w_g − τ_eff Σ_i p_i d_i.

With equal τ_i this is FedAvg. Only trainable parameters are normalised: a site marks them with
one scalar extra each (``fednova.param.<name>``) because the server sees a bare state dict and
cannot tell a parameter from a float buffer. Buffers (BatchNorm running statistics, step
counters) are not gradient steps, so they take FedAvg's sample-weighted average — extrapolating a
running variance could make it negative.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fedfair_med.algorithms.averaging import Aggregation
from fedfair_med.algorithms.base import Algorithm
from fedfair_med.algorithms.params import check_number
from fedfair_med.contracts import ClientUpdate, LocalSettings, SiteContext, StateDict

NORMALISER = "fednova.a"
PARAM_PREFIX = "fednova.param."


def momentum_normaliser(steps: int, rho: float) -> float:
    """a = Σ_k (1 − ρ^{τ−k})/(1 − ρ) = [τ − ρ(1 − ρ^τ)/(1 − ρ)]/(1 − ρ); τ when ρ = 0."""
    if rho == 0.0:
        return float(steps)
    return (steps - rho * (1.0 - rho**steps) / (1.0 - rho)) / (1.0 - rho)


class FedNova(Algorithm):
    name = "fednova"
    required_optimizer = "sgd"
    # a_i counts each round's momentum from a zero buffer; a buffer carried in would break it
    allows_kept_optimizer_state = False

    @classmethod
    def param_defaults(cls) -> dict[str, Any]:
        return {"rho": 0.0}

    def validate_params(self) -> None:
        check_number(self.name, "rho (local SGD momentum)", self.params["rho"], low=0.0, high=1.0,
                     high_open=True)

    @property
    def rho(self) -> float:
        return float(self.params["rho"])

    def local_momentum(self, settings: LocalSettings) -> float:
        return self.rho

    def client_extras(
        self, ctx: SiteContext, start_state: StateDict, model: nn.Module, steps: int,
        site_state: StateDict,
    ) -> StateDict:
        """The normaliser a_i and one marker per trainable parameter (no per-sample values)."""
        extras: StateDict = {
            NORMALISER: torch.tensor(momentum_normaliser(steps, self.rho))
        }
        for name, p in model.named_parameters():
            if p.requires_grad:
                extras[PARAM_PREFIX + name] = torch.tensor(1.0)
        return extras

    def start_aggregation(self, global_state: StateDict, server_state: StateDict) -> Aggregation:
        return NovaAggregation(self, global_state, server_state)


class NovaAggregation(Aggregation):
    """Streams FedNova's server step: Σ_i n_i a_i and Σ_i (n_i / a_i)(w_i − w_g) per parameter.

    With N = Σ n_i these give τ_eff = Σ n_i a_i / N and Σ_i p_i d_i = −Σ_i (n_i/a_i)(w_i − w_g) / N.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.weighted_normaliser = 0.0  # Σ n_i a_i
        self.moved: dict[str, torch.Tensor] = {}  # Σ (n_i / a_i)(w_i − w_g), flat float64

    def fold(self, site: str, update: ClientUpdate, weight: float) -> None:
        normaliser = float(update.extras[NORMALISER])
        parameters = {key[len(PARAM_PREFIX):] for key in update.extras if key.startswith(PARAM_PREFIX)}
        parameters = {n for n in parameters if torch.is_floating_point(self.global_state[n])}
        self.weighted_normaliser += weight * normaliser
        self.average.add({k: v for k, v in update.state.items() if k not in parameters}, weight)
        for name in parameters:
            if normaliser > 0.0:
                self.add_to_sum(self.moved, name, update.state[name], weight / normaliser,
                                subtract=self.global_state[name])
            else:  # no local step: w_i = w_g, nothing to add (the sum still exists)
                self.running_sum(self.moved, name)

    def new_model(self) -> StateDict:
        new_state = self.average.result()
        total = self.average.total
        tau_eff = self.weighted_normaliser / total
        for name, moved in self.moved.items():
            new_state[name] = self.global_plus(name, moved, total, tau_eff)
        return new_state
