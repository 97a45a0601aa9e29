"""A sweep's comparison: long-format run table, Pareto fronts, selected settings, t-tests, plot.

Every number is from a run's **last round** (never the best test round). The setting reported for
each method is chosen on the **validation** split only:

    score(point) = w_m · mean_seeds(val metric) − w_g · mean_seeds(val gap),  chosen = argmax score

(ties go to the earlier grid point). The test metric and gap of the chosen setting are then
reported as mean ± sample std over seeds, with a two-sided Welch t-test against the reference
method's chosen setting: t = (x̄₁ − x̄₂) / √(s₁²/n₁ + s₂²/n₂) with Welch–Satterthwaite degrees of
freedom (:func:`scipy.stats.ttest_ind` with ``equal_var=False``).

The Pareto front of a method is its set of grid points (mean over seeds) that no other point of
the same method beats on both axes: point j dominates i when metric_j ≥ metric_i and gap_j ≤
gap_i with at least one strict. It describes the test trade-off; it selects nothing.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from fedfair_med.experiments.plan import Selection, Sweep, SweepError
from fedfair_med.runtime.rundir import read_metrics, read_run_yaml

NAN = float("nan")


def _number(value: Any) -> float:
    return NAN if value is None else float(value)


def _gap_order(names: Sequence[str]) -> list[str]:
    return sorted(set(names), key=lambda g: (g != "ea", g))


# ---- the long-format table -------------------------------------------------------------------
def load_runs(sweep: Sweep, out: str | Path, summaries: bool = False) -> pd.DataFrame:
    """One row per run (runs.csv): label, method, point, grid params, seed, last-round numbers.

    Columns ``test_metric`` / ``test_<gap>`` come from the test split, ``val_metric`` /
    ``val_<gap>`` from the validation split (NaN when the run had none); ``path`` is relative
    to ``out``. With ``summaries``, ``out`` is a results folder
    (:meth:`~fedfair_med.experiments.sweep.PlannedRun.summary_path`).
    """
    out = Path(out)
    rows: list[dict[str, Any]] = []
    params = sweep.grid_params
    for run in sweep.runs:
        path = run.summary_path(out) if summaries else run.path(out)
        records = read_metrics(path)
        if not records:
            raise SweepError(f"{path}: metrics.jsonl has no rounds")
        last = records[-1]
        resolved = read_run_yaml(path).get("resolved") or {}
        row: dict[str, Any] = {"label": run.label, "method": run.method, "point": run.point}
        row.update({p: run.params.get(p, NAN) for p in params})
        row.update(seed=run.seed, rounds=int(last["round"]),
                   metric_name=resolved.get("primary_metric", "metric"),
                   test_metric=_number(last.get("metric")))
        row.update({f"test_{g}": _number(v) for g, v in (last.get("gaps") or {}).items()})
        val = last.get("val") or {}
        row["val_metric"] = _number(val.get("metric"))
        row.update({f"val_{g}": _number(v) for g, v in (val.get("gaps") or {}).items()})
        row["path"] = run.relpath
        rows.append(row)
    frame = pd.DataFrame(rows)
    gaps = _gap_order([c[5:] for c in frame.columns if c.startswith("test_") and c != "test_metric"]
                      + [c[4:] for c in frame.columns if c.startswith("val_") and c != "val_metric"])
    head = ["label", "method", "point", *params, "seed", "rounds", "metric_name"]
    ordered = (head + ["test_metric"] + [f"test_{g}" for g in gaps]
               + ["val_metric"] + [f"val_{g}" for g in gaps] + ["path"])
    for column in ordered:
        if column not in frame.columns:
            frame[column] = NAN
    return frame[ordered]


def _require(runs: pd.DataFrame, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in runs.columns]
    if missing:
        raise SweepError(f"the run table has no column(s) {missing}")


# ---- per grid point ---------------------------------------------------------------------------
def summarise(runs: pd.DataFrame, gap: str, selection: Selection | None = None) -> pd.DataFrame:
    """Mean (and sample std) over seeds per (label, point), in the table's order."""
    selection = selection or Selection(gap=gap)
    _require(runs, ["label", "method", "point", "seed", "test_metric", f"test_{gap}",
                    "val_metric", f"val_{gap}"])
    grouped = runs.groupby(["label", "point"], sort=False)
    summary = grouped.agg(
        method=("method", "first"), n=("seed", "count"),
        test_metric_mean=("test_metric", "mean"), test_metric_std=("test_metric", "std"),
        test_gap_mean=(f"test_{gap}", "mean"), test_gap_std=(f"test_{gap}", "std"),
        val_metric_mean=("val_metric", "mean"), val_gap_mean=(f"val_{gap}", "mean"),
    ).reset_index()
    summary["val_score"] = (selection.metric_weight * summary["val_metric_mean"]
                            - selection.gap_weight * summary["val_gap_mean"])
    return summary


