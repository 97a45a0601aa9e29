"""FedAvgM — Hsu, Qi and Brown, "Measuring the Effects of Non-Identical Data Distribution for
Federated Visual Classification", arXiv:1909.06335, 2019.

FedAvg with momentum at the server. Sites train exactly as under FedAvg; the server treats the
round's move of the average as a pseudo-gradient and keeps a velocity v across rounds:

    Δ_t = x_t − Σ_s p_s y_s,      v_t = β v_{t−1} + Δ_t,      x_{t+1} = x_t − η_s v_t,

with p_s = n_s / N (FedAvg's weights). β = 0 and η_s = 1 is FedAvg. Under label skew the sites'
updates partly cancel each round; the velocity accumulates the direction they share, so a
federation whose average moves slowly moves up to 1 / (1 − β) times further along it.

Only trainable parameters get momentum: BatchNorm's running statistics are estimates, not
gradient steps (momentum could push a variance below zero), so they take FedAvg's average.
Sites name their trainable parameters with one-number extras; the server cannot tell them from
buffers otherwise. v lives in the server state and never leaves the server.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fedfair_med.algorithms.averaging import Aggregation
from fedfair_med.algorithms.base import Algorithm
from fedfair_med.algorithms.params import check_number
from fedfair_med.contracts import ClientUpdate, SiteContext, StateDict

TRAINABLE = "fedavgm.trainable."  # extras: a 1 per trainable parameter name
VELOCITY = "fedavgm.v."  # server state: v per trainable parameter


class FedAvgM(Algorithm):
    name = "fedavgm"

    @classmethod
    def param_defaults(cls) -> dict[str, Any]:
        return {"beta": 0.9, "server_lr": 1.0}

    def validate_params(self) -> None:
        check_number(self.name, "beta", self.params["beta"], low=0.0, high=1.0, high_open=True)
        check_number(self.name, "server_lr", self.params["server_lr"], low=0.0, low_open=True)

    def client_extras(self, ctx: SiteContext, start_state: StateDict, model: nn.Module, steps: int,
                      site_state: StateDict) -> StateDict:
        return {TRAINABLE + name: torch.ones(()) for name, p in model.named_parameters()
                if p.requires_grad}

    def start_aggregation(self, global_state: StateDict, server_state: StateDict) -> Aggregation:
        return FedAvgMAggregation(self, global_state, server_state)


class FedAvgMAggregation(Aggregation):
    """FedAvg's streaming average, then the momentum step on the trainable parameters."""

    algorithm: FedAvgM

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.trainable: set[str] = set()
        self.velocity: StateDict = {}

    def fold(self, site: str, update: ClientUpdate, weight: float) -> None:
        super().fold(site, update, weight)
        self.trainable |= {k[len(TRAINABLE):] for k in update.extras if k.startswith(TRAINABLE)}

    def kept_extras(self, extras: StateDict) -> StateDict:
        return {k: v for k, v in extras.items() if not k.startswith(TRAINABLE)}

    def new_model(self) -> StateDict:
        new_state = self.average.result()
        beta, server_lr = float(self.algorithm.params["beta"]), float(self.algorithm.params["server_lr"])
        for name in sorted(self.trainable & new_state.keys()):
            x = self.global_state[name]
            x64 = x.to(torch.float64)
            velocity = x64 - new_state[name].to(torch.float64)  # Δ_t, the pseudo-gradient
            previous = self.server_state.get(VELOCITY + name)
            if previous is not None:
                velocity = velocity + beta * previous.to(torch.float64)
            new_state[name] = (x64 - server_lr * velocity).to(x.dtype)
            self.velocity[VELOCITY + name] = velocity.to(x.dtype)
        return new_state

    def next_server_state(self) -> StateDict:
        return {**self.server_state, **self.velocity}
