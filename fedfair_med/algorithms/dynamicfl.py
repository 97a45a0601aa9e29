r"""DynamicFL-style resource-adaptive training by structural re-parameterisation.

DynamicFL: Zhang et al., "Towards fairness-aware and privacy-preserving enhanced collaborative
learning for healthcare", Nature Communications, 2025 — well-equipped sites train a larger
network than they upload. The branch mechanism is RepVGG's structural re-parameterisation (Ding
et al., "RepVGG: Making VGG-style ConvNets Great Again", CVPR 2021).

A site with capacity ``c`` trains, during its local round, a copy of the global model in which
every convolution carries ``c`` extra parallel branches (conv + norm, γ initialised to 0, so the
expanded model starts as the base model exactly). Before uploading, each branch's norm is folded
into its kernel and the kernels are summed into the main convolution:

.. math::

    W' = W + \sum_i \frac{\gamma_i}{\sqrt{\sigma_i^2 + \varepsilon}} K_i, \qquad
    b' = b + \sum_i \Big(\beta_i - \frac{\gamma_i \mu_i}{\sqrt{\sigma_i^2 + \varepsilon}}\Big)

so the upload (and the next download) has exactly the base architecture and size, and the merged
model computes exactly what the expanded model computed in eval mode. Sites with c = 0 train the
plain model, i.e. run FedAvg unchanged. See :mod:`fedfair_med.models.reparam` for how bias-free
convolutions stay lossless.
"""

from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from fedfair_med.algorithms.base import Algorithm
from fedfair_med.algorithms.params import check_choice, check_number
from fedfair_med.contracts import SiteContext
from fedfair_med.models.reparam import KERNEL_CHOICES, expand_convolutions, merge_convolutions


class DynamicFL(Algorithm):
    """FedAvg where rich sites add re-parameterisable capacity during local training only.

    Parameters: ``capacity`` — site name → number of extra branches per convolution (unlisted
    sites: 0; an int applies to every site); ``kernel`` — branch kernel, ``"same"`` as the main
    kernel or ``"1x1"`` (zero-padded to the main kernel's size when merged).
    """

    name = "dynamicfl"

    @classmethod
    def param_defaults(cls) -> dict[str, Any]:
        return {"capacity": {}, "kernel": "same"}

    def validate_params(self) -> None:
        capacity = self.params["capacity"]
        if isinstance(capacity, Mapping):
            items = list(capacity.items())
        elif isinstance(capacity, int) and not isinstance(capacity, bool):
            items = [("every site", capacity)]
        else:
            raise ValueError(
                f"capacity must map site names to branch counts (or be one int), got {capacity!r}"
            )
        for site, c in items:
            check_number(self.name, f"capacity for {site!r}", c, low=0, integer=True)
        check_choice(self.name, "kernel", self.params["kernel"], KERNEL_CHOICES)

    def site_capacity(self, site: str) -> int:
        capacity = self.params["capacity"]
        if isinstance(capacity, int):
            return capacity
        return int(capacity.get(site, 0))

    def prepare_model(self, model: nn.Module, ctx: SiteContext) -> nn.Module:
        branches = self.site_capacity(ctx.site)
        if branches == 0:
            return model  # the plain model: this site's update is FedAvg's
        return expand_convolutions(model, branches, self.params["kernel"])

    def finish_model(self, model: nn.Module, ctx: SiteContext) -> nn.Module:
        if self.site_capacity(ctx.site) == 0:
            return model
        return merge_convolutions(model)
