r"""Confidence intervals without pooling predictions: the Poisson bootstrap, summed over sites.

The usual bootstrap resamples n predictions with replacement, which needs them in one place.
The Poisson bootstrap instead gives every sample i an independent weight w_bi ~ Poisson(1) in
replicate b (Hanley & MacGibbon 2006; Chamandy et al. 2012). Weights of different samples are
independent, so a replicate's weighted sums split over sites: each site draws the weights of its
own samples from its own stream, computes for every replicate b the weighted count and sums that
the metrics need, per group,

.. math::  T_{b,g} = \sum_{i \in g} w_{bi}\,(1,\; m_i,\; s_i,\; y_i,\; y_i s_i),

(the same five fields as an evaluation summary: count, metric, score, positives, score over
positives), and sends these B × (1 + Σ_a V_a) × 5 numbers **once**, after the final evaluation.
The server adds the sites' tables, reads every replicate's group means (metric = Σ w m / Σ w;
P(ŷ=1) as the mean score for DP; the same restricted to y = 1 for EO), the pooled mean and the gaps
EA / DP / EO exactly as :func:`~fedfair_med.fairness.site_summaries.combine_summaries` does on the
unweighted sums, and reports the percentile interval of each over the B replicates.

Streams: sample i's B weights come from its own PCG64 generator, seeded by SHA-256 of (seed,
site name, site secret, sample id), so the numbers do not depend on the order predictions are
stored in, and adding or removing one sample changes no other sample's weights. :func:`poisson_bootstrap` runs the same code
over pooled predictions (the in-process runtime); with the same seed and secrets it returns exactly
what the federation reports. The site secret exists because the server knows the plan's seed: with
a public stream it could regenerate every weight and, once B exceeds a group's size, solve the
B linear equations for each sample's metric and score (see docs/privacy.md).

With the run's ``privacy: statistics_epsilon`` set, a site releases its tables through the
Gaussian mechanism (:func:`privatize_replicates`): each sample's metric and score clipped to [0, 1],
its weight vector clipped to L2 norm √(3B), so one test sample changes the release by at most
Δ₂ = √(3B) · √(5 (1 + A)) (it enters the overall table and one row of each of A attribute tables);
σ is calibrated so this single release spends the run's (ε, δ).
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

__all__ = [
    "FIELDS", "DEFAULT_REPLICATES", "BootstrapPrivacy", "site_replicates", "privatize_replicates",
    "combine_replicates", "poisson_bootstrap", "replicate_weights",
]

#: One row of a replicate table: weighted count, metric sum, score sum, positives, score over positives.
FIELDS = ("n", "metric", "score", "n_pos", "score_pos")
DEFAULT_REPLICATES = 1000
#: Samples weighted at once, so a large site needs O(B × chunk) memory, not O(B × n).
_CHUNK = 512


def _sample_seed(seed: int, site: str, secret: str, sample_id: str) -> int:
    digest = hashlib.sha256(f"poisson-bootstrap/{int(seed)}/{site}/{secret}/{sample_id}".encode()).digest()
    return int.from_bytes(digest[:16], "little")


def replicate_weights(ids: Sequence[str], replicates: int, *, seed: int, site: str,
                      secret: str = "") -> np.ndarray:
    """The [B, n] Poisson(1) weights of the samples ``ids``: column i from sample i's own stream.

    Keyed by the sample's id, so adding or removing one sample leaves every other sample's
    weights unchanged (what the DP sensitivity below relies on) and row order does not matter.
    """
    out = np.empty((replicates, len(ids)), dtype=np.float64)
    for i, sample_id in enumerate(ids):
        rng = np.random.Generator(np.random.PCG64(_sample_seed(seed, site, secret, str(sample_id))))
        out[:, i] = rng.poisson(1.0, size=replicates)
    return out


def _known(value: Any) -> bool:
    return not (value is None or (isinstance(value, float) and value != value) or str(value) == "")


class BootstrapPrivacy:
    """The Gaussian mechanism for one site's replicate tables: σ and the noise seed."""

    def __init__(self, sigma: float, noise_seed: int) -> None:
        self.sigma, self.noise_seed = float(sigma), int(noise_seed)

    @staticmethod
    def sensitivity(replicates: int, attributes: int) -> float:
        """Δ₂ = √(3B) · √(5 (1 + A)); see the module docstring."""
        return math.sqrt(3.0 * replicates) * math.sqrt(5.0 * (1 + attributes))

    @classmethod
    def from_option(cls, privacy: Mapping[str, Any] | None, *, seed: int,
                    site: str) -> "BootstrapPrivacy | None":
        """From the run's ``privacy`` option: None unless ``statistics_epsilon`` is set; σ spends
        the whole (ε, δ) on this one release (it is the only release over the test samples)."""
        from fedfair_med.privacy.accountant import calibrate_sigma
        from fedfair_med.privacy.mechanism import noise_seed
        from fedfair_med.privacy.settings import parse_privacy

        settings = parse_privacy(privacy)
        if not settings.protects_statistics:
            return None
        sigma = calibrate_sigma(settings.statistics_epsilon, settings.statistics_delta, 1,
                                settings.conversion)
        return cls(sigma, noise_seed(seed, 0, site, purpose="bootstrap"))

    @staticmethod
    def accounting(privacy: Mapping[str, Any] | None, *, replicates: int,
                   attributes: int) -> dict[str, Any] | None:
        """What ``report.json`` states about the release: ε spent, δ, σ, Δ₂, the unit."""
        from fedfair_med.privacy.accountant import calibrate_sigma, gaussian_epsilon
        from fedfair_med.privacy.settings import parse_privacy

        settings = parse_privacy(privacy)
        if not settings.protects_statistics:
            return None
        sigma = calibrate_sigma(settings.statistics_epsilon, settings.statistics_delta, 1,
                                settings.conversion)
        return {"epsilon": gaussian_epsilon(sigma, 1, settings.statistics_delta, settings.conversion),
                "delta": settings.statistics_delta, "sigma": sigma, "releases": 1,
                "sensitivity": BootstrapPrivacy.sensitivity(replicates, attributes),
                "unit": "one test sample at one site (add/remove adjacency)",
                "accountant": f"RDP of the Gaussian mechanism, {settings.conversion} conversion"}


