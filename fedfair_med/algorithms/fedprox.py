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

#: ctx.state.round key: the round's global weights w_g, per trainable parameter
ANCHOR = "fedprox.anchor"


class FedProx(Algorithm):
    name = "fedprox"

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
        """Remember w_g (for this site's round): the model has just been loaded with it."""
        ctx.state.round[ANCHOR] = {
            name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad
        }

    def after_backward(self, model: nn.Module, ctx: SiteContext) -> None:
        """grad ← grad + μ (w − w_g), the gradient of (μ/2)‖w − w_g‖²."""
        if self.mu == 0.0:
            return
        anchor = ctx.state.round[ANCHOR]
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name not in anchor:
                    continue
                pull = (p - anchor[name]) * self.mu
                if p.grad is None:
                    p.grad = pull
                else:
                    p.grad.add_(pull)
