"""Sweep planning: a sweep file, validated and expanded into one RunConfig per run, before
anything runs (:mod:`fedfair_med.experiments.sweep` runs the plan,
:mod:`fedfair_med.experiments.analysis` compares its results; both import this module, neither
imports the other's caller).

The file format and the run layout are described in :mod:`fedfair_med.experiments.sweep`.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from fedfair_med.config import ConfigError, RunConfig, load_config
from fedfair_med.contracts import SEGMENTATION

SWEEP_KEYS = ("name", "base", "seeds", "select", "reference", "methods", "holdout")
METHOD_KEYS = ("method", "grid", "fixed", "settings")
SELECT_KEYS = ("metric_weight", "gap_weight", "gap")
SWEEP_SET = ("method", "method_params", "seed", "name")  # the sweep sets these per run
# runs.csv columns a grid parameter must not shadow.
RESERVED_COLUMNS = ("label", "method", "point", "seed", "rounds", "metric_name", "path")
_SAFE_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")
DEFAULT_POINT = "default"
#: Leave-one-site-out runs live in ``<label>/holdout=<site>[,<point>]/seed-<s>`` and are finished
#: only when the held-out site's audit, :data:`HOLDOUT_FILE`, is there too.
HOLDOUT_PREFIX = "holdout="
HOLDOUT_FILE = "holdout.json"


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
    holdout: str | None = None  # leave one site out: the manifest of the site left out
    fold: str | None = None  # ... and its name (the fold)

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
    holdout: dict[str, str] = field(default_factory=dict)  # fold name -> held-out manifest

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

    kind = SEGMENTATION
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
        default_gap = ("ea" if kind == SEGMENTATION
                       else criterion_gap(base_config.criterion, base_config.attribute))
        gap = select.get("gap", default_gap)
        if not isinstance(gap, str) or not re.match(r"^(ea|(dp|eo):[A-Za-z0-9_]+)$", gap):
            problems.append(f"select.gap: use 'ea', 'dp:ATTRIBUTE' or 'eo:ATTRIBUTE', got {gap!r}")
        elif kind == SEGMENTATION and gap != "ea":
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
    folds = _holdout_folds(raw, base, methods, problems) if base_config is not None else {}
    runs: list[PlannedRun] = []
    for label, entry in methods.items():
        # With a broken base the entries are checked against the default configuration, so
        # the base's problem is reported once, not again at every grid point.
        if not folds:
            entry_runs = _expand(str(label), entry, base if base_config is not None else {},
                                 seeds, name, problems, REGISTRY)
            runs.extend(entry_runs if base_config is not None else [])
            continue
        for fold, manifest in folds.items():
            others = [m for m in base["data"]["manifests"] if m != manifest]
            fold_base = {**base, "data": {**base["data"], "manifests": others}}
            entry_runs = _expand(str(label), entry, fold_base, seeds, f"{name}-{HOLDOUT_PREFIX[:-1]}-{fold}",
                                 problems if fold == next(iter(folds)) else [], REGISTRY)
            for run in entry_runs:
                point = holdout_point(fold, run.point)
                runs.append(dataclasses.replace(
                    run, point=point, relpath=f"runs/{run.label}/{point}/seed-{run.seed}",
                    holdout=manifest, fold=fold))

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
                 selection=selection, reference=str(reference), kind=kind, runs=runs, holdout=folds)


# ---- leave one site out -----------------------------------------------------------------------
def fold_name(manifest: str | Path) -> str:
    """A held-out site's fold name from its manifest path: the file's stem, or its folder's name
    when the file is ``manifest.csv`` (as the importers write them)."""
    path = Path(manifest)
    stem = path.stem if path.stem != "manifest" else (path.parent.name or path.stem)
    return _UNSAFE.sub("_", stem) or "site"


def holdout_point(fold: str, point: str) -> str:
    """``holdout=<fold>`` or ``holdout=<fold>,<point>``: the fold first, so the folder says it."""
    return HOLDOUT_PREFIX + fold + ("" if point == DEFAULT_POINT else "," + point)


def split_holdout_point(name: str) -> tuple[str | None, str]:
    """(fold, setting point) of a run folder's point name; (None, name) outside a holdout study."""
    if not name.startswith(HOLDOUT_PREFIX):
        return None, name
    fold, _, point = name[len(HOLDOUT_PREFIX):].partition(",")
    return fold, point or DEFAULT_POINT


def _holdout_folds(raw: Mapping[str, Any], base: Mapping[str, Any], methods: Any,
                   problems: list[str]) -> dict[str, str]:
    """``holdout: all`` (every site of base.data.manifests in turn) or a list of fold names:
    {fold name: held-out manifest}; {} without the key."""
    if "holdout" not in raw or raw["holdout"] in (None, False):
        return {}
    wanted = raw["holdout"]
    manifests = (base.get("data") or {}).get("manifests")
    if not isinstance(manifests, list) or len(manifests) < 2:
        problems.append("holdout: needs base.data.manifests with at least two sites (one is left "
                        "out in turn, the others train)")
        return {}
    folds = {fold_name(m): str(m) for m in manifests}
    if len(folds) != len(manifests):
        problems.append(f"holdout: two manifests give the same site name ({[fold_name(m) for m in manifests]}); "
                        "name the files or their folders apart")
        return {}
    if wanted not in ("all", True):
        if (not isinstance(wanted, list) or not wanted
                or not all(isinstance(f, str) and f in folds for f in wanted)):
            problems.append(f"holdout: 'all' or a list of sites among {sorted(folds)}, got {wanted!r}")
            return {}
        folds = {f: folds[f] for f in wanted}
    for label, entry in (methods.items() if isinstance(methods, dict) else []):
        if isinstance(entry, dict) and "data" in (entry.get("settings") or {}):
            problems.append(f"methods.{label}.settings: data is set per fold by holdout; set it in base")
    return folds


def _effective_optimizer(config: Mapping[str, Any]) -> str | None:
    """The local optimiser a run configuration mapping trains with: its own, else its task's
    default; None when the task is unknown (reported elsewhere)."""
    from fedfair_med.tasks import TASKS

    if config.get("optimizer"):
        return str(config["optimizer"])
    task = TASKS.get(str(config.get("task")))
    return task.defaults.optimizer if task is not None else None


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
    required, optimizer = registry[method].required_optimizer, _effective_optimizer(base)
    if required and optimizer not in (None, required):
        # The method swaps the optimiser but keeps the rate, so the arm would run, say, SGD at a
        # rate tuned for Adam and barely learn: a comparison that says nothing about the method.
        problems.append(
            f"{at}: {method} trains with local {required} whatever 'optimizer' says, but this arm's "
            f"optimizer is {optimizer!r}; set optimizer: {required} with a "
            f"learning rate chosen for {required} (in base, or in this entry's settings)")
        return []
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
    metrics, predictions and model); a leave-one-site-out run (``holdout=…`` folder) also
    needs its held-out audit, holdout.json."""
    run_dir = Path(run_dir)
    needed = ["report.json"]
    if run_dir.parent.name.startswith(HOLDOUT_PREFIX):
        needed.append(HOLDOUT_FILE)
    for name in needed:
        try:
            json.loads((run_dir / name).read_text())
        except (OSError, ValueError):
            return False
    return True