def site_replicates(predictions: pd.DataFrame, vocabularies: Mapping[str, Sequence[str]], *,
                    site: str, seed: int, replicates: int = DEFAULT_REPLICATES, secret: str = "",
                    privacy: BootstrapPrivacy | None = None) -> dict[str, np.ndarray]:
    """One site's weighted tables: ``overall`` [B, 5] and one [B, V, 5] per attribute.

    ``predictions`` has columns id, metric, score, y_true and the attribute columns; values outside
    an attribute's vocabulary are refused (every site's tables must line up). With ``privacy``,
    the tables are released through :func:`privatize_replicates`.
    """
    frame = predictions.copy()
    frame["_id"] = frame["id"].astype(str)
    frame = frame.sort_values("_id", kind="stable")
    n = len(frame)
    metric = frame["metric"].to_numpy(np.float64)
    score = frame["score"].to_numpy(np.float64)
    if privacy is not None:  # bounded per-sample values: the sensitivity below relies on it
        metric, score = np.clip(metric, 0.0, 1.0), np.clip(score, 0.0, 1.0)
    positive = (frame["y_true"].to_numpy(np.float64) >= 0.5).astype(np.float64)
    values = np.stack([np.ones(n), metric, score, positive, positive * score], axis=1)  # [n, 5]
    members: dict[str, np.ndarray] = {}
    for attribute, vocabulary in vocabularies.items():
        index = np.full(n, -1, dtype=np.int64)
        if attribute in frame.columns:
            for i, value in enumerate(frame[attribute].tolist()):
                if not _known(value):
                    continue
                if str(value) not in vocabulary:
                    raise ValueError(f"attribute {attribute!r} has value {value!r}, which is not in "
                                     f"the federation's vocabulary {list(vocabulary)}")
                index[i] = list(vocabulary).index(str(value))
        members[attribute] = index
    ids = frame["_id"].tolist()
    tables = {"overall": np.zeros((replicates, len(FIELDS)))}
    tables.update({a: np.zeros((replicates, len(v), len(FIELDS))) for a, v in vocabularies.items()})
    for start in range(0, n, _CHUNK):  # O(B × chunk) memory whatever the site's size
        part = slice(start, min(n, start + _CHUNK))
        weights = replicate_weights(ids[part], replicates, seed=seed, site=site, secret=secret)
        if privacy is not None:  # each sample's weight vector in the L2 ball of radius √(3B)
            bound = math.sqrt(3.0 * replicates)
            norms = np.sqrt((weights ** 2).sum(axis=0))
            weights = weights * np.minimum(1.0, bound / np.maximum(norms, 1e-12))[None, :]
        tables["overall"] += weights @ values[part]
        for attribute, vocabulary in vocabularies.items():
            index = members[attribute][part]
            for g in range(len(vocabulary)):
                rows = index == g
                if rows.any():
                    tables[attribute][:, g] += weights[:, rows] @ values[part][rows]
    if privacy is not None:
        tables = privatize_replicates(tables, privacy, replicates=replicates,
                                      attributes=len(vocabularies))
    return tables


