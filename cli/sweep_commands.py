"""``fedfair-med sweep FILE``: methods × grid × seeds, resumable, with a progress bar over runs.

Also ``fedfair-med results collect|render``: the committed run summaries of a study and the
results page generated from them (:mod:`fedfair_med.experiments.results`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedfair_med.cli.errors import fail as _fail

console = Console(highlight=False)


class RichSweepProgress:
    """One bar over the sweep's runs; already-finished runs count as done from the start."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.task_id: Any = None
        self.skipped = 0
        self.running: list[str] = []
        self.failed = 0

    def _describe(self) -> str:
        text = f"runs ({self.skipped} skipped as already finished"
        text += f", {self.failed} failed)" if self.failed else ")"
        return text + (f" · {', '.join(self.running)}" if self.running else "")

    def planned(self, total: int, finished: int) -> None:
        self.skipped = finished
        self.task_id = self.progress.add_task(self._describe(), total=total, completed=finished)

    def run_started(self, run: Any) -> None:
        self.running.append(run.relpath.removeprefix("runs/"))
        self.progress.update(self.task_id, description=self._describe())

    def run_finished(self, run: Any, ok: bool) -> None:
        name = run.relpath.removeprefix("runs/")
        if name in self.running:
            self.running.remove(name)
        self.failed += 0 if ok else 1
        self.progress.update(self.task_id, advance=1, description=self._describe())




def cores_hint(parallel: int, runs_to_do: int, cores: int | None) -> str | None:
    """A line when the sweep would leave cores idle: every run uses one torch thread (so its
    numbers do not depend on --parallel), hence only --parallel uses a machine's other cores."""
    if not cores or parallel >= cores or runs_to_do <= parallel:
        return None
    wanted = min(cores, runs_to_do)
    return (f"each run uses one torch thread, so --parallel {parallel} uses {parallel} of this "
            f"machine's {cores} cores; --parallel {wanted} runs {wanted} at once (about "
            f"{wanted} × the memory of one run) with the same numbers.")


def plan_table(sweep: Any, out: Path, results: Optional[Path] = None) -> Table:
    """Per methods entry: grid points, seeds, runs and how many are already finished
    (in ``out``, or with a summary in ``results``)."""
    from fedfair_med.experiments.sweep import is_finished

    table = Table(title=f"Sweep {sweep.name}: {len(sweep.seeds)} seed(s) {sweep.seeds}")
    for column in ("label", "method", "grid points", "runs", "finished"):
        table.add_column(column, justify="left" if column in ("label", "method", "grid points") else "right")
    for label in sweep.methods:
        runs = [r for r in sweep.runs if r.label == label]
        points = list(dict.fromkeys(r.point for r in runs))
        done = sum(is_finished(r.path(out))
                   or (results is not None and is_finished(r.summary_path(results))) for r in runs)
        table.add_row(label, runs[0].method, ", ".join(points), str(len(runs)), str(done))
    return table


def result_table(path: Path) -> Table:
    """table.csv as a Rich table (the same numbers as table.md)."""
    import math

    import pandas as pd

    frame = pd.read_csv(path)
    table = Table(title="Selected settings (validation), test numbers at the last round")
    metric, gap = str(frame["metric_name"].iloc[0]), str(frame["gap_name"].iloc[0]).upper()
    for column in ("method", "setting", "n", metric, f"{gap} gap", f"p ({metric})", "p (gap)"):
        table.add_column(column, justify="left" if column in ("method", "setting") else "right")

    def pm(mean: float, std: float) -> str:
        return f"{mean:.3f}" if not math.isfinite(std) else f"{mean:.3f} ± {std:.3f}"

    def p(value: float, ref: bool) -> str:
        return "ref." if ref else ("—" if not math.isfinite(value) else f"{value:.3g}")

    for _, r in frame.iterrows():
        table.add_row(str(r["label"]), str(r["setting"]), str(r["n"]),
                      pm(r["metric_mean"], r["metric_std"]), pm(r["gap_mean"], r["gap_std"]),
                      p(r["p_metric"], bool(r["reference"])), p(r["p_gap"], bool(r["reference"])))
    return table


