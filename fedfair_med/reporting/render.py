"""Render a run's report as Markdown and as a self-contained HTML page (and a console summary).

Pure formatting of what :func:`~fedfair_med.reporting.run_report.build_run_report` built and the
run directory holds (run.yaml, the per-round records); the files themselves are read and written
by :mod:`fedfair_med.runtime.rundir`.

The HTML embeds its charts as base64 PNG and its styles inline: reports are read on clinical
machines that are often offline, and a file that fetches nothing also leaks nothing. Charts use
matplotlib's Agg canvas directly (no pyplot), so rendering never touches global backend state.
"""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import yaml

from fedfair_med.contracts import CLASSIFICATION
from fedfair_med.reporting.run_report import DECISION_GAPS_DEFINITION

__all__ = ["render_markdown", "render_html", "print_summary"]


# ---- formatting ------------------------------------------------------------------------------
def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(int(value))
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if not math.isfinite(number):
        return "–"
    return f"{number:.{digits}f}"


def _ci(pair: Any) -> str:
    if not isinstance(pair, (list, tuple)) or len(pair) != 2 or any(
        v is None or not math.isfinite(float(v)) for v in pair
    ):
        return "–"
    return f"[{_fmt(pair[0])}, {_fmt(pair[1])}]"


def _title(config: Mapping[str, Any]) -> tuple[str, str]:
    """Title (task · method) and subtitle: the method's parameters (λ first), the criterion,
    seed and rounds as the run resolved them (run.yaml's ``rounds`` is null when the task's
    default applied; ``resolved.rounds`` has the number)."""
    task = config.get("task")
    task_name = task.get("name") if isinstance(task, Mapping) else task
    method = config.get("method")
    method_name = method.get("name") if isinstance(method, Mapping) else method
    title = " · ".join(str(x) for x in (task_name, method_name) if x) or "run"
    criterion = config.get("criterion")
    bits = []
    params = config.get("method_params")
    if isinstance(params, Mapping) and params:
        ordered = sorted(params.items(), key=lambda kv: (kv[0] != "lam", kv[0]))
        bits.append(", ".join(f"{'λ' if k == 'lam' else k} {v}" for k, v in ordered))
    if isinstance(criterion, Mapping) and criterion.get("name"):
        bits.append(f"criterion {criterion.get('name')} over {criterion.get('attribute', 'site')}")
    elif isinstance(criterion, str) and criterion:
        bits.append(f"criterion {criterion} over {config.get('attribute') or 'site'}")
    for key in ("seed", "rounds"):
        value = config.get(key)
        resolved = config.get("resolved")
        if value is None and isinstance(resolved, Mapping):
            value = resolved.get(key)
        if value is not None:
            bits.append(f"{key} {value}")
    return title, ", ".join(bits)


def _round_columns(rounds: Sequence[Mapping[str, Any]]) -> list[str]:
    gap_names: list[str] = []
    for r in rounds:
        for name in (r.get("gaps") or {}):
            if name not in gap_names:
                gap_names.append(name)
    gap_names.sort(key=lambda g: (g != "ea", g))
    return ["metric"] + gap_names


def _round_values(record: Mapping[str, Any], columns: Sequence[str]) -> dict[str, Any]:
    gaps = record.get("gaps") or {}
    return {c: record.get("metric") if c == "metric" else gaps.get(c) for c in columns}


def _ordered_attributes(groups: Sequence[Mapping[str, Any]]) -> list[str]:
    seen: list[str] = []
    for row in groups:
        if row["attribute"] not in seen:
            seen.append(row["attribute"])
    return seen


