"""The benchmark scripts run in their tiny ``--quick`` mode and write well-formed JSON.

Timings are never asserted (they depend on the machine); what is checked is that each script
still runs against the current package and that its result file has the keys and internal
consistency that docs/performance.md and readers of ``benchmarks/results/`` rely on.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
MACHINE_KEYS = {"nproc", "cpu_model", "torch_threads", "command", "load_average_at_start"}


def run_script(name: str, tmp_path: Path, *extra: str) -> dict:
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    returned = module.main(["--quick", "--out", str(tmp_path), *extra])
    written = json.loads((tmp_path / f"{name}.quick.json").read_text())
    assert not (tmp_path / f"{name}.json").exists()  # --quick never replaces a full result
    assert written["benchmark"] == name and written["quick"] is True
    assert MACHINE_KEYS <= set(written["machine"])
    assert "--quick" in written["machine"]["command"]
    assert json.loads(json.dumps(returned, default=str))["benchmark"] == name
    return written


def _spread_ok(s: dict) -> None:
    assert {"n", "median", "p25", "p75", "min", "max"} <= set(s)
    assert s["min"] <= s["p25"] <= s["median"] <= s["p75"] <= s["max"]


def test_epoch_overhead_quick(tmp_path) -> None:
    result = run_script("epoch_overhead", tmp_path)["results"][0]
    assert result["task"] == "synthetic-seg" and result["samples"] == sum(result["sites"].values())
    _spread_ok(result["ratio"])
    ratio = result["raw"]["federated"][0] / result["raw"]["plain"][0]
    assert result["ratio"]["median"] == pytest.approx(ratio)
    assert result["meets_target"] == (result["ratio"]["median"] <= result["target"])
    assert result["model_bytes"] > 0


def test_method_overhead_quick(tmp_path) -> None:
    result = run_script("method_overhead", tmp_path, "--methods", "flexfair", "scaffold")["results"][0]
    rows = {m["row"]: m for m in result["methods"]}
    assert set(rows) == {"fedavg", "flexfair", "scaffold"}
    assert rows["fedavg"]["ratio_to_fedavg"]["median"] == pytest.approx(1.0)
    assert rows["flexfair"]["target"] == 1.05 and isinstance(rows["flexfair"]["meets_target"], bool)
    assert rows["scaffold"]["optimizer"] == "sgd" and rows["scaffold"]["target"] is None
    for row in rows.values():
        _spread_ok(row["round_s"])
        assert math.isfinite(row["ratio_to_fedavg"]["median"])


def test_sites_scaling_quick(tmp_path) -> None:
    written = run_script("sites_scaling", tmp_path, "--sites", "2")
    (row,) = written["results"]
    assert row["sites"] == 2 and row["method"] == "fedavg"
    assert row["time_ratio_to_first"]["median"] == pytest.approx(1.0)
    assert row["rss_growth_bytes"] == 0 and row["state_dict_bytes"] > 0
    # measured in the subprocess: the peak RSS of a torch process is well above 50 MB
    assert min(row["peak_rss_bytes"]) > 50 * 2**20
    assert row["steps_per_round"] == -(-written["setup"]["train_total"] // 2 // 8) * 2


def test_data_loading_quick(tmp_path) -> None:
    result = run_script("data_loading", tmp_path)["results"][0]
    for key in ("uncached", "cached"):
        side = result["throughput"][key]
        assert all(e["images"] == side["epochs"][0]["images"] > 0 for e in side["epochs"])
        wait = result["training_wait"][key]
        assert all(0.0 <= e["data_share"] <= 1.0 for e in wait["epochs"])
        assert [e["epoch"] for e in wait["epochs"]] == [1, 2]
    assert result["throughput"]["speedup"] == pytest.approx(
        result["throughput"]["cached"]["images_per_s"]["median"]
        / result["throughput"]["uncached"]["images_per_s"]["median"])


def _load(name: str):
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_openfl_wire_accounting(tmp_path) -> None:
    """Bytes are counted from the task runner's wire log: shape × item size, per site and round."""
    openfl_overhead = _load("openfl_overhead")
    model_bytes, rounds = 4000, 2
    entries = []
    for r in range(rounds):
        for site in openfl_overhead.SITES:
            entries += [
                {"site": site, "task": "fedfair_train", "round": r, "name": "w", "shape": [1000], "dtype": "float32"},
                {"site": site, "task": "fedfair_train", "round": r, "name": "extra/flexfair.sums",
                 "shape": [3], "dtype": "float64"},
                {"site": site, "task": "fedfair_evaluate", "round": r, "name": "summary/site",
                 "shape": [1, 5], "dtype": "float64"},
            ]
    wire = tmp_path / "wire.jsonl"
    wire.write_text("".join(json.dumps(e) + "\n" for e in entries))
    counted = openfl_overhead.wire_bytes(wire, model_bytes, rounds)
    assert counted["upload_bytes_per_site_round"] == 4000 + 24 + 40
    assert counted["fairness_statistics_bytes_per_site_round"] == 24
    assert counted["payload_ratio"] == pytest.approx((4064 + 4000) / 8000)
    steady = openfl_overhead._steady_round_s([{"round": 2, "elapsed_s": 5.0}, {"round": 1, "elapsed_s": 3.5},
                                               {"round": 3, "elapsed_s": 6.25}])
    assert steady == pytest.approx([1.5, 1.25])


@pytest.mark.openfl
@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("FEDFAIR_BENCH_OPENFL"),
                    reason="starts 4 OpenFL processes (~1–2 min); set FEDFAIR_BENCH_OPENFL=1")
def test_openfl_overhead_quick(tmp_path) -> None:
    written = run_script("openfl_overhead", tmp_path)
    assert written["setup"]["tls"] is True
    assert written["wire"]["model_bytes"] > 0 and written["startup_s"]["n"] == 1
    _spread_ok(written["round_ratio"])