def register(app: typer.Typer) -> None:
    """Attach the ``sweep`` command and the ``results`` group to ``app``."""
    register_results(app)

    @app.command("sweep")
    def sweep(
        sweep_file: Path = typer.Argument(..., help="Sweep file (YAML: base, seeds, methods)."),
        out: Optional[Path] = typer.Option(None, "--out",
                                           help="Output folder (default runs/sweeps/NAME)."),
        parallel: int = typer.Option(1, "--parallel", min=1,
                                     help="Runs at once, each in its own process with 1 torch thread (the numbers do "
                                          "not depend on it): up to the number of cores."),
        dry_run: bool = typer.Option(False, "--dry-run",
                                     help="Print the plan and how much is already done; run nothing."),
        results: Optional[Path] = typer.Option(
            None, "--results",
            help="Committed summaries folder (e.g. results/NAME): each finished run's run.yaml, "
                 "metrics.jsonl and report.json go there; runs with a summary are not rerun."),
        only: Optional[list[str]] = typer.Option(
            None, "--only", help="Run only this method label's runs (repeatable); the rest stay planned."),
        seed: Optional[list[int]] = typer.Option(
            None, "--seed", help="Run only this seed's runs (repeatable), e.g. seed 0 of every "
                                 "method first."),
    ) -> None:
        """Run a sweep (methods × grid × seeds); finished runs are skipped, so it resumes.

        With ``holdout: all`` in the file, every run is repeated once per site left out of
        training, and the model is audited on that site (leave one site out).
        """
        from fedfair_med.experiments.sweep import SweepError, load_sweep, plan_status, run_sweep, select_runs

        try:
            plan = load_sweep(sweep_file)
        except SweepError as err:
            _fail(str(err))
        target = out or Path("runs") / "sweeps" / plan.name
        status = plan_status(plan, target, results)
        try:
            selected = select_runs(plan, status.to_run, only, seed) if only or seed else status.to_run
        except SweepError as err:
            _fail(str(err))
        hint = cores_hint(parallel, len(selected), os.cpu_count())
        if dry_run:
            console.print(plan_table(plan, target, results))
            # typer.echo, not Rich: a long path must not wrap the summary over two lines.
            typer.echo(f"{status.total} runs planned in {target}: {len(status.finished)} already "
                       f"finished, {len(status.to_run)} to run"
                       + (f", {len(selected)} of them selected." if len(selected) != len(status.to_run) else "."))
            if hint:
                typer.echo(hint)
            return
        if hint:
            typer.echo(hint)
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console) as progress:
            try:
                result = run_sweep(plan, target, parallel=parallel,
                                   progress=RichSweepProgress(progress), results=results,
                                   only=only or None, seeds=seed or None)
            except SweepError as err:
                _fail(str(err))
        typer.echo(f"ran {len(result.executed)} run(s), skipped {len(result.skipped)} "
                   "already finished")
        if result.remaining:
            typer.echo(f"{result.remaining} planned run(s) not selected (--only / --seed) remain; "
                       "the comparison is written when every run has finished.")
            return
        if "table.csv" in result.outputs:
            console.print(result_table(result.outputs["table.csv"]))
            typer.echo(result.outputs["table.md"].read_text().splitlines()[0])
        else:  # leave one site out (holdout: in the sweep file)
            typer.echo(result.outputs["holdout.md"].read_text())
        for name, path in result.outputs.items():
            typer.echo(f"{name}: {path}")


