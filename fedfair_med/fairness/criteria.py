"""Fairness criteria: which groups, and which per-sample risk, a penalty or a gap is about.

* ``ea`` — equal accuracy: groups are sites, risk is the task's per-sample loss (Dice loss for
  segmentation, cross-entropy for classification).
* ``dp`` — demographic parity: groups are the values of a sensitive attribute pooled over sites,
  risk is the positive-class probability P(y=1|x).
* ``eo`` — equal opportunity: as ``dp`` on samples with y = 1 only.
"""

from __future__ import annotations

from dataclasses import dataclass

CRITERIA = ("ea", "dp", "eo")


@dataclass(frozen=True)
class Criterion:
    """A fairness criterion and the attribute that defines its groups (``site`` for EA)."""

    name: str = "ea"
    attribute: str = "site"

    def __post_init__(self) -> None:
        if self.name not in CRITERIA:
            raise ValueError(f"unknown fairness criterion {self.name!r}; use one of {CRITERIA}")
        if self.name == "ea" and self.attribute != "site":
            raise ValueError("equal accuracy (ea) groups by site; set attribute: site")
        if self.name in ("dp", "eo") and self.attribute == "site":
            raise ValueError(
                f"{self.name} needs a sensitive attribute (e.g. sex or age_band), not site"
            )

    @property
    def positive_only(self) -> bool:
        return self.name == "eo"

    @property
    def uses_task_loss(self) -> bool:
        return self.name == "ea"
