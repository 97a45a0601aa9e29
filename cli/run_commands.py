"""``fedfair-med demo`` and ``fedfair-med simulate``: in-process federations with live progress."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedfair_med.cli.errors import fail as _fail
from fedfair_med.config import ConfigError, RunConfig, load_config

console = Console()

DEMO_METHODS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("fedavg", {}),
    ("flexfair", {"lam": 1.0}),  # λ = 3 narrows EA further but costs 0.05 pooled Dice (docs/methods.md)
)


class RichProgress:
    """One progress bar per round, advanced by every local optimiser step at every site, then
    by every test/val sample evaluated (evaluation can take longer than training)."""

    def __init__(self, progress: Progress, label: str) -> None:
        self.progress, self.label = progress, label
        self.task_id: Any = None
        self.round = (0, 0)

    def _replace(self, description: str, total: int) -> None:
        if self.task_id is not None:
            self.progress.remove_task(self.task_id)
        self.task_id = self.progress.add_task(description, total=total)

    def round_started(self, round_index: int, total_rounds: int, total_steps: int) -> None:
        self.round = (round_index, total_rounds)
        self._replace(f"{self.label} round {round_index}/{total_rounds}", total_steps)

    def advance(self, steps: int) -> None:
        self.progress.advance(self.task_id, steps)

    def evaluation_started(self, round_index: int, split: str, samples: int) -> None:
        self._replace(f"{self.label} round {round_index}/{self.round[1]}: evaluating {split}",
                      samples)

    def evaluated(self, samples: int) -> None:
        self.progress.advance(self.task_id, samples)

    def round_finished(self, round_index: int, record: dict[str, Any]) -> None:
        self.progress.update(self.task_id, description=(
            f"{self.label} round {round_index}: {round_summary(record)}"))


def round_summary(record: dict[str, Any]) -> str:
    """'metric 0.712, EA 0.034' — or 'not evaluated' for a round skipped by eval_every."""
    if "metric" not in record:
        return "not evaluated (eval_every)"
    return f"metric {record['metric']:.3f}, EA {record['gaps']['ea']:.3f}"


class LineProgress:
    """One plain line per round (elapsed, ETA, metric, EA gap) where stdout is no terminal: a
    log file or CI job must show the run is alive without a transient bar."""

    def __init__(self, label: str, echo: Any = None) -> None:
        self.label, self.echo = label, echo or (lambda line: typer.echo(line))
        self.total_rounds = 0
        self.started: float | None = None

    def round_started(self, round_index: int, total_rounds: int, total_steps: int) -> None:
        self.total_rounds = total_rounds
        if self.started is None:
            self.started = time.monotonic()

    def advance(self, steps: int) -> None:
        pass

    def round_finished(self, round_index: int, record: dict[str, Any]) -> None:
        elapsed = time.monotonic() - (self.started or time.monotonic())
        eta = elapsed / round_index * (self.total_rounds - round_index)
        self.echo(f"{self.label} round {round_index}/{self.total_rounds}: elapsed "
                  f"{_clock(elapsed)}, ETA {_clock(eta)}, {round_summary(record)}")


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=True)


def run_with_progress(config: RunConfig, out: Path, label: str, force: bool = False):
    """Run with a live bar on a terminal, one line per round otherwise."""
    from fedfair_med.runtime.local import run_simulation

    if not console.is_terminal:
        return run_simulation(config, out, progress=LineProgress(label), force=force)
    with _progress() as progress:
        return run_simulation(config, out, progress=RichProgress(progress, label), force=force)


def site_table(results: dict[str, Any], metric_name: str) -> Table:
    """Per-site metric, pooled mean and EA gap, one column per method."""
    table = Table(title=f"Per-site {metric_name} on the test split (last round)")
    table.add_column("site")
    for label in results:
        table.add_column(label, justify="right")
    sites = list(next(iter(results.values())).final["sites"])
    for site in sites:
        table.add_row(site, *(f"{r.final['sites'][site]['metric']:.3f}" for r in results.values()))
    table.add_row("mean (pooled)", *(f"{r.final['metric']:.3f}" for r in results.values()),
                  end_section=True)
    table.add_row("EA gap", *(f"{r.final['gaps']['ea']:.3f}" for r in results.values()))
    for gap in sorted(k for k in next(iter(results.values())).final["gaps"] if k != "ea"):
        table.add_row(f"{gap.upper()} gap", *(f"{r.final['gaps'][gap]:.3f}" for r in results.values()))
    return table




def default_run_name(config: RunConfig) -> str:
    """``runs/NAME`` for a config that names no run: task, method, λ and seed, so flag-only
    runs of different settings do not land in one directory (the same settings are refused)."""
    if config.name != RunConfig.name:
        return config.name
    parts = [config.task, config.method]
    if "lam" in config.method_params:
        parts.append(f"lam{config.method_params['lam']:g}")
    parts.append(f"seed{config.seed}")
    return "-".join(parts)


def _run_cli(config: RunConfig, target: Path, label: str, force: bool) -> Any:
    """Run, turning refusals, failures and Ctrl-C into one line; ``target`` is then unchanged."""
    from fedfair_med.runtime.rundir import RunExistsError

    try:
        return run_with_progress(config, target, label, force=force)
    except RunExistsError as err:
        _fail(str(err))
    except KeyboardInterrupt:
        typer.echo(f"interrupted: nothing was written to {target}", err=True)
        raise typer.Exit(130) from None
    except Exception as err:  # one line, never a traceback; a failed run's rounds are kept aside
        kept = getattr(err, "kept_run", None)
        where = f"; the rounds done so far are in {kept} (status failed)" if kept else ""
        message = str(err) if isinstance(err, (ValueError, OSError, FloatingPointError)) else \
            f"{type(err).__name__}: {err} (a bug: please report it)"
        _fail(f"{message}; nothing was written to {target}{where}")


def register(app: typer.Typer) -> None:
    @app.command()
    def demo(
        out: Path = typer.Option(Path("runs/demo"), help="Where the run directories go."),
        seed: int = typer.Option(0, help="Random seed (same seed, same numbers)."),
        rounds: Optional[int] = typer.Option(None, help="Rounds (default: the task's, 20)."),
        task: str = typer.Option("synthetic-seg", help="synthetic-seg or synthetic-cls."),
        force: bool = typer.Option(False, "--force", help="Replace runs already in OUT."),
    ) -> None:
        """A 3-site federation on built-in synthetic data: FedAvg vs FlexFair, per-site table."""
        from fedfair_med.runtime.rundir import RunExistsError, check_target

        criterion, attribute = ("ea", "site") if task == "synthetic-seg" else ("dp", "age_band")
        configs = {}
        for method, params in DEMO_METHODS:
            try:
                config = load_config(
                    {"name": f"demo-{method}", "task": task, "method": method,
                     "method_params": params, "criterion": criterion, "attribute": attribute},
                    seed=seed, rounds=rounds)
                check_target(out / method, force)  # before the first run, not after it
            except (ConfigError, RunExistsError) as err:
                _fail(str(err))
            label = method if not params else f"{method} (λ={params['lam']:g})"
            configs[label] = (method, config)
        results = {}
        for label, (method, config) in configs.items():
            results[label] = _run_cli(config, out / method, label, force)
            console.print(f"[green]✓[/] {label}: run directory {out / method}")
        metric = "Dice" if task == "synthetic-seg" else "accuracy"
        console.print(site_table(results, metric))
        fedavg, flexfair = results.values()
        gap = "ea" if criterion == "ea" else f"dp:{attribute}"
        console.print(
            f"{gap.upper()} gap: FedAvg {fedavg.final['gaps'][gap]:.3f} → FlexFair "
            f"{flexfair.final['gaps'][gap]:.3f}. Reports: "
            + ", ".join(str(r.path / "report.html") for r in results.values()))

    @app.command()
    def simulate(
        config_file: Optional[Path] = typer.Argument(None, help="Run configuration (YAML)."),
        out: Optional[Path] = typer.Option(
            None, help="Run directory (default runs/NAME; without a name in the config, "
                       "runs/TASK-METHOD[-lamL]-seedS)."),
        task: Optional[str] = typer.Option(None, help="Task name, e.g. synthetic-seg, fundus."),
        method: Optional[str] = typer.Option(None, help="Method, e.g. fedavg, flexfair."),
        seed: Optional[int] = typer.Option(
            None, help="Random seed of data splits, initial weights and batches (default: the "
                       "config's, else 0); same config and seed, same numbers."),
        rounds: Optional[int] = typer.Option(
            None, help="Federated rounds (default: the config's, else the task's)."),
        lam: Optional[float] = typer.Option(None, help="FlexFair's penalty weight λ."),
        criterion: Optional[str] = typer.Option(None, help="ea, dp or eo."),
        attribute: Optional[str] = typer.Option(None, help="Sensitive attribute for dp/eo."),
        max_steps: Optional[int] = typer.Option(None, help="Cap on local steps per round."),
        eval_every: Optional[int] = typer.Option(
            None, help="Evaluate every N rounds (the last round always; default 1)."),
        force: bool = typer.Option(False, "--force", help="Replace a run already in the run "
                                                          "directory (kept until this one finishes)."),
    ) -> None:
        """Run one federation in-process from a YAML config and/or flags."""
        source: Any = config_file if config_file is not None else {}
        try:
            config = load_config(source, task=task, method=method, seed=seed, rounds=rounds,
                                 criterion=criterion, attribute=attribute, max_steps=max_steps,
                                 eval_every=eval_every)
            if lam is not None:
                config.method_params = {**config.method_params, "lam": lam}
                config.validate()
        except ConfigError as err:
            _fail(str(err))
        target = out or Path("runs") / default_run_name(config)
        try:  # which device, precision and threads, before a long run (fedfair-med doctor)
            from fedfair_med.cli.doctor_commands import device_line
            console.print(device_line(config), highlight=False)
        except ConfigError as err:
            _fail(str(err))
        result = _run_cli(config, target, config.method, force)
        from fedfair_med.tasks import build_task

        console.print(site_table({config.method: result}, build_task(config.task).primary_metric))
        console.print(f"run directory: {target} (report.html, report.json, metrics.jsonl)")
        console.print_json(json.dumps({"metric": result.final["metric"], "gaps": result.final["gaps"]}))
