"""Single "recipe" runs as committed summaries: the evidence that a task's FedAvg setting learns.

Before any sweep, issue 16 asks for one federated FedAvg setting per task that reaches a quality
bar (:data:`QUALITY_BARS`). Each try is one ``fedfair-med simulate CONFIG --out runs/recipes/NAME``;
its learning curve is the evidence, so it is kept as a small summary::

    results/recipes/<NAME>/   run.yaml, metrics.jsonl, report.json (complete runs only),
                              status.json (written here: complete or incomplete, rounds done)

``fedfair-med results collect-run RUN_DIR`` writes one (:func:`collect_run`). A run still in
progress or interrupted is its staging folder ``.NAME.incomplete-PID``
(:mod:`fedfair_med.runtime.rundir`); it may be collected, and its summary says "incomplete" until
a collect of the finished run replaces it. ``fedfair-med results render`` turns every summary into
a table per recipe and a line saying whether the bar was reached
(:func:`recipes_markdown`). Nothing per sample is copied: predictions.csv is only read, to add
the final model's ROC AUC and balanced accuracy (two numbers) that round records do not hold.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from typing import Any, Mapping

from fedfair_med.experiments.plan import SweepError, is_finished
from fedfair_med.runtime.rundir import (
    STAGING_MARK,
    RunDirectoryError,
    read_metrics,
    read_predictions,
    read_run_yaml,
    read_status,
)

RECIPES_FOLDER = "recipes"
RECIPE_STATUS = "status.json"
COMPLETE, INCOMPLETE = "complete", "incomplete"

# Issue 16, item 1: task -> metric -> the last evaluated round's test value to reach (>=).
# "dice" / "accuracy" are the round records' primary metric; "auc" and "balanced_accuracy" come
# from a round record when it holds them, else from the finished run's final test predictions.
QUALITY_BARS: dict[str, dict[str, float]] = {
    "fundus": {"dice": 0.70},
    "polyp": {"dice": 0.70},
    "skin": {"auc": 0.80, "balanced_accuracy": 0.70},
}
METRIC_LABELS = {"dice": "Dice", "accuracy": "accuracy", "auc": "AUC",
                 "auc_within_site": "AUC within sites", "balanced_accuracy": "balanced accuracy"}


class RecipeError(SweepError):
    """A folder is not a run, or a collect would lose evidence (one-line message)."""


# ---- collecting --------------------------------------------------------------------------------------
def recipe_name(run_dir: Path) -> str:
    """NAME of ``runs/recipes/NAME``, of its staging folder ``.NAME.incomplete-PID`` or of a
    failed run kept aside as ``NAME.failed[-N]``."""
    name = Path(run_dir).resolve().name
    if name.startswith(".") and STAGING_MARK in name:
        return name[1:].rsplit(STAGING_MARK, 1)[0]
    return re.sub(r"\.failed(-\d+)?$", "", name)


def _planned_rounds(config: Mapping[str, Any]) -> int | None:
    rounds = (config.get("resolved") or {}).get("rounds", config.get("rounds"))
    return int(rounds) if isinstance(rounds, (int, float)) else None


def _whole_records(text: str) -> str:
    """The complete JSON lines of a metrics.jsonl a running process may be appending to."""
    kept = []
    for line in text.splitlines(keepends=True):
        if not line.endswith("\n"):
            break  # torn last line: the writer is mid-way
        try:
            json.loads(line)
        except ValueError:
            if line.strip():
                break
        kept.append(line)
    return "".join(kept)


def _final_quality(run_dir: Path) -> dict[str, float]:
    """ROC AUC and balanced accuracy of the final model on the test split (classification)."""
    from fedfair_med.fairness.metrics import roc_auc, within_group_roc_auc

    try:
        predictions = read_predictions(run_dir)
    except RunDirectoryError:
        return {}
    if predictions is None or not {"y_true", "y_pred", "score"} <= set(predictions.columns):
        return {}
    y_true = predictions["y_true"].astype(float).to_numpy()
    y_pred = predictions["y_pred"].astype(float).to_numpy()
    recalls = [float((y_pred[y_true == c] == c).mean()) for c in (0.0, 1.0) if (y_true == c).any()]
    score = predictions["score"].astype(float).to_numpy()
    out = {"auc": roc_auc(y_true, score)}
    if "site" in predictions.columns and predictions["site"].nunique() > 1:
        out["auc_within_site"] = within_group_roc_auc(
            y_true, score, sensitive_features=predictions["site"].astype(str).to_numpy())
    if len(recalls) == 2:
        out["balanced_accuracy"] = sum(recalls) / 2
    return {k: float(v) for k, v in out.items() if math.isfinite(v)}


def read_recipe_status(summary: Path) -> dict[str, Any]:
    """The summary's status.json ({} when absent or unreadable)."""
    try:
        status = json.loads((Path(summary) / RECIPE_STATUS).read_text())
    except (OSError, ValueError):
        return {}
    return status if isinstance(status, dict) else {}


