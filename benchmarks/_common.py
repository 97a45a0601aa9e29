"""Shared helpers of the benchmark scripts: machine facts, interleaved timing, paired ratios,
real-data manifests, one federated round, result files and tables.

Why interleave: the benchmarks run on small machines shared with other jobs, where the speed
of the CPU drifts by tens of percent within a minute. Timing side A for a minute and then side
B compares two different machines. Instead every repeat times each side once, in an order that
alternates (A B, B A, …), and a ratio is formed *within* a repeat; the median of those paired
ratios and their spread are reported. A drift slower than one repeat then cancels.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
if str(REPO) not in sys.path:  # `python benchmarks/NAME.py` from anywhere uses this checkout
    sys.path.insert(0, str(REPO))
# Like for like: the hand-written loops the runtime is compared with do not prepare batches in a
# background thread, so the runtime does not either (data_loading.py measures prefetching on its
# own). FEDFAIR_PREFETCH=1 in the environment measures the runtime with it.
os.environ.setdefault("FEDFAIR_PREFETCH", "0")


# ---- command line and machine ------------------------------------------------------------------
def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true",
                   help="tiny synthetic settings and one repeat: checks the script, measures nothing")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per side")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON result")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--data", type=Path, default=None,
                   help="shared public datasets (default $FEDFAIR_SHARED_DATA or ../shared/data)")
    p.add_argument("--limit", type=int, default=16, help="images per split and site from real data")
    return p


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """What a reader needs to judge the figures: cores, CPU, threads, load, versions, command."""
    import monai
    import torch

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    args = list(sys.argv[1:] if argv is None else argv)
    return {
        "nproc": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "python": platform.python_version(),
        "load_average_at_start": [round(x, 2) for x in load],
        "git_commit": commit,
        "command": "python " + shlex.join([f"benchmarks/{Path(sys.argv[0]).name}", *args]),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def set_threads(threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)


# ---- statistics ------------------------------------------------------------------------------
def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, quartiles and range: a few repeats on a noisy machine are not normal samples."""
    v = sorted(float(x) for x in values)
    if not v:
        return {"n": 0}
    q = statistics.quantiles(v, n=4, method="inclusive") if len(v) > 1 else [v[0]] * 3
    return {"n": len(v), "median": statistics.median(v), "p25": q[0], "p75": q[2],
            "min": v[0], "max": v[-1]}


def paired_ratios(numerator: Sequence[float], denominator: Sequence[float]) -> list[float]:
    """Ratio per repeat (both sides timed within the same repeat)."""
    return [n / d for n, d in zip(numerator, denominator) if d > 0]


@dataclass
class Interleaved:
    """Times of several sides, each timed once per repeat in a shuffled / alternating order.

    ``times`` is wall-clock time; ``cpu`` is this process's CPU time (user + system, all its
    threads) over the same calls. On cores shared with other jobs, wall time also counts the
    moments another job held the core; CPU time counts only work this process did, so its
    ratios stay meaningful under load (the work compared here is in-memory compute, with no
    waiting on disk or network that CPU time would hide — data comes from the page cache).
    """

    times: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, list[float]] = field(default_factory=dict)

    def ratio(self, side: str, reference: str, clock: str = "wall") -> dict[str, float]:
        source = self.cpu if clock == "cpu" else self.times
        return spread(paired_ratios(source[side], source[reference]))


def interleave(sides: Mapping[str, Callable[[], Any]], repeats: int, warmup: int = 1,
               seed: int = 0) -> Interleaved:
    """Run every side ``warmup`` times untimed, then ``repeats`` times timed, interleaved.

    With two sides the order alternates (A B, B A, …) so neither side always runs right after
    the other; with more sides each repeat is a seeded shuffle.
    """
    names = list(sides)
    for _ in range(warmup):
        for name in names:
            sides[name]()
    rng = random.Random(seed)
    result = Interleaved({n: [] for n in names}, {n: [] for n in names})
    for r in range(repeats):
        if len(names) == 2:
            order = names if r % 2 == 0 else names[::-1]
        else:
            order = names[:]
            rng.shuffle(order)
        for name in order:
            wall, cpu = time.perf_counter(), time.process_time()
            sides[name]()
            result.cpu[name].append(time.process_time() - cpu)
            result.times[name].append(time.perf_counter() - wall)
    return result