# ---- charts ----------------------------------------------------------------------------------
def _png(figure: Any) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def group_chart(rows: Sequence[Mapping[str, Any]], attribute: str, metric_name: str) -> str:
    """Base64 PNG: one bar per group with its 95% CI as an error bar (hatched when small)."""
    from matplotlib.figure import Figure

    labels = [str(r["group"]) for r in rows]
    means = np.array([np.nan if r["metric"] is None else r["metric"] for r in rows], dtype=float)
    lows = np.array([np.nan if r["ci95"][0] is None else r["ci95"][0] for r in rows], dtype=float)
    highs = np.array([np.nan if r["ci95"][1] is None else r["ci95"][1] for r in rows], dtype=float)
    err = np.vstack([np.nan_to_num(means - lows), np.nan_to_num(highs - means)]).clip(min=0)
    figure = Figure(figsize=(max(4.0, 0.7 * len(rows) + 2.0), 3.0))
    ax = figure.add_subplot()
    bars = ax.bar(range(len(rows)), means, yerr=err, capsize=4, color="#4c78a8")
    for bar, row in zip(bars, rows):
        if row.get("small"):
            bar.set_hatch("//")
            bar.set_alpha(0.6)
    crowded = len(rows) > 4 or sum(len(label) for label in labels) > 6 * len(rows)
    ax.set_xticks(range(len(rows)), labels, rotation=30 if crowded else 0,
                  ha="right" if crowded else "center")
    ax.set_ylabel(metric_name)
    note = "; hatched: small group" if any(r.get("small") for r in rows) else ""
    ax.set_title(f"{metric_name} by {attribute} (95% CI{note})")
    ax.grid(axis="y", alpha=0.3)
    return _png(figure)


def curves_chart(rounds: Sequence[Mapping[str, Any]], metric_name: str) -> str:
    """Base64 PNG: pooled and per-site metric per round (left), fairness gaps per round (right)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    x = [r["round"] for r in rounds]
    figure = Figure(figsize=(9.0, 3.2))
    left, right = figure.subplots(1, 2)
    left.plot(x, [r.get("metric", np.nan) for r in rounds], marker="o", color="black",
              label="pooled")
    site_names = sorted({s for r in rounds for s in (r.get("sites") or {})})
    for site in site_names:
        values = [((r.get("sites") or {}).get(site) or {}).get("metric", np.nan) for r in rounds]
        left.plot(x, [np.nan if v is None else v for v in values], marker=".", alpha=0.8,
                  label=site)
    left.set_xlabel("round")
    left.set_ylabel(metric_name)
    left.set_title(f"test {metric_name}")
    left.legend(fontsize=7)
    left.grid(alpha=0.3)
    for name in _round_columns(rounds)[1:]:
        values = [(r.get("gaps") or {}).get(name) for r in rounds]
        right.plot(x, [np.nan if v is None else v for v in values], marker="o", label=name)
    right.set_xlabel("round")
    right.set_ylabel("gap")
    right.set_title("fairness gaps")
    if right.lines:
        right.legend(fontsize=7)
    right.grid(alpha=0.3)
    for ax in (left, right):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _png(figure)


# ---- Markdown and HTML -----------------------------------------------------------------------
def _md(text: Any) -> str:
    """A Markdown table cell: '|' would end the cell (definitions are full of |x|)."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(
    report: Mapping[str, Any], config: Mapping[str, Any], rounds: Sequence[Mapping[str, Any]]
) -> str:
    """The report as GitHub-flavoured Markdown (tables only, no images)."""
    title, subtitle = _title(config)
    metric_name = report.get("primary_metric", "metric")
    classification = report.get("kind") == CLASSIFICATION
    overall = report["overall"]
    lines = [f"# Fairness report — {title}", ""]
    if subtitle:
        lines += [subtitle, ""]
    lines += [
        "## Overall", "",
        f"| samples | {metric_name} | 95% CI |", "|---:|---:|---:|",
        f"| {overall['n']} | {_fmt(overall['metric'])} | {_ci(overall.get('ci95'))} |", "",
        "## Fairness gaps", "", "| gap | value | 95% CI | definition |", "|---|---:|---:|---|",
    ]
    definitions = report.get("definitions", {})
    cis = report.get("gaps_ci95") or {}
    for name, value in report["gaps"].items():
        lines.append(f"| `{_md(name)}` | {_fmt(value)} | {_ci(cis.get(name))} "
                     f"| {_md(definitions.get(name, ''))} |")
    quality = "auc" in overall  # absent from a federated run's report.json
    if quality:
        lines += _decision_lines(report)
    head = f"| attribute | group | n | {metric_name} | 95% CI |"
    rule = "|---|---|---:|---:|---:|"
    if classification:
        head += " positive rate | mean score |"
        rule += "---:|---:|"
    if quality:
        head += " AUC | ECE |"
        rule += "---:|---:|"
    lines += ["", "## Per-group results", "", head, rule]
    for row in report["groups"]:
        flag = " (small)" if row.get("small") else ""
        line = (f"| {_md(row['attribute'])} | {_md(row['group'])}{flag} | {row['n']}"
                f" | {_fmt(row['metric'])}"
                f" | {_ci(row.get('ci95'))} |")
        if classification:
            line += f" {_fmt(row.get('positive_rate'))} | {_fmt(row.get('mean_score'))} |"
        if quality:
            line += f" {_fmt(row.get('auc'))} | {_fmt(row.get('ece'))} |"
        lines.append(line)
    if rounds:
        columns = _round_columns(rounds)
        lines += ["", "## Per-round metrics", "",
                  "| round | " + " | ".join(_md(c) for c in columns) + " |",
                  "|---:|" + "---:|" * len(columns)]
        for r in rounds:
            values = _round_values(r, columns)
            lines.append(f"| {r['round']} | " + " | ".join(_fmt(values[c]) for c in columns) + " |")
    if report.get("warnings"):
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in report["warnings"]]
    if config:
        lines += ["", "## Run configuration", "", "```yaml",
                  yaml.safe_dump(dict(config), sort_keys=False).rstrip(), "```"]
    return "\n".join(lines) + "\n"