def collect_run(run_dir: Path, into: Path, force: bool = False, note: str | None = None) -> dict[str, Any]:
    """Copy one run's summary into ``into`` (replacing what is there); return its status.

    ``note`` says what run.yaml cannot (e.g. the code has changed since, so the same settings now
    train differently); it is kept when the summary is collected again without one.

    Raises :class:`RecipeError` when ``run_dir`` is not a run (no run.yaml mapping or no
    metrics.jsonl), or when an incomplete run would replace a complete summary without ``force``.
    """
    run_dir, into = Path(run_dir), Path(into)
    if not run_dir.is_dir():
        raise RecipeError(f"{run_dir} is not a directory")
    try:
        config = read_run_yaml(run_dir)
    except RunDirectoryError as err:
        raise RecipeError(f"{run_dir} is not a run directory: {err}") from None
    if not config or not (run_dir / "metrics.jsonl").is_file():
        raise RecipeError(f"{run_dir} is not a run directory (needs run.yaml and metrics.jsonl)")
    source_status = read_status(run_dir) or {}
    complete = source_status.get("status", COMPLETE) == COMPLETE and is_finished(run_dir)
    if (not complete and not force
            and read_recipe_status(into).get("status") == COMPLETE):
        raise RecipeError(f"{into} holds a complete run's summary; collecting the incomplete "
                          f"{run_dir} over it needs --force")
    note = note if note is not None else read_recipe_status(into).get("note")
    metrics = (run_dir / "metrics.jsonl").read_text(encoding="utf-8")
    if not complete:
        metrics = _whole_records(metrics)
    partial = into.with_name(into.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    shutil.copyfile(run_dir / "run.yaml", partial / "run.yaml")
    (partial / "metrics.jsonl").write_text(metrics, encoding="utf-8")
    if complete:
        shutil.copyfile(run_dir / "report.json", partial / "report.json")
    rounds = read_metrics(partial)
    status: dict[str, Any] = {
        "status": COMPLETE if complete else INCOMPLETE,
        "rounds_done": max((int(r["round"]) for r in rounds), default=0),
        "rounds_planned": _planned_rounds(config),
    }
    if not complete:
        status["run_status"] = source_status.get("status", "unknown")
        if source_status.get("error"):  # a failed run (NAME.failed): why it stopped
            status["error"] = str(source_status["error"])
    for key in ("started", "finished"):
        if key in source_status:
            status[key] = source_status[key]
    if complete:
        quality = _final_quality(run_dir)
        if quality:
            status["final_test"] = quality
    if note:
        status["note"] = str(note)
    (partial / RECIPE_STATUS).write_text(json.dumps(status, indent=1) + "\n", encoding="utf-8")
    if into.exists():
        shutil.rmtree(into)
    partial.rename(into)
    return status


# ---- reading and rendering ------------------------------------------------------------------------
def find_recipes(root: Path) -> list[Path]:
    """Every recipe summary under ``root`` (``root/<NAME>`` holding run.yaml), sorted by name."""
    root = Path(root)
    return sorted(p.parent for p in root.glob("*/run.yaml") if not p.parent.name.endswith(".partial"))


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    value = float(value)
    return f"{value:.3f}" if math.isfinite(value) else "—"


def _minutes(seconds: Any) -> str:
    return "—" if seconds is None else f"{float(seconds) / 60:.1f} min"


def settings_line(config: Mapping[str, Any]) -> str:
    """The settings that make a recipe, from run.yaml (resolved values where the run wrote them)."""
    resolved = config.get("resolved") or {}
    local = resolved.get("local") or {}
    data = config.get("data") or {}
    network = config.get("network") or "task default"
    kwargs = config.get("network_kwargs") or {}
    optimiser = local.get("optimizer", config.get("optimizer")) or "task default"
    if optimiser == "sgd" and local.get("momentum") is not None:
        optimiser += f" (momentum {local['momentum']})"
    if local.get("optimizer_state", config.get("optimizer_state")) == "keep":
        optimiser += ", each site's state kept across rounds"
    epochs = local.get("epochs", config.get("epochs"))
    parts = [f"task `{config.get('task', '?')}`", f"method `{config.get('method', '?')}`",
             f"seed {config.get('seed', '?')}",
             f"{len(resolved.get('sites') or [])} sites",
             f"network `{network}`" + (f" {json.dumps(kwargs, sort_keys=True)}" if kwargs else ""),
             f"image size {'×'.join(str(v) for v in data['image_size'])}"
             if isinstance(data.get("image_size"), (list, tuple)) else
             f"image size {data.get('image_size', 'task default')}",
             f"optimiser {optimiser}", f"lr {local.get('lr', config.get('lr'))}"
             + (f" cosine-decayed to {local['lr_final']} over the rounds"
                if local.get("lr_final") is not None else ""),
             f"batch {resolved.get('batch_size', config.get('batch_size'))}",
             f"{epochs} epoch{'' if epochs == 1 else 's'} × {_planned_rounds(config)} rounds"]
    steps = local.get("max_steps", config.get("max_steps"))
    if steps:
        parts.append(f"at most {steps} steps a round")
    extra = {k: v for k, v in sorted(data.items()) if k not in ("manifests", "cache", "image_size")}
    parts += [f"{k} {v}" for k, v in extra.items()]
    return ", ".join(parts)


def _value(record: Mapping[str, Any], metric: str, primary: str) -> float | None:
    value = record.get("metric") if metric == primary else record.get(metric)
    return None if value is None else float(value)


def verdict(task: str, last: Mapping[str, Any] | None, primary: str,
            final_test: Mapping[str, float], complete: bool) -> tuple[str, list[str]]:
    """("reached" / "not reached" / "no bar", one "metric value ≥ bar" phrase per bar).

    Values come from the last evaluated round's record, or (metrics a round record lacks) from
    the finished run's final test predictions, which are that same last round's.
    """
    bars = QUALITY_BARS.get(task)
    if not bars:
        return "no bar", []
    phrases, reached = [], True
    for metric, bar in bars.items():
        value = _value(last, metric, primary) if last is not None else None
        if value is None and complete:
            value = final_test.get(metric)
        label = METRIC_LABELS.get(metric, metric)
        if value is None or not math.isfinite(value):
            phrases.append(f"{label} not measured (bar {bar:.2f})")
            reached = False
            continue
        phrases.append(f"{label} {value:.3f} {'≥' if value >= bar else '<'} {bar:.2f}")
        reached = reached and value >= bar
    return ("reached" if reached else "not reached"), phrases


def recipe_markdown(summary: Path, plot_link: str | None = None) -> tuple[str, str]:
    """(one recipe's table and settings, its summary line)."""
    summary = Path(summary)
    config = read_run_yaml(summary)
    status = read_recipe_status(summary)
    resolved = config.get("resolved") or {}
    primary = str(resolved.get("primary_metric", "metric"))
    task = str(config.get("task", "?"))
    complete = status.get("status") == COMPLETE
    done, planned = status.get("rounds_done"), status.get("rounds_planned")
    state = COMPLETE if complete else f"incomplete: {done} of {planned} rounds"
    if status.get("run_status") == "failed":
        state += ", the run failed"
    records = [r for r in read_metrics(summary) if r.get("metric") is not None]
    sites = sorted({s for r in records for s in (r.get("sites") or {})})
    gaps = sorted({g for r in records for g in (r.get("gaps") or {})}, key=lambda g: (g != "ea", g))
    quality = [m for m in ("auc", "balanced_accuracy") if any(m in r for r in records)]
    name = summary.name
    lines = [f"#### Recipe `{name}` ({state})", "", settings_line(config) + ".", ""]
    if status.get("note"):
        lines += [f"Note: {status['note']}", ""]
    if not records:
        lines += ["No evaluated round yet.", ""]
    else:
        head = (["round", "elapsed", f"val {primary}", f"test {primary}"]
                + [f"test {primary} {s}" for s in sites] + [f"{g.upper()} gap" for g in gaps]
                + [f"test {METRIC_LABELS[m]}" for m in quality])
        lines += ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
        for r in records:
            cells = [str(r["round"]), _minutes(r.get("elapsed_s")),
                     _fmt((r.get("val") or {}).get("metric")), _fmt(r.get("metric"))]
            cells += [_fmt(((r.get("sites") or {}).get(s) or {}).get("metric")) for s in sites]
            cells += [_fmt((r.get("gaps") or {}).get(g)) for g in gaps]
            cells += [_fmt(r.get(m)) for m in quality]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    final_test = status.get("final_test") or {}
    if final_test and complete:
        lines += ["Final model on the test split (from its predictions, at collect time): "
                  + ", ".join(f"{METRIC_LABELS.get(k, k)} {_fmt(v)}" for k, v in sorted(final_test.items()))
                  + ".", ""]
    if plot_link and records:
        lines += [f"![{name} learning curve]({plot_link})", ""]
    last = records[-1] if records else None
    outcome, phrases = verdict(task, last, primary, final_test, complete)
    where = f"round {last['round']}" if last else "no evaluated round"
    if outcome == "no bar":
        line = f"`{name}` ({task}): no quality bar for this task in issue 16 ({state})."
    else:
        line = (f"`{name}` ({task}, {where}, {state}): **{outcome}** — " + "; ".join(phrases) + ".")
    return "\n".join(lines) + "\n", line


def plot_recipe(summary: Path, path: Path) -> Path | None:
    """Validation and test metric per evaluated round (None when no round was evaluated)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    summary = Path(summary)
    records = [r for r in read_metrics(summary) if r.get("metric") is not None]
    if not records:
        return None
    config = read_run_yaml(summary)
    primary = str((config.get("resolved") or {}).get("primary_metric", "metric"))
    figure = Figure(figsize=(6.4, 4.0), dpi=100)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot(1, 1, 1)
    rounds = [r["round"] for r in records]
    val = [math.nan if (r.get("val") or {}).get("metric") is None else r["val"]["metric"]
           for r in records]
    ax.plot(rounds, val, marker="o", label=f"val {primary}")
    ax.plot(rounds, [r["metric"] for r in records], marker="s", label=f"test {primary}")
    for metric in ("auc", "balanced_accuracy"):  # classification quality, where rounds hold it
        if any(r.get(metric) is not None for r in records):
            ax.plot(rounds, [math.nan if r.get(metric) is None else r[metric] for r in records],
                    marker="^", label=f"test {METRIC_LABELS[metric]}")
    for metric, bar in (QUALITY_BARS.get(str(config.get("task"))) or {}).items():
        ax.axhline(bar, color="grey", linestyle="--", linewidth=0.8,
                   label=f"issue 16 bar: {METRIC_LABELS.get(metric, metric)} {bar:.2f}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("test / val value")
    ax.set_title(f"Recipe {summary.name}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    return path


def recipes_markdown(root: Path, plots: Path | None = None, plots_link: str | None = None,
                     where: str = "results/recipes") -> str:
    """The "Recipes" part of the generated page: summary lines first, then one table per recipe.

    With ``plots``, each recipe's curve is (re)written there as ``recipe-<NAME>.png`` and linked
    as ``plots_link/recipe-<NAME>.png``; the text does not depend on the images.
    """
    summaries = find_recipes(root)
    lines = ["### Recipes (issue 16, item 1)", "",
             f"Single FedAvg runs that look for a per-task setting reaching the issue's bars "
             f"({'; '.join(f'{t}: ' + ', '.join(f'{METRIC_LABELS.get(m, m)} ≥ {b:.2f}' for m, b in bars.items()) for t, bars in QUALITY_BARS.items())}; "
             f"last evaluated round, test split). Summaries: `{where}/<NAME>`, written by "
             f"`fedfair-med results collect-run runs/recipes/NAME`.", ""]
    if not summaries:
        return "\n".join(lines + ["No recipe run has been collected yet.", ""]) + "\n"
    bodies, verdicts = [], []
    for summary in summaries:
        link = None
        if plots_link is not None:
            link = f"{plots_link.rstrip('/')}/recipe-{summary.name}.png"
        if plots is not None:
            Path(plots).mkdir(parents=True, exist_ok=True)
            plot_recipe(summary, Path(plots) / f"recipe-{summary.name}.png")
        body, line = recipe_markdown(summary, link)
        bodies.append(body.rstrip() + "\n")
        verdicts.append(f"* {line}")
    return "\n".join(lines + verdicts + [""] + bodies)
