"""One group-vs-pooled gap: the formula by hand, and the three places that use it (per-sample
metrics, the round metrics from the sites' summed tables, FairFed's Δ_k under equal accuracy)
give the same number for the same samples."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from fedfair_med.algorithms.fairfed import FairFed
from fedfair_med.fairness.gap import group_deviations, max_gap
from fedfair_med.fairness.metrics import equal_accuracy_gap
from fedfair_med.fairness.site_summaries import combine_summaries, site_summary


def test_two_groups_gap_is_the_larger_share_times_the_difference() -> None:
    # a: 3 samples of mean 0.9, b: 1 sample of mean 0.1; pooled (2.7 + 0.1) / 4 = 0.7
    deviations, pooled = group_deviations([2.7, 0.1], [3, 1])
    assert pooled == pytest.approx(0.7)
    assert deviations == pytest.approx([0.2, 0.6])
    assert max_gap([2.7, 0.1], [3, 1]) == pytest.approx(3 / 4 * (0.9 - 0.1))
    # the mean of the group means (0.5) would give 0.4: the pool weights samples, not groups
    assert max_gap([2.7, 0.1], [3, 1]) != pytest.approx(0.4)


def test_empty_groups_have_no_distance_and_no_groups_no_gap() -> None:
    deviations, _ = group_deviations([1.0, 0.0, 3.0], [2, 0, 4])
    assert math.isnan(deviations[1]) and deviations[0] == pytest.approx(1 / 6)
    assert max_gap([1.0, 0.0, 3.0], [2, 0, 4]) == pytest.approx(1 / 6)  # 0.5 and 0.75 vs 4/6
    assert math.isnan(max_gap([0.0], [0])) and math.isnan(max_gap([], []))
    assert max_gap([1.0, 2.0], [1, 1], pooled=0.0) == 2.0  # a caller's own pooled mean wins


def test_metrics_site_summaries_and_fairfed_agree_on_the_equal_accuracy_gap() -> None:
    rng = np.random.default_rng(3)
    sizes = {"site-a": 40, "site-b": 7, "site-c": 19}
    rows = [{"site": s, "metric": float(rng.random() * (0.5 + 0.2 * k)), "score": 0.5, "y_true": 1}
            for k, (s, n) in enumerate(sizes.items()) for _ in range(n)]
    frame = pd.DataFrame(rows)
    by_samples = equal_accuracy_gap(frame["metric"], sensitive_features=frame["site"])

    summaries = {s: site_summary(frame[frame["site"] == s], ["site"]) for s in sizes}
    by_tables = combine_summaries(summaries, classification=False)["gaps"]["ea"]

    statistics = {}
    for k, s in enumerate(sorted(sizes)):  # groups are sites: one non-zero group per site
        part = frame[frame["site"] == s]["metric"]
        sums, counts = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
        sums[k], counts[k] = float(part.sum()), float(len(part))
        statistics[s] = {"group_sums": sums, "group_counts": counts,
                         "loss_sum": torch.tensor(0.0, dtype=torch.float64),
                         "num_samples": torch.tensor(float(len(part)), dtype=torch.float64)}
    deltas, _ = FairFed(criterion="ea").fairness_deltas(statistics)

    assert by_samples > 0.05  # the sites do differ
    assert by_tables == pytest.approx(by_samples, abs=1e-12)
    assert float(deltas.max()) == pytest.approx(by_samples, abs=1e-12)
