"""Sweeps: methods × hyper-parameter grid points × seeds, resumable, optionally in parallel.

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

With ``results`` (a committed folder, :mod:`fedfair_med.experiments.results`), every finished
run's summary (run.yaml, metrics.jsonl, report.json) is copied to
``results/<label>/<point>/seed-<s>/`` as it finishes, a run whose summary is there counts
as finished even when its run directory is gone (a new machine), and the comparison is computed
from the summaries.
"""

from __future__ import annotations

import itertools
import json
import math
import multiprocessing
import os
import re
import shutil
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import yaml

from fedfair_med.config import ConfigError, RunConfig, load_config

SWEEP_KEYS = ("name", "base", "seeds", "select", "reference", "methods")
METHOD_KEYS = ("method", "grid", "fixed", "settings")
SELECT_KEYS = ("metric_weight", "gap_weight", "gap")
SWEEP_SET = ("method", "method_params", "seed", "name")  # the sweep sets these per run
# runs.csv columns a grid parameter must not shadow.
RESERVED_COLUMNS = ("label", "method", "point", "seed", "rounds", "metric_name", "path")
_SAFE_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")
DEFAULT_POINT = "default"


class SweepError(ConfigError):
    """A sweep file or sweep-run problem; the message names the entry."""


@dataclass(frozen=True)
class Selection:
    """How each method's setting is chosen, on validation only.

    score(point) = metric_weight · mean_seeds(val metric) − gap_weight · mean_seeds(val gap),
    both from the last round; the point with the highest score is chosen.
    """

    metric_weight: float = 1.0
    gap_weight: float = 1.0
    gap: str = "ea"


@dataclass(frozen=True)
class PlannedRun:
    """One run of the sweep: where it goes and the configuration it runs."""

    label: str
    method: str
    point: str
    params: Mapping[str, Any]
    seed: int
    config: RunConfig
    relpath: str  # relative to the sweep's output folder

    def path(self, out: Path) -> Path:
        return Path(out) / self.relpath

    def summary_path(self, results: Path) -> Path:
        """Where its summary lies in a results folder: ``<label>/<point>/seed-<s>`` (no ``runs/``,
        which .gitignore keeps out of the repository)."""
        return Path(results) / self.relpath.removeprefix("runs/")


@dataclass
class Sweep:
    """A validated sweep file: its runs in a stable order, and how to compare them."""

    name: str
    base: dict[str, Any]
    seeds: list[int]
    methods: dict[str, dict[str, Any]]
    selection: Selection
    reference: str
    kind: str
    runs: list[PlannedRun] = field(default_factory=list)

    @property
    def grid_params(self) -> list[str]:
        """Every grid parameter of every method, in first-seen order (runs.csv columns)."""
        names: list[str] = []
        for run in self.runs:
            names.extend(p for p in run.params if p not in names)
        return names


