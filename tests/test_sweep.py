"""Sweeps: plan expansion and validation, resume, parallel runs, selection on validation,
Pareto fronts, Welch t-tests, the validation split the runtime now logs, and the CLI.

Runs are real but tiny (2 rounds, 1 local step, data scale 0.25): about a second each.
"""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import typer
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from typer.testing import CliRunner

from fedfair_med.config import RunConfig
from fedfair_med.data.synthetic import synthetic_classification, synthetic_segmentation
from fedfair_med.experiments.analysis import (
    pareto_mask, paper_table, select_settings, welch_p,
)
from fedfair_med.experiments.sweep import (
    Selection, SweepError, load_sweep, plan_status, point_name, run_sweep,
)
from fedfair_med.runtime.local import run_simulation
from fedfair_med.runtime.rundir import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY_BASE = {"task": "synthetic-seg", "rounds": 2, "max_steps": 1, "data": {"scale": 0.25}}
TINY = {
    "name": "tiny",
    "base": TINY_BASE,
    "seeds": [0, 1],
    "methods": {"fedavg": {"method": "fedavg"},
                "flexfair": {"method": "flexfair", "grid": {"lam": [0.5, 3.0]}}},
}


def _write(path, content) -> str:
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    return str(path)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """The tiny sweep, run once with --parallel 1: (sweep file, output folder, result)."""
    root = tmp_path_factory.mktemp("sweep")
    source = _write(root / "tiny.yaml", TINY)
    out = root / "out"
    result = run_sweep(load_sweep(source), out, parallel=1)
    return source, out, result


# ---- plan and validation ---------------------------------------------------------------------
def test_plan_expands_methods_grid_points_and_seeds_into_stable_directories() -> None:
    sweep = load_sweep({
        "base": TINY_BASE, "seeds": [0, 1, 2],
        "methods": {
            "fedavg": {"method": "fedavg"},
            "flexfair": {"method": "flexfair",
                         "grid": {"weighting": ["uniform", "proportional"], "lam": [0.5, 1, 3]}},
            "prox": {"method": "fedprox", "grid": {"mu": [0.01, 0.1]}, "fixed": {}},
        },
    })
    assert len(sweep.runs) == (1 + 3 * 2 + 2) * 3
    paths = [r.relpath for r in sweep.runs]
    assert len(set(paths)) == len(paths)
    assert "runs/fedavg/default/seed-2" in paths
    # keys sorted, whatever their order in the file, so the directory does not move
    assert "runs/flexfair/lam=0.5,weighting=proportional/seed-1" in paths
    assert "runs/prox/mu=0.01/seed-0" in paths
    assert all(re.fullmatch(r"runs/[\w.-]+/[\w.,=+-]+/seed-\d+", p) for p in paths)
    run = next(r for r in sweep.runs if r.relpath == "runs/flexfair/lam=3,weighting=uniform/seed-2")
    assert run.config.method == "flexfair" and run.config.seed == 2
    assert run.config.method_params == {"lam": 3, "weighting": "uniform"}
    assert run.config.rounds == 2 and run.config.data == {"scale": 0.25}
    assert point_name({"note": "a/b c"}) == "note=a_b_c"
    assert sweep.reference == "flexfair"          # FlexFair is the default comparison
    assert sweep.selection == Selection(1.0, 1.0, "ea")


def test_a_bad_file_is_rejected_whole_with_every_entry_named(tmp_path) -> None:
    bad = {
        "base": {**TINY_BASE, "seed": 3, "colour": "red"},
        "seeds": [0, 1],
        "methods": {
            "ok": {"method": "fedavg"},
            "nosuch": {"method": "fedmagic"},
            "typo": {"method": "fedprox", "grid": {"mew": [0.1]}},
            "negative": {"method": "flexfair", "grid": {"lam": [1.0, -1.0]}},
        },
        "reference": "missing",
    }
    with pytest.raises(SweepError) as info:
        load_sweep(_write(tmp_path / "bad.yaml", bad))
    message = str(info.value)
    assert "bad.yaml" in message
    assert "base.seed" in message and "colour" in message
    assert "methods.nosuch.method: unknown method 'fedmagic'" in message
    assert "methods.typo" in message and "'mew'" in message
    assert "methods.negative at lam=-1.0" in message and "lam" in message
    assert "reference" in message
    assert "methods.ok" not in message
    with pytest.raises(SweepError, match="seeds"):
        load_sweep({"base": TINY_BASE, "seeds": [], "methods": {"a": {"method": "fedavg"}}})
    with pytest.raises(SweepError, match="select.gap"):
        load_sweep({**TINY, "select": {"gap": "dp:sex"}})   # segmentation has only EA