def pareto_mask(metric: Sequence[float], gap: Sequence[float]) -> np.ndarray:
    """True for points no other point dominates (metric higher is better, gap lower is better).

    Equal points do not dominate each other; points with a NaN coordinate are never on the front
    and dominate nothing.
    """
    m, g = np.asarray(metric, dtype=float), np.asarray(gap, dtype=float)
    valid = np.isfinite(m) & np.isfinite(g)
    front = valid.copy()
    for i in np.flatnonzero(valid):
        others = valid & (m >= m[i]) & (g <= g[i]) & ((m > m[i]) | (g < g[i]))
        if others.any():
            front[i] = False
    return front


def pareto_fronts(summary: pd.DataFrame) -> pd.DataFrame:
    """``summary`` with ``on_front``: the point is on its own method's Pareto front."""
    result = summary.copy()
    result["on_front"] = False
    for _, index in result.groupby("label", sort=False).groups.items():
        part = result.loc[index]
        result.loc[index, "on_front"] = pareto_mask(part["test_metric_mean"], part["test_gap_mean"])
    return result


def select_settings(runs: pd.DataFrame, selection: Selection) -> pd.DataFrame:
    """Per label, the grid point with the highest validation score (see the module docstring).

    Only ``val_*`` columns enter the choice; a method whose runs have no validation numbers is
    an error rather than a silent fall-back to test.
    """
    summary = summarise(runs, selection.gap, selection)
    chosen = []
    for label, part in summary.groupby("label", sort=False):
        scores = part["val_score"]
        if not np.isfinite(scores.to_numpy(dtype=float)).any():
            raise SweepError(
                f"{label}: no validation metric in its runs, so no setting can be selected "
                "without the test set (the task's sites need a val split)")
        chosen.append(part.loc[scores.idxmax()])
    return pd.DataFrame(chosen).reset_index(drop=True)


