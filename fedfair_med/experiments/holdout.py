"""Leave one site out: how does a federation's model do at a hospital that took no part?

A sweep file with ``holdout: all`` (or ``holdout: [site, …]``) runs every method, setting and
seed once per site of ``base.data.manifests``: the federation trains on the *other* sites with
the same settings, and the trained model is then audited on the left-out site's test split with
the code of ``fedfair-med report --model`` (:func:`~fedfair_med.runtime.model_audit.audit_model`
scoring through the site runtime's own evaluation loop, with the run's network, image options and
age edges, every attribute of the manifest). Planning is :mod:`fedfair_med.experiments.plan`
(``holdout`` key), running :mod:`fedfair_med.experiments.sweep`; this module audits a fold and
tabulates the folds.

Layout and resume are those of any sweep, with the fold first in the setting folder::

    OUT/runs/<label>/holdout=<site>[,<point>]/seed-<s>/   run files + holdout/ (the audit's files)
                                                          + holdout.json (the audit's report)
    results/<study>/<label>/holdout=<site>[,<point>]/seed-<s>/   run.yaml, metrics.jsonl,
                                                          report.json, holdout.json

A fold is trained and audited inside ``seed-<s>.partial/`` and renamed only when both are done,
and a fold folder counts as finished only when its ``holdout.json`` parses
(:func:`~fedfair_med.experiments.plan.is_finished`), so an interrupted fold is redone, never
counted. ``holdout.json`` holds the audit's aggregates (overall, per group, gaps with 95 %
bootstrap intervals) and which sites trained; the per-sample predictions stay in the run folder.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from fedfair_med.experiments.plan import (
    HOLDOUT_FILE,
    Sweep,
    SweepError,
    fold_name,
    holdout_point,
    point_name,
    split_holdout_point,
)
from fedfair_med.runtime.rundir import read_metrics, read_run_yaml

__all__ = ["HOLDOUT_DIR", "audit_fold", "fold_rows", "holdout_markdown", "holdout_tables",
           "missing_folds", "write_holdout_outputs"]

HOLDOUT_DIR = "holdout"  # the audit's own files (predictions.csv, report.*) inside a fold's run
MIN_GROUP_SIZE = 10  # report --model's default


def audit_fold(run_dir: str | Path, manifest: str | Path,
               min_group_size: int = MIN_GROUP_SIZE) -> dict[str, Any]:
    """Audit a finished run's ``model.pt`` on the held-out site ``manifest``; write holdout.json.

    The arguments are those ``report --model RUN/model.pt --run-yaml RUN/run.yaml --manifest M``
    derives from the run.yaml. Refuses a model whose federation trained on the audited site.
    """
    from fedfair_med.runtime.model_audit import audit_model, read_run_settings

    run_dir = Path(run_dir)
    settings = read_run_settings(run_dir / "run.yaml")
    resolved = read_run_yaml(run_dir).get("resolved") or {}
    training = [str(s) for s in resolved.get("sites") or []]
    result = audit_model(
        task=str(settings["task"]), weights=run_dir / "model.pt", manifest=manifest,
        out_dir=run_dir / HOLDOUT_DIR, attributes=[],
        split="test", age_edges=tuple(settings.get("age_edges") or (60.0,)),
        min_group_size=min_group_size, network=settings.get("network"),
        network_kwargs=settings.get("network_kwargs"), data_options=settings.get("data"),
        run_method=settings.get("method"),
    )
    report = result.report
    audited = [str(g["group"]) for g in report.get("groups", []) if g.get("attribute") == "site"]
    leaked = sorted(set(audited) & set(training))
    if leaked:
        raise SweepError(f"{run_dir}: held-out site {leaked} took part in training ({training})")
    record = {"holdout": {"fold": fold_name(manifest), "manifest": str(manifest),
                          "site": audited[0] if audited else fold_name(manifest),
                          "training_sites": training, "split": "test",
                          "samples": int(len(result.predictions))},
              **report}
    target = run_dir / HOLDOUT_FILE
    partial = target.with_name(target.name + ".partial")
    partial.write_text(json.dumps(record, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(partial, target)
    return record


# ---- tables -------------------------------------------------------------------------------------
def _number(value: Any) -> float:
    return math.nan if value is None else float(value)


def _last_metric(path: Path) -> float:
    """The pooled test metric of the training sites at the last round (metrics.jsonl)."""
    records = read_metrics(path)
    if not records:
        raise SweepError(f"{path}: metrics.jsonl has no rounds")
    return _number(records[-1].get("metric"))


def fold_rows(sweep: Sweep, folder: str | Path, summaries: bool = False) -> pd.DataFrame:
    """One row per finished fold run: in-federation and held-out metric, gaps, group metrics.

    ``folder`` is a sweep output folder, or with ``summaries`` a results folder. Columns:
    ``gap_<name>`` (+ ``_lo`` / ``_hi``: the audit's 95 % interval) for every gap of the audit
    except the one-site ``ea``, and ``group_<attribute>=<group>`` for each single attribute.
    """
    folder = Path(folder)
    rows = []
    for run in sweep.runs:
        path = run.summary_path(folder) if summaries else run.path(folder)
        audit = json.loads((path / HOLDOUT_FILE).read_text())
        fold, point = split_holdout_point(run.point)
        overall = audit.get("overall") or {}
        low, high = (list(overall.get("ci95") or []) + [None, None])[:2]
        row: dict[str, Any] = {
            "label": run.label, "method": run.method, "fold": fold, "point": point,
            "seed": run.seed, "site": audit["holdout"]["site"],
            "training_sites": ",".join(audit["holdout"]["training_sites"]),
            "metric_name": audit.get("primary_metric", "metric"), "n": int(overall.get("n", 0)),
            "federation_metric": _last_metric(path),
            "heldout_metric": _number(overall.get("metric")),
            "heldout_lo": _number(low), "heldout_hi": _number(high),
        }
        row["drop"] = row["heldout_metric"] - row["federation_metric"]
        if "auc" in overall:  # classification: what a small gap on scores could hide
            row["heldout_auc"] = _number(overall.get("auc"))
            row["heldout_ece"] = _number(overall.get("ece"))
            row.update({f"decision_{g}": _number(v)
                        for g, v in (audit.get("decision_gaps") or {}).items()})
        intervals = audit.get("gaps_ci95") or {}
        for gap, value in (audit.get("gaps") or {}).items():
            if gap == "ea":  # over sites: one site, always 0
                continue
            lo, hi = (list(intervals.get(gap) or []) + [None, None])[:2]
            row.update({f"gap_{gap}": _number(value), f"gap_{gap}_lo": _number(lo),
                        f"gap_{gap}_hi": _number(hi)})
        for group in audit.get("groups", []):
            attribute = str(group.get("attribute"))
            if attribute == "site" or "×" in attribute:
                continue
            row[f"group_{attribute}={group['group']}"] = _number(group.get("metric"))
            if "auc" in group:
                row[f"auc_{attribute}={group['group']}"] = _number(group.get("auc"))
        rows.append(row)
    return pd.DataFrame(rows)


def _cell(values: pd.Series, low: pd.Series | None = None, high: pd.Series | None = None) -> str:
    """One seed: the value [its 95 % interval]; several: mean ± std over seeds."""
    finite = values[np.isfinite(values.to_numpy(dtype=float))]
    if finite.empty:
        return "—"
    if len(values) == 1:
        text = f"{float(finite.iloc[0]):.3f}"
        if low is not None and high is not None and math.isfinite(low.iloc[0]) and math.isfinite(high.iloc[0]):
            text += f" [{float(low.iloc[0]):.3f}, {float(high.iloc[0]):.3f}]"
        return text
    return f"{float(finite.mean()):.3f} ± {float(finite.std(ddof=1)) if len(finite) > 1 else 0.0:.3f}"


def holdout_tables(frame: pd.DataFrame) -> list[str]:
    """Two Markdown tables: per fold and method, the held-out vs in-federation metric and the
    held-out gaps; then the held-out metric per group."""
    if frame.empty:
        return ["No fold has finished yet.", ""]
    metric = str(frame["metric_name"].iloc[0])
    gaps = [c[4:] for c in frame.columns
            if c.startswith("gap_") and not c.endswith(("_lo", "_hi"))]
    groups = [c for c in frame.columns if c.startswith(("group_", "auc_"))]
    keys = ["fold", "label", "point"]
    order = list(dict.fromkeys(zip(frame["fold"], frame["label"], frame["point"])))
    header = ["held-out site", "method", "setting", "seeds", f"test {metric} in the federation",
              f"{metric} on the held-out site", "held-out − federation",
              *(f"{g.upper()} gap (held-out) ↓" for g in gaps)]
    lines = ["| " + " | ".join(header) + " |", "|---|---|---|---:|---:|---:|---:|" + "---:|" * len(gaps)]
    grouped = {key: part for key, part in frame.groupby(keys, sort=False)}
    for key in order:
        part = grouped[key]
        site = str(part["site"].iloc[0])
        cells = [site, key[1], key[2], str(len(part)), _cell(part["federation_metric"]),
                 _cell(part["heldout_metric"], part["heldout_lo"], part["heldout_hi"]),
                 _cell(part["drop"])]
        cells += [_cell(part[f"gap_{g}"], part[f"gap_{g}_lo"], part[f"gap_{g}_hi"]) for g in gaps]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if groups:
        lines += [f"The held-out site's {metric} per group (mean over seeds; groups under "
                  f"{MIN_GROUP_SIZE} images are flagged in each audit's report"
                  + ("; AUC: ROC AUC within the group" if any(g.startswith("auc_") for g in groups)
                     else "") + ").", "",
                  "| held-out site | method | setting | n | "
                  + " | ".join(g.removeprefix("group_").replace("auc_", "AUC ", 1)
                               for g in groups) + " |",
                  "|---|---|---|---:|" + "---:|" * len(groups)]
        for key in order:
            part = grouped[key]
            cells = [str(part["site"].iloc[0]), key[1], key[2], str(int(part["n"].iloc[0]))]
            for g in groups:
                values = part[g].to_numpy(dtype=float)
                cells.append(f"{np.nanmean(values):.3f}" if np.isfinite(values).any() else "—")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if "heldout_auc" in frame.columns:
        decisions = [c for c in frame.columns if c.startswith("decision_")]
        lines += ["Classification on the held-out site: ROC AUC, calibration error and the gaps "
                  "on thresholded decisions (mean over seeds).", "",
                  "| held-out site | method | setting | ROC AUC | ECE | "
                  + " | ".join(f"{c.removeprefix('decision_').upper()} gap on decisions"
                               for c in decisions) + " |",
                  "|---|---|---|---:|---:|" + "---:|" * len(decisions)]
        for key in order:
            part = grouped[key]
            cells = [str(part["site"].iloc[0]), key[1], key[2]]
            for column in ("heldout_auc", "heldout_ece", *decisions):
                values = part[column].to_numpy(dtype=float)
                cells.append(f"{np.nanmean(values):.3f}" if np.isfinite(values).any() else "—")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def missing_folds(description: dict[str, Any], finished: Sequence[str]) -> list[str]:
    """Planned fold runs (``label/holdout=…/seed-s``) of a study's sweep.yaml without a summary."""
    planned = []
    for label, entry in (description.get("methods") or {}).items():
        grid = (entry or {}).get("grid") or {}
        names = sorted(grid)
        for values in itertools.product(*(grid[n] for n in names)):
            point = point_name(dict(zip(names, values)))
            for fold in description.get("holdout") or {}:
                for seed in description.get("seeds") or []:
                    planned.append(f"{label}/{holdout_point(fold, point)}/seed-{seed}")
    done = set(finished)
    return [p for p in planned if p not in done]


def holdout_markdown(study: Any, where: str | None = None) -> str:
    """A leave-one-site-out study's generated section (a :class:`~results.Study`)."""
    sweep = study.sweep
    base = sweep.base
    folds = ", ".join(f"`{f}`" for f in sweep.holdout)
    lines = [f"### Study `{study.name}`: leave one site out", "",
             f"Summaries: `{where or Path(study.path).as_posix()}`; task `{base.get('task', '?')}`, "
             f"{base.get('rounds', '?')} rounds, seeds {sweep.seeds}, held-out sites {folds}; "
             f"**{study.finished} of {study.planned} planned fold runs finished**.", "",
             "Each fold trains the federation on the other sites (same settings) and audits its "
             "last-round model on the held-out site's test split with the code of "
             "`fedfair-med report --model`. *In the federation*: the pooled test metric of the "
             "training sites at the last round. One seed: the value [the audit's 95 % bootstrap "
             "interval]; several: mean ± std over seeds. The site gap (EA over sites) of a "
             "one-site audit is 0 and is left out.", ""]
    lines += holdout_tables(fold_rows(sweep, study.path, summaries=True))
    missing = missing_folds(study.description,
                            [r.relpath.removeprefix("runs/") for r in sweep.runs])
    if missing:
        shown = ", ".join(f"`{m}`" for m in missing[:8])
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        lines += [f"**Not finished (not counted above):** {shown}{more}.", ""]
    return "\n".join(lines) + "\n"


def write_holdout_outputs(sweep: Sweep, out: str | Path,
                          source: str | Path | None = None) -> dict[str, Path]:
    """holdout.csv (one row per fold run) and holdout.md (the tables) in ``out``."""
    out = Path(out)
    frame = (fold_rows(sweep, out) if source is None
             else fold_rows(sweep, source, summaries=True))
    paths = {"holdout.csv": out / "holdout.csv", "holdout.md": out / "holdout.md"}
    frame.to_csv(paths["holdout.csv"], index=False)
    paths["holdout.md"].write_text(
        f"Leave one site out, sweep {sweep.name}: held-out site audits (report --model).\n\n"
        + "\n".join(holdout_tables(frame)))
    return paths
