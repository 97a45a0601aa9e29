"""Per-group discrimination and calibration (AUC, ECE), thresholded gaps, and the EA closed form.

Checked against scikit-learn and fairlearn (where a definition coincides) and against hand
computations, so a DP/EO gap can never be read without the model quality beside it.
"""

from __future__ import annotations

import numpy as np
import pytest

from fedfair_med.fairness import (
    demographic_parity_gap,
    equal_opportunity_gap,
    expected_calibration_error,
    group_calibration_error,
    group_roc_auc,
    roc_auc,
    within_group_roc_auc,
)
from fedfair_med.fairness.site_summaries import combine_summaries, site_summary

sk_metrics = pytest.importorskip("sklearn.metrics")
fairlearn_metrics = pytest.importorskip("fairlearn.metrics")


def _sample(seed: int, n: int = 300):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    # Rounded scores so ties occur; informative but imperfect.
    score = np.clip(np.round(0.5 * y + rng.uniform(0, 0.6, n), 2), 0, 1)
    group = rng.choice(["<60", ">=60", "m"], n)
    return y, score, group


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_roc_auc_matches_sklearn_with_ties(seed):
    y, score, _ = _sample(seed)
    assert roc_auc(y, score) == pytest.approx(sk_metrics.roc_auc_score(y, score), abs=1e-12)


def test_roc_auc_hand_example_and_undefined_for_one_class():
    # positives 0.8, 0.4; negatives 0.4, 0.1 → pairs: (0.8>0.4) (0.8>0.1) (0.4=0.4 → ½) (0.4>0.1)
    assert roc_auc([1, 1, 0, 0], [0.8, 0.4, 0.4, 0.1]) == pytest.approx(3.5 / 4)
    assert np.isnan(roc_auc([1, 1, 1], [0.2, 0.5, 0.9]))


@pytest.mark.parametrize("seed", [0, 1])
def test_group_roc_auc_matches_fairlearn_metricframe(seed):
    y, score, group = _sample(seed)
    frame = fairlearn_metrics.MetricFrame(metrics=sk_metrics.roc_auc_score, y_true=y, y_pred=score,
                                          sensitive_features=group)
    ours = group_roc_auc(y, score, sensitive_features=group)
    assert list(ours) == sorted(frame.by_group.index)
    for key, value in frame.by_group.items():
        assert ours[key] == pytest.approx(value, abs=1e-12)


def test_within_group_auc_ignores_a_gap_between_groups_and_weights_by_pairs():
    # Site a scores everything high, site b low: pooled AUC rewards telling a from b.
    y = np.array([1, 1, 0, 1, 0, 0])
    score = np.array([0.9, 0.8, 0.85, 0.2, 0.1, 0.3])
    site = np.array(["a", "a", "a", "b", "b", "b"])
    # a: positives 0.9, 0.8 vs negative 0.85 -> 1 of 2 pairs; b: 0.2 vs 0.1, 0.3 -> 1 of 2.
    assert within_group_roc_auc(y, score, sensitive_features=site) == pytest.approx(0.5)
    assert roc_auc(y, score) == pytest.approx(6 / 9)  # the cross-site pairs: 4 of 5 won
    # (1 pos x 3 neg) at one site, (3 pos x 1 neg) at another, one-class site adds no pairs.
    y2 = np.array([1, 0, 0, 0, 1, 1, 1, 0, 1, 1])
    s2 = np.array([0.9, 0.1, 0.2, 0.3, 0.5, 0.6, 0.1, 0.4, 0.7, 0.8])
    g2 = np.array(["p"] * 4 + ["q"] * 4 + ["r"] * 2)
    # p: AUC 1 over 3 pairs; q: positives 0.5, 0.6, 0.1 vs 0.4 -> 2 of 3; r: no pairs.
    assert within_group_roc_auc(y2, s2, sensitive_features=g2) == pytest.approx((3 * 1 + 3 * 2 / 3) / 6)
    assert np.isnan(within_group_roc_auc(y2[8:], s2[8:], sensitive_features=g2[8:]))
    # Missing group labels belong to no group.
    assert within_group_roc_auc(y2, s2, sensitive_features=np.where(g2 == "q", "", g2)) == pytest.approx(1.0)


@pytest.mark.parametrize("seed", [0, 1])
def test_within_group_auc_is_the_auc_over_same_group_pairs(seed):
    y, score, group = _sample(seed, 120)
    won = pairs = 0.0
    for i in np.flatnonzero(y == 1):
        for j in np.flatnonzero(y == 0):
            if group[i] == group[j]:
                pairs += 1
                won += 1.0 if score[i] > score[j] else 0.5 if score[i] == score[j] else 0.0
    assert within_group_roc_auc(y, score, sensitive_features=group) == pytest.approx(won / pairs)