#: What "ROC AUC within sites" means, beside the pooled AUC.
WITHIN_SITE_AUC_DEFINITION = (
    "AUC within sites counts only the (malignant, benign) pairs from the same site: how well the "
    "model ranks cases inside one hospital. The pooled AUC also credits ranking one site's cases "
    "above another's, which pays where the sites' prevalences differ.")


def _decision_lines(report: Mapping[str, Any]) -> list[str]:
    """Classification: AUC, calibration and the gaps on decisions, beside the score gaps."""
    overall = report["overall"]
    lines = ["", "## Discrimination, calibration and decisions", "",
             "A small gap on scores can hide a model that is equally poor for everyone; read it "
             "with these.", ""]
    if "auc_within_site" in overall:  # sites' prevalences differ: ranking across sites also counts
        lines += ["| ROC AUC | ROC AUC within sites | ECE (10 bins) |", "|---:|---:|---:|",
                  f"| {_fmt(overall.get('auc'))} | {_fmt(overall['auc_within_site'])} "
                  f"| {_fmt(overall.get('ece'))} |", "", _md(WITHIN_SITE_AUC_DEFINITION), ""]
    else:
        lines += ["| ROC AUC | ECE (10 bins) |", "|---:|---:|",
                  f"| {_fmt(overall.get('auc'))} | {_fmt(overall.get('ece'))} |", ""]
    lines += [f"Gaps {_md(DECISION_GAPS_DEFINITION)}:", "", "| decision gap | value |", "|---|---:|"]
    for name, value in (report.get("decision_gaps") or {}).items():
        lines.append(f"| {_md(name)} | {_fmt(value)} |")
    return lines


def _environment() -> Any:
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    env = Environment(
        loader=FileSystemLoader(str(Path(__file__).resolve().parent / "templates")),
        autoescape=select_autoescape(["html"]),
        keep_trailing_newline=True,
    )
    env.filters["fmt"] = _fmt
    env.filters["ci"] = _ci
    return env


