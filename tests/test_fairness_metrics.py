"""Fairness gaps (EA, DP, EO), per-group tables and bootstrap CIs.

Values are checked against hand computations, against fairlearn where the definitions coincide,
and against properties every max-deviation-from-pooled-mean gap must have.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedfair_med.fairness import (
    age_bands,
    bootstrap_ci,
    demographic_parity_gap,
    equal_accuracy_gap,
    equal_opportunity_gap,
    group_means,
    group_table,
    intersect,
)

fairlearn_metrics = pytest.importorskip("fairlearn.metrics")


# ---- hand-computed example ---------------------------------------------------------------------
# Six samples at two sites; site-a has mean Dice 0.8, site-b 0.5 and the pooled mean is
# (0.9 + 0.7 + 0.8 + 0.5 + 0.4 + 0.6) / 6 = 3.9 / 6 = 0.65, so EA = max(0.15, 0.15) = 0.15.
DICE = [0.9, 0.7, 0.8, 0.5, 0.4, 0.6]
SITES = ["site-a", "site-a", "site-a", "site-b", "site-b", "site-b"]


def test_equal_accuracy_gap_hand_example():
    assert equal_accuracy_gap(DICE, sensitive_features=SITES) == pytest.approx(0.15)


def test_equal_accuracy_gap_uses_pooled_mean_not_mean_of_groups():
    # Unequal sizes: group a = [1, 1, 1] (mean 1), b = [0] (mean 0). Pooled mean 0.75, so the
    # gap is |0 - 0.75| = 0.75, whereas a mean of group means (0.5) would give 0.5.
    assert equal_accuracy_gap([1, 1, 1, 0], sensitive_features=["a", "a", "a", "b"]) == pytest.approx(0.75)


def test_demographic_parity_gap_hand_example_score_and_threshold():
    scores = [0.9, 0.6, 0.2, 0.4, 0.1, 0.3]
    sex = ["f", "f", "f", "m", "m", "m"]
    # Score form: E[s|f] = 1.7/3, E[s|m] = 0.8/3, pooled 2.5/6 → gap = |1.7/3 - 2.5/6| = 0.15.
    assert demographic_parity_gap(None, scores, sensitive_features=sex) == pytest.approx(0.15)
    # Thresholded at 0.5: f selects 2/3, m 0/3, pooled 2/6 → gap 1/3.
    assert demographic_parity_gap(None, scores, sensitive_features=sex, threshold=0.5) == pytest.approx(1 / 3)


def test_equal_opportunity_gap_only_counts_positives():
    y_true = [1, 1, 0, 1, 0, 1]
    scores = [0.8, 0.6, 0.99, 0.2, 0.99, 0.4]
    sex = ["f", "f", "f", "m", "m", "m"]
    # Positives: f → [0.8, 0.6] mean 0.7; m → [0.2, 0.4] mean 0.3; pooled 0.5 → gap 0.2.
    # The 0.99 negatives must not move it.
    assert equal_opportunity_gap(y_true, scores, sensitive_features=sex) == pytest.approx(0.2)
    # TPR at 0.5: f 2/2, m 0/2, pooled 2/4 → 0.5.
    assert equal_opportunity_gap(y_true, scores, sensitive_features=sex, threshold=0.5) == pytest.approx(0.5)


def test_missing_sensitive_values_are_excluded_from_groups_and_pooled_mean():
    values = [1.0, 0.0, 0.5, 100.0, 100.0, 100.0]
    groups = ["a", "b", "b", "", None, float("nan")]
    assert group_means(values, sensitive_features=groups) == {"a": (1, 1.0), "b": (2, 0.25)}
    # Pooled over the three known samples: 0.5 → gaps 0.5 and 0.25.
    assert equal_accuracy_gap(values, sensitive_features=groups) == pytest.approx(0.5)
    assert demographic_parity_gap(values, values, sensitive_features=pd.Series(groups)) == pytest.approx(0.5)


def test_accepts_lists_numpy_pandas_and_torch():
    expected = equal_accuracy_gap(DICE, sensitive_features=SITES)
    for metric in (np.array(DICE), pd.Series(DICE), torch.tensor(DICE), torch.tensor(DICE)[:, None]):
        for sites in (np.array(SITES), pd.Series(SITES), SITES):
            assert equal_accuracy_gap(metric, sensitive_features=sites) == pytest.approx(expected)
    codes = torch.tensor([0, 0, 0, 1, 1, 1])
    assert equal_accuracy_gap(DICE, sensitive_features=codes) == pytest.approx(expected)
    assert set(group_means(DICE, sensitive_features=codes)) == {0, 1}


@pytest.mark.parametrize(
    "call",
    [
        lambda: equal_accuracy_gap([0.1, 0.2], sensitive_features=["a"]),
        lambda: demographic_parity_gap([1, 0, 1], [0.1, 0.2], sensitive_features=["a", "b"]),
        lambda: equal_opportunity_gap([1, 0], [0.1, 0.2], sensitive_features=["a", "b", "c"]),
        lambda: group_means([1.0], sensitive_features=["a", "b"]),
    ],
)
def test_length_mismatch_raises_value_error(call):
    with pytest.raises(ValueError, match="length mismatch"):
        call()


def test_empty_and_degenerate_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="empty"):
        equal_accuracy_gap([], sensitive_features=[])
    with pytest.raises(ValueError, match="empty"):
        demographic_parity_gap([], [], sensitive_features=[])
    with pytest.raises(ValueError, match="missing sensitive feature"):
        equal_accuracy_gap([0.5, 0.6], sensitive_features=["", None])
    with pytest.raises(ValueError, match="y_true == 1"):
        equal_opportunity_gap([0, 0], [0.5, 0.6], sensitive_features=["a", "b"])
    with pytest.raises(ValueError, match="NaN"):
        equal_accuracy_gap([0.5, float("nan")], sensitive_features=["a", "b"])


# ---- agreement with fairlearn ------------------------------------------------------------------
def _random_classification(seed: int, n: int = 200):
    rng = np.random.default_rng(seed)
    groups = rng.choice(["a", "b", "c"], size=n, p=[0.5, 0.3, 0.2])
    y_true = rng.integers(0, 2, size=n)
    scores = np.clip(rng.normal(0.4 + 0.2 * y_true + 0.1 * (groups == "c"), 0.2), 0, 1)
    return y_true, scores, groups


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_thresholded_dp_matches_fairlearn_selection_rate(seed):
    y_true, scores, groups = _random_classification(seed)
    y_hat = (scores >= 0.5).astype(int)
    frame = fairlearn_metrics.MetricFrame(
        metrics=fairlearn_metrics.selection_rate, y_true=y_true, y_pred=y_hat,
        sensitive_features=groups,
    )
    ours = demographic_parity_gap(y_true, scores, sensitive_features=groups, threshold=0.5)
    assert ours == pytest.approx(frame.difference(method="to_overall"), abs=1e-12)
    assert ours > 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ea_and_score_dp_match_fairlearn_mean_metric(seed):
    y_true, scores, groups = _random_classification(seed)

    def mean_of_predictions(y_true, y_pred):
        return float(np.mean(y_pred))

    frame = fairlearn_metrics.MetricFrame(
        metrics=mean_of_predictions, y_true=y_true, y_pred=scores, sensitive_features=groups,
    )
    expected = frame.difference(method="to_overall")
    assert equal_accuracy_gap(scores, sensitive_features=groups) == pytest.approx(expected, abs=1e-12)
    assert demographic_parity_gap(y_true, scores, sensitive_features=groups) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_thresholded_eo_matches_fairlearn_true_positive_rate(seed):
    y_true, scores, groups = _random_classification(seed)
    frame = fairlearn_metrics.MetricFrame(
        metrics=fairlearn_metrics.true_positive_rate, y_true=y_true,
        y_pred=(scores >= 0.5).astype(int), sensitive_features=groups,
    )
    ours = equal_opportunity_gap(y_true, scores, sensitive_features=groups, threshold=0.5)
    assert ours == pytest.approx(frame.difference(method="to_overall"), abs=1e-12)


# ---- properties --------------------------------------------------------------------------------
values_strategy = st.lists(st.floats(0, 1, allow_nan=False), min_size=1, max_size=30)


@settings(max_examples=60, deadline=None)
@given(values=values_strategy, n_groups=st.integers(1, 4))
def test_gap_is_zero_when_every_group_holds_the_same_values(values, n_groups):
    metric = values * n_groups
    groups = [g for g in range(n_groups) for _ in values]
    assert equal_accuracy_gap(metric, sensitive_features=groups) == pytest.approx(0.0, abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(
    data=st.lists(st.tuples(st.floats(0, 1, allow_nan=False), st.sampled_from("abc")),
                  min_size=1, max_size=40),
    seed=st.integers(0, 2**16),
)
def test_gap_is_permutation_invariant_and_bounded(data, seed):
    values = np.array([v for v, _ in data])
    groups = np.array([g for _, g in data])
    gap = equal_accuracy_gap(values, sensitive_features=groups)
    order = np.random.default_rng(seed).permutation(len(values))
    assert equal_accuracy_gap(values[order], sensitive_features=groups[order]) == pytest.approx(gap, abs=1e-12)
    # A group mean and the pooled mean both lie in [min, max], so the gap cannot exceed the range.
    assert 0.0 <= gap <= values.max() - values.min() + 1e-12


@settings(max_examples=40, deadline=None)
@given(data=st.lists(st.tuples(st.floats(0, 1, allow_nan=False), st.sampled_from("ab")),
                     min_size=2, max_size=40))
def test_two_group_gap_matches_closed_form(data):
    # With two groups, |m_a - m| = n_b/n |m_a - m_b|, so EA = max(n_a, n_b)/n * |m_a - m_b|.
    values = np.array([v for v, _ in data])
    groups = np.array([g for _, g in data])
    gap = equal_accuracy_gap(values, sensitive_features=groups)
    if len(set(groups)) == 1:
        assert gap == pytest.approx(0.0, abs=1e-12)
        return
    a, b = values[groups == "a"], values[groups == "b"]
    expected = max(len(a), len(b)) / len(values) * abs(a.mean() - b.mean())
    assert gap == pytest.approx(expected, abs=1e-9)


# ---- tables --------------------------------------------------------------------------------------
def test_bootstrap_ci_contains_mean_and_narrows_with_n():
    rng = np.random.default_rng(3)
    widths = []
    for n in (20, 200, 2000):
        x = rng.uniform(0, 1, size=n)
        low, high = bootstrap_ci(x, n_boot=500, seed=0)
        assert low <= x.mean() <= high
        widths.append(high - low)
    assert widths[0] > widths[1] > widths[2]
    # Width of a 95% interval of a mean scales like 1/sqrt(n): ~3.9 sd/sqrt(n), sd(U(0,1)) ≈ 0.289.
    assert widths[2] == pytest.approx(3.92 * 0.2887 / math.sqrt(2000), rel=0.2)


def test_bootstrap_ci_is_deterministic_for_a_seed_and_nan_when_tiny():
    x = np.random.default_rng(0).normal(size=50)
    assert bootstrap_ci(x, seed=7) == bootstrap_ci(list(x), seed=7)
    assert bootstrap_ci(x, seed=7) != bootstrap_ci(x, seed=8)
    low, high = bootstrap_ci([0.3], seed=0)
    assert math.isnan(low) and math.isnan(high)
    lo90, hi90 = bootstrap_ci(x, level=0.90, seed=1)
    lo99, hi99 = bootstrap_ci(x, level=0.99, seed=1)
    assert lo99 < lo90 and hi90 < hi99


def test_group_table_rows_match_numpy():
    rng = np.random.default_rng(5)
    values = rng.uniform(size=40)
    groups = np.array(["b"] * 25 + ["a"] * 12 + ["c"] * 2 + [""])
    table = group_table(values, sensitive_features=groups, attribute_name="sex",
                        n_boot=200, seed=1, min_group_size=10)
    assert list(table.columns) == ["attribute", "group", "n", "metric", "ci_low", "ci_high", "small"]
    assert table["group"].tolist() == ["a", "b", "c"]  # sorted, missing left out
    assert table["n"].tolist() == [12, 25, 2]
    assert table["small"].tolist() == [False, False, True]
    assert (table["attribute"] == "sex").all()
    for _, row in table.iterrows():
        member_values = values[groups == row["group"]]
        assert row["metric"] == pytest.approx(member_values.mean())
        assert (row["ci_low"], row["ci_high"]) == bootstrap_ci(member_values, n_boot=200, seed=1)
        assert row["ci_low"] <= row["metric"] <= row["ci_high"]


def test_intersect_and_age_bands():
    sex = ["female", "male", "", "female"]
    band = age_bands([70, 30, 65, None])
    assert band == [">60", "<=60", ">60", ""]
    assert intersect(sex, band) == ["female & >60", "male & <=60", "", ""]
    assert intersect(sex, band, names=["sex", "age_band"])[0] == "sex=female & age_band=>60"
    assert age_bands([30, 50, 70], edges=(40, 60)) == ["<=40", "40-60", ">60"]
    with pytest.raises(ValueError):
        intersect(sex, band[:2])
    with pytest.raises(ValueError):
        age_bands([30], edges=(60, 40))