def test_expected_calibration_error_hand_example():
    # 10 bins. Bin 1 ([0, 0.1]): p = 0.05, 0.05, y = 0, 1 → |0.5 − 0.05| = 0.45, weight 2/5.
    # Bin 10 ((0.9, 1]): p = 0.92, 1.0, 0.95, y = 1, 1, 0 → |2/3 − 0.9566…|, weight 3/5.
    y = [0, 1, 1, 1, 0]
    p = [0.05, 0.05, 0.92, 1.0, 0.95]
    expected = 2 / 5 * 0.45 + 3 / 5 * abs(2 / 3 - (0.92 + 1.0 + 0.95) / 3)
    assert expected_calibration_error(y, p) == pytest.approx(expected)
    # Two bins split at 0.5 hold the same samples here.
    assert expected_calibration_error(y, p, n_bins=2) == pytest.approx(expected)
    # A value on an edge belongs to the lower bin, as in scikit-learn: 0.5 with 0.05 when B = 2.
    assert expected_calibration_error([1, 0], [0.5, 0.05], n_bins=2) == pytest.approx(
        abs(0.5 - 0.275))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_expected_calibration_error_matches_sklearn_calibration_curve(seed):
    y, score, _ = _sample(seed)
    # calibration_curve with uniform bins drops empty bins and returns per-bin means; weight them
    # by each bin's count (its bins: (lo, hi], the first one closed at 0).
    from sklearn.calibration import calibration_curve

    frac_pos, mean_pred = calibration_curve(y, score, n_bins=5, strategy="uniform")
    counts = np.bincount(np.searchsorted(np.linspace(0, 1, 6)[1:-1], score), minlength=5)
    counts = counts[counts > 0]
    expected = float(np.sum(counts / len(y) * np.abs(frac_pos - mean_pred)))
    assert expected_calibration_error(y, score, n_bins=5) == pytest.approx(expected, abs=1e-12)


def test_calibration_error_rejects_non_probabilities_and_is_zero_when_calibrated():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        expected_calibration_error([0, 1], [0.2, 1.3])
    with pytest.raises(ValueError, match="n_bins"):
        expected_calibration_error([0, 1], [0.2, 0.3], n_bins=0)
    # Per bin the positive share equals the mean score: perfectly calibrated.
    y = [1, 0, 0, 0, 1, 1, 1, 0]
    p = [0.25, 0.25, 0.25, 0.25, 0.75, 0.75, 0.75, 0.75]
    assert expected_calibration_error(y, p) == pytest.approx(0.0)


def test_group_calibration_error_equals_ece_on_each_subset_and_skips_missing():
    y, score, group = _sample(4)
    group = group.astype(object)
    group[:7] = ""
    per_group = group_calibration_error(y, score, sensitive_features=group)
    assert "" not in per_group
    for key, value in per_group.items():
        members = group == key
        assert value == pytest.approx(expected_calibration_error(y[members], score[members]))


def test_a_constant_model_has_zero_dp_but_auc_one_half():
    # What the report must not let hide: equal scores for everyone are "fair" and useless.
    y, _, group = _sample(5)
    constant = np.full(len(y), 0.3)
    assert demographic_parity_gap(y, constant, sensitive_features=group) == pytest.approx(0.0, abs=1e-12)
    assert all(v == pytest.approx(0.5) for v in group_roc_auc(y, constant, sensitive_features=group).values())


@pytest.mark.parametrize("seed", [0, 1])
def test_thresholded_gaps_on_decisions_match_fairlearn(seed):
    y, score, group = _sample(seed)
    decision = (score >= 0.5).astype(int)
    dp = fairlearn_metrics.MetricFrame(metrics=fairlearn_metrics.selection_rate, y_true=y,
                                       y_pred=decision, sensitive_features=group)
    eo = fairlearn_metrics.MetricFrame(metrics=fairlearn_metrics.true_positive_rate, y_true=y,
                                       y_pred=decision, sensitive_features=group)
    assert demographic_parity_gap(y, decision, sensitive_features=group) == pytest.approx(
        dp.difference(method="to_overall"), abs=1e-12)
    assert equal_opportunity_gap(y, decision, sensitive_features=group) == pytest.approx(
        eo.difference(method="to_overall"), abs=1e-12)


def test_round_ea_of_two_unequal_sites_is_larger_site_share_times_difference():
    """metrics.jsonl's EA (from site summaries) uses the sample-weighted pooled mean.

    Site a: 6 images of Dice 0.8; site b: 2 images of Dice 0.4. Pooled D = (4.8 + 0.8)/8 = 0.7,
    so EA = max(0.1, 0.3) = 0.3 = max(6, 2)/8 × 0.4 — not half the difference (0.2).
    """
    import pandas as pd

    def site(n, dice):
        return site_summary(pd.DataFrame({"metric": [dice] * n, "score": [0.0] * n,
                                          "y_true": [0] * n}), [])

    combined = combine_summaries({"a": site(6, 0.8), "b": site(2, 0.4)}, classification=False)
    assert combined["metric"] == pytest.approx(0.7)
    assert combined["gaps"]["ea"] == pytest.approx(max(6, 2) / 8 * abs(0.8 - 0.4))
    assert combined["gaps"]["ea"] != pytest.approx(abs(0.8 - 0.4) / 2)