# ---- tests and the paper-style table -----------------------------------------------------------
def welch_p(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided Welch t-test p-value (NaN with fewer than two finite values on a side)."""
    from scipy.stats import ttest_ind

    x = np.asarray(a, dtype=float)
    y = np.asarray(b, dtype=float)
    x, y = x[np.isfinite(x)], y[np.isfinite(y)]
    if len(x) < 2 or len(y) < 2:
        return NAN
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(ttest_ind(x, y, equal_var=False).pvalue)


def paper_table(runs: pd.DataFrame, chosen: pd.DataFrame, gap: str, reference: str, *,
                require_reference: bool = True) -> pd.DataFrame:
    """Each method at its chosen setting: test mean ± std over seeds and p vs ``reference``.

    A study still running may have no finished ``reference`` run yet: with
    ``require_reference=False`` its table then has no p-values instead of failing.
    """
    def values(label: str, point: str, column: str) -> np.ndarray:
        part = runs[(runs["label"] == label) & (runs["point"] == point)]
        return part[column].to_numpy(dtype=float)

    ref = chosen[chosen["label"] == reference]
    if ref.empty and require_reference:
        raise SweepError(f"reference {reference!r} has no selected setting")
    ref_point = None if ref.empty else ref.iloc[0]["point"]
    rows = []
    for _, row in chosen.iterrows():
        metric = values(row["label"], row["point"], "test_metric")
        gaps = values(row["label"], row["point"], f"test_{gap}")
        is_ref = row["label"] == reference
        rows.append({
            "label": row["label"], "method": row["method"], "setting": row["point"],
            "n": int(len(metric)),
            "metric_mean": float(np.nanmean(metric)),
            "metric_std": float(np.nanstd(metric, ddof=1)) if len(metric) > 1 else NAN,
            "gap_mean": float(np.nanmean(gaps)),
            "gap_std": float(np.nanstd(gaps, ddof=1)) if len(gaps) > 1 else NAN,
            "p_metric": NAN if is_ref or ref_point is None
            else welch_p(metric, values(reference, ref_point, "test_metric")),
            "p_gap": NAN if is_ref or ref_point is None
            else welch_p(gaps, values(reference, ref_point, f"test_{gap}")),
            "val_score": float(row["val_score"]),
            "reference": bool(is_ref),
        })
    return pd.DataFrame(rows)


def caption(selection: Selection, n_seeds: int, metric_name: str, reference: str,
            planned_seeds: int | None = None, fewest_seeds: int | None = None) -> str:
    """How the table's settings were chosen, in words (printed above the table).

    ``n_seeds``: the seeds with a finished run; ``planned_seeds`` (when more) says the rest wait;
    ``fewest_seeds`` (when fewer than ``n_seeds``) says some rows have fewer (column n).
    """
    weight = "" if selection.metric_weight == 1 else f"{selection.metric_weight:g}·"
    have = (f"{fewest_seeds} to {n_seeds}" if fewest_seeds is not None and fewest_seeds < n_seeds
            else f"{n_seeds}")
    seeds = (f"{have} of {planned_seeds} planned seeds so far"
             if planned_seeds is not None and planned_seeds > n_seeds else f"{have} seeds")
    if have != f"{n_seeds}":
        seeds += " (each row's in column n)"
    return (f"Selected on validation: max {weight}mean val {metric_name} − "
            f"{selection.gap_weight:g}·mean val {selection.gap.upper()} gap; last round; "
            f"{seeds}. Test {metric_name} and {selection.gap.upper()} gap at the last round, "
            f"mean ± std over seeds; p: two-sided Welch t-test against {reference} at its "
            f"selected setting.")


def _pm(mean: float, std: float) -> str:
    if not math.isfinite(mean):
        return "—"
    return f"{mean:.3f}" if not math.isfinite(std) else f"{mean:.3f} ± {std:.3f}"


def _p(value: float, is_ref: bool) -> str:
    if is_ref:
        return "ref."
    return "—" if not math.isfinite(value) else f"{value:.3g}"


def table_markdown(table: pd.DataFrame, caption_text: str, metric_name: str, gap: str) -> str:
    lines = [f"Table: {caption_text}", "",
             f"| method | setting | n | {metric_name} ↑ | {gap.upper()} gap ↓ | p ({metric_name}) | p (gap) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for _, r in table.iterrows():
        lines.append(
            f"| {r['label']} | {r['setting']} | {r['n']} | {_pm(r['metric_mean'], r['metric_std'])}"
            f" | {_pm(r['gap_mean'], r['gap_std'])} | {_p(r['p_metric'], r['reference'])}"
            f" | {_p(r['p_gap'], r['reference'])} |")
    return "\n".join(lines) + "\n"


# ---- the plot ----------------------------------------------------------------------------------
def plot_pareto(fronts: pd.DataFrame, path: Path, metric_name: str, gap: str, n_seeds: int) -> Path:
    """Every grid point (faint), each method's front (line) and its selected point (star)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.8), dpi=120)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot(1, 1, 1)
    colours = [f"C{i}" for i in range(10)]
    for i, (label, part) in enumerate(fronts.groupby("label", sort=False)):
        colour = colours[i % len(colours)]
        ax.scatter(part["test_gap_mean"], part["test_metric_mean"], color=colour, alpha=0.35, s=24)
        front = part[part["on_front"]].sort_values("test_gap_mean")
        ax.plot(front["test_gap_mean"], front["test_metric_mean"], color=colour, marker="o",
                label=label)
        selected = part[part["chosen"].astype(bool)] if "chosen" in part else part.iloc[:0]
        for _, row in selected.iterrows():
            ax.scatter([row["test_gap_mean"]], [row["test_metric_mean"]], color=colour, marker="*",
                       s=160, edgecolors="black", zorder=3)
            ax.annotate(row["point"], (row["test_gap_mean"], row["test_metric_mean"]),
                        textcoords="offset points", xytext=(5, 5), fontsize=7)
    ax.set_xlabel(f"test {gap.upper()} gap (lower is better)")
    ax.set_ylabel(f"test {metric_name} (higher is better)")
    ax.set_title(f"Pareto fronts per method (mean over {n_seeds} seeds, last round; ★ selected on val)",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    return path


# ---- everything at once --------------------------------------------------------------------------
def write_outputs(sweep: Sweep, out: str | Path, source: str | Path | None = None) -> dict[str, Path]:
    """runs.csv, pareto.csv/png, table.csv/md in ``out``; returns their paths by name.

    The runs are read from ``source`` (a results folder of summaries) when given, else ``out``.
    """
    out = Path(out)
    gap = sweep.selection.gap
    runs = load_runs(sweep, out) if source is None else load_runs(sweep, source, summaries=True)
    paths = {"runs.csv": out / "runs.csv"}
    runs.to_csv(paths["runs.csv"], index=False)
    metric_name = str(runs["metric_name"].iloc[0])
    n_seeds = len(sweep.seeds)

    fronts = pareto_fronts(summarise(runs, gap, sweep.selection))
    chosen = select_settings(runs, sweep.selection)
    chosen_keys = set(zip(chosen["label"], chosen["point"]))
    fronts["chosen"] = [(lab, pt) in chosen_keys for lab, pt in zip(fronts["label"], fronts["point"])]
    paths["pareto.csv"] = out / "pareto.csv"
    fronts.to_csv(paths["pareto.csv"], index=False)
    paths["pareto.png"] = plot_pareto(fronts, out / "pareto.png", metric_name, gap, n_seeds)

    table = paper_table(runs, chosen, gap, sweep.reference)
    table["metric_name"], table["gap_name"] = metric_name, gap
    paths["table.csv"] = out / "table.csv"
    table.to_csv(paths["table.csv"], index=False)
    text = caption(sweep.selection, n_seeds, metric_name, sweep.reference)
    paths["table.md"] = out / "table.md"
    paths["table.md"].write_text(table_markdown(table, text, metric_name, gap))
    return paths
