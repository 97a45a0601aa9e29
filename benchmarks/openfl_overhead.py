"""Cost of the real federation: OpenFL over mutual TLS vs the in-process runtime, same run.

One aggregator and three collaborators (the synthetic federation's sites) run as separate
processes on this machine, exactly as ``fedfair-med aggregator start`` / ``collaborator start``
run them (mutual TLS on, certificates from ``init-federation`` and ``certify``). The same
configuration then runs in-process with :func:`run_simulation`; the two alternate, repeat after
repeat. Measured:

* round time: the aggregator's round records carry ``elapsed_s``; the steady-state round time is
  the median difference between consecutive rounds (round 1 holds the start-up), likewise for the
  in-process run. Target: OpenFL round ÷ in-process round ≤ 1.3;
* start-up: seconds from launching the processes until a collaborator starts its first local
  training (imports, plan parsing, data, TLS handshake);
* bytes per round: every tensor a collaborator sends is logged by the task runner
  (``FEDFAIR_WIRE_LOG``: name, shape, dtype — never values) and counted as shape × item size.
  Downloads are not logged; they are counted as one model state plus the method's broadcast per
  site and round (what the aggregator serves), so this is the tensor payload, not TLS frames.
  Target: payload per round ÷ (2 × model bytes × sites) ≤ 1.02, fairness statistics
  (``extra/`` tensors of FlexFair) < 1 KiB per site and round.

    python benchmarks/openfl_overhead.py           # flexfair-ea, 4 rounds, 2 repeats
    python benchmarks/openfl_overhead.py --quick   # 2 rounds, 1 repeat (still ~1 min: 4 processes)
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common as bench

SITES = ["site-a", "site-b", "site-c"]
ROUND_TARGET, BYTES_TARGET, STATISTICS_TARGET = 1.3, 1.02, 1024


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cli(*args: Any) -> None:
    import typer
    from typer.testing import CliRunner

    from fedfair_med.cli.federation_commands import register

    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    register(app)
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exit_code != 0:
        raise RuntimeError(f"fedfair-med {' '.join(map(str, args))} failed:\n{result.output}")


def make_workspace(root: Path, method: str, config: dict[str, Any]) -> Path:
    import yaml

    root.mkdir(parents=True, exist_ok=True)
    (root / "run.yaml").write_text(yaml.safe_dump(config))
    _cli("init-federation", "bench", "--task", "synthetic-seg", "--method", method, "--sites", ",".join(SITES),
         "--port", _free_port(), "--config", root / "run.yaml", "--workspaces-dir", root / "workspaces")
    ws = root / "workspaces" / "bench"
    for site in SITES:
        _cli("collaborator", "setup", ws / "bundles" / f"{site}.zip", "--name", site)
    _cli("certify", "--workspace", ws, *[ws / "bundles" / s / "cert/client" / f"col_{s}.csr" for s in SITES])
    return ws


def run_federation(ws: Path, logs: Path, timeout_s: float) -> dict[str, Any]:
    """Launch aggregator + collaborators; return start-up time and the wire log path."""
    wire = logs / "wire.jsonl"
    wire.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "FEDFAIR_WIRE_LOG": str(wire)}
    command = [sys.executable, "-m", "fedfair_med.cli.federation_commands"]
    procs: dict[str, subprocess.Popen] = {}
    started = time.perf_counter()
    startup_s = None
    try:
        procs["aggregator"] = subprocess.Popen(
            [*command, "aggregator", "start", "--workspace", str(ws), "--timeout", str(timeout_s)],
            stdout=open(logs / "aggregator.log", "w"), stderr=subprocess.STDOUT, env=env, cwd=bench.REPO)
        for site in SITES:
            procs[site] = subprocess.Popen(
                [*command, "collaborator", "start", str(ws / "bundles" / site), "--name", site,
                 "--certificate", str(ws / "certified" / f"col_{site}.crt"), "--connect-timeout", "60"],
                stdout=open(logs / f"{site}.log", "w"), stderr=subprocess.STDOUT, env=env, cwd=bench.REPO)
        while procs["aggregator"].poll() is None:
            if startup_s is None and any("train round 1" in (logs / f"{s}.log").read_text() for s in SITES):
                startup_s = time.perf_counter() - started
            if time.perf_counter() - started > timeout_s + 30:
                raise RuntimeError("federation did not finish in time")
            time.sleep(0.05)
        if procs["aggregator"].returncode != 0:
            raise RuntimeError((logs / "aggregator.log").read_text()[-3000:])
        for site in SITES:
            procs[site].wait(timeout=60)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
    return {"startup_s": startup_s, "wall_s": time.perf_counter() - started, "wire": wire}


def _steady_round_s(history: list[dict[str, Any]]) -> list[float]:
    elapsed = [float(r["elapsed_s"]) for r in sorted(history, key=lambda r: r["round"])]
    return [b - a for a, b in zip(elapsed, elapsed[1:])]


def wire_bytes(wire: Path, model_bytes: int, rounds: int) -> dict[str, Any]:
    import numpy as np

    uploads = statistics = 0
    by_task: dict[str, int] = {}
    entries = [json.loads(line) for line in wire.read_text().splitlines()]
    # Bytes sent are the `kind: wire` tensors (packed); what they carry is logged as `content`.
    packed = any(e.get("kind") == "wire" for e in entries)
    for entry in entries:
        size = int(np.prod(entry["shape"], dtype=np.int64)) * np.dtype(entry["dtype"]).itemsize
        if entry.get("kind", "wire") == "wire" or not packed:
            uploads += size
            by_task[entry["task"]] = by_task.get(entry["task"], 0) + size
        if entry.get("kind") != "wire" and entry["name"].startswith("extra/flexfair"):
            statistics += size
    per_round_site = uploads / rounds / len(SITES)
    downloads = model_bytes  # one global model per site and round (broadcast extras are O(groups))
    return {
        "upload_bytes_per_site_round": per_round_site,
        "upload_bytes_by_task": by_task,
        "download_bytes_per_site_round_counted": downloads,
        "payload_ratio": (per_round_site + downloads) / (2 * model_bytes),
        "fairness_statistics_bytes_per_site_round": statistics / rounds / len(SITES),
        "model_bytes": model_bytes,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = bench.parser(__doc__.splitlines()[0])
    p.add_argument("--method", default="flexfair-ea", help="plan template")
    p.add_argument("--rounds", type=int, default=None)
    args = p.parse_args(argv)
    bench.set_threads(args.threads)
    import torch
    import yaml

    from fedfair_med.config import RunConfig
    from fedfair_med.runtime.local import run_simulation
    from fedfair_med.runtime.rundir import read_metrics

    rounds = args.rounds or (2 if args.quick else 4)
    repeats = args.repeats or (1 if args.quick else 2)
    config = {"rounds": rounds, "data": {"scale": 0.25 if args.quick else 1.0}}
    started = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix="fedfair-openfl-bench-"))
    ws = make_workspace(scratch, args.method, config)
    plan = yaml.safe_load((ws / "plan/plan.yaml").read_text())
    run_config = RunConfig(**{**plan["fedfair"]["settings"]["spec"]["run"], "runtime": "local"})
    tls = bool(plan["network"]["settings"].get("tls", True))

    openfl_rounds, local_rounds, startups, ratios, wire = [], [], [], [], None
    for r in range(repeats):
        order = ("openfl", "local") if r % 2 == 0 else ("local", "openfl")
        measured: dict[str, list[float]] = {}
        for side in order:
            if side == "openfl":
                run_dir = ws / "run"
                if run_dir.exists():
                    import shutil

                    shutil.rmtree(run_dir)
                out = run_federation(ws, scratch, timeout_s=900)
                measured[side] = _steady_round_s(read_metrics(run_dir))
                startups.append(out["startup_s"])
                model_bytes = bench.state_bytes(torch.load(run_dir / "model.pt"))
                wire = wire_bytes(out["wire"], model_bytes, rounds)
            else:
                result = run_simulation(run_config, scratch / f"local-{r}")
                measured[side] = _steady_round_s(result.history)
        openfl_rounds += measured["openfl"]
        local_rounds += measured["local"]
        ratios.append(bench.spread(measured["openfl"])["median"] / bench.spread(measured["local"])["median"])
    ratio = bench.spread(ratios)
    payload = {
        "benchmark": "openfl_overhead", "quick": args.quick, "machine": bench.machine(argv),
        "target": f"round ratio <= {ROUND_TARGET} with TLS; payload ratio <= {BYTES_TARGET}; "
                  f"fairness statistics < {STATISTICS_TARGET} B per site and round",
        "setup": {"method": args.method, "task": "synthetic-seg", "sites": SITES, "rounds": rounds,
                  "repeats": repeats, "tls": tls, "data": config["data"]},
        "openfl_round_s": bench.spread(openfl_rounds), "local_round_s": bench.spread(local_rounds),
        "round_ratio": ratio, "meets_round_target": ratio["median"] <= ROUND_TARGET,
        "startup_s": bench.spread([s for s in startups if s is not None]),
        "wire": wire,
        "meets_bytes_target": wire["payload_ratio"] <= BYTES_TARGET,
        "meets_statistics_target": wire["fairness_statistics_bytes_per_site_round"] < STATISTICS_TARGET,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    path = bench.write_result("openfl_overhead", payload, args.out)
    bench.print_table(
        f"OpenFL ({'mTLS' if tls else 'no TLS'}, 3 collaborator processes) vs in-process, {args.method}",
        ["quantity", "value", "target"],
        [["round s: OpenFL / in-process", f"{payload['openfl_round_s']['median']:.3f} / "
          f"{payload['local_round_s']['median']:.3f}", ""],
         ["round ratio", bench.ratio_text(ratio), f"≤ {ROUND_TARGET}: {bench.verdict(ratio['median'], ROUND_TARGET)}"],
         ["start-up s", payload["startup_s"].get("median", float("nan")), ""],
         ["payload ÷ (2 × model × sites)", wire["payload_ratio"],
          f"≤ {BYTES_TARGET}: {bench.verdict(wire['payload_ratio'], BYTES_TARGET)}"],
         ["fairness statistics B/site/round", wire["fairness_statistics_bytes_per_site_round"],
          f"< {STATISTICS_TARGET}: "
          + ("meets" if payload["meets_statistics_target"] else "MISSES")]])
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main(sys.argv[1:])
