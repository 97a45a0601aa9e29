"""benchmarks/time_to_quality.py (issue 16, item 7): the crossing read from a curve, and the
``--quick`` output's structure and units. Timings are never asserted."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _module():
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("bench_time_to_quality",
                                                  BENCHMARKS / "time_to_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_threshold_crossing_is_the_first_evaluation_at_or_above_it() -> None:
    ttq = _module().time_to_threshold
    times = [1.0, 2.0, 3.0, 4.0, 5.0]
    values = [0.2, 0.70, 0.65, 0.71, 0.90]  # crosses 0.7 at 2 s, dips, crosses again
    assert ttq(times, values, 0.70) == 2.0  # equality counts, the first crossing wins
    assert ttq(times, values, 0.705) == 4.0  # the dip at 3 s does not
    assert ttq(times, values, 0.95) is None  # never reached within the budget
    assert ttq(times, [math.nan, 0.8, 0.9, 0.9, 0.9], 0.5) == 2.0  # NaN never crosses
    assert ttq([], [], 0.1) is None
    with pytest.raises(ValueError):
        ttq([1.0, 2.0], [0.5], 0.1)
    ratio = _module().ratio
    assert ratio(3.0, 2.0) == 1.5 and ratio(None, 2.0) is None and ratio(3.0, None) is None


def test_quick_mode_writes_curves_threshold_and_ratios(tmp_path: Path) -> None:
    module = _module()
    returned = module.main(["--quick", "--out", str(tmp_path), "--threads", "1",
                            "--pooled-budget-s", "0.6", "--federated-budget-s", "0.4",
                            "--rounds", "3"])
    written = json.loads((tmp_path / "time_to_quality.quick.json").read_text())
    assert not (tmp_path / "time_to_quality.json").exists()  # --quick never replaces a full result
    assert written["benchmark"] == "time_to_quality" and written["quick"] is True
    assert {"nproc", "cpu_model", "load_average_at_start", "command"} <= set(written["machine"])
    assert "--quick" in written["machine"]["command"] and len(written["load_average_at_end"]) == 3
    assert returned["results"][0]["threshold"] == written["results"][0]["threshold"]
    (result,) = written["results"]
    assert result["task"] == "synthetic-seg" and result["metric"] == "dice"
    assert result["split"] == "val"
    curves = result["curves"]
    assert set(curves) == {"pooled", "fedavg", "flexfair"}
    for name, curve in curves.items():
        assert len(curve["train_s"]) == len(curve["metric"]) == len(curve["wall_s"]) >= 1
        # cumulative training seconds, increasing; evaluation excluded, so never above the wall clock
        assert curve["train_s"] == sorted(curve["train_s"]) and curve["train_s"][0] > 0
        assert all(t <= w for t, w in zip(curve["train_s"], curve["wall_s"]))
        assert all(0.0 <= m <= 1.0 for m in curve["metric"])
        assert result["best"][name] == max(curve["metric"])
    # The pooled loop evaluates every federated round's worth of steps; federated runs every round.
    steps = curves["pooled"]["step"]
    assert all(s % result["pooled_eval_every_steps"] == 0 for s in steps[:-1])
    assert result["pooled_eval_every_steps"] == result["steps_per_round"]
    assert curves["fedavg"]["round"] == list(range(1, len(curves["fedavg"]["round"]) + 1))
    assert len(curves["fedavg"]["round"]) <= 3
    # The target and the times are read from the curves by the same rule.
    assert result["threshold"] == pytest.approx(0.95 * result["pooled_best"])
    for name, curve in curves.items():
        assert result["time_to_threshold_s"][name] == module.time_to_threshold(
            curve["train_s"], curve["metric"], result["threshold"])
    assert result["time_to_threshold_s"]["pooled"] is not None  # its own best is within reach
    fed, pooled = result["time_to_threshold_s"]["fedavg"], result["time_to_threshold_s"]["pooled"]
    assert result["federated_over_pooled"] == (None if fed is None else pytest.approx(fed / pooled))
    assert result["targets"] == {"federated_over_pooled": 1.5, "flexfair_over_fedavg": 1.1}


def _payload(fedavg_s: float | None, quick: bool = False) -> dict:
    result = {
        "task": "fundus", "sites": {"chase_db1": 16, "stare": 11}, "network": "unet",
        "network_kwargs": {"channels": [16, 32]}, "image_size": [384, 384], "batch_size": 4,
        "optimizer": "adam", "lr": 0.001, "local_epochs": 4, "steps_per_round": 28,
        "pooled_eval_every_steps": 28, "split": "val", "metric": "dice", "flexfair_params": {},
        "budgets": {"pooled_train_s": 300.0, "federated_rounds": 60, "federated_train_s": 420.0},
        "pooled_best": 0.735, "fraction": 0.95, "threshold": 0.69825,
        "time_to_threshold_s": {"pooled": 151.0, "fedavg": fedavg_s, "flexfair": 343.2},
        "best": {"pooled": 0.735, "fedavg": 0.7221, "flexfair": 0.7205},
        "federated_over_pooled": None if fedavg_s is None else fedavg_s / 151.0,
        "flexfair_over_fedavg": None if fedavg_s is None else 343.2 / fedavg_s,
        "targets": {"federated_over_pooled": 1.5, "flexfair_over_fedavg": 1.1},
        "meets_target": {"federated_over_pooled": fedavg_s is not None and fedavg_s / 151.0 <= 1.5,
                         "flexfair_over_fedavg": fedavg_s is not None and 343.2 / fedavg_s <= 1.1},
    }
    return {"benchmark": "time_to_quality", "quick": quick, "load_average_at_end": [2.0, 2.0, 2.0],
            "machine": {"nproc": 2, "cpu_model": "Test CPU", "torch_threads": 2,
                        "load_average_at_start": [1.0, 1.0, 1.0], "git_commit": "abc1234",
                        "command": "python benchmarks/time_to_quality.py", "date_utc": "2026-12-01T21:44:11Z"},
            "results": [result]}


def test_the_results_page_table_is_made_from_the_committed_json(tmp_path: Path) -> None:
    from fedfair_med.experiments.results import render_section

    root = tmp_path / "results"
    assert "Time to quality" not in render_section(root)  # no result committed: no section
    (root / "benchmarks").mkdir(parents=True)
    (root / "benchmarks" / "time_to_quality.json").write_text(json.dumps(_payload(321.1)))
    page = render_section(root)
    assert "Generated from `results/benchmarks/time_to_quality.json`" in page
    assert "| side | best val Dice | training s to 0.95 × 0.735 = 0.698 | ratio | goal |" in page
    assert "| pooled plain loop | 0.735 | 151 |  |  |" in page
    assert "| FedAvg | 0.722 | 321 | 2.13 × pooled | ≤ 1.5: **not met** |" in page
    assert "| FlexFair | 0.721 | 343 | 1.07 × FedAvg | ≤ 1.1: met |" in page
    assert "commit abc1234" in page and "FlexFair at its defaults" in page
    assert "training images chase_db1 16 + stare 11" in page and "image 384×384" in page
    # a side that never reached the target says so, and the goals are not met
    (root / "benchmarks" / "time_to_quality.json").write_text(json.dumps(_payload(None, quick=True)))
    page = render_section(root)
    assert "| FedAvg | 0.722 | not reached |  | ≤ 1.5: **not met** |" in page
    assert "A `--quick` run (tiny budgets): not a measurement of the goals." in page