def test_per_label_settings_override_base_for_that_label_only() -> None:
    sweep = load_sweep({
        "base": {**TINY_BASE, "lr": 0.001}, "seeds": [0],
        "methods": {"fedavg": {"method": "fedavg"},
                    "scaffold": {"method": "scaffold", "settings": {"lr": 0.05, "rounds": 3}}},
    })
    configs = {r.label: r.config for r in sweep.runs}
    assert configs["scaffold"].lr == 0.05 and configs["scaffold"].rounds == 3
    assert configs["fedavg"].lr == 0.001 and configs["fedavg"].rounds == TINY_BASE["rounds"]
    with pytest.raises(SweepError, match=r"methods.s.settings: 'seed' is set by the sweep"):
        load_sweep({"base": TINY_BASE, "seeds": [0],
                    "methods": {"s": {"method": "fedavg", "settings": {"seed": 4}}}})
    with pytest.raises(SweepError, match=r"methods.s at default: lr"):
        load_sweep({"base": TINY_BASE, "seeds": [0],
                    "methods": {"s": {"method": "fedavg", "settings": {"lr": -1}}}})


def test_an_sgd_only_method_at_an_adam_arm_is_refused_with_the_fix_named() -> None:
    """FedNova and SCAFFOLD swap in SGD but keep the arm's rate: an arm tuned for Adam would run
    SGD at lr 1e-3 and barely learn, so the sweep refuses it instead of comparing it."""
    adam_base = {**TINY_BASE, "optimizer": "adam", "lr": 0.001}
    with pytest.raises(SweepError) as info:
        load_sweep({"base": adam_base, "seeds": [0],
                    "methods": {"fedavg": {"method": "fedavg"},
                                "nova": {"method": "fednova"},
                                "scaffold": {"method": "scaffold"}}})
    message = str(info.value)
    assert "methods.nova: fednova trains with local sgd" in message and "'adam'" in message
    assert "methods.scaffold: scaffold" in message and "set optimizer: sgd" in message
    assert "methods.fedavg" not in message
    # Fixed in the arm's settings, or inherited from the task's own default (synthetic: SGD).
    fixed = load_sweep({"base": adam_base, "seeds": [0], "methods": {
        "nova": {"method": "fednova", "settings": {"optimizer": "sgd", "lr": 0.05}}}})
    assert [(r.config.optimizer, r.config.lr) for r in fixed.runs] == [("sgd", 0.05)]
    assert load_sweep({"base": TINY_BASE, "seeds": [0], "methods": {"s": {"method": "scaffold"}}}).runs


@pytest.mark.parametrize("path", sorted(
    str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yaml")
    if "methods" in (yaml.safe_load(p.read_text()) or {})))
def test_every_shipped_sweep_loads(path) -> None:
    """The shipped study files are valid, so none trains a method at another optimiser's rate."""
    assert load_sweep(ROOT / path).runs


# ---- running, resuming, parallel ---------------------------------------------------------------
def test_sweep_writes_every_output_and_the_long_table(finished) -> None:
    _, out, result = finished
    assert len(result.executed) == 6 and not result.skipped
    for name in ("runs.csv", "pareto.csv", "pareto.png", "table.csv", "table.md"):
        assert (out / name).is_file(), name
    assert not list(out.rglob("*.partial"))
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 6
    assert {"label", "method", "point", "lam", "seed", "rounds", "test_metric", "test_ea",
            "val_metric", "val_ea", "path"} <= set(runs.columns)
    row = runs[(runs["label"] == "flexfair") & (runs["lam"] == 3.0) & (runs["seed"] == 1)].iloc[0]
    last = read_metrics(out / row["path"])[-1]
    assert row["rounds"] == 2 == last["round"]
    assert row["test_metric"] == last["metric"] and row["test_ea"] == last["gaps"]["ea"]
    assert row["val_metric"] == last["val"]["metric"] and row["val_ea"] == last["val"]["gaps"]["ea"]
    assert math.isnan(runs[runs["label"] == "fedavg"]["lam"].iloc[0])
    table = (out / "table.md").read_text()
    assert "selected on validation" in table.lower() and "last round" in table and "2 seeds" in table


