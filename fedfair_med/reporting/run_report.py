"""The report of one run (``report.json``): per-group metrics with CIs, fairness gaps, warnings.

:func:`build_run_report` is the one builder, whichever runtime made the run. Where the per-sample
predictions may be pooled (a simulation's ``predictions.csv``, one row per test image: id, site,
sensitive attributes, y_true, score, y_pred, metric; or a model audit at one site) it computes
every number from them; in a federation, where predictions stay at the sites, it takes the final
round's combined site summaries and the sites' Poisson-bootstrap tables instead. Both give the
same keys. Every number is a sample mean, so the report can be recomputed by anyone holding the
predictions; NaN is written as ``null`` so the file is strict JSON.

Groups are sites, every sensitive attribute (a numeric ``age`` column is banded into
``age_band``, never grouped raw) and, optionally, each pair of attributes ("sex×age_band").
Gaps: ``ea`` over sites always; ``dp:<attr>`` and ``eo:<attr>`` over each attribute for
classification, using the positive-class score as in FlexFair (see
:mod:`fedfair_med.fairness.metrics`).
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from fedfair_med.contracts import CLASSIFICATION, MISSING, TASK_KINDS
from fedfair_med.fairness.metrics import (
    demographic_parity_gap,
    equal_accuracy_gap,
    equal_opportunity_gap,
    expected_calibration_error,
    group_calibration_error,
    group_roc_auc,
    within_group_roc_auc,
    is_missing,
    roc_auc,
)
from fedfair_med.fairness.tables import age_bands, bootstrap_ci, group_table, intersect

__all__ = ["build_run_report", "CORE_COLUMNS", "INTERSECTION_SEPARATOR", "gap_definition"]

#: Columns of predictions.csv that are not sensitive attributes.
CORE_COLUMNS = ("id", "site", "y_true", "score", "y_pred", "metric")
INTERSECTION_SEPARATOR = "×"
#: A numeric attribute with more distinct values than this is not a grouping (it would give one
#: group per value); ``age`` is banded instead, anything else is skipped with a warning.
MAX_NUMERIC_GROUPS = 20


def gap_definition(name: str, primary_metric: str = "metric") -> str:
    """One-line formula for a gap key such as ``ea``, ``dp:sex`` or ``eo:age_band``."""
    if name == "ea":
        return (f"EA = max over sites k of |mean({primary_metric} | site=k) - mean({primary_metric})|"
                " (means over test samples)")
    kind, _, attribute = name.partition(":")
    if kind == "ea":
        return (f"EA = max over groups k of |mean({primary_metric} | {attribute}=k)"
                f" - mean({primary_metric})| (means over test samples)")
    if kind == "dp":
        return (f"DP = max over groups k of |E[score | {attribute}=k] - E[score]|,"
                " score = P(y=1|x)")
    if kind == "eo":
        return (f"EO = max over groups k of |E[score | {attribute}=k, y=1] - E[score | y=1]|,"
                " score = P(y=1|x)")
    raise ValueError(f"unknown gap {name!r}")


def json_safe(value: Any) -> Any:
    """JSON-safe copy (strict JSON has no NaN): arrays/tensors/numpy scalars to Python, NaN/inf to None."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, np.generic):  # numpy array, torch tensor
        return json_safe(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _labels(column: pd.Series) -> list[str]:
    """Attribute values as text, '' for missing; whole-number floats lose their '.0'."""
    out = []
    for v in column.tolist():
        if is_missing(v):
            out.append(MISSING)
        elif isinstance(v, float) and v.is_integer():
            out.append(str(int(v)))
        else:
            out.append(str(v).strip())
    return out


def _grouping_columns(
    predictions: pd.DataFrame, attributes: Sequence[str], age_edges: Sequence[float],
    warnings: list[str],
) -> dict[str, list[str]]:
    """{attribute name: per-sample label} for every attribute that defines groups."""
    out: dict[str, list[str]] = {}
    for attribute in attributes:
        if attribute == "site" or attribute in out:
            continue
        if attribute in ("age", "age_band") and "age" in predictions.columns:
            # Re-band from raw ages so the caller's edges win over a stored age_band column.
            if "age_band" not in out:
                out["age_band"] = age_bands(predictions["age"], age_edges)
            continue
        if attribute not in predictions.columns:
            warnings.append(f"attribute {attribute!r} is not a column of the predictions; skipped")
            continue
        column = predictions[attribute]
        if pd.api.types.is_numeric_dtype(column) and column.nunique(dropna=True) > MAX_NUMERIC_GROUPS:
            warnings.append(
                f"attribute {attribute!r} is numeric with {column.nunique()} distinct values;"
                " not used as a grouping (bin it first)"
            )
            continue
        out[attribute] = _labels(column)
    return out


def _rows(table: pd.DataFrame, extra: dict[str, dict[str, float]] | None = None) -> list[dict]:
    rows = []
    for rec in table.to_dict("records"):
        row = {
            "attribute": rec["attribute"],
            "group": str(rec["group"]),
            "n": int(rec["n"]),
            "metric": float(rec["metric"]),
            "ci95": [float(rec["ci_low"]), float(rec["ci_high"])],
            "small": bool(rec["small"]),
        }
        for key, per_group in (extra or {}).items():
            row[key] = per_group.get(str(rec["group"]), float("nan"))
        rows.append(row)
    return rows


def _per_group_mean(values: np.ndarray, labels: Sequence[str]) -> dict[str, float]:
    frame = pd.DataFrame({"g": list(labels), "v": values})
    frame = frame[frame["g"] != MISSING]
    return {str(k): float(v) for k, v in frame.groupby("g")["v"].mean().items()}


def gap_ci(values: np.ndarray, labels: Sequence[str], *, n_boot: int, seed: int,
           level: float = 0.95) -> list[float]:
    """Percentile-bootstrap interval of max_k |mean(values | k) - pooled mean|.

    Resampled within each group, so group sizes stay fixed as the sites and groups of a study
    are. Samples with a missing label are left out, as in the gap itself. [nan, nan] with fewer
    than two groups or a group of one. The max of absolute differences is biased upward, so
    for a gap near 0 the interval can lie above the estimate: read it as "how large the gap
    could plausibly be".
    """
    labels_arr = np.asarray(list(labels), dtype=object)
    known = labels_arr != MISSING
    values, labels_arr = np.asarray(values, dtype=np.float64)[known], labels_arr[known]
    groups = [values[labels_arr == g] for g in dict.fromkeys(labels_arr.tolist())]
    if len(groups) < 2 or min(len(g) for g in groups) < 2:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    means = np.empty((n_boot, len(groups)))
    for j, x in enumerate(groups):
        chunk = max(1, 4_000_000 // len(x))
        for start in range(0, n_boot, chunk):
            stop = min(n_boot, start + chunk)
            means[start:stop, j] = x[rng.integers(0, len(x), size=(stop - start, len(x)))].mean(axis=1)
    sizes = np.array([len(g) for g in groups], dtype=np.float64)
    pooled = means @ sizes / sizes.sum()
    gaps = np.abs(means - pooled[:, None]).max(axis=1)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(gaps, [alpha, 1.0 - alpha])
    return [float(low), float(high)]


def _gap_cis(gaps: dict[str, float], metric: np.ndarray, sites: list[str],
             grouping: dict[str, list[str]], *, n_boot: int, seed: int,
             score: np.ndarray | None, y_true: np.ndarray | None) -> dict[str, list[float]]:
    """A bootstrap interval (:func:`gap_ci`) for every defined gap of ``gaps``."""
    cis: dict[str, list[float]] = {}
    for name, value in gaps.items():
        if value is None or not math.isfinite(value):
            continue
        kind, _, attribute = name.partition(":")
        labels = sites if not attribute else grouping[attribute]
        if kind == "ea":
            cis[name] = gap_ci(metric, labels, n_boot=n_boot, seed=seed)
        elif kind == "dp" and score is not None:
            cis[name] = gap_ci(score, labels, n_boot=n_boot, seed=seed)
        elif kind == "eo" and score is not None and y_true is not None:
            positive = y_true == 1
            cis[name] = gap_ci(score[positive], [l for l, p in zip(labels, positive) if p],
                               n_boot=n_boot, seed=seed)
    return cis


def build_run_report(
    predictions: pd.DataFrame | None = None,
    *,
    kind: str,
    primary_metric: str,
    attributes: Sequence[str] = (),
    age_edges: Sequence[float] = (60,),
    intersections: bool = True,
    min_group_size: int = 10,
    n_boot: int = 1000,
    seed: int = 0,
    attribute_gaps: bool = False,
    final_round: Mapping[str, Any] | None = None,
    bootstrap: Mapping[str, Any] | None = None,
    sites: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The ``report.json`` content of one run, from ``predictions`` or, in a federation, from
    ``final_round`` (the last ``metrics.jsonl`` record: the sites' combined summaries) and
    ``bootstrap`` (:func:`~fedfair_med.fairness.bootstrap.combine_replicates` of the sites'
    Poisson-bootstrap tables; None: no intervals) and ``sites`` (the federation's, dropped or not).

    Returns ``{"primary_metric", "kind", "overall": {n, metric, ci95}, "groups": [...],
    "gaps": {...}, "gaps_ci95": {gap: [low, high]}, "definitions": {...}, "warnings": [...],
    "settings": {...}}``; each group row
    is ``{attribute, group, n, metric, ci95, small}`` plus, for classification,
    ``positive_rate`` (share with y_pred = 1) and ``mean_score`` (mean P(y=1|x), the quantity
    the DP gap compares). Samples missing an attribute are excluded from that attribute's groups
    and gaps (and any intersection using it) and reported in ``warnings``.

    Classification reports also carry what a small DP/EO gap could hide — a model equally bad
    for everyone: ``auc`` (ROC AUC of the score) and ``ece`` (expected calibration error, 10
    bins) overall and per group, and ``decision_gaps``: DP and EO on the thresholded decisions
    ``y_pred`` (the share predicted positive, and the true-positive rate). With
    ``attribute_gaps`` (a model audit), ``gaps`` also holds ``ea:<attr>``, the EA gap of the
    primary metric over each attribute's groups, not only over sites.
    """
    if kind not in TASK_KINDS:
        raise ValueError(f"kind must be one of {TASK_KINDS}, got {kind!r}")
    if predictions is None and final_round is not None:
        return _from_summaries(final_round, kind=kind, primary_metric=primary_metric,
                               min_group_size=min_group_size, bootstrap=bootstrap,
                               sites=list(final_round["sites"]) if sites is None else list(sites))
    if not isinstance(predictions, pd.DataFrame):
        raise ValueError("predictions must be a pandas DataFrame")
    if len(predictions) == 0:
        raise ValueError("predictions is empty")
    required = ["site", "metric"] + (["y_true", "score", "y_pred"] if kind == CLASSIFICATION else [])
    missing_columns = [c for c in required if c not in predictions.columns]
    if missing_columns:
        raise ValueError(f"predictions lack column(s) {missing_columns}")

    warnings: list[str] = []
    metric = pd.to_numeric(predictions["metric"], errors="coerce").to_numpy(np.float64)
    if not np.all(np.isfinite(metric)):
        raise ValueError("the metric column has missing or non-numeric values")
    sites = _labels(predictions["site"])
    if any(s == MISSING for s in sites):
        raise ValueError("every prediction needs a site")
    n = len(metric)

    grouping = _grouping_columns(predictions, attributes, age_edges, warnings)
    for name, labels in grouping.items():
        n_missing = sum(label == MISSING for label in labels)
        if n_missing:
            warnings.append(
                f"{n_missing} of {n} samples have no {name}; they are left out of the {name}"
                " groups and gaps"
            )

    if kind == CLASSIFICATION:
        score = pd.to_numeric(predictions["score"], errors="coerce").to_numpy(np.float64)
        y_pred = pd.to_numeric(predictions["y_pred"], errors="coerce").to_numpy(np.float64)
        y_true = pd.to_numeric(predictions["y_true"], errors="coerce").to_numpy(np.float64)
        if not (np.all(np.isfinite(score)) and np.all(np.isfinite(y_pred))
                and np.all(np.isfinite(y_true))):
            raise ValueError("y_true, score and y_pred must be numeric for every sample")

    def table_rows(name: str, labels: list[str]) -> list[dict]:
        table = group_table(metric, sensitive_features=labels, attribute_name=name,
                            n_boot=n_boot, seed=seed, min_group_size=min_group_size)
        if kind == CLASSIFICATION:
            extra_cols = {"positive_rate": _per_group_mean(y_pred, labels),
                          "mean_score": _per_group_mean(score, labels),
                          **_quality_columns(y_true, score, labels)}
        else:
            extra_cols = None
        return _rows(table, extra_cols)

    groups: list[dict] = table_rows("site", sites)
    for name, labels in grouping.items():
        groups.extend(table_rows(name, labels))
    if intersections:
        for (a, la), (b, lb) in itertools.combinations(grouping.items(), 2):
            groups.extend(table_rows(f"{a}{INTERSECTION_SEPARATOR}{b}", intersect(la, lb)))

    warnings.extend(_small_group_warnings(groups, min_group_size))

    gaps: dict[str, float] = {"ea": equal_accuracy_gap(metric, sensitive_features=sites)}
    if attribute_gaps:
        for name, labels in grouping.items():
            try:
                gaps[f"ea:{name}"] = equal_accuracy_gap(metric, sensitive_features=labels)
            except ValueError as err:
                gaps[f"ea:{name}"] = float("nan")
                warnings.append(f"ea:{name} undefined: {err}")
    decision_gaps: dict[str, float] = {}
    if kind == CLASSIFICATION:
        for name, labels in grouping.items():
            try:
                gaps[f"dp:{name}"] = demographic_parity_gap(y_true, score, sensitive_features=labels)
            except ValueError as err:
                gaps[f"dp:{name}"] = float("nan")
                warnings.append(f"dp:{name} undefined: {err}")
            try:
                gaps[f"eo:{name}"] = equal_opportunity_gap(y_true, score, sensitive_features=labels)
            except ValueError as err:
                gaps[f"eo:{name}"] = float("nan")
                warnings.append(f"eo:{name} undefined: {err}")
            decision_gaps.update(_decision_gaps(name, y_true, y_pred, labels))

    cis = _gap_cis(gaps, metric, sites, grouping, n_boot=n_boot, seed=seed,
                   score=score if kind == CLASSIFICATION else None,
                   y_true=y_true if kind == CLASSIFICATION else None)
    low, high = bootstrap_ci(metric, n_boot=n_boot, seed=seed)
    overall: dict[str, Any] = {"n": n, "metric": float(metric.mean()), "ci95": [low, high]}
    if kind == CLASSIFICATION:
        overall["auc"] = roc_auc(y_true, score)
        if len(set(sites)) > 1:  # ranking within each hospital, whatever the sites' prevalences
            overall["auc_within_site"] = within_group_roc_auc(y_true, score, sensitive_features=sites)
        overall["ece"] = expected_calibration_error(y_true, score)
    settings = {
        "attributes": list(grouping),
        "age_edges": [float(e) for e in age_edges],
        "min_group_size": int(min_group_size),
        "n_boot": int(n_boot),
        "seed": int(seed),
        "ci_level": 0.95,
    }
    extra = {"decision_gaps": decision_gaps} if kind == CLASSIFICATION else {}
    return _report(kind, primary_metric, overall, groups, gaps, cis, warnings, settings, **extra)


def _report(kind: str, primary_metric: str, overall: Mapping[str, Any], groups: list[dict],
            gaps: Mapping[str, Any], gaps_ci95: Mapping[str, Any], warnings: list[str],
            settings: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    """The one shape of ``report.json``, JSON-safe, whatever the report was computed from."""
    return json_safe({
        "primary_metric": primary_metric,
        "kind": kind,
        "overall": dict(overall),
        "groups": groups,
        "gaps": dict(gaps),
        "gaps_ci95": dict(gaps_ci95),
        "definitions": {name: gap_definition(name, primary_metric) for name in gaps},
        "warnings": warnings,
        "settings": dict(settings),
        **extra,
    })


def _small_group_warnings(groups: Sequence[Mapping[str, Any]], min_group_size: int) -> list[str]:
    return [f"{g['attribute']}={g['group']} has only {g['n']} samples (< {min_group_size}); "
            "its metric and CI are unreliable" for g in groups if g["small"]]


def _from_summaries(record: Mapping[str, Any], *, kind: str, primary_metric: str,
                    min_group_size: int, bootstrap: Mapping[str, Any] | None,
                    sites: list[str]) -> dict[str, Any]:
    """A federated run's report: group means from the final round's combined site summaries,
    95 % intervals (``ci95``, ``gaps_ci95``) from the sites' Poisson-bootstrap tables
    (:mod:`fedfair_med.fairness.bootstrap`), null without them."""
    boot = bootstrap or {}
    none = [None, None]

    def ci(attribute: str, group: str) -> list:
        if attribute == "site" and group in boot.get("sites", {}):
            return list(boot["sites"][group])
        return list(boot.get("groups", {}).get(attribute, {}).get(group, none))

    def row(attribute: str, group: str, v: Mapping[str, Any]) -> dict[str, Any]:
        return {"attribute": attribute, "group": group, "n": v["n"], "metric": v["metric"],
                "ci95": ci(attribute, group), "small": v["n"] < min_group_size}

    groups = [row("site", s, v) for s, v in record["sites"].items()]
    groups += [row(attribute, group, v) for attribute, table in record["groups"].items()
               if attribute != "site" for group, v in table.items()]
    if bootstrap is None:
        warnings = ["federated run: metrics come from per-site aggregate summaries; no bootstrap "
                    "confidence intervals (no site sent its Poisson-bootstrap tables)"]
    else:
        warnings = [f"federated run: confidence intervals from a Poisson bootstrap ({boot['replicates']} "
                    "replicates) whose weighted sums each site computed from its own predictions"]
        if boot.get("privacy"):
            warnings.append(f"the bootstrap tables are differentially private (epsilon "
                            f"{boot['privacy']['epsilon']:.3g}, delta {boot['privacy']['delta']:.3g}); "
                            "their noise widens every interval")
    warnings += _small_group_warnings(groups, min_group_size)
    if record.get("dropped"):
        warnings.append(f"site(s) {', '.join(record['dropped'])} dropped out of the final round")
    settings: dict[str, Any] = {"sites": sites, "min_group_size": min_group_size,
                                "source": "openfl"}
    if bootstrap is not None:
        settings.update(n_boot=boot["replicates"], seed=boot.get("seed"), ci_level=boot["level"],
                        ci_method="poisson bootstrap, summed over sites")
        if boot.get("privacy"):
            settings["bootstrap_privacy"] = dict(boot["privacy"])
    overall = {"n": record["n"], "metric": record["metric"], "ci95": list(boot.get("overall", none))}
    gaps_ci95 = {k: list(boot.get("gaps", {}).get(k, none)) for k in record["gaps"]}
    return _report(kind, primary_metric, overall, groups, record["gaps"], gaps_ci95, warnings, settings)


#: What ``decision_gaps`` measure, for the reports.
DECISION_GAPS_DEFINITION = (
    "on the decisions y_pred (score >= threshold), not the scores: DP = max over groups k of "
    "|P(y_pred=1 | k) - P(y_pred=1)|; EO = the same over samples with y=1 (true-positive rates)")


def _quality_columns(y_true: np.ndarray, score: np.ndarray, labels: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per-group ROC AUC and calibration error (NaN where a group holds one class only)."""
    known = np.array([label != MISSING for label in labels])
    if not known.any():
        return {"auc": {}, "ece": {}}
    kept = [label for label in labels if label != MISSING]
    auc = group_roc_auc(y_true[known], score[known], sensitive_features=kept)
    ece = group_calibration_error(y_true[known], score[known], sensitive_features=kept)
    return {"auc": {str(k): v for k, v in auc.items()}, "ece": {str(k): v for k, v in ece.items()}}


def _decision_gaps(name: str, y_true: np.ndarray, y_pred: np.ndarray,
                   labels: Sequence[str]) -> dict[str, float]:
    """``dp:<name>`` and ``eo:<name>`` on the 0/1 decisions (NaN where undefined)."""
    out: dict[str, float] = {}
    for key, function in (("dp", demographic_parity_gap), ("eo", equal_opportunity_gap)):
        try:
            out[f"{key}:{name}"] = function(y_true, y_pred, sensitive_features=labels)
        except ValueError:
            out[f"{key}:{name}"] = float("nan")  # the score gap already warned about it
    return out