# ---- data ------------------------------------------------------------------------------------
def shared_data(explicit: Path | None = None) -> Path:
    if explicit is not None:
        return explicit
    env = os.environ.get("FEDFAIR_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


#: Task → (importer name, folder under the shared data) per site group.
SOURCES = {"fundus": [("chase", "chasedb1"), ("stare", "stare")], "skin": [("ham10000", "ham10000")]}


def manifests(task: str, limit: int, data: Path | None = None,
              root: Path = Path("/tmp/fedfair-bench/manifests")) -> list[str]:
    """Site manifests of ``task`` from the shared data (written once under ``root``, no copies)."""
    from fedfair_med.data.importers import import_dataset

    base = shared_data(data)
    paths: list[str] = []
    for dataset, folder in SOURCES[task]:
        src = base / folder
        if not src.is_dir():
            raise FileNotFoundError(f"{src} not found: real-data benchmarks need the shared data "
                                    f"(set FEDFAIR_SHARED_DATA), or run with --quick")
        out = root / f"{dataset}-limit{limit}"
        written = sorted(out.glob("*/manifest.csv"))
        if not written:
            written = [s.manifest for s in import_dataset(dataset, src, out, limit=limit, seed=0)]
        paths.extend(str(p) for p in sorted(written))
    return paths


def task_config(task: str, limit: int, data_root: Path | None = None, **fields: Any):
    """A :class:`RunConfig` for ``task``; real tasks read manifests, synthetic ones scale down."""
    from fedfair_med.config import RunConfig

    options = dict(fields.pop("data", {}) or {})
    if task in SOURCES:
        options.setdefault("manifests", manifests(task, limit, data_root))
    return RunConfig(task=task, **fields, data=options)


# ---- one federated round, exactly as the in-process runtime runs it ---------------------------------
class FederatedRounds:
    """The in-process runtime's round without evaluation, reusable one round at a time.

    Statistics pass when the method wants one, then at every site broadcast → local training
    (:meth:`SiteRunner.train`) folded into the server's streaming aggregation — the same calls, in the same
    order, as :func:`fedfair_med.runtime.local.run_simulation`.
    """

    def __init__(self, config: Any, task: Any = None, sites: Any = None) -> None:
        from fedfair_med.algorithms.base import float_state
        from fedfair_med.runtime.local import build_sites
        from fedfair_med.runtime.setup import RunSetup

        from fedfair_med.runtime.malloc_tuning import keep_freed_memory

        config.validate()
        keep_freed_memory()  # as run_simulation does
        self.config = config
        setup = RunSetup.create(config, task)  # the run set-up run_simulation makes
        self.task = setup.task
        self.sites = sites if sites is not None else build_sites(setup)
        self.algorithm = setup.algorithm
        self.model = setup.build_model()
        self.global_state = float_state(self.model)
        self.server_state = self.algorithm.init_server_state(self.global_state, [s.name for s in self.sites])
        self.round_index = 0

    def __call__(self) -> None:
        import torch

        from fedfair_med.runtime.setup import derive_seed

        self.round_index += 1
        r, algorithm = self.round_index, self.algorithm
        if algorithm.wants_statistics(r, self.server_state):
            stats = {s.name: s.statistics(algorithm, self.model, self.global_state, r) for s in self.sites}
            self.server_state = algorithm.absorb_statistics(self.server_state, stats)
        aggregation = algorithm.start_aggregation(self.global_state, self.server_state)
        for site in sorted(self.sites, key=lambda s: s.name):
            broadcast = algorithm.broadcast(self.server_state, site.name)
            aggregation.add(site.name, site.train(algorithm, self.model, self.global_state, broadcast, r))
        torch.manual_seed(derive_seed(self.config.seed, r, "server"))
        self.global_state, self.server_state = aggregation.result()


def state_bytes(state: Mapping[str, Any]) -> int:
    return int(sum(v.numel() * v.element_size() for v in state.values()))


# ---- output ---------------------------------------------------------------------------------
def write_result(name: str, payload: dict[str, Any], out: Path) -> Path:
    """``out/NAME.json``; a ``--quick`` run (``payload["quick"]``) writes ``NAME.quick.json``
    instead, so checking a script never overwrites the committed full measurement."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}{'.quick' if payload.get('quick') else ''}.json"
    path.write_text(json.dumps(payload, indent=2, sort_keys=False, default=_plain) + "\n")
    return path


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A Rich table when Rich is installed, else aligned plain text."""
    cells = [[_fmt(c) for c in row] for row in rows]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(str(c)), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
        print(title)
        print("  ".join(str(c).ljust(w) for c, w in zip(columns, widths)))
        for r in cells:
            print("  ".join(v.ljust(w) for v, w in zip(r, widths)))
        return
    from rich.markup import escape

    table = Table(title=escape(title))
    for c in columns:
        table.add_column(escape(str(c)))
    for r in cells:
        table.add_row(*(escape(v) for v in r))
    Console(width=max(120, Console().width)).print(table)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def ratio_text(s: Mapping[str, float]) -> str:
    """'1.023 [1.010–1.041]': median [p25–p75] of paired ratios."""
    if not s.get("n"):
        return "n/a"
    return f"{s['median']:.3f} [{s['p25']:.3f}–{s['p75']:.3f}]"


def verdict(value: float | None, target: float) -> str:
    if value is None:
        return "n/a"
    return "meets" if value <= target else "MISSES"
