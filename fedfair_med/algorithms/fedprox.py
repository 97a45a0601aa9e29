"""FedProx — Li, Sahu, Zaheer, Sanjabi, Talwalkar and Smith, "Federated Optimization in
Heterogeneous Networks", MLSys 2020.

Each site minimises its task loss plus a proximal term that keeps the local model near the
round's global model w_g:

    h_s(w) = F_s(w) + (μ/2) ‖w − w_g‖²,      ∇h_s(w) = ∇F_s(w) + μ (w − w_g).

With μ = 0 this is FedAvg; larger μ limits client drift on heterogeneous (non-IID) sites at the
cost of slower local progress. The server is FedAvg's sample-weighted average.

The term is applied in :meth:`FedProx.after_backward` as its exact gradient μ (w − w_g) rather
than as an ``extra_loss``: the update is identical, but no autograd graph over every weight is
built at each step (it matters for ResNet-50 / UNet sized models), and the loss the shared loop
checks for finiteness stays the task loss.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fedfair_med.algorithms.base import Algorithm
from fedfair_med.algorithms.params import check_number
from fedfair_med.contracts import SiteContext, StateDict


class FedProx(Algorithm):
    name = "fedprox"

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        # Global weights w_g per site for the round in progress (sites may share one instance).
        self._anchors: dict[str, dict[str, torch.Tensor]] = {}

    @classmethod
    def param_defaults(cls) -> dict[str, Any]:
        return {"mu": 0.01}

    def validate_params(self) -> None:
        check_number(self.name, "mu", self.params["mu"], low=0.0)

    @property
    def mu(self) -> float:
        return float(self.params["mu"])

    def on_round_start(
        self, ctx: SiteContext, model: nn.Module, broadcast: StateDict, site_state: StateDict
    ) -> None:
        """Remember w_g: the model has just been loaded with the global weights."""
        self._anchors[ctx.site] = {
            name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad
        }

    def after_backward(self, model: nn.Module, ctx: SiteContext) -> None:
        """grad ← grad + μ (w − w_g), the gradient of (μ/2)‖w − w_g‖²."""
        if self.mu == 0.0:
            return
        anchor = self._anchors[ctx.site]
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name not in anchor:
                    continue
                pull = (p - anchor[name]) * self.mu
                if p.grad is None:
                    p.grad = pull
                else:
                    p.grad.add_(pull)

    def client_extras(
        self, ctx: SiteContext, start_state: StateDict, model: nn.Module, steps: int,
        site_state: StateDict,
    ) -> StateDict:
        self._anchors.pop(ctx.site, None)  # the round is over; free the copy of w_g
        return {}
