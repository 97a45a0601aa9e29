"""The Poisson bootstrap that decomposes across sites (fedfair_med/fairness/bootstrap.py).

Predictions are drawn here with known group effects; the federated path (each site's tables,
added by the server) is compared with the in-process path over the pooled predictions, with the
usual multinomial percentile bootstrap, and with the DP release and its accounting.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fedfair_med.fairness.site_summaries import combine_summaries, site_summary
from fedfair_med.fairness.bootstrap import (
    FIELDS, BootstrapPrivacy, combine_replicates, poisson_bootstrap, replicate_weights, site_replicates,
)
from fedfair_med.fairness.tables import bootstrap_ci
from fedfair_med.privacy.accountant import gaussian_epsilon

SITES = ("h1", "h2", "h3")
VOCAB = {"site": list(SITES), "sex": ["female", "male"]}


def predictions(n_per_site: int = 60, seed: int = 1) -> pd.DataFrame:
    """Classification predictions: score and correctness depend on site and sex."""
    rng = np.random.default_rng(seed)
    frames = []
    for k, site in enumerate(SITES):
        sex = rng.choice(["female", "male", ""], size=n_per_site, p=[0.45, 0.45, 0.10])
        y = rng.integers(0, 2, size=n_per_site)
        score = np.clip(0.3 + 0.4 * y + 0.1 * (sex == "male") + 0.05 * k
                        + rng.normal(0, 0.15, n_per_site), 0, 1)
        frames.append(pd.DataFrame({
            "id": [f"{site}-{i:03d}" for i in range(n_per_site)], "site": site, "sex": sex,
            "y_true": y, "score": score, "y_pred": (score >= 0.5).astype(int),
            "metric": ((score >= 0.5) == (y == 1)).astype(float)}))
    return pd.concat(frames, ignore_index=True)


def test_sites_summed_equal_pooled_in_process_bootstrap_exactly_and_ignore_row_order() -> None:
    pooled = predictions()
    secrets = {s: f"secret-{s}" for s in SITES}
    tables = {s: site_replicates(pooled[pooled["site"] == s].sample(frac=1.0, random_state=3), VOCAB,
                                 site=s, seed=7, replicates=300, secret=secrets[s]) for s in SITES}
    assert all(t["sex"].shape == (300, 2, len(FIELDS)) for t in tables.values())
    federated = combine_replicates(tables, VOCAB, classification=True)
    in_process = poisson_bootstrap(pooled, VOCAB, seed=7, replicates=300, secrets=secrets,
                                   classification=True)
    assert federated == in_process
    assert set(federated["gaps"]) == {"ea", "dp:site", "eo:site", "dp:sex", "eo:sex"}
    # another secret (or another seed) is another stream, hence other intervals
    assert poisson_bootstrap(pooled, VOCAB, seed=7, replicates=300, classification=True) != in_process
    assert poisson_bootstrap(pooled, VOCAB, seed=8, replicates=300, secrets=secrets,
                             classification=True) != in_process


def test_tables_are_weighted_summaries_and_a_point_estimate_lies_inside_each_interval() -> None:
    pooled = predictions()
    site = pooled[pooled["site"] == "h2"]
    tables = site_replicates(site, VOCAB, site="h2", seed=0, replicates=50)
    weights = replicate_weights(site["id"].tolist(), 50, seed=0, site="h2")
    metric = site["metric"].to_numpy()
    assert np.allclose(tables["overall"][:, 1], weights @ metric)
    assert np.allclose(tables["overall"][:, 0], weights.sum(axis=1))
    # one sample fewer changes the tables by exactly that sample's weighted values (its own
    # stream; every other sample keeps its weights), the neighbouring-dataset property DP needs
    without = site_replicates(site.iloc[1:], VOCAB, site="h2", seed=0, replicates=50)
    first = site.iloc[0]
    assert np.allclose(tables["overall"] - without["overall"],
                       np.outer(weights[:, 0], [1, first["metric"], first["score"], first["y_true"],
                                                first["y_true"] * first["score"]]))
    assert weights.mean() == pytest.approx(1.0, abs=0.05) and weights.var() == pytest.approx(1.0, abs=0.1)
    point = combine_summaries({s: site_summary(pooled[pooled["site"] == s], ["site", "sex"]) for s in SITES},
                              classification=True)
    cis = poisson_bootstrap(pooled, VOCAB, seed=0, replicates=400, classification=True)
    assert cis["overall"][0] < point["metric"] < cis["overall"][1]
    for s in SITES:
        assert cis["sites"][s][0] < point["sites"][s]["metric"] < cis["sites"][s][1]
    for g, v in point["groups"]["sex"].items():
        assert cis["groups"]["sex"][g][0] < v["metric"] < cis["groups"]["sex"][g][1]
    for key, value in point["gaps"].items():
        low, high = cis["gaps"][key]
        assert low <= high and low - 0.05 < value < high + 0.05, key


def _multinomial_gap_interval(frame: pd.DataFrame, replicates: int, seed: int) -> list[float]:
    """The usual percentile bootstrap of the DP gap over sex: resample n rows with replacement."""
    rng = np.random.default_rng(seed)
    score, sex = frame["score"].to_numpy(), frame["sex"].to_numpy()
    gaps = []
    for _ in range(replicates):
        idx = rng.integers(0, len(frame), len(frame))
        s, g = score[idx], sex[idx]
        known = g != ""
        pooled = s[known].mean()
        gaps.append(max(abs(s[g == v].mean() - pooled) for v in ("female", "male")))
    return list(np.quantile(gaps, [0.025, 0.975]))


def test_intervals_match_the_usual_percentile_bootstrap_within_monte_carlo_error() -> None:
    pooled = predictions(n_per_site=150, seed=4)
    B = 4000
    cis = poisson_bootstrap(pooled, VOCAB, seed=11, replicates=B, classification=True)
    # With B = 4000 the Monte-Carlo sd of a 2.5 % quantile is ~0.04 standard errors of the mean,
    # and the Poisson and multinomial bootstraps differ by O(1/n); 0.25 half-widths is > 6 sd.
    for site in SITES:
        values = pooled.loc[pooled["site"] == site, "metric"]
        low, high = bootstrap_ci(values, n_boot=B, seed=5)
        half = (high - low) / 2
        assert abs(cis["sites"][site][0] - low) < 0.25 * half
        assert abs(cis["sites"][site][1] - high) < 0.25 * half
    low, high = bootstrap_ci(pooled["metric"], n_boot=B, seed=5)
    assert abs(cis["overall"][0] - low) < 0.25 * (high - low) / 2
    assert abs(cis["overall"][1] - high) < 0.25 * (high - low) / 2
    ref = _multinomial_gap_interval(pooled, 2000, seed=6)
    width = ref[1] - ref[0]
    assert abs(cis["gaps"]["dp:sex"][0] - ref[0]) < 0.25 * width
    assert abs(cis["gaps"]["dp:sex"][1] - ref[1]) < 0.25 * width


def test_statistics_dp_noises_every_number_with_the_calibrated_sigma_and_accounts_for_it() -> None:
    pooled = predictions()
    option = {"statistics_epsilon": 4.0, "statistics_delta": 1e-5}
    B = 200
    site = pooled[pooled["site"] == "h1"]
    privacy = BootstrapPrivacy.from_option(option, seed=3, site="h1")
    assert privacy is not None and BootstrapPrivacy.from_option({}, seed=3, site="h1") is None
    noisy = site_replicates(site, VOCAB, site="h1", seed=3, replicates=B, privacy=privacy)
    exact = site_replicates(site, VOCAB, site="h1", seed=3, replicates=B)
    delta2 = BootstrapPrivacy.sensitivity(B, attributes=len(VOCAB))
    assert delta2 == pytest.approx(np.sqrt(3 * B) * np.sqrt(5 * 3))
    # weight clipping to sqrt(3B) almost never binds, so the difference is the noise alone
    noise = np.concatenate([(noisy[k] - exact[k]).ravel() for k in exact])
    assert noise.size == B * (1 + 3 + 2) * 5
    assert noise.std() == pytest.approx(privacy.sigma * delta2, rel=0.05)
    assert abs(noise.mean()) < 4 * privacy.sigma * delta2 / np.sqrt(noise.size)
    # the same seed gives the same release (reproducible private runs); another site other noise
    again = site_replicates(site, VOCAB, site="h1", seed=3, replicates=B, privacy=privacy)
    assert all(np.array_equal(again[k], noisy[k]) for k in noisy)
    other = BootstrapPrivacy.from_option(option, seed=3, site="h2")
    assert other.noise_seed != privacy.noise_seed and other.sigma == privacy.sigma
    accounting = BootstrapPrivacy.accounting(option, replicates=B, attributes=len(VOCAB))
    assert accounting["releases"] == 1 and accounting["sigma"] == privacy.sigma
    assert accounting["epsilon"] <= 4.0 and accounting["epsilon"] == pytest.approx(4.0, rel=1e-5)
    assert gaussian_epsilon(privacy.sigma, 1, 1e-5) == pytest.approx(accounting["epsilon"])
    # the server reads noisy tables as a DP release: every interval is still inside [0, 1]
    tables = {s: site_replicates(pooled[pooled["site"] == s], VOCAB, site=s, seed=3, replicates=B,
                                 privacy=BootstrapPrivacy.from_option(option, seed=3, site=s))
              for s in SITES}
    cis = combine_replicates(tables, VOCAB, classification=True, noisy=True)
    exact_cis = poisson_bootstrap(pooled, VOCAB, seed=3, replicates=B, classification=True)
    for low, high in [cis["overall"], *cis["sites"].values(), *cis["gaps"].values()]:
        assert 0.0 <= low <= high <= 1.0
    assert (cis["overall"][1] - cis["overall"][0]) > (exact_cis["overall"][1] - exact_cis["overall"][0])


def test_values_outside_the_plans_vocabulary_are_refused() -> None:
    frame = predictions().head(10).assign(sex="other")
    with pytest.raises(ValueError, match="'other'.*vocabulary"):
        site_replicates(frame, VOCAB, site="h1", seed=0, replicates=5)


def test_federated_report_carries_every_interval_and_the_dp_release() -> None:
    from fedfair_med.reporting.run_report import build_run_report

    pooled = predictions()
    record = combine_summaries({s: site_summary(pooled[pooled["site"] == s], ["site", "sex"]) for s in SITES},
                               classification=True)

    def federated_report(record: dict, sites: list, bootstrap: dict | None = None) -> dict:
        return build_run_report(kind="classification", primary_metric="accuracy", final_round=record,
                                sites=sites, bootstrap=bootstrap)

    plain = federated_report(record, list(SITES))
    assert plain["overall"]["ci95"] == [None, None] and all(g["ci95"] == [None, None] for g in plain["groups"])
    cis = poisson_bootstrap(pooled, VOCAB, seed=0, replicates=200, classification=True)
    cis["privacy"] = BootstrapPrivacy.accounting({"statistics_epsilon": 2.0, "statistics_delta": 1e-6},
                                                 replicates=200, attributes=len(VOCAB))
    report = federated_report(record, list(SITES), bootstrap=cis)
    assert report["overall"]["ci95"] == cis["overall"]
    rows = {(g["attribute"], g["group"]): g["ci95"] for g in report["groups"]}
    assert {k: v for k, v in rows.items() if k[0] == "site"} == {("site", s): cis["sites"][s] for s in SITES}
    assert {k: v for k, v in rows.items() if k[0] == "sex"} == {("sex", g): v for g, v in cis["groups"]["sex"].items()}
    assert report["gaps_ci95"] == {k: cis["gaps"][k] for k in record["gaps"]}
    assert report["settings"]["n_boot"] == 200
    assert report["settings"]["bootstrap_privacy"]["epsilon"] == pytest.approx(2.0, rel=1e-5)
    assert any("differentially private" in w for w in report["warnings"])
    # one builder, one shape: from the pooled predictions it gives the same numbers and keys
    # (decision gaps need the per-sample decisions, which stay at the sites in a federation)
    direct = build_run_report(pooled, kind="classification", primary_metric="accuracy",
                              attributes=["sex"], intersections=False, n_boot=20)
    assert set(direct) == set(report) | {"decision_gaps"}
    assert report["overall"]["metric"] == pytest.approx(direct["overall"]["metric"], abs=1e-12)
    assert {k: report["gaps"][k] for k in direct["gaps"]} == pytest.approx(direct["gaps"], abs=1e-12)
    assert set(report["definitions"]) == set(report["gaps"])  # the summaries also give dp/eo:site
    assert {k: report["definitions"][k] for k in direct["gaps"]} == direct["definitions"]
    assert [(g["attribute"], g["group"], g["n"]) for g in report["groups"]] == \
        [(g["attribute"], g["group"], g["n"]) for g in direct["groups"]]
