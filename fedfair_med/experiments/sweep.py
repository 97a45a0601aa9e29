"""Sweeps: methods × hyper-parameter grid points × seeds, resumable, optionally in parallel.

Running lives here; the plan (file format, validation, expansion into runs) in
:mod:`fedfair_med.experiments.plan`, which this module, the analysis and the committed results
import — the imports run one way (plan ← analysis, results ← sweep).

A sweep file is one YAML mapping::

    name: demo                      # optional; names the runs
    base: {task: synthetic-seg, rounds: 8, data: {scale: 0.5}}   # a RunConfig mapping
    seeds: [0, 1, 2]
    select: {metric_weight: 1.0, gap_weight: 1.0}                 # optional; gap: ea | dp:sex …
    reference: flexfair             # optional; the label the t-tests compare against
    methods:
      fedavg: {method: fedavg}
      flexfair: {method: flexfair, grid: {lam: [0.5, 1, 3]}, fixed: {weighting: uniform}}
      scaffold: {method: scaffold, settings: {lr: 0.05}}   # run settings for this label only

``settings`` overrides keys of ``base`` for one label (e.g. a learning rate suited to the plain
SGD that FedNova and SCAFFOLD require while the others use Adam); they are recorded in each
run's ``run.yaml``.

Every (label, grid point, seed) becomes one :class:`~fedfair_med.config.RunConfig`, validated
with the same :func:`~fedfair_med.config.load_config` a single run uses, before anything runs.
Run ``(label, point, seed)`` lives in ``OUT/runs/<label>/<param=value,...>/seed-<seed>/``.

Resuming: a run is finished when its directory holds a ``report.json`` that parses. A run is
written into ``seed-<s>.partial/`` and renamed into place only when it has finished, so a
killed sweep leaves no directory that looks finished; anything unfinished is redone.

With ``holdout: all`` (or a list of sites), every run is repeated once per site of
``base.data.manifests`` left out of training, and its model is audited on that site
(leave one site out, :mod:`fedfair_med.experiments.holdout`).

With ``results`` (a committed folder, :mod:`fedfair_med.experiments.results`), every finished
run's summary (run.yaml, metrics.jsonl, report.json) is copied to
``results/<label>/<point>/seed-<s>/`` as it finishes, a run whose summary is there counts
as finished even when its run directory is gone (a new machine), and the comparison is computed
from the summaries.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import yaml

from fedfair_med.config import ConfigError, RunConfig, load_config
from fedfair_med.experiments.plan import (  # re-exported: callers plan and run through this module
    PlannedRun, Selection, Sweep, SweepError, is_finished, load_sweep, point_name,
)

__all__ = ["PlannedRun", "Selection", "Sweep", "SweepError", "SweepResult", "is_finished",
           "load_sweep", "plan_status", "point_name", "run_sweep", "select_runs", "stale_runs"]

def _normalised(config: RunConfig) -> dict[str, Any]:
    return yaml.safe_load(yaml.safe_dump(config.to_dict()))


def stale_runs(sweep: Sweep, out: Path, summaries: bool = False) -> list[PlannedRun]:
    """Finished runs whose run.yaml differs from what the sweep file now asks for.

    ``out`` is a sweep output folder, or with ``summaries`` a results folder.
    """
    stale = []
    for run in sweep.runs:
        path = run.summary_path(out) if summaries else run.path(out)
        if not is_finished(path):
            continue
        try:
            # load_config fills defaults, so a field added to RunConfig later is no difference
            stored = load_config(path / "run.yaml")
        except ConfigError:
            stale.append(run)
            continue
        if _normalised(stored) != _normalised(run.config):
            stale.append(run)
    return stale


@dataclass
class PlanStatus:
    total: int
    finished: list[PlannedRun]
    to_run: list[PlannedRun]


def plan_status(sweep: Sweep, out: Path, results: Path | None = None) -> PlanStatus:
    """Which runs are finished (in ``out``, or with a summary in ``results``) and which remain."""
    def done(run: PlannedRun) -> bool:
        return is_finished(run.path(out)) or (results is not None
                                              and is_finished(run.summary_path(results)))

    finished = [r for r in sweep.runs if done(r)]
    done = {r.relpath for r in finished}
    return PlanStatus(len(sweep.runs), finished, [r for r in sweep.runs if r.relpath not in done])


# ---- running ---------------------------------------------------------------------------------
class SweepProgress(Protocol):
    def planned(self, total: int, finished: int) -> None: ...
    def run_started(self, run: PlannedRun) -> None: ...
    def run_finished(self, run: PlannedRun, ok: bool) -> None: ...


class _Silent:
    def planned(self, total: int, finished: int) -> None:
        pass

    def run_started(self, run: PlannedRun) -> None:
        pass

    def run_finished(self, run: PlannedRun, ok: bool) -> None:
        pass


def execute_run(config: Mapping[str, Any], target: str, holdout: str | None = None) -> str:
    """Run one configuration into ``target``: into ``target.partial`` first, renamed when done.

    With ``holdout`` (a leave-one-site-out fold), the trained model is audited on that site's
    manifest before the rename, so a fold interrupted between training and audit stays partial.
    A top-level function so 'spawn' worker processes can import it.
    """
    from fedfair_med.runtime.local import run_simulation

    final = Path(target)
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    run_simulation(RunConfig(**config), partial)
    if holdout is not None:
        from fedfair_med.experiments.holdout import audit_fold

        audit_fold(partial, holdout)
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)
    return str(final)


def _init_worker() -> None:
    """One torch thread per worker: N workers on N cores, and the same numbers as --parallel 1."""
    import torch

    torch.set_num_threads(1)


@dataclass
class SweepResult:
    """Which runs this call executed and which were already finished."""

    out: Path
    executed: list[PlannedRun]
    skipped: list[PlannedRun]
    outputs: dict[str, Path] = field(default_factory=dict)
    #: planned runs this call left out (``only`` / ``seeds``): the comparison waits for them
    remaining: int = 0


def select_runs(sweep: Sweep, runs: Sequence[PlannedRun], only: Sequence[str] | None = None,
                seeds: Sequence[int] | None = None) -> list[PlannedRun]:
    """The runs of the labels in ``only`` and the seeds in ``seeds`` (None: all), in plan order.

    A sitting of a few runs can then do, say, seed 0 of every method first: a whole first
    comparison sooner than the plan's method-by-method order gives one.
    """
    labels = list(sweep.methods)
    unknown = [label for label in only or () if label not in labels]
    if unknown:
        raise SweepError(f"--only: no method label {', '.join(map(repr, unknown))} in the sweep; "
                         f"its labels: {', '.join(labels)}")
    strays = [seed for seed in seeds or () if seed not in sweep.seeds]
    if strays:
        raise SweepError(f"--seed: {', '.join(map(str, strays))} not among the sweep's seeds "
                         f"{sweep.seeds}")
    return [r for r in runs if (not only or r.label in only) and (seeds is None or r.seed in seeds)]


def run_sweep(sweep: Sweep, out: str | Path, parallel: int = 1,
              progress: SweepProgress | None = None, analyse: bool = True,
              results: str | Path | None = None, only: Sequence[str] | None = None,
              seeds: Sequence[int] | None = None) -> SweepResult:
    """Run every unfinished run of ``sweep`` into ``out``, then write the comparison outputs.

    Runs are independent, so a failing run does not stop the others; failures are raised
    together at the end (their directories stay unfinished and are retried next time).
    With ``results``, each finished run's summary is written there as it finishes (and any
    finished run in ``out`` still missing one is backfilled), runs with a summary are skipped,
    and the comparison is computed from the summaries. ``only`` (labels) and ``seeds`` run a
    part of the plan (:func:`select_runs`); the comparison is written once every run is finished.
    """
    import torch

    if not isinstance(parallel, int) or parallel < 1:
        raise SweepError(f"--parallel must be a positive integer, got {parallel!r}")
    out = Path(out)
    results = Path(results) if results is not None else None
    progress = progress or _Silent()
    for folder in (out, results) if results is not None else (out,):
        stale = stale_runs(sweep, folder, summaries=folder is results)
        if stale:
            listed = ", ".join(str(r.summary_path(folder) if folder is results else r.path(folder))
                               for r in stale[:3])
            raise SweepError(
                f"{len(stale)} finished run(s) in {folder} were made with a different configuration "
                f"than the sweep file now gives (e.g. {listed}); use a new --out / --results or "
                "delete them")
    status = plan_status(sweep, out, results)
    selected = select_runs(sweep, status.to_run, only, seeds) if only or seeds is not None else None
    progress.planned(status.total, len(status.finished))
    (out / "runs").mkdir(parents=True, exist_ok=True)
    (out / "sweep.yaml").write_text(yaml.safe_dump(_describe(sweep), sort_keys=False))

    def keep_summary(run: PlannedRun) -> None:
        if results is not None:
            from fedfair_med.experiments.results import write_summary

            write_summary(run.path(out), run.summary_path(results))

    if results is not None:
        from fedfair_med.experiments.results import write_sweep_description

        write_sweep_description(_describe(sweep), results)
        for run in status.finished:
            if not is_finished(run.summary_path(results)):
                keep_summary(run)

    failures: list[tuple[PlannedRun, BaseException]] = []
    to_run = status.to_run if selected is None else selected
    if parallel == 1:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for run in to_run:
                progress.run_started(run)
                ok = True
                try:
                    execute_run(run.config.to_dict(), str(run.path(out)), run.holdout)
                    keep_summary(run)
                except Exception as err:  # noqa: BLE001 - reported with the run below
                    failures.append((run, err))
                    ok = False
                progress.run_finished(run, ok=ok)
        finally:
            torch.set_num_threads(threads)
    elif to_run:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=parallel, mp_context=context,
                                 initializer=_init_worker) as pool:
            pending: dict[Future, PlannedRun] = {}
            queue = list(to_run)
            while queue or pending:
                while queue and len(pending) < parallel:
                    run = queue.pop(0)
                    progress.run_started(run)
                    try:
                        future = pool.submit(execute_run, run.config.to_dict(), str(run.path(out)),
                                             run.holdout)
                    except BrokenProcessPool as err:  # a worker died: nothing more can start
                        for lost in [run, *queue]:
                            failures.append((lost, err))
                            progress.run_finished(lost, ok=False)
                        queue = []
                        break
                    pending[future] = run
                if not pending:
                    break
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    run = pending.pop(future)
                    error = future.exception()
                    if error is None:
                        try:
                            keep_summary(run)
                        except Exception as err:  # noqa: BLE001 - reported with the run below
                            error = err
                    if error is not None:
                        failures.append((run, error))
                    progress.run_finished(run, ok=error is None)
    if failures:
        lines = [f"{r.relpath}: {type(e).__name__}: {e}" for r, e in failures]
        raise SweepError(f"{len(failures)} run(s) failed (rerun the sweep to retry them):\n  "
                         + "\n  ".join(lines))
    result = SweepResult(out=out, executed=to_run, skipped=status.finished,
                         remaining=len(status.to_run) - len(to_run))
    if result.remaining:  # a partial sitting: the comparison needs every run
        return result
    if analyse and sweep.holdout:
        from fedfair_med.experiments.holdout import write_holdout_outputs

        result.outputs = write_holdout_outputs(sweep, out, source=results)
    elif analyse:
        from fedfair_med.experiments.analysis import write_outputs

        result.outputs = write_outputs(sweep, out, source=results)
    return result


def _describe(sweep: Sweep) -> dict[str, Any]:
    """The validated sweep, written beside its runs so the outputs say what produced them."""
    described = {"name": sweep.name, "base": sweep.base, "seeds": sweep.seeds,
                 "methods": sweep.methods,
                 "select": {"metric_weight": sweep.selection.metric_weight,
                            "gap_weight": sweep.selection.gap_weight, "gap": sweep.selection.gap},
                 "reference": sweep.reference}
    if sweep.holdout:
        described["holdout"] = dict(sweep.holdout)  # fold -> held-out manifest
    return described
