r"""Fair Mixup — Chuang & Mroueh, "Fair Mixup: Fairness via Interpolation", ICLR 2021,
run federated: each site mixes only its own images.

Fair Mixup regularises the *path* between two groups rather than only its end points. For groups
a and b of a sensitive attribute, paired samples (x_a, x_b) and t ~ U(0, 1),

.. math::

    x_t = t\,x_a + (1 - t)\,x_b, \qquad
    M(t) = \frac{1}{P}\sum_{p=1}^{P} r\big(f(x_t^{(p)}), y_t^{(p)}\big), \qquad
    \text{penalty} = \lambda_{mix}\,\Big|\frac{dM}{dt}\Big|

whose expectation over t bounds |M(1) − M(0)|, the group gap, while being smooth along the path.
``r`` is the criterion's per-sample risk (``Objective.sample_risk``): for demographic parity it is
P(y=1|x) and ignores labels, giving the paper's DP penalty; for equal opportunity the same, and
only y = 1 samples (``Objective.risk_mask``) are paired, giving the paper's EO penalty; for
equal accuracy it is the task loss on mixed labels y_t = t y_a + (1 − t) y_b. Floating-point
labels (segmentation masks) are mixed directly; integer class labels are mixed as
t·r(f(x_t), y_a) + (1 − t)·r(f(x_t), y_b), which for cross-entropy is exactly the loss against the
mixed one-hot label.

The two groups are the two most frequent values of ``attribute`` among the batch's eligible
samples (ties broken by value); samples are paired in batch order and the larger group is
truncated. Fewer than two groups gives a zero penalty. t is drawn from a generator seeded by
(round, site index, step), so runs repeat exactly. The mixed forward pass runs in the model's
current (training) mode, as in the paper's reference training loop.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from fedfair_med.algorithms.base import Algorithm
from fedfair_med.algorithms.params import check_number
from fedfair_med.contracts import MISSING, SiteContext, StateDict


#: ctx.state.round key: batches seen at the site this round
STEP = "fairmixup.step"


def attribute_strings(batch: Mapping[str, Any], attribute: str) -> list[str]:
    """The batch's values of ``attribute`` as strings (collated lists or tensors)."""
    if attribute not in batch:
        raise ValueError(f"fairmixup: the batch has no attribute {attribute!r}; "
                         f"available keys: {sorted(batch)}")
    values = batch[attribute]
    if isinstance(values, torch.Tensor):
        values = values.reshape(-1).tolist()
    return [str(v) for v in values]


def pair_two_groups(
    values: list[str], eligible: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Indices (a, b) pairing the two most frequent non-missing values; None if < 2 groups."""
    keep = [i for i, v in enumerate(values)
            if v != MISSING and (eligible is None or bool(eligible[i]))]
    counts = Counter(values[i] for i in keep)
    if len(counts) < 2:
        return None
    (first, _), (second, _) = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:2]
    idx_a = [i for i in keep if values[i] == first]
    idx_b = [i for i in keep if values[i] == second]
    size = min(len(idx_a), len(idx_b))
    return torch.tensor(idx_a[:size]), torch.tensor(idx_b[:size])


def mixing_generator(round_index: int, site_index: int, step: int) -> torch.Generator:
    """A CPU generator seeded from (round, site, step): the same t in every runtime."""
    seed = int(np.random.SeedSequence([round_index, site_index, step]).generate_state(1, np.uint64)[0])
    generator = torch.Generator()
    generator.manual_seed(seed & 0x7FFF_FFFF_FFFF_FFFF)
    return generator


def _take(batch: Mapping[str, Any], index: torch.Tensor) -> dict[str, Any]:
    """The batch restricted to ``index`` (tensors indexed, lists picked)."""
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == len(batch["image"]):
            out[key] = value[index.to(value.device)]
        elif isinstance(value, (list, tuple)) and len(value) == len(batch["image"]):
            out[key] = [value[int(i)] for i in index]
        else:
            out[key] = value
    return out


class FairMixup(Algorithm):
    """FedAvg plus the Fair Mixup path penalty on each site's own batches (see module docstring).

    Parameters: ``weight`` (λ_mix ≥ 0) and ``attribute`` (the sensitive attribute whose groups are
    mixed, e.g. ``sex``).
    """

    name = "fairmixup"

    @classmethod
    def param_defaults(cls) -> dict[str, Any]:
        return {"weight": 0.1, "attribute": "sex"}

    def validate_params(self) -> None:
        check_number(self.name, "weight", self.params["weight"], low=0.0)
        attribute = self.params["attribute"]
        if not isinstance(attribute, str) or not attribute or attribute == "site":
            raise ValueError(
                f"attribute must name a sensitive attribute (e.g. 'sex'), got {attribute!r}; "
                "mixing is within one site, so 'site' has only one group"
            )

    def on_round_start(
        self, ctx: SiteContext, model: nn.Module, broadcast: StateDict, site_state: StateDict
    ) -> None:
        ctx.state.round[STEP] = 0

    def _next_step(self, ctx: SiteContext) -> int:
        """This round's batch count at the site (it seeds t), then one more."""
        step = ctx.state.round.get(STEP, 0)
        ctx.state.round[STEP] = step + 1
        return step

    def mix(
        self, batch: Mapping[str, Any], ctx: SiteContext, step: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(x_t, t, idx_a, idx_b) for one batch of one site, or None when < 2 groups are present."""
        sites = batch.get("site")
        if isinstance(sites, (list, tuple)) and any(str(s) != ctx.site for s in sites):
            raise ValueError(f"fairmixup: site {ctx.site!r} got a batch holding another site's samples")
        eligible = ctx.objective.risk_mask(batch).reshape(-1).cpu()
        pairs = pair_two_groups(attribute_strings(batch, self.params["attribute"]), eligible)
        if pairs is None:
            return None
        idx_a, idx_b = pairs
        images = batch["image"]
        t = torch.rand((), generator=mixing_generator(ctx.round, ctx.site_index, step))
        t = t.to(device=images.device, dtype=images.dtype).requires_grad_(True)
        idx_a, idx_b = idx_a.to(images.device), idx_b.to(images.device)
        mixed = t * images[idx_a] + (1.0 - t) * images[idx_b]
        return mixed, t, idx_a, idx_b

    def extra_loss(
        self, model: nn.Module, batch: Mapping[str, Any], logits: torch.Tensor, ctx: SiteContext
    ) -> torch.Tensor | None:
        step = self._next_step(ctx)
        if self.params["weight"] == 0:
            return None
        mixed = self.mix(batch, ctx, step)
        if mixed is None:
            return logits.new_zeros(())
        x_t, t, idx_a, idx_b = mixed
        out = model(x_t)
        batch_a, batch_b = _take(batch, idx_a), _take(batch, idx_b)
        if torch.is_floating_point(batch["label"]):
            mixed_batch = dict(batch_a)
            mixed_batch["label"] = t * batch_a["label"] + (1.0 - t) * batch_b["label"]
            path_value = ctx.objective.sample_risk(out, mixed_batch).mean()
        else:
            path_value = (t * ctx.objective.sample_risk(out, batch_a).mean()
                          + (1.0 - t) * ctx.objective.sample_risk(out, batch_b).mean())
        (slope,) = torch.autograd.grad(path_value, t, create_graph=True, allow_unused=True)
        if slope is None:  # the risk does not depend on the input at all: a flat path
            return logits.new_zeros(())
        return float(self.params["weight"]) * slope.abs()
