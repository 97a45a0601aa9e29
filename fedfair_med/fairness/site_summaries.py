"""Round metrics from aggregate statistics, so no per-sample value has to leave a site.

A site turns its test predictions into a :func:`site_summary` — counts and sums per site and
per group — and the server :func:`combine_summaries` into the pooled metric and the gaps:

* EA = max_k |D_k − D| with D_k the mean per-sample metric on site k and D the pooled mean;
* DP(a) = max_g |E[s | a = g] − E[s | a known]| with s the positive-class probability;
* EO(a) = the same over samples with y = 1;
* classification also gets the balanced accuracy ½ (TPR + TNR), from the correct-decision sums
  over positives and over all samples (how a model that calls everything benign is told apart
  from one that learned, on label-skewed sites).

A sample whose attribute is missing belongs to no group of that attribute and is left out of
that attribute's pooled mean too — the definition of :mod:`fedfair_med.fairness.metrics` and
docs/metrics.md (HAM10000 has rows without age or sex).

Sums of per-sample values reproduce the pooled means exactly, so the in-process runtime (which
could pool predictions) and the federated one (which cannot) report the same numbers.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable, Mapping

import pandas as pd

from fedfair_med.contracts import is_missing
from fedfair_med.fairness.gap import max_gap

Summary = dict[str, Any]


def _add(acc: dict[str, float], metric: float, score: float, positive: bool) -> None:
    acc["n"] += 1
    acc["metric"] += metric
    acc["score"] += score
    if positive:
        acc["n_pos"] += 1
        acc["score_pos"] += score
        acc["metric_pos"] += metric


def _empty() -> dict[str, float]:
    return {"n": 0, "metric": 0.0, "score": 0.0, "n_pos": 0, "score_pos": 0.0, "metric_pos": 0.0}


def site_summary(predictions: pd.DataFrame, attributes: Iterable[str]) -> Summary:
    """Counts and sums of metric and score, overall and per value of each attribute.

    ``predictions`` has columns metric, score, y_true and the attribute columns; missing
    attribute values ('' or NaN) are left out of that attribute's groups.
    """
    overall = _empty()
    groups: dict[str, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(_empty))
    attributes = [a for a in attributes if a in predictions.columns]
    for row in predictions.itertuples(index=False):
        r = row._asdict()
        positive = float(r["y_true"]) >= 0.5
        _add(overall, float(r["metric"]), float(r["score"]), positive)
        for a in attributes:
            value = r[a]
            if is_missing(value):
                continue
            _add(groups[a][str(value)], float(r["metric"]), float(r["score"]), positive)
    return {"overall": overall, "groups": {a: dict(g) for a, g in groups.items()}}


def _merge(into: dict[str, float], other: Mapping[str, float]) -> None:
    for key, value in other.items():
        into[key] = into.get(key, 0) + value


def _gap(groups: Mapping[str, Mapping[str, float]], num: str, den: str) -> float:
    """The gap of ``num / den`` over ``groups`` (:func:`fedfair_med.fairness.gap.max_gap`)."""
    return max_gap([g[num] for g in groups.values()], [g[den] for g in groups.values()])


def _balanced_accuracy(acc: Mapping[str, float]) -> float:
    """½ (TPR + TNR) with ``metric`` the per-sample correctness; NaN with one class only."""
    n_neg = acc["n"] - acc["n_pos"]
    if acc["n_pos"] <= 0 or n_neg <= 0:
        return float("nan")
    return 0.5 * (acc["metric_pos"] / acc["n_pos"] + (acc["metric"] - acc["metric_pos"]) / n_neg)


def combine_summaries(summaries: Mapping[str, Summary], *, classification: bool) -> dict[str, Any]:
    """Pooled metric, per-site table and fairness gaps from the sites' summaries."""
    sites = {s: dict(summaries[s]["overall"]) for s in sorted(summaries)}
    total = _empty()
    for s in sites.values():
        _merge(total, s)
    attr_groups: dict[str, dict[str, dict[str, float]]] = defaultdict(dict)
    for s in sorted(summaries):
        for a, groups in summaries[s]["groups"].items():
            for g, acc in groups.items():
                _merge(attr_groups[a].setdefault(g, _empty()), acc)
    gaps: dict[str, float] = {"ea": _gap(sites, "metric", "n")}
    if classification:
        for a in sorted(attr_groups):
            if a == "age":
                continue
            gaps[f"dp:{a}"] = _gap(attr_groups[a], "score", "n")
            gaps[f"eo:{a}"] = _gap(attr_groups[a], "score_pos", "n_pos")
    combined: dict[str, Any] = {
        "metric": total["metric"] / total["n"] if total["n"] else float("nan"),
        "n": int(total["n"]),
        "sites": {s: {"n": int(v["n"]), "metric": v["metric"] / v["n"] if v["n"] else float("nan")}
                  for s, v in sites.items()},
        "groups": {a: {g: {"n": int(v["n"]), "metric": v["metric"] / v["n"] if v["n"] else float("nan"),
                           "mean_score": v["score"] / v["n"] if v["n"] else float("nan")}
                       for g, v in sorted(groups.items())}
                   for a, groups in sorted(attr_groups.items()) if a != "age"},
        "gaps": gaps,
    }
    if classification and all("metric_pos" in summaries[s]["overall"] for s in summaries):
        combined["balanced_accuracy"] = _balanced_accuracy(total)  # absent from older summaries
    return combined
