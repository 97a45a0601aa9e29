"""``fedfair-med report``: the fairness report of a run, or an audit of any model on a site's data.

``fedfair-med report RUN_DIR`` writes report.json/.md/.html for a run directory.
``fedfair-med report --model model.pt --manifest site.csv --task TASK`` scores a trained model
on one hospital's own manifest and writes predictions.csv and the same reports to a local folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from fedfair_med.cli.errors import fail as _fail


def _parse_edges(text: str) -> tuple[float, ...]:
    """'60' or '40,60' → (40.0, 60.0); strictly increasing."""
    try:
        edges = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"--age-edges must be numbers separated by commas, got {text!r}") from None
    if not edges or list(edges) != sorted(set(edges)):
        raise ValueError(f"--age-edges must be strictly increasing, got {text!r}")
    return edges




def unfinished_run(run_dir: Path) -> str | None:
    """Why ``run_dir`` must not be reported (a run still being written, or one that stopped
    half-way), or None. Directories without status.json predate it and are taken as they are."""
    from fedfair_med.runtime.rundir import STAGING_MARK, read_status

    status = read_status(run_dir)
    if status is None:
        if STAGING_MARK in run_dir.name:
            return f"{run_dir} is the unfinished staging directory of a run, not a run"
        return None
    if status.get("status") == "complete":
        return None
    return (f"{run_dir} holds an unfinished run (status {status.get('status')!r}, started "
            f"{status.get('started', '?')}); its files are not a complete result")


def _report_run(run_dir: Path, min_group_size: int, age_edges: Optional[str]) -> None:
    from rich.console import Console

    from fedfair_med.reporting.render import _title, print_summary
    from fedfair_med.runtime.rundir import RunDirectoryError, read_report, read_run_yaml, write_reports

    why = unfinished_run(run_dir) if run_dir.is_dir() else None
    if why:
        _fail(why)
    try:
        edges = _parse_edges(age_edges if age_edges is not None else "60")
        paths = write_reports(run_dir, min_group_size=min_group_size, age_edges=edges)
    except (RunDirectoryError, ValueError, OSError) as error:
        _fail(str(error))
    console = Console(highlight=False)
    title, subtitle = _title(read_run_yaml(run_dir))
    console.print(f"run {run_dir}: {title}" + (f" ({subtitle})" if subtitle else ""), markup=False)
    print_summary(read_report(run_dir), console)
    if not (run_dir / "predictions.csv").exists():
        console.print("no predictions.csv (they stayed at the sites): rendered the existing "
                      "report.json; --min-group-size and --age-edges were not re-applied",
                      markup=False)
    for label, path in paths.items():
        console.print(f"{label}: {path}", markup=False)


def _audit(model: Path, manifest: Path, task: Optional[str], attributes: list[str], split: str,
           network: Optional[str], run_yaml: Optional[Path], out: Optional[Path],
           min_group_size: int, age_edges: Optional[str], force: bool = False) -> None:
    from rich.console import Console

    from fedfair_med.reporting.render import print_summary
    from fedfair_med.runtime.model_audit import (AuditError, audit_model, default_out_dir,
                                                 read_run_settings)
    from fedfair_med.runtime.rundir import holds_run

    out = out if out is not None else default_out_dir(model, manifest)
    if holds_run(out) and not force:
        _fail(f"{out} already holds files; give another --out, or --force to replace them")
    try:
        run = read_run_settings(run_yaml) if run_yaml is not None else {}
        if task and run.get("task") and task != run["task"]:
            raise AuditError(f"--task {task!r} differs from task {run['task']!r} of {run_yaml}")
        task_name = task or run.get("task")
        if not task_name:
            raise AuditError("--task is required (or --run-yaml naming the run the model came from)")
        if age_edges is not None:
            edges = _parse_edges(age_edges)
        else:
            edges = tuple(run.get("age_edges") or (60.0,))
        # --network overrides the run's network; the run's kwargs only fit the run's network.
        same_network = network is None or network == run.get("network")
        result = audit_model(
            task=str(task_name), weights=model, manifest=manifest,
            out_dir=out, attributes=attributes, split=split,
            age_edges=edges, min_group_size=min_group_size,
            network=network or run.get("network"),
            network_kwargs=run.get("network_kwargs") if same_network else None,
            data_options=run.get("data"), run_method=run.get("method"),
        )
    except (AuditError, ValueError, OSError) as error:
        _fail(str(error))
    console = Console(highlight=False)
    print_summary(result.report, console)
    for label, path in result.paths.items():
        console.print(f"{label}: {path}", markup=False)


def register(app: typer.Typer) -> None:
    """Attach the ``report`` command to ``app``."""

    @app.command("report")
    def report(
        run_dir: Optional[Path] = typer.Argument(
            None, help="A run directory (holds run.yaml, metrics.jsonl, predictions.csv or "
                       "report.json). Leave out to audit a model with --model/--manifest."),
        model: Optional[Path] = typer.Option(
            None, "--model", help="Audit these weights (a state dict, e.g. a run's model.pt)."),
        manifest: Optional[Path] = typer.Option(
            None, "--manifest", help="The site manifest (CSV) whose samples the model is scored on."),
        task: Optional[str] = typer.Option(
            None, "--task", help="Task of the model (polyp, fundus, mri, skin); read from "
                                 "--run-yaml when given."),
        attribute: Optional[list[str]] = typer.Option(
            None, "--attribute", help="Group by this manifest column (repeatable); default: all "
                                      "of the manifest's attributes."),
        split: str = typer.Option("test", "--split", help="Which rows of the manifest to score."),
        network: Optional[str] = typer.Option(
            None, "--network", help="Network the weights belong to (default: the run's, else "
                                    "the task's)."),
        run_yaml: Optional[Path] = typer.Option(
            None, "--run-yaml", help="run.yaml of the run the model came from: task, network, "
                                     "network_kwargs, image options."),
        out: Optional[Path] = typer.Option(
            None, "--out", help="Folder for the audit's files (default: audit-<model's run "
                                "folder>-<site folder>)."),
        force: bool = typer.Option(False, "--force", help="Replace the files of an earlier audit "
                                                          "in the --out folder."),
        min_group_size: int = typer.Option(10, "--min-group-size", min=1,
                                           help="Flag groups with fewer test samples than this."),
        age_edges: Optional[str] = typer.Option(
            None, "--age-edges", help="Age-band edges, comma-separated (e.g. 40,60); default 60."),
    ) -> None:
        """Write the fairness report (JSON, Markdown, self-contained HTML) of a run or a model."""
        audit_options = {"--model": model, "--manifest": manifest, "--task": task,
                         "--attribute": attribute or None, "--network": network,
                         "--run-yaml": run_yaml, "--out": out,
                         "--split": None if split == "test" else split}
        if run_dir is not None:
            given = [name for name, value in audit_options.items() if value is not None]
            if given:
                _fail(f"give either RUN_DIR or --model/--manifest, not both "
                      f"({', '.join(given)} only apply to a model audit)")
            _report_run(run_dir, min_group_size, age_edges)
            return
        if model is None and manifest is None:
            _fail("give a run directory (RUN_DIR) or a model to audit (--model and --manifest)")
        if model is None or manifest is None:
            _fail(f"a model audit needs both --model and --manifest (missing "
                  f"{'--model' if model is None else '--manifest'})")
        _audit(model, manifest, task, list(attribute or []), split, network, run_yaml, out,
               min_group_size, age_edges, force)