def register_results(app: typer.Typer) -> None:
    """Attach the ``results`` command group (collect, collect-run, render) to ``app``."""
    results_app = typer.Typer(help="Committed run summaries and the results page made from them.",
                              no_args_is_help=True)

    @results_app.command("collect")
    def collect(
        out: Path = typer.Argument(..., help="A sweep's output folder (holds sweep.yaml and runs/)."),
        into: Path = typer.Option(..., "--into", help="The study's results folder, e.g. results/NAME."),
    ) -> None:
        """Copy every finished run's summary (run.yaml, metrics.jsonl, report.json) into --into."""
        from fedfair_med.experiments.results import collect as collect_summaries
        from fedfair_med.experiments.sweep import SweepError

        try:
            written = collect_summaries(out, into)
        except SweepError as err:
            _fail(str(err))
        typer.echo(f"{len(written)} run summaries in {into}")

    @results_app.command("collect-run")
    def collect_run(
        run_dirs: list[Path] = typer.Argument(
            ..., help="Runs: runs/recipes/NAME, or a staging folder runs/recipes/.NAME.incomplete-PID "
                      "while it runs; several at once go to results/recipes/NAME each."),
        into: Optional[Path] = typer.Option(
            None, "--into", help="Summary folder, for one run (default: results/recipes/NAME)."),
        force: bool = typer.Option(False, "--force",
                                   help="Let an incomplete run replace a complete run's summary."),
        note: Optional[str] = typer.Option(
            None, "--note", help="A line the results page shows with the recipe (kept on later "
                                 "collects), e.g. that the code has changed since the run."),
    ) -> None:
        """Copy each run's summary (run.yaml, metrics.jsonl, report.json when complete) and a
        status.json saying complete or incomplete (rounds done of planned)."""
        from fedfair_med.experiments.recipes import RECIPES_FOLDER, RecipeError, recipe_name
        from fedfair_med.experiments.recipes import collect_run as collect_one

        if into is not None and len(run_dirs) > 1:
            _fail("--into names one summary folder; give one run, or leave --into out")
        # Staging and failed folders first, so a finished run given beside them wins.
        ordered = sorted(run_dirs, key=lambda d: not (Path(d).name.startswith(".")
                                                      or ".failed" in Path(d).name))
        failures = []
        for run_dir in ordered:
            if not run_dir.exists() and any(c in str(run_dir) for c in "*?["):
                typer.echo(f"{run_dir}: nothing matched")  # a shell pattern with no match
                continue
            target = into or Path("results") / RECIPES_FOLDER / recipe_name(run_dir)
            try:
                status = collect_one(run_dir, target, force=force, note=note)
            except (RecipeError, OSError) as err:
                failures.append(str(err))
                continue
            state = status["status"]
            if state != "complete":
                state += f": {status['rounds_done']} of {status['rounds_planned']} rounds"
            typer.echo(f"{target}: {state}")
        if failures:
            _fail("; ".join(failures))

    @results_app.command("render")
    def render(
        root: Path = typer.Argument(Path("results"), help="Folder of studies (each with sweep.yaml)."),
        doc: Path = typer.Option(Path("docs/results.md"), "--doc",
                                 help="Page whose generated block is rewritten."),
        plots: Optional[Path] = typer.Option(
            None, "--plots", help="Folder for the Pareto plots (default: results/ beside the page, "
                                  "subfolder generated)."),
        check: bool = typer.Option(False, "--check",
                                   help="Write nothing; exit 1 if the page is not what render makes."),
    ) -> None:
        """Regenerate the marked block of the results page (and its plots) from the summaries."""
        import os

        from fedfair_med.experiments.results import render_section, split_doc, update_doc
        from fedfair_med.experiments.sweep import SweepError

        plots_dir = plots or doc.parent / "results" / "generated"
        link = os.path.relpath(plots_dir, doc.parent).replace(os.sep, "/")
        try:
            if check:
                section = render_section(root, plots_link=link)
                if split_doc(doc.read_text())[1] != section:
                    _fail(f"{doc} differs from what `fedfair-med results render` makes; rerun it")
                typer.echo(f"{doc} is up to date")
                return
            section = render_section(root, plots=plots_dir, plots_link=link)
            changed = update_doc(doc, section)
        except (SweepError, OSError) as err:
            _fail(str(err))
        typer.echo(f"{doc}: {'rewritten' if changed else 'unchanged'}; plots in {plots_dir}")

    app.add_typer(results_app, name="results")