# ---- reading and validating ----------------------------------------------------------------
def format_value(value: Any) -> str:
    """A filesystem-safe, stable token for a parameter value (0.5 → '0.5', True → 'true')."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (int, float)):
        text = repr(value)
    elif isinstance(value, str):
        text = value
    else:
        text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return _UNSAFE.sub("_", text) or "_"


def point_name(params: Mapping[str, Any]) -> str:
    """``lam=0.5,weighting=uniform`` (keys sorted), or ``default`` for a method without a grid."""
    if not params:
        return DEFAULT_POINT
    return ",".join(f"{format_value(k)}={format_value(params[k])}" for k in sorted(params))


def criterion_gap(criterion: str, attribute: str) -> str:
    """The metrics.jsonl gap key a criterion is measured by: 'ea', 'dp:sex', 'eo:age_band'."""
    return "ea" if criterion == "ea" else f"{criterion}:{attribute}"


def _read(source: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SweepError(f"{path}: no such sweep file") from None
    except yaml.YAMLError as err:
        raise SweepError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: a sweep file must be a mapping with base, seeds and methods")
    return raw


def _lines(err: ConfigError) -> list[str]:
    """A configuration error's problems, one per line, without its 'invalid configuration' head."""
    lines = [line.strip() for line in str(err).splitlines()]
    return [line for line in lines if line and line != "invalid configuration:"]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load_sweep(source: str | Path | Mapping[str, Any]) -> Sweep:
    """Read and validate a sweep file completely; raise one :class:`SweepError` listing every problem."""
    from fedfair_med.algorithms import REGISTRY
    from fedfair_med.tasks import TASKS

    raw = _read(source)
    where = f"{source}: " if isinstance(source, (str, Path)) else ""
    problems: list[str] = []

    unknown = sorted(set(raw) - set(SWEEP_KEYS))
    if unknown:
        problems.append(f"unknown key(s) {unknown}; known keys: {list(SWEEP_KEYS)}")
    name = raw.get("name", Path(source).stem if isinstance(source, (str, Path)) else "sweep")
    if not isinstance(name, str) or not _SAFE_LABEL.match(name):
        problems.append(f"name: use letters, digits, '.', '_' or '-', got {name!r}")
        name = "sweep"

    base = raw.get("base")
    if not isinstance(base, dict):
        problems.append("base: must be a mapping of run configuration keys (task, rounds, data, …)")
        base = {}
    for key in SWEEP_SET:
        if key in base:
            problems.append(f"base.{key}: set by the sweep (seeds / methods), remove it from base")
    base = {k: v for k, v in base.items() if k not in SWEEP_SET}
    base_config: RunConfig | None = None
    try:
        base_config = load_config(base)
    except ConfigError as err:
        problems.extend(f"base: {line}" for line in _lines(err))

    seeds = raw.get("seeds")
    if (not isinstance(seeds, list) or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        problems.append(f"seeds: must be a non-empty list of integers, got {seeds!r}")
        seeds = []
    elif len(set(seeds)) != len(seeds):
        problems.append(f"seeds: repeated seed in {seeds}")

    kind = "segmentation"
    if base_config is not None and base_config.task in TASKS:
        kind = TASKS[base_config.task].kind
    selection = Selection()
    select = raw.get("select", {}) or {}
    if not isinstance(select, dict):
        problems.append("select: must be a mapping (metric_weight, gap_weight, gap)")
        select = {}
    bad = sorted(set(select) - set(SELECT_KEYS))
    if bad:
        problems.append(f"select: unknown key(s) {bad}; known keys: {list(SELECT_KEYS)}")
    for key in ("metric_weight", "gap_weight"):
        if key in select and not (_is_number(select[key]) and select[key] >= 0):
            problems.append(f"select.{key}: must be a number >= 0, got {select[key]!r}")
    if base_config is not None:
        default_gap = ("ea" if kind == "segmentation"
                       else criterion_gap(base_config.criterion, base_config.attribute))
        gap = select.get("gap", default_gap)
        if not isinstance(gap, str) or not re.match(r"^(ea|(dp|eo):[A-Za-z0-9_]+)$", gap):
            problems.append(f"select.gap: use 'ea', 'dp:ATTRIBUTE' or 'eo:ATTRIBUTE', got {gap!r}")
        elif kind == "segmentation" and gap != "ea":
            problems.append(f"select.gap: segmentation runs report only the 'ea' gap, got {gap!r}")
        elif gap.endswith(":age"):
            problems.append("select.gap: raw age has no gap; use age_band")
        else:
            selection = Selection(float(select.get("metric_weight", 1.0)),
                                  float(select.get("gap_weight", 1.0)), gap)

    methods = raw.get("methods")
    if not isinstance(methods, dict) or not methods:
        problems.append("methods: must map a label to {method, grid, fixed}")
        methods = {}
    runs: list[PlannedRun] = []
    for label, entry in methods.items():
        # With a broken base the entries are checked against the default configuration, so
        # the base's problem is reported once, not again at every grid point.
        entry_runs = _expand(str(label), entry, base if base_config is not None else {},
                             seeds, name, problems, REGISTRY)
        runs.extend(entry_runs if base_config is not None else [])

    relpaths = [r.relpath for r in runs]
    if len(set(relpaths)) != len(relpaths):
        dupes = sorted({p for p in relpaths if relpaths.count(p) > 1})
        problems.append(f"methods: grid values give the same directory twice: {dupes[:3]}")

    reference = raw.get("reference")
    if reference is None:
        flexfair = [str(k) for k, v in methods.items() if isinstance(v, dict) and v.get("method") == "flexfair"]
        reference = flexfair[0] if flexfair else (str(next(iter(methods))) if methods else "")
    elif str(reference) not in {str(k) for k in methods}:
        problems.append(f"reference: {reference!r} is not a method label ({[str(k) for k in methods]})")

    if problems:
        raise SweepError(f"{where}invalid sweep file:\n  " + "\n  ".join(problems))
    return Sweep(name=name, base=base, seeds=list(seeds), methods={str(k): v for k, v in methods.items()},
                 selection=selection, reference=str(reference), kind=kind, runs=runs)


def _expand(label: str, entry: Any, base: dict[str, Any], seeds: Sequence[int], sweep_name: str,
            problems: list[str], registry: Mapping[str, Any]) -> list[PlannedRun]:
    """The runs of one methods entry; problems are appended with the entry named."""
    own: list[str] = []
    runs = _expand_entry(label, entry, base, seeds, sweep_name, own, registry)
    problems.extend(own)
    return [] if own else runs


def _expand_entry(label: str, entry: Any, base: dict[str, Any], seeds: Sequence[int],
                  sweep_name: str, problems: list[str], registry: Mapping[str, Any]) -> list[PlannedRun]:
    at = f"methods.{label}"
    if not _SAFE_LABEL.match(label):
        problems.append(f"{at}: a label must use letters, digits, '.', '_' or '-' (it names a folder)")
        return []
    if not isinstance(entry, dict):
        problems.append(f"{at}: must be a mapping with method (and optional grid, fixed, settings)")
        return []
    unknown = sorted(set(entry) - set(METHOD_KEYS))
    if unknown:
        problems.append(f"{at}: unknown key(s) {unknown}; known keys: {list(METHOD_KEYS)}")
    method = entry.get("method")
    if method not in registry:
        problems.append(f"{at}.method: unknown method {method!r}; choose one of {sorted(registry)}")
        return []
    grid, fixed = entry.get("grid") or {}, entry.get("fixed") or {}
    settings = entry.get("settings") or {}
    if not isinstance(settings, dict):
        problems.append(f"{at}.settings: must map run settings (keys of base) to values")
        return []
    for key in settings:
        if key in ("method", "method_params", "seed", "name"):
            problems.append(f"{at}.settings: {key!r} is set by the sweep itself; use method, grid "
                            f"or fixed (method parameters) or seeds instead")
    if problems:
        return []
    base = {**base, **settings}
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        problems.append(f"{at}.grid: must map each parameter to a non-empty list of values")
        return []
    if not isinstance(fixed, dict):
        problems.append(f"{at}.fixed: must map parameters to values")
        return []
    known = registry[method].param_defaults()
    for param in [*grid, *fixed]:
        if param not in known:
            problems.append(f"{at}: {method} has no parameter {param!r}; its parameters: {sorted(known)}")
    for param in grid:
        if param in fixed:
            problems.append(f"{at}: {param!r} is both in grid and fixed")
        if param in RESERVED_COLUMNS or str(param).startswith(("test_", "val_")):
            problems.append(f"{at}.grid: parameter name {param!r} clashes with a runs.csv column")
    if problems:
        return []
    names = sorted(grid)
    runs = []
    for values in itertools.product(*(grid[n] for n in names)):
        params = dict(zip(names, values))
        point = point_name(params)
        try:
            load_config({**base, "method": method, "method_params": {**fixed, **params}})
        except ConfigError as err:
            problems.extend(f"{at} at {point}: {line}" for line in _lines(err))
            continue
        for seed in seeds:
            config = load_config({**base, "name": f"{sweep_name}-{label}-{point}-seed-{seed}",
                                  "method": method, "method_params": {**fixed, **params},
                                  "seed": seed})
            runs.append(PlannedRun(label=label, method=method, point=point, params=params,
                                   seed=seed, config=config,
                                   relpath=f"runs/{label}/{point}/seed-{seed}"))
    return runs


# ---- state of a sweep on disk ----------------------------------------------------------------
def is_finished(run_dir: Path) -> bool:
    """A run is finished when its report.json exists and parses (the runtime writes it after
    metrics, predictions and model)."""
    report = Path(run_dir) / "report.json"
    try:
        json.loads(report.read_text())
    except (OSError, ValueError):
        return False
    return True


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


def execute_run(config: Mapping[str, Any], target: str) -> str:
    """Run one configuration into ``target``: into ``target.partial`` first, renamed when done.

    A top-level function so 'spawn' worker processes can import it.
    """
    from fedfair_med.runtime.local import run_simulation

    final = Path(target)
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    run_simulation(RunConfig(**config), partial)
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


def run_sweep(sweep: Sweep, out: str | Path, parallel: int = 1,
              progress: SweepProgress | None = None, analyse: bool = True,
              results: str | Path | None = None) -> SweepResult:
    """Run every unfinished run of ``sweep`` into ``out``, then write the comparison outputs.

    Runs are independent, so a failing run does not stop the others; failures are raised
    together at the end (their directories stay unfinished and are retried next time).
    With ``results``, each finished run's summary is written there as it finishes (and any
    finished run in ``out`` still missing one is backfilled), runs with a summary are skipped,
    and the comparison is computed from the summaries.
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
    if parallel == 1:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for run in status.to_run:
                progress.run_started(run)
                ok = True
                try:
                    execute_run(run.config.to_dict(), str(run.path(out)))
                    keep_summary(run)
                except Exception as err:  # noqa: BLE001 - reported with the run below
                    failures.append((run, err))
                    ok = False
                progress.run_finished(run, ok=ok)
        finally:
            torch.set_num_threads(threads)
    elif status.to_run:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=parallel, mp_context=context,
                                 initializer=_init_worker) as pool:
            pending: dict[Future, PlannedRun] = {}
            queue = list(status.to_run)
            while queue or pending:
                while queue and len(pending) < parallel:
                    run = queue.pop(0)
                    progress.run_started(run)
                    try:
                        future = pool.submit(execute_run, run.config.to_dict(), str(run.path(out)))
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
    result = SweepResult(out=out, executed=status.to_run, skipped=status.finished)
    if analyse:
        from fedfair_med.experiments.analysis import write_outputs

        result.outputs = write_outputs(sweep, out, source=results)
    return result


def _describe(sweep: Sweep) -> dict[str, Any]:
    """The validated sweep, written beside its runs so the outputs say what produced them."""
    return {"name": sweep.name, "base": sweep.base, "seeds": sweep.seeds, "methods": sweep.methods,
            "select": {"metric_weight": sweep.selection.metric_weight,
                       "gap_weight": sweep.selection.gap_weight, "gap": sweep.selection.gap},
            "reference": sweep.reference}
