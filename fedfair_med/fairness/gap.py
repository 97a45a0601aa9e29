r"""The group-mean-versus-pooled-mean gap, the one fact behind EA, DP and EO — in one place.

For groups k with sums :math:`S_k = \sum_{i \in k} x_i` of a per-sample value x (Dice, 1/0
correctness, the positive-class score) and counts :math:`N_k`:

.. math::

    d_k = \Big|\frac{S_k}{N_k} - \frac{S}{N}\Big|, \qquad S = \sum_k S_k, \quad N = \sum_k N_k,
    \qquad \text{gap} = \max_k d_k .

The pooled mean S / N weights every *sample* equally: it is the mean over exactly the samples that
belong to some group (a sample whose attribute is missing is in no group and not in the pool
either), not the mean of the group means. For two groups a, b:
:math:`S/N - S_a/N_a = (N_b/N)(S_b/N_b - S_a/N_a)`, so the gap is
:math:`\max(N_a, N_b)/N \cdot |m_a - m_b|` — half the difference only for equal sizes.

Used by the per-sample metrics (:mod:`fedfair_med.fairness.metrics`), the round metrics from the
sites' summed tables (:mod:`fedfair_med.fairness.site_summaries`) and FairFed's per-site
distances Δ_k under equal accuracy (:mod:`fedfair_med.algorithms.fairfed`).
"""

from __future__ import annotations

import math
from typing import Iterable


def group_deviations(sums: Iterable[float], counts: Iterable[float],
                     pooled: float | None = None) -> tuple[list[float], float]:
    """``([d_k per group], S / N)``; d_k is NaN for a group without samples (N_k ≤ 0), and
    everything is NaN when no group has any.

    S and N are added in the order given (every runtime passes groups in the same order, so
    the bits agree). ``pooled`` replaces S / N when the caller already holds the pooled mean of
    the very same samples (e.g. straight from the per-sample values).
    """
    sums, counts = [float(s) for s in sums], [float(n) for n in counts]
    if len(sums) != len(counts):
        raise ValueError(f"{len(sums)} group sums for {len(counts)} group counts")
    if pooled is None:
        total_sum = total_count = 0.0
        for s, n in zip(sums, counts):
            total_sum += s
            total_count += n
        pooled = total_sum / total_count if total_count > 0 else math.nan
    deviations = [abs(s / n - pooled) if n > 0 else math.nan for s, n in zip(sums, counts)]
    return deviations, pooled


def max_gap(sums: Iterable[float], counts: Iterable[float], pooled: float | None = None) -> float:
    """max_k d_k over the groups with samples (see the module docstring); NaN when none has."""
    deviations, _ = group_deviations(sums, counts, pooled)
    present = [d for d in deviations if not math.isnan(d)]
    return max(present) if present else math.nan
