"""What a clinical task declares, in one place: network, loss, risk, metric and defaults.

Every task module (``synthetic``, ``polyp``, ``fundus``, ``mri``, ``skin``) exposes one
:class:`Task` subclass with the same members, so runtimes and methods never special-case a task.
Segmentation tasks output one foreground logit per pixel (B, 1, ...); classification tasks output
two class logits (B, 2), class 1 being the positive (e.g. malignant) class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from fedfair_med.contracts import SEGMENTATION, Objective
from fedfair_med.fairness.criteria import Criterion


@dataclass
class TaskDefaults:
    """CPU-sized defaults; every one can be overridden in a run configuration."""

    network: str
    image_size: tuple[int, ...]
    batch_size: int = 8
    lr: float = 1e-3
    optimizer: str = "adam"
    momentum: float = 0.0
    epochs: int = 1
    rounds: int = 10
    network_kwargs: dict[str, Any] = field(default_factory=dict)


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-image soft Dice loss 1 − (2Σpy + ε)/(Σp + Σy + ε) on sigmoid probabilities, shape (B,)."""
    prob = torch.sigmoid(logits).flatten(1)
    target = target.flatten(1).to(prob.dtype)
    inter = (prob * target).sum(1)
    return 1.0 - (2.0 * inter + eps) / (prob.sum(1) + target.sum(1) + eps)


def hard_dice(logits: torch.Tensor, target: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Per-image Dice of the thresholded prediction, shape (B,); 1 when both masks are empty."""
    pred = (torch.sigmoid(logits) > threshold).flatten(1).to(torch.float64)
    target = (target.flatten(1) > 0.5).to(torch.float64)
    inter = (pred * target).sum(1)
    denom = pred.sum(1) + target.sum(1)
    return torch.where(denom > 0, 2.0 * inter / denom.clamp_min(1e-12), torch.ones_like(denom))


def keyword_names(*functions: Any) -> set[str]:
    """Named keyword parameters of ``functions`` (not ``self``, ``seed`` or ``**options``)."""
    import inspect

    names = set()
    for function in functions:
        for parameter in inspect.signature(function).parameters.values():
            if parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY):
                names.add(parameter.name)
    return names - {"self", "seed"}


def _all_finite(value: Any) -> bool:
    """No inf/nan anywhere in a (nested) option value (YAML's .inf/.nan would fail much later)."""
    import math

    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(_all_finite(v) for v in value)
    if isinstance(value, dict):
        return all(_all_finite(v) for v in value.values())
    return True


class Task:
    """Base class; subclasses set ``name``, ``kind``, ``defaults`` and implement data loading."""

    name = "task"
    kind = SEGMENTATION
    defaults: TaskDefaults
    in_channels = 3

    @property
    def primary_metric(self) -> str:
        return "dice" if self.kind == SEGMENTATION else "accuracy"

    # ---- data options ----------------------------------------------------------------------
    def data_options(self) -> set[str]:
        """Names ``config.data`` may hold: the keyword parameters of data loading and of every
        ``configure`` in the class hierarchy (read from their signatures, so they cannot drift)."""
        functions = [self.load_federation,
                     *(vars(cls)["configure"] for cls in type(self).__mro__ if "configure" in vars(cls))]
        return keyword_names(*functions)

    def data_problems(self, data: Mapping[str, Any]) -> list[str]:
        """What is wrong with ``config.data`` for this task, found without loading any data."""
        unknown = sorted(set(data) - self.data_options())
        if unknown:
            return [f"unknown option(s) {unknown} for task {self.name!r}; "
                    f"known: {sorted(self.data_options())}"]
        return [f"{key}: must be finite numbers, got {value!r}" for key, value in data.items()
                if not _all_finite(value)]

    # ---- model ---------------------------------------------------------------------------
    def apply_model_options(self, data: Mapping[str, Any]) -> None:
        """Take the data options that change the network's shape (the aggregator loads no data)."""

    def build_model(self, network: str | None = None, **kwargs: Any) -> nn.Module:
        from fedfair_med.models import build_network

        out = 1 if self.kind == SEGMENTATION else 2
        name = network or self.defaults.network
        merged = {**self.defaults.network_kwargs, **kwargs} if name == self.defaults.network else kwargs
        return build_network(
            name, in_channels=self.in_channels, out_channels=out,
            spatial_dims=len(self.defaults.image_size), **merged,
        )

    # ---- losses and risks ------------------------------------------------------------------
    def sample_loss(self, logits: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
        """Per-sample loss (B,): soft Dice loss, or cross-entropy."""
        if self.kind == SEGMENTATION:
            return soft_dice_loss(logits, batch["label"])
        return F.cross_entropy(logits, batch["label"].long(), reduction="none")

    def task_loss(self, logits: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
        """Mean training loss: Dice + BCE for segmentation, CE for classification."""
        if self.kind == SEGMENTATION:
            bce = F.binary_cross_entropy_with_logits(logits, batch["label"].to(logits.dtype))
            return soft_dice_loss(logits, batch["label"]).mean() + bce
        return self.sample_loss(logits, batch).mean()

    def positive_probability(self, logits: torch.Tensor) -> torch.Tensor:
        """P(y=1|x) per sample (B,): softmax of class 1, or mean foreground probability."""
        if self.kind == SEGMENTATION:
            return torch.sigmoid(logits).flatten(1).mean(1)
        return torch.softmax(logits, dim=1)[:, 1]

    def site_logits(self, site: str | None, logits: torch.Tensor) -> torch.Tensor:
        """The logits ``site`` acts on: the model's own, unless a task corrects them per site
        (skin's ``prevalence_correction``). Predictions and the score-based fairness risks
        (DP, EO) use them, so a penalty acts on the scores the audit measures; the task loss
        never does."""
        return logits

    def sample_metric(self, logits: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
        """Per-sample primary metric (B,): hard Dice, or 1.0 for a correct prediction."""
        if self.kind == SEGMENTATION:
            return hard_dice(logits, batch["label"])
        return (logits.argmax(1) == batch["label"].long()).to(torch.float64)

    def objective(self, criterion: Criterion, site: str | None = None) -> Objective:
        """The local objective pieces for a fairness criterion (see :class:`Objective`), as
        ``site`` trains them (:meth:`site_task_loss`)."""
        if criterion.uses_task_loss:
            risk = self.sample_loss
        else:
            def risk(logits: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
                return self.positive_probability(self.site_logits(site, logits))

        if criterion.positive_only:
            def mask(batch: Mapping[str, Any]) -> torch.Tensor:
                return self.positive_label(batch)
        else:
            def mask(batch: Mapping[str, Any]) -> torch.Tensor:
                return torch.ones(len(batch["group"]), dtype=torch.bool, device=batch["group"].device)

        return Objective(task_loss=self.site_task_loss(site), sample_risk=risk, risk_mask=mask)

    def site_task_loss(self, site: str | None) -> Callable[[torch.Tensor, Mapping[str, Any]], torch.Tensor]:
        """The task loss one site trains with; the same everywhere unless a task derives it from
        the site's own data (skin's ``class_weights: balanced``), which keeps both runtimes equal:
        an OpenFL collaborator only ever sees its own data."""
        return self.task_loss

    def positive_label(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """y = 1 per sample: the class label, or 'the mask has foreground' for segmentation."""
        label = batch["label"]
        if self.kind == SEGMENTATION:
            return label.flatten(1).amax(1) > 0.5
        return label.long() == 1