def test_killed_run_is_redone_alone_and_gives_the_same_numbers(finished, tmp_path) -> None:
    source, first_out, _ = finished
    out = tmp_path / "out"
    shutil.copytree(first_out, out)
    sweep = load_sweep(source)
    victim = next(r for r in sweep.runs if r.relpath == "runs/flexfair/lam=0.5/seed-1")
    (victim.path(out) / "report.json").unlink()          # killed before the report
    (victim.path(out) / "model.pt").write_bytes(b"half")
    before = {r.relpath: (r.path(out) / "report.json").stat().st_mtime_ns
              for r in sweep.runs if r is not victim}
    assert len(plan_status(sweep, out).to_run) == 1

    result = run_sweep(sweep, out, parallel=1)
    assert [r.relpath for r in result.executed] == [victim.relpath]
    assert len(result.skipped) == 5
    after = {r.relpath: (r.path(out) / "report.json").stat().st_mtime_ns
             for r in sweep.runs if r is not victim}
    assert after == before
    pd.testing.assert_frame_equal(pd.read_csv(out / "runs.csv"), pd.read_csv(first_out / "runs.csv"))
    again = run_sweep(sweep, out, parallel=1)
    assert again.executed == [] and len(again.skipped) == 6


def test_changed_sweep_file_does_not_silently_reuse_old_runs(finished, tmp_path) -> None:
    _, out, _ = finished
    changed = load_sweep({**TINY, "base": {**TINY_BASE, "rounds": 3}})
    with pytest.raises(SweepError, match="different configuration"):
        run_sweep(changed, out)


def test_parallel_two_gives_the_same_numbers_as_one(finished, tmp_path) -> None:
    """Two runs in two spawned workers at once equal the same runs done in-process."""
    _, first_out, _ = finished
    subset = {**TINY, "methods": {"flexfair": {"method": "flexfair", "grid": {"lam": [3.0]}}}}
    result = run_sweep(load_sweep(subset), tmp_path / "p2", parallel=2)
    assert len(result.executed) == 2
    parallel = pd.read_csv(tmp_path / "p2" / "runs.csv")
    serial = pd.read_csv(first_out / "runs.csv")
    serial = serial[serial["path"].str.startswith("runs/flexfair/lam=3.0/")]
    pd.testing.assert_frame_equal(parallel.reset_index(drop=True),
                                  serial[parallel.columns].reset_index(drop=True))


# ---- analysis on hand-made numbers ---------------------------------------------------------------
def test_pareto_front_excludes_dominated_points() -> None:
    metric = [0.90, 0.80, 0.85, 0.70, 0.90, float("nan"), 0.95]
    gap = [0.20, 0.10, 0.30, 0.10, 0.20, 0.00, 0.40]
    # 2 is beaten by 0 (higher metric, lower gap); 3 by 1 (same gap, higher metric);
    # 0 and 4 are equal, so neither dominates the other; a NaN point is never on the front.
    assert pareto_mask(metric, gap).tolist() == [True, True, False, False, True, False, True]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6)), min_size=1, max_size=12))
def test_pareto_front_is_exactly_the_non_dominated_set(points) -> None:
    metric = [float(m) for m, _ in points]
    gap = [float(g) for _, g in points]
    front = pareto_mask(metric, gap)

    def dominates(j: int, i: int) -> bool:
        return (metric[j] >= metric[i] and gap[j] <= gap[i]
                and (metric[j] > metric[i] or gap[j] < gap[i]))

    for i in range(len(points)):
        assert front[i] == (not any(dominates(j, i) for j in range(len(points))))


def test_welch_p_matches_scipy_and_the_textbook_formula() -> None:
    a = np.array([0.71, 0.74, 0.69, 0.77, 0.72])
    b = np.array([0.66, 0.70, 0.61, 0.68])
    p = welch_p(a, b)
    assert p == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue, rel=1e-12)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    t = (a.mean() - b.mean()) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    assert p == pytest.approx(2 * stats.t.sf(abs(t), df), rel=1e-9)
    assert math.isnan(welch_p([0.5], b))                   # one seed: no test


def _hand_runs(val_a: float, val_b: float) -> pd.DataFrame:
    """Method 'm': point A is best on test, point B on validation; 'ref' is the reference."""
    rows = []
    for seed, noise in enumerate((0.0, 0.01, -0.01)):
        rows += [
            {"label": "m", "method": "fedavg", "point": "A", "seed": seed,
             "test_metric": 0.90 + noise, "test_ea": 0.05, "val_metric": val_a + noise, "val_ea": 0.10},
            {"label": "m", "method": "fedavg", "point": "B", "seed": seed,
             "test_metric": 0.70 + noise, "test_ea": 0.20 + noise / 2, "val_metric": val_b + noise, "val_ea": 0.10},
            {"label": "ref", "method": "flexfair", "point": "lam=1", "seed": seed,
             "test_metric": 0.80 + 2 * noise, "test_ea": 0.10 - noise, "val_metric": 0.8, "val_ea": 0.1},
        ]
    return pd.DataFrame(rows)