def render_html(
    report: Mapping[str, Any], config: Mapping[str, Any], rounds: Sequence[Mapping[str, Any]]
) -> str:
    """The report as one self-contained HTML page (inline CSS, base64 PNG charts)."""
    title, subtitle = _title(config)
    metric_name = report.get("primary_metric", "metric")
    groups = report["groups"]
    charts = []
    for attribute in _ordered_attributes(groups):
        rows = [r for r in groups if r["attribute"] == attribute]
        charts.append({"attribute": attribute, "png": group_chart(rows, attribute, metric_name)})
    columns = _round_columns(rounds) if rounds else []
    definitions = report.get("definitions", {})
    template = _environment().get_template("report.html")
    return template.render(
        title=title,
        subtitle=subtitle,
        primary_metric=metric_name,
        classification=report.get("kind") == CLASSIFICATION,
        # AUC, calibration and decision gaps: in reports built from predictions, not in a
        # federated run's report.json (its predictions stayed at the sites).
        quality="auc" in report["overall"],
        overall=report["overall"],
        gaps=[{"name": k, "value": v, "ci95": (report.get("gaps_ci95") or {}).get(k),
               "definition": definitions.get(k, "")} for k, v in report["gaps"].items()],
        decision_gaps=list((report.get("decision_gaps") or {}).items()),
        decision_definition=DECISION_GAPS_DEFINITION,
        within_site_definition=WITHIN_SITE_AUC_DEFINITION,
        groups=groups,
        min_group_size=(report.get("settings") or {}).get("min_group_size", 10),
        group_charts=charts,
        curves_png=curves_chart(rounds, metric_name) if rounds else None,
        round_columns=columns,
        rounds=[{"round": r["round"], "cells": _round_values(r, columns)} for r in rounds],
        warnings=report.get("warnings", []),
        config_text=yaml.safe_dump(dict(config), sort_keys=False) if config else "(no run.yaml)",
    )


# ---- terminal --------------------------------------------------------------------------------
def print_summary(report: Mapping[str, Any], console: Any) -> None:
    """Print the per-group table and the gaps as Rich tables on ``console``."""
    from rich.table import Table
    from rich.text import Text

    metric_name = report.get("primary_metric", "metric")
    overall = report["overall"]
    table = Table(title=f"{metric_name} by group (overall {_fmt(overall['metric'])},"
                        f" 95% CI {_ci(overall.get('ci95'))}, n={overall['n']})")
    table.add_column("attribute")
    table.add_column("group")
    table.add_column("n", justify="right")
    table.add_column(metric_name, justify="right")
    table.add_column("95% CI", justify="right")
    for row in report["groups"]:
        style = "yellow" if row.get("small") else None
        # Text() so group labels such as "[a]" are never read as Rich markup.
        table.add_row(Text(str(row["attribute"])), Text(str(row["group"])), str(row["n"]),
                      _fmt(row["metric"]), _ci(row.get("ci95")), style=style)
    console.print(table)
    gaps = Table(title="fairness gaps")
    gaps.add_column("gap")
    gaps.add_column("value", justify="right")
    gaps.add_column("95% CI", justify="right")
    cis = report.get("gaps_ci95") or {}
    for name, value in report["gaps"].items():
        gaps.add_row(Text(name), _fmt(value), _ci(cis.get(name)))
    for name, value in (report.get("decision_gaps") or {}).items():
        gaps.add_row(Text(f"{name} (decisions)"), _fmt(value))
    console.print(gaps)
    if "auc" in overall:
        within = (f" (within sites {_fmt(overall['auc_within_site'])})"
                  if "auc_within_site" in overall else "")
        console.print(f"ROC AUC {_fmt(overall['auc'])}{within}, calibration error (ECE) "
                      f"{_fmt(overall.get('ece'))}", markup=False)
    for warning in report.get("warnings", []):
        console.print(Text.assemble(("warning: ", "yellow"), str(warning)))