def privatize_replicates(tables: Mapping[str, np.ndarray], privacy: BootstrapPrivacy, *,
                         replicates: int, attributes: int) -> dict[str, np.ndarray]:
    """Tables + N(0, (σ Δ₂)²) per number, from a generator seeded by ``privacy.noise_seed``."""
    scale = privacy.sigma * BootstrapPrivacy.sensitivity(replicates, attributes)
    rng = np.random.Generator(np.random.PCG64(privacy.noise_seed))
    return {name: np.asarray(t, dtype=np.float64) + scale * rng.standard_normal(np.shape(t))
            for name, t in sorted(tables.items())}


def _means(num: np.ndarray, den: np.ndarray, noisy: bool) -> np.ndarray:
    """num / den per replicate; NaN where the weighted count is 0 (a group absent from a replicate)."""
    if noisy:  # post-processing of a DP release: counts floored, means kept in [0, 1]
        return np.clip(num / np.maximum(den, 1e-6), 0.0, 1.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _max_gap(groups: np.ndarray, pooled: np.ndarray) -> np.ndarray:
    """max over groups of |group mean − pooled| per replicate, ignoring absent groups ([B, G] → [B])."""
    diffs = np.abs(groups - pooled[:, None])
    out = np.full(len(pooled), np.nan)
    present = ~np.isnan(diffs).all(axis=1)
    out[present] = np.nanmax(diffs[present], axis=1)
    return out


def _interval(values: np.ndarray, level: float) -> list[float | None]:
    values = values[~np.isnan(values)]
    if len(values) < 2:
        return [None, None]
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(values, [alpha, 1.0 - alpha])
    return [float(low), float(high)]


def combine_replicates(site_tables: Mapping[str, Mapping[str, np.ndarray]],
                       vocabularies: Mapping[str, Sequence[str]], *, classification: bool,
                       level: float = 0.95, noisy: bool = False) -> dict[str, Any]:
    """Percentile CIs of the pooled metric, every site, every group and every gap.

    The sites' tables are added in sorted site order; per replicate, the metrics and gaps are
    those :func:`~fedfair_med.fairness.site_summaries.combine_summaries` computes from unweighted sums
    (EA over sites; DP and EO over each attribute but ``age``, for classification only).
    """
    sites = sorted(site_tables)
    if not sites:
        raise ValueError("no site sent bootstrap tables")
    i_n, i_m, i_s, i_p, i_sp = range(len(FIELDS))
    total = sum(np.asarray(site_tables[s]["overall"], dtype=np.float64) for s in sites)
    pooled_metric = _means(total[:, i_m], total[:, i_n], noisy)
    site_metric = np.stack([_means(site_tables[s]["overall"][:, i_m], site_tables[s]["overall"][:, i_n], noisy)
                            for s in sites], axis=1)
    out: dict[str, Any] = {
        "replicates": int(total.shape[0]), "level": level,
        "overall": _interval(pooled_metric, level),
        "sites": {s: _interval(site_metric[:, k], level) for k, s in enumerate(sites)},
        "groups": {}, "gaps": {"ea": _interval(_max_gap(site_metric, pooled_metric), level)},
    }
    pooled_score = _means(total[:, i_s], total[:, i_n], noisy)
    pooled_pos = _means(total[:, i_sp], total[:, i_p], noisy)
    for attribute in sorted(vocabularies):
        if attribute == "age":
            continue
        table = sum(np.asarray(site_tables[s][attribute], dtype=np.float64) for s in sites)  # [B, V, 5]
        counts = table[:, :, i_n]
        present = [g for g in range(table.shape[1]) if noisy or (counts[:, g] > 0).any()]
        group_metric = _means(table[:, :, i_m], counts, noisy)
        out["groups"][attribute] = {str(vocabularies[attribute][g]): _interval(group_metric[:, g], level)
                                    for g in sorted(present, key=lambda g: str(vocabularies[attribute][g]))}
        if classification:
            dp = _max_gap(_means(table[:, present, i_s], counts[:, present], noisy), pooled_score)
            eo = _max_gap(_means(table[:, present, i_sp], table[:, present, i_p], noisy), pooled_pos)
            out["gaps"][f"dp:{attribute}"] = _interval(dp, level)
            out["gaps"][f"eo:{attribute}"] = _interval(eo, level)
    return out


def poisson_bootstrap(predictions: pd.DataFrame, vocabularies: Mapping[str, Sequence[str]], *,
                      seed: int, classification: bool, replicates: int = DEFAULT_REPLICATES,
                      secrets: Mapping[str, str] | None = None, level: float = 0.95) -> dict[str, Any]:
    """The same intervals from pooled predictions (column ``site``), each site with its own stream."""
    secrets = secrets or {}
    tables = {str(site): site_replicates(frame, vocabularies, site=str(site), seed=seed,
                                         replicates=replicates, secret=secrets.get(str(site), ""))
              for site, frame in predictions.groupby("site", sort=True)}
    return combine_replicates(tables, vocabularies, classification=classification, level=level)
