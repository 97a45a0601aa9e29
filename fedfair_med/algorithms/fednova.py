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

import math
from typing import Any, Mapping

import torch
from torch import nn

from fedfair_med.algorithms.base import (
    Algorithm,
    ClientUpdate,
    LocalSettings,
    SiteContext,
    StateDict,
    weighted_average,
)

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

    @classmethod
    def param_defaults(cls) -> dict[str, Any]:
        return {"rho": 0.0}

    def validate_params(self) -> None:
        rho = self.params["rho"]
        if (isinstance(rho, bool) or not isinstance(rho, (int, float)) or not math.isfinite(rho)
                or not 0.0 <= rho < 1.0):
            raise ValueError(
                f"fednova: rho (local SGD momentum) must satisfy 0 <= rho < 1, got {rho!r}"
            )

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

    def aggregate(
        self,
        global_state: StateDict,
        updates: Mapping[str, ClientUpdate],
        server_state: StateDict,
    ) -> tuple[StateDict, StateDict]:
        weights = self.aggregation_weights(updates, server_state)
        # Buffers (and the fallback for anything not marked a parameter): FedAvg's average.
        new_state = weighted_average({s: u.state for s, u in updates.items()}, weights)
        sites = sorted(updates)
        total = float(sum(weights[s] for s in sites))
        share = {s: weights[s] / total for s in sites}
        normaliser = {s: float(updates[s].extras[NORMALISER]) for s in sites}
        tau_eff = sum(share[s] * normaliser[s] for s in sites)
        parameters = {
            key[len(PARAM_PREFIX):]
            for u in updates.values() for key in u.extras if key.startswith(PARAM_PREFIX)
        }
        for name in parameters:
            start = global_state[name]
            if not torch.is_floating_point(start):
                continue
            start64 = start.to(torch.float64)
            direction = torch.zeros_like(start64)  # Σ_i p_i d_i
            for s in sites:
                if normaliser[s] <= 0.0:  # no local step: w_i = w_g, nothing to add
                    continue
                moved = start64 - updates[s].state[name].to(torch.float64)
                direction += (share[s] / normaliser[s]) * moved
            new_state[name] = (start64 - tau_eff * direction).to(start.dtype)
        return new_state, self.update_server_state(server_state, updates, weights)
