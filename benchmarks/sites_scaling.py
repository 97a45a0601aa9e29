"""Scaling with the number of simulated sites: 2 → 32 sites sharing a fixed total sample count.

Each setting runs :func:`fedfair_med.runtime.local.run_simulation` — the real in-process runtime,
training, aggregation and per-site evaluation — in a fresh subprocess, so peak RSS
(``ru_maxrss``) belongs to that setting alone. Settings are run in an interleaved order (each
repeat goes up, the next down) so machine drift spreads over all of them. The synthetic
segmentation federation is split evenly: with 256 training images and batch 8, every setting
takes 32 optimiser steps per round, so any growth in wall time is per-site overhead.

Targets: round wall time flat within 15 % (median round time at K sites ÷ at 2 sites ≤ 1.15),
and peak RSS growing by no more than one model state dict per extra site (SCAFFOLD included,
whose sites each keep a private control variate c_i).

    python benchmarks/sites_scaling.py            # 2, 4, 8, 16, 32 sites; FedAvg and SCAFFOLD
    python benchmarks/sites_scaling.py --quick    # 2 and 4 sites, one repeat; checks the script
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common as bench

TIME_TARGET = 1.15
TASK = "bench-scaled-seg"


def _max_rss_bytes() -> int:
    # Linux reports ru_maxrss in KiB (macOS in bytes).
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _scaled_styles(num_sites: int, train_total: int, test_total: int) -> tuple:
    from fedfair_med.data.synthetic import SiteStyle

    return tuple(
        SiteStyle(f"site-{k:02d}", train_total // num_sites, max(2, test_total // num_sites),
                  contrast=1.0 - 0.4 * k / num_sites, brightness=0.3 * k / num_sites,
                  noise=0.1, thickness=1.0)
        for k in range(num_sites))


def _register_task() -> None:
    """Make ``bench-scaled-seg`` — synthetic segmentation split evenly over ``num_sites`` sites —
    known to the task registry of this (worker) process only; the package is not changed."""
    import fedfair_med.tasks as tasks

    locations = getattr(tasks, "_LOCATIONS", None)
    if locations is not None:  # lazy registry: name → "module:attribute"
        locations[TASK] = "sites_scaling:ScaledSegmentation"
    else:
        tasks.TASKS[TASK] = __getattr__("ScaledSegmentation")  # type: ignore[index]


def __getattr__(name: str) -> Any:
    # ScaledSegmentation is built on first access, so importing this module stays torch-free.
    if name != "ScaledSegmentation":
        raise AttributeError(name)
    from fedfair_med.data.synthetic import synthetic_segmentation
    from fedfair_med.tasks.synthetic import SyntheticSegmentation

    class ScaledSegmentation(SyntheticSegmentation):
        name = TASK

        def load_federation(self, seed: int = 0, num_sites: int = 2, train_total: int = 256,
                            test_total: int = 128, **options: Any):
            styles = _scaled_styles(num_sites, train_total, test_total)
            return synthetic_segmentation(seed=seed, sites=styles, **options)

    globals()["ScaledSegmentation"] = ScaledSegmentation
    return ScaledSegmentation


def worker(args: Any) -> None:
    """One setting in this fresh process; prints one JSON line."""
    bench.set_threads(args.threads)
    _register_task()
    from fedfair_med.config import RunConfig
    from fedfair_med.runtime.local import run_simulation

    marks: dict[str, Any] = {"round_s": [], "round_cpu_s": [], "rss_after_round": []}

    class Clock:
        def round_started(self, round_index: int, total_rounds: int, total_steps: int) -> None:
            if round_index == 1:
                marks["rss_setup"] = _max_rss_bytes()
                marks["steps_per_round"] = total_steps
            marks["start"], marks["cpu"] = time.perf_counter(), time.process_time()

        def advance(self, steps: int) -> None:
            pass

        def round_finished(self, round_index: int, record: dict[str, Any]) -> None:
            marks["round_s"].append(time.perf_counter() - marks["start"])
            marks["round_cpu_s"].append(time.process_time() - marks["cpu"])
            marks["rss_after_round"].append(_max_rss_bytes())

    config = RunConfig(task=TASK, method=args.method, rounds=args.rounds + 1, seed=0,
                       network_kwargs={"channels": list(args.channels)},
                       data={"num_sites": args.worker, "train_total": args.train_total,
                             "test_total": args.test_total})
    with tempfile.TemporaryDirectory() as tmp:
        result = run_simulation(config, Path(tmp) / "run", progress=Clock())
    state = result.state or {}
    print(json.dumps({
        "sites": args.worker, "method": args.method,
        "round_s": marks["round_s"][1:],  # round 1 is the warm-up (first touches, lazy imports)
        "round_cpu_s": marks["round_cpu_s"][1:],
        "peak_rss_bytes": marks["rss_after_round"][-1], "rss_after_setup_bytes": marks["rss_setup"],
        "state_dict_bytes": bench.state_bytes(state), "steps_per_round": marks["steps_per_round"],
    }))


def run_setting(sites: int, method: str, args: Any) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", str(sites), "--method", method,
               "--rounds", str(args.rounds), "--train-total", str(args.train_total),
               "--test-total", str(args.test_total), "--channels", *map(str, args.channels)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ}, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"setting {sites} sites / {method} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = bench.parser(__doc__.splitlines()[0])
    p.add_argument("--worker", type=int, default=None, help=argparse_hidden())
    p.add_argument("--method", default="fedavg")
    p.add_argument("--methods", nargs="+", default=None)
    p.add_argument("--sites", nargs="+", type=int, default=None)
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per subprocess")
    p.add_argument("--train-total", type=int, default=256)
    p.add_argument("--test-total", type=int, default=128)
    p.add_argument("--channels", nargs="+", type=int, default=None,
                   help="UNet channels; the default (32 64 128 256) makes a 3.3 MB state dict, "
                        "large enough for one per site to show above allocator noise")
    args = p.parse_args(argv)
    args.channels = args.channels or ([8, 16, 32] if args.quick else [32, 64, 128, 256])
    args.rounds = args.rounds or (1 if args.quick else 2)
    if args.worker is not None:
        worker(args)
        return {}
    args.repeats = args.repeats or (1 if args.quick else 3)
    site_counts = args.sites or ([2, 4] if args.quick else [2, 4, 8, 16, 32])
    methods = args.methods or (["fedavg"] if args.quick else ["fedavg", "scaffold"])
    if args.quick:
        args.train_total, args.test_total = 32, 16
    started = time.perf_counter()
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {(m, k): [] for m in methods for k in site_counts}
    for r in range(args.repeats):
        order = [(m, k) for k in site_counts for m in methods]
        for method, k in (order if r % 2 == 0 else order[::-1]):
            runs[(method, k)].append(run_setting(k, method, args))

    results = []
    for method in methods:
        base = runs[(method, site_counts[0])]
        base_time = bench.spread([t for run in base for t in run["round_s"]])["median"]
        base_rss = min(run["peak_rss_bytes"] for run in base)
        for k in site_counts:
            rows = runs[(method, k)]
            times = [t for run in rows for t in run["round_s"]]
            # Paired per repeat: this setting's median round ÷ the 2-site median of the same repeat.
            ratios = [bench.spread(run["round_s"])["median"] / bench.spread(b["round_s"])["median"]
                      for run, b in zip(rows, base)]
            cpu_ratios = [bench.spread(run["round_cpu_s"])["median"] / bench.spread(b["round_cpu_s"])["median"]
                          for run, b in zip(rows, base)]
            peak = min(run["peak_rss_bytes"] for run in rows)  # least-disturbed of the repeats
            state = rows[0]["state_dict_bytes"]
            extra_sites = k - site_counts[0]
            growth = peak - base_rss
            per_site = growth / (extra_sites * state) if extra_sites else 0.0
            results.append({
                "method": method, "sites": k, "steps_per_round": rows[0]["steps_per_round"],
                "round_s": bench.spread(times), "time_ratio_to_first": bench.spread(ratios),
                "round_cpu_s": bench.spread([t for run in rows for t in run["round_cpu_s"]]),
                "cpu_time_ratio_to_first": bench.spread(cpu_ratios),
                "time_ratio_of_medians": bench.spread(times)["median"] / base_time,
                "peak_rss_bytes": [run["peak_rss_bytes"] for run in rows],
                "rss_growth_bytes": growth, "state_dict_bytes": state,
                "rss_growth_state_dicts_per_extra_site": per_site,
                "meets_time_target": bench.spread(ratios)["median"] <= TIME_TARGET,
                "meets_time_target_cpu": bench.spread(cpu_ratios)["median"] <= TIME_TARGET,
                "meets_memory_target": per_site <= 1.0,
            })
    payload = {
        "benchmark": "sites_scaling", "quick": args.quick, "machine": bench.machine(argv),
        "target": f"round time ratio to {site_counts[0]} sites <= {TIME_TARGET}; peak RSS growth <= "
                  f"one state dict per extra site",
        "setup": {"task": "synthetic-seg split evenly", "train_total": args.train_total,
                  "test_total": args.test_total, "channels": args.channels, "rounds_timed": args.rounds,
                  "repeats": args.repeats, "site_counts": site_counts, "methods": methods},
        "results": results, "raw": {f"{m}/{k}": v for (m, k), v in runs.items()},
        "wall_s": round(time.perf_counter() - started, 1),
    }
    path = bench.write_result("sites_scaling", payload, args.out)
    bench.print_table(
        f"Sites scaling at a fixed {args.train_total} training images (fresh process per setting)",
        ["method", "sites", "steps", "round s", f"wall ÷ {site_counts[0]} sites", f"CPU ÷ {site_counts[0]} sites",
         "≤ 1.15 (wall / CPU)",
         "RSS growth MB", "state dicts / extra site", "memory ≤ 1"],
        [[r["method"], r["sites"], r["steps_per_round"], r["round_s"]["median"],
          bench.ratio_text(r["time_ratio_to_first"]), bench.ratio_text(r["cpu_time_ratio_to_first"]),
          bench.verdict(r["time_ratio_to_first"]["median"], TIME_TARGET) + " / "
          + bench.verdict(r["cpu_time_ratio_to_first"]["median"], TIME_TARGET),
          r["rss_growth_bytes"] / 2**20, r["rss_growth_state_dicts_per_extra_site"],
          bench.verdict(r["rss_growth_state_dicts_per_extra_site"], 1.0)] for r in results])
    print(f"wrote {path}")
    return payload


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main(sys.argv[1:])
