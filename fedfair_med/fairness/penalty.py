r"""The FlexFair penalty and the aggregate group statistics that make it federated.

FlexFair (Xing et al., Nature Communications 2025) adds to the task loss a weighted variance of per-group risks:

.. math::

    P(\theta) = \sum_k \big(R_k(\theta) - \bar R(\theta)\big)^2, \qquad
    \bar R = \sum_j w_j R_j, \qquad
    R_k = \frac{1}{N_k} \sum_{i \in k} r_i(\theta)

where group *k* is a site (equal accuracy, r = Dice loss or CE) or a value of a sensitive
attribute pooled over sites (demographic parity, r = P(y=1|x); equal opportunity, the same over
y = 1 samples only).

Why it federates exactly. Differentiating,

.. math::

    \nabla P = \sum_k g_k \nabla R_k, \qquad
    g_k = 2\Big[(R_k - \bar R) - w_k \sum_j (R_j - \bar R)\Big],

so given the *global* R_k (from per-site sums and counts — never per-sample values) every sample
i contributes :math:`g_{k(i)} \nabla r_i / N_{k(i)}`. A site with n_s of the N training samples
that minimises the batch mean of :math:`c_i r_i`, :math:`c_i = N g_{k(i)} / N_{k(i)}`, has an
expected gradient whose FedAvg-weighted (n_s / N) sum over sites is exactly ∇P. The server
therefore broadcasts one coefficient per group, ``c_k``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

WEIGHTINGS = ("uniform", "proportional")


@dataclass(frozen=True)
class GroupStatistics:
    """Per-group risk sums and sample counts (what a site may share)."""

    sums: torch.Tensor  # (K,) float64
    counts: torch.Tensor  # (K,) float64

    @classmethod
    def zeros(cls, num_groups: int) -> "GroupStatistics":
        z = torch.zeros(num_groups, dtype=torch.float64)
        return cls(z.clone(), z.clone())

    def __add__(self, other: "GroupStatistics") -> "GroupStatistics":
        return GroupStatistics(self.sums + other.sums, self.counts + other.counts)

    @property
    def risks(self) -> torch.Tensor:
        """R_k = sum_k / N_k; NaN for a group with no samples."""
        return torch.where(self.counts > 0, self.sums / self.counts.clamp_min(1), torch.nan)


def group_sums(
    risk: torch.Tensor, group: torch.Tensor, num_groups: int, mask: torch.Tensor | None = None
) -> GroupStatistics:
    """Sum and count per-sample ``risk`` by ``group`` (−1 = no group); detached, float64."""
    risk = risk.detach().to(torch.float64).reshape(-1)
    group = group.reshape(-1).to(torch.long)
    keep = group >= 0
    if mask is not None:
        keep = keep & mask.reshape(-1).to(torch.bool)
    sums = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, group[keep], risk[keep])
    counts = torch.zeros(num_groups, dtype=torch.float64).index_add_(
        0, group[keep], torch.ones_like(risk[keep])
    )
    return GroupStatistics(sums, counts)


def group_weights(counts: torch.Tensor, weighting: str = "uniform") -> torch.Tensor:
    """w_j over the groups that have samples: uniform 1/K', or N_j / Σ N (``proportional``)."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown group weighting {weighting!r}; use one of {WEIGHTINGS}")
    present = (counts > 0).to(torch.float64)
    if weighting == "uniform":
        return present / present.sum().clamp_min(1)
    return counts.to(torch.float64) * present / counts.sum().clamp_min(1)


def penalty(risks: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """P = Σ_k (R_k − Σ_j w_j R_j)² over groups with a finite risk (differentiable)."""
    present = torch.isfinite(risks) if not risks.requires_grad else torch.isfinite(risks.detach())
    r = risks[present]
    w = weights.to(r.dtype)[present]
    mean = (w * r).sum()
    return ((r - mean) ** 2).sum()


def penalty_gradient_coefficients(risks: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """g_k = ∂P/∂R_k = 2[(R_k − R̄) − w_k Σ_j (R_j − R̄)]; 0 for empty groups."""
    present = torch.isfinite(risks)
    r = torch.where(present, risks, torch.zeros_like(risks)).to(torch.float64)
    w = torch.where(present, weights.to(torch.float64), torch.zeros_like(r))
    mean = (w * r).sum()
    dev = torch.where(present, r - mean, torch.zeros_like(r))
    return torch.where(present, 2.0 * (dev - w * dev.sum()), torch.zeros_like(r))


def sample_coefficients(
    stats: GroupStatistics, total_samples: float, weighting: str = "uniform"
) -> torch.Tensor:
    """Per-group coefficient c_k = N g_k / N_k that a site multiplies each sample's risk by."""
    g = penalty_gradient_coefficients(stats.risks, group_weights(stats.counts, weighting))
    return torch.where(stats.counts > 0, total_samples * g / stats.counts.clamp_min(1), 0.0)


def surrogate_penalty(
    risk: torch.Tensor, group: torch.Tensor, coefficients: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Batch mean of c_{k(i)} r_i: the site's share of P whose gradient sums to ∇P over sites."""
    group = group.reshape(-1).to(torch.long)
    keep = group >= 0
    if mask is not None:
        keep = keep & mask.reshape(-1).to(torch.bool)
    coef = coefficients.to(risk.dtype)[group.clamp_min(0)] * keep.to(risk.dtype)
    return (coef * risk.reshape(-1)).mean()


def pooled_penalty(
    risk: torch.Tensor,
    group: torch.Tensor,
    num_groups: int,
    mask: torch.Tensor | None = None,
    weighting: str = "uniform",
) -> torch.Tensor:
    """P computed centrally on pooled per-sample risks — the reference the federated form equals."""
    group = group.reshape(-1).to(torch.long)
    keep = group >= 0
    if mask is not None:
        keep = keep & mask.reshape(-1).to(torch.bool)
    r = risk.reshape(-1)[keep]
    g = group[keep]
    counts = torch.zeros(num_groups, dtype=r.dtype).index_add_(0, g, torch.ones_like(r))
    sums = torch.zeros(num_groups, dtype=r.dtype).index_add_(0, g, r)
    risks = torch.where(counts > 0, sums / counts.clamp_min(1), torch.full_like(sums, torch.nan))
    return penalty(risks, group_weights(counts.detach(), weighting))