def test_selection_uses_validation_never_test() -> None:
    runs = _hand_runs(val_a=0.60, val_b=0.75)
    chosen = select_settings(runs, Selection(1.0, 1.0, "ea"))
    assert chosen.set_index("label").loc["m", "point"] == "B"
    # the same runs with validation favouring A choose A: only val columns decide
    chosen = select_settings(_hand_runs(val_a=0.75, val_b=0.60), Selection(1.0, 1.0, "ea"))
    assert chosen.set_index("label").loc["m", "point"] == "A"
    # the gap weight enters: B's val gap made large flips the choice back to A
    heavy = runs.copy()
    heavy.loc[heavy["point"] == "B", "val_ea"] = 0.30
    assert select_settings(heavy, Selection(1.0, 1.0, "ea")).set_index("label").loc["m", "point"] == "A"
    assert select_settings(heavy, Selection(1.0, 0.0, "ea")).set_index("label").loc["m", "point"] == "B"
    no_val = runs.assign(val_metric=float("nan"))
    with pytest.raises(SweepError, match="validation"):
        select_settings(no_val, Selection())


def test_paper_table_reports_chosen_test_numbers_and_welch_p_against_the_reference() -> None:
    runs = _hand_runs(val_a=0.60, val_b=0.75)
    table = paper_table(runs, select_settings(runs, Selection()), "ea", "ref").set_index("label")
    b = runs[(runs["label"] == "m") & (runs["point"] == "B")]
    ref = runs[runs["label"] == "ref"]
    assert table.loc["m", "setting"] == "B" and table.loc["m", "n"] == 3
    assert table.loc["m", "metric_mean"] == pytest.approx(b["test_metric"].mean())
    assert table.loc["m", "metric_std"] == pytest.approx(b["test_metric"].std(ddof=1))
    assert table.loc["m", "p_metric"] == pytest.approx(
        stats.ttest_ind(b["test_metric"], ref["test_metric"], equal_var=False).pvalue)
    assert table.loc["m", "p_gap"] == pytest.approx(
        stats.ttest_ind(b["test_ea"], ref["test_ea"], equal_var=False).pvalue)
    assert math.isnan(table.loc["ref", "p_metric"]) and table.loc["ref", "reference"]


# ---- the validation split ----------------------------------------------------------------------
def test_val_split_is_added_without_changing_train_or_test() -> None:
    for make in (synthetic_segmentation, synthetic_classification):
        with_val, without = make(seed=4, scale=0.25), make(seed=4, scale=0.25, n_val=0)
        for a, b in zip(with_val.sites, without.sites):
            assert b.val is None and a.val is not None and len(a.val) >= 2
            for split in ("train", "test"):
                assert torch.equal(getattr(a, split).images, getattr(b, split).images)
                assert torch.equal(getattr(a, split).labels, getattr(b, split).labels)
            assert not set(a.val.ids) & (set(a.train.ids) | set(a.test.ids))
            assert not torch.equal(a.val.images[:2], a.test.images[:2])


def test_runtime_logs_val_beside_unchanged_test_numbers(tmp_path) -> None:
    common = dict(task="synthetic-seg", method="flexfair", method_params={"lam": 1.0}, rounds=2,
                  max_steps=1)
    plain = run_simulation(RunConfig(**common, data={"scale": 0.25, "n_val": 0}), tmp_path / "a")
    with_val = run_simulation(RunConfig(**common, data={"scale": 0.25}), tmp_path / "b")
    rows_a, rows_b = read_metrics(plain.path), read_metrics(with_val.path)
    assert all("val" not in r for r in rows_a)
    for a, b in zip(rows_a, rows_b):
        assert {k: v for k, v in b.items() if k not in ("val", "elapsed_s")} == \
            {k: v for k, v in a.items() if k != "elapsed_s"}
    val = rows_b[-1]["val"]
    assert val["n"] == 3 * 4 and set(val["sites"]) == {"site-a", "site-b", "site-c"}
    assert val["metric"] != rows_b[-1]["metric"] and "ea" in val["gaps"]


# ---- the command line ------------------------------------------------------------------------------
def _app() -> typer.Typer:
    from fedfair_med.cli.sweep_commands import register

    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """Test app."""

    register(app)
    return app


