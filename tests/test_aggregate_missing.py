"""One definition of a fairness gap when the attribute is missing: the gaps the runtimes write
(fairness/site_summaries.py) equal fairness/metrics.py on the pooled samples —
missing-attribute samples belong to no group and are left out of the pooled mean."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fedfair_med.fairness.site_summaries import combine_summaries, site_summary
from fedfair_med.fairness.metrics import demographic_parity_gap, equal_opportunity_gap


def _predictions(seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    n = 60
    sex = rng.choice(["female", "male", ""], size=n, p=[0.4, 0.3, 0.3]).astype(object)
    sex[rng.random(n) < 0.1] = np.nan
    band = rng.choice(["<40", "40-60", ">60"], size=n).astype(object)
    band[rng.random(n) < 0.25] = np.nan
    y = (rng.random(n) < 0.5).astype(float)
    # missing rows score high: pooling them in (the old aggregate) would move the pooled mean
    score = np.where(pd.isna(band) | (sex == "") | pd.isna(sex), 0.95, rng.random(n) * 0.6)
    return pd.DataFrame({"site": np.where(np.arange(n) < 35, "site-a", "site-b"), "sex": sex,
                         "age_band": band, "y_true": y, "score": score, "metric": y})


@pytest.mark.parametrize("seed", [0, 1])
def test_runtime_gaps_equal_the_metric_definitions_with_missing_attributes(seed):
    pooled = _predictions(seed)
    summaries = {s: site_summary(pooled[pooled["site"] == s], ["site", "sex", "age_band"])
                 for s in ("site-a", "site-b")}
    gaps = combine_summaries(summaries, classification=True)["gaps"]
    for attribute in ("sex", "age_band"):
        values = pooled[attribute]  # a Series: np.asarray of a list would turn NaN into "nan"
        assert gaps[f"dp:{attribute}"] == pytest.approx(
            demographic_parity_gap(pooled["y_true"], pooled["score"], sensitive_features=values), abs=1e-12)
        assert gaps[f"eo:{attribute}"] == pytest.approx(
            equal_opportunity_gap(pooled["y_true"], pooled["score"], sensitive_features=values), abs=1e-12)


def test_missing_rows_do_not_move_the_gap():
    """Adding rows whose attribute is unknown leaves the DP gap of that attribute unchanged."""
    base = pd.DataFrame({"sex": ["f", "f", "m", "m"], "y_true": [1.0, 0.0, 1.0, 0.0],
                         "score": [0.8, 0.6, 0.2, 0.4], "metric": [1.0] * 4})
    extra = pd.DataFrame({"sex": ["", None, float("nan")], "y_true": [1.0, 1.0, 0.0],
                          "score": [1.0, 1.0, 1.0], "metric": [1.0] * 3})
    before = combine_summaries({"a": site_summary(base, ["sex"])}, classification=True)["gaps"]
    after = combine_summaries({"a": site_summary(pd.concat([base, extra]), ["sex"])},
                              classification=True)["gaps"]
    assert before["dp:sex"] == pytest.approx(0.2)
    assert after["dp:sex"] == pytest.approx(before["dp:sex"])
    assert after["eo:sex"] == pytest.approx(before["eo:sex"])


def test_none_and_nan_among_strings_in_a_plain_list_are_missing_not_groups():
    from fedfair_med.fairness.metrics import group_means

    for missing in (None, float("nan")):
        means = group_means([1.0, 2.0, 3.0, 4.0],
                            sensitive_features=["male", missing, "female", "female"])
        assert set(means) == {"male", "female"}, missing