def test_cli_dry_run_run_resume_and_errors(finished, tmp_path) -> None:
    source, first_out, _ = finished
    runner = CliRunner()
    result = runner.invoke(_app(), ["sweep", source, "--out", str(first_out), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "6 runs planned" in result.output and "6 already finished, 0 to run" in result.output

    out = tmp_path / "out"
    shutil.copytree(first_out, out)
    shutil.rmtree(out / "runs" / "fedavg" / "default" / "seed-1")
    result = runner.invoke(_app(), ["sweep", source, "--out", str(out), "--dry-run"])
    assert "5 already finished, 1 to run" in result.output
    result = runner.invoke(_app(), ["sweep", source, "--out", str(out), "--parallel", "1"])
    assert result.exit_code == 0, result.output
    assert "ran 1 run(s), skipped 5 already finished" in result.output
    assert "Selected on validation" in result.output and "table.md" in result.output
    pd.testing.assert_frame_equal(pd.read_csv(out / "runs.csv"), pd.read_csv(first_out / "runs.csv"))

    bad = _write(tmp_path / "bad.yaml", {**TINY, "methods": {"x": {"method": "nope"}}})
    result = runner.invoke(_app(), ["sweep", bad, "--out", str(tmp_path / "never")])
    assert result.exit_code == 1
    assert "methods.x.method: unknown method 'nope'" in result.output
    assert not (tmp_path / "never").exists()


def test_the_sweep_says_when_it_would_leave_cores_idle(finished, tmp_path, monkeypatch) -> None:
    """One torch thread a run keeps numbers independent of --parallel, so a sweep at --parallel 1
    on a 4-core machine says so (and what to pass); none when the cores are used or too few runs."""
    from fedfair_med.cli.sweep_commands import cores_hint

    assert cores_hint(1, 6, 4) == ("each run uses one torch thread, so --parallel 1 uses 1 of this "
                                   "machine's 4 cores; --parallel 4 runs 4 at once (about 4 × the "
                                   "memory of one run) with the same numbers.")
    assert "--parallel 2 runs 2" in cores_hint(1, 2, 16)
    assert cores_hint(4, 6, 4) is None and cores_hint(2, 2, 4) is None and cores_hint(1, 6, None) is None

    source, _, _ = finished
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    plan = ["sweep", source, "--out", str(tmp_path / "out"), "--dry-run"]
    dry = CliRunner().invoke(_app(), plan)
    assert dry.exit_code == 0 and "uses 1 of this machine's 4 cores" in dry.output, dry.output
    busy = CliRunner().invoke(_app(), [*plan, "--parallel", "4"])
    assert busy.exit_code == 0 and "torch thread" not in busy.output, busy.output


def test_a_partial_sitting_runs_only_the_chosen_labels_and_seeds(finished, tmp_path) -> None:
    """--only / --seed run part of the plan (the rest stays planned, the comparison waits); the
    runs it made count as finished afterwards and give the full sweep's numbers."""
    source, first_out, _ = finished
    runner = CliRunner()
    out = tmp_path / "out"
    plan = ["sweep", source, "--out", str(out)]
    dry = runner.invoke(_app(), [*plan, "--seed", "0", "--dry-run"])
    assert "0 already finished, 6 to run, 3 of them selected." in dry.output, dry.output
    first = runner.invoke(_app(), [*plan, "--only", "flexfair", "--seed", "1"])
    assert first.exit_code == 0, first.output
    assert "ran 2 run(s)" in first.output and "4 planned run(s) not selected" in first.output
    made = sorted(p.parent.relative_to(out).as_posix() for p in (out / "runs").rglob("metrics.jsonl"))
    assert made == ["runs/flexfair/lam=0.5/seed-1", "runs/flexfair/lam=3.0/seed-1"]
    assert not (out / "runs.csv").exists() and not (out / "table.md").exists()
    rest = runner.invoke(_app(), plan)
    assert rest.exit_code == 0, rest.output
    assert "ran 4 run(s), skipped 2 already finished" in rest.output
    pd.testing.assert_frame_equal(pd.read_csv(out / "runs.csv"), pd.read_csv(first_out / "runs.csv"))
    for bad, message in ((["--only", "fedprox"], "no method label 'fedprox'"),
                         (["--seed", "7"], "--seed: 7 not among the sweep's seeds")):
        refused = runner.invoke(_app(), [*plan, *bad])
        assert refused.exit_code == 1 and message in refused.output, refused.output
