"""Issue 12, items 1, 2, 6, 7: a run directory is whole or absent, nothing is silently replaced,
long runs show they are alive, and the shipped configs and reports say what they do.

The interruption tests drive a real ``fedfair-med simulate`` subprocess over an existing run
directory and stop it with SIGINT or SIGKILL at several points; ``report`` must then show either
the old run or the new one, never files of both.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import typer
import yaml
from typer.testing import CliRunner

from fedfair_med.cli.main import app
from fedfair_med.config import RunConfig, load_config
from fedfair_med.reporting.run_report import build_run_report, gap_ci
from fedfair_med.runtime import local
from fedfair_med.runtime.local import run_simulation
from fedfair_med.runtime.rundir import STAGING_MARK, RunExistsError, read_metrics, read_status

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(max_steps=1, data={"scale": 0.25})
CLI = [sys.executable, "-c", "from fedfair_med.cli.main import app; app()"]


def _old_run(path: Path) -> dict:
    """A finished fedavg run at ``path``; returns the bytes of its files to compare later."""
    run_simulation(RunConfig(task="synthetic-seg", method="fedavg", seed=0, rounds=2, **TINY), path)
    return {p.name: p.read_bytes() for p in path.iterdir()}


def _staging(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f".{path.name}{STAGING_MARK}*"))


def _report(path: Path):
    return CliRunner().invoke(app, ["report", str(path)])


def _assert_one_run(path: Path, old: dict) -> str:
    """``path`` holds the old run byte for byte, or a complete new one; report names the same
    method run.yaml does and shows the numbers of that run's own metrics.jsonl."""
    method = yaml.safe_load((path / "run.yaml").read_text())["method"]
    if method == "fedavg":
        for name in ("run.yaml", "metrics.jsonl", "model.pt", "predictions.csv"):
            assert (path / name).read_bytes() == old[name], name
    else:
        assert read_status(path)["status"] == "complete"
    result = _report(path)
    assert result.exit_code == 0, result.output
    assert f"synthetic-seg · {method}" in (path / "report.md").read_text()
    report = json.loads((path / "report.json").read_text())
    assert report["overall"]["metric"] == pytest.approx(read_metrics(path)[-1]["metric"], abs=1e-9)
    return method


@pytest.mark.parametrize("sig,when", [(signal.SIGINT, "started"), (signal.SIGINT, "round"),
                                      (signal.SIGKILL, "round")])
def test_interrupted_simulate_over_a_run_leaves_the_old_run_whole(tmp_path, sig, when) -> None:
    target = tmp_path / "runs" / "demo"
    old = _old_run(target)
    config = tmp_path / "new.yaml"
    config.write_text(yaml.safe_dump({"task": "synthetic-seg", "method": "flexfair",
                                      "method_params": {"lam": 2.0}, "seed": 1, "rounds": 60,
                                      **TINY}))
    # A suite started in the background inherits SIGINT ignored (POSIX shells do that to '&'
    # jobs), and Python then installs no Ctrl-C handler: give the child the default disposition.
    proc = subprocess.Popen([*CLI, "simulate", str(config), "--out", str(target), "--force"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        staged = _staging(target)
        if staged and when == "started":
            break
        if staged and (staged[0] / "metrics.jsonl").exists() and \
                (staged[0] / "metrics.jsonl").read_text().count("\n") >= 1:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted: " + proc.stdout.read()
    proc.send_signal(sig)
    output = proc.communicate(timeout=120)[0]
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "interrupted" in output, output
        assert not _staging(target)  # cleaned up on Ctrl-C
    else:
        leftover = _staging(target)
        assert leftover and read_status(leftover[0])["status"] == "running"
        refused = _report(leftover[0])
        assert refused.exit_code == 1 and "unfinished run" in refused.output, refused.output
    assert _assert_one_run(target, old) == "fedavg"

    if sig == signal.SIGKILL:  # the next run removes the dead one's staging, then replaces the old
        done = CliRunner().invoke(app, ["simulate", str(config), "--out", str(target), "--force",
                                        "--rounds", "2"])
        assert done.exit_code == 0, done.output
        assert not _staging(target)
        assert _assert_one_run(target, old) == "flexfair"


class _CtrlCInSideCallback:
    """Progress that presses Ctrl-C in round 1 from inside a ``__del__``: Python prints the
    KeyboardInterrupt raised there as "Exception ignored" and carries on (the CI failure of stop
    15: the signal landed in an import lock's weakref callback and the run finished anyway)."""

    def __init__(self) -> None:
        self.rounds_started: list[int] = []

    def round_started(self, round_index, total_rounds, total_steps) -> None:
        self.rounds_started.append(round_index)

    def advance(self, steps) -> None:
        pass

    def round_finished(self, round_index, record) -> None:
        if round_index == 1:
            class PressesCtrlC:
                def __del__(self) -> None:
                    os.kill(os.getpid(), signal.SIGINT)
                    time.sleep(0.5)  # the handler runs here, inside __del__, and is swallowed

            PressesCtrlC()


def test_a_ctrl_c_swallowed_by_a_side_callback_still_stops_the_run(tmp_path, monkeypatch) -> None:
    target = tmp_path / "run"
    old = _old_run(target)
    # As in a terminal: Ctrl-C raises (a suite started with '&' inherits SIGINT ignored).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    progress = _CtrlCInSideCallback()
    try:
        with pytest.raises(KeyboardInterrupt):
            run_simulation(RunConfig(task="synthetic-seg", method="flexfair", rounds=4, **TINY),
                           target, progress=progress, force=True)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    finally:
        signal.signal(signal.SIGINT, previous)
    assert progress.rounds_started == [1]  # stopped before round 2, not at the end
    assert {p.name: p.read_bytes() for p in target.iterdir()} == old
    assert not _staging(target)


def test_simulate_never_replaces_a_run_without_force(tmp_path) -> None:
    target = tmp_path / "run"
    old = _old_run(target)
    started = time.monotonic()
    result = CliRunner().invoke(app, ["simulate", "--task", "synthetic-seg", "--method", "flexfair",
                                      "--out", str(target)])
    assert result.exit_code == 1 and "already holds a run" in result.output and "--force" in result.output
    assert time.monotonic() - started < 30  # refused before any training
    assert {p.name: p.read_bytes() for p in target.iterdir()} == old
    with pytest.raises(RunExistsError):
        run_simulation(RunConfig(task="synthetic-seg", rounds=1, **TINY), target)


def test_a_crash_mid_run_keeps_the_old_run_and_leaves_no_staging(tmp_path, monkeypatch) -> None:
    target = tmp_path / "run"
    old = _old_run(target)
    evaluate = local._evaluate

    def crash_in_round_two(sites, model, split, progress, r):
        if r == 2:
            raise FloatingPointError("loss is inf")
        return evaluate(sites, model, split, progress, r)

    monkeypatch.setattr(local, "_evaluate", crash_in_round_two)
    with pytest.raises(FloatingPointError):
        run_simulation(RunConfig(task="synthetic-seg", method="flexfair", rounds=3, **TINY),
                       target, force=True)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == old
    assert not _staging(target)
    # The rounds done before the crash are kept aside, visibly failed, never taken for a result.
    failed = tmp_path / "run.failed"
    status = json.loads((failed / "status.json").read_text())
    assert status["status"] == "failed" and "loss is inf" in status["error"]
    assert [r["round"] for r in read_metrics(failed)] == [1]
    refused = CliRunner().invoke(app, ["report", str(failed)])
    assert refused.exit_code == 1 and "Traceback" not in refused.output


def test_a_bug_after_the_last_round_is_one_line_and_keeps_the_rounds(tmp_path, monkeypatch) -> None:
    """A failure outside the expected kinds (here an ImportError in report writing, after every
    round) names where the finished rounds went instead of printing a traceback."""
    def broken(*_args, **_kwargs):
        raise ImportError("cannot import name 'write_reports'")

    monkeypatch.setattr(local, "write_reports", broken)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"task": "synthetic-seg", "rounds": 2, **TINY}))
    result = CliRunner().invoke(app, ["simulate", str(config), "--out", str(tmp_path / "run")])
    assert result.exit_code == 1, result.output
    assert "ImportError" in result.output and "Traceback" not in result.output
    assert f"the rounds done so far are in {tmp_path / 'run.failed'}" in " ".join(result.output.split())
    assert [r["round"] for r in read_metrics(tmp_path / "run.failed")] == [1, 2]
    assert not (tmp_path / "run").exists()


def test_a_run_killed_between_the_renames_of_its_commit_is_put_back(tmp_path) -> None:
    """Killed after moving the old run aside and before renaming the new one in: the next run
    restores the complete new run instead of deleting it, and then refuses to replace it."""
    target = tmp_path / "run"
    old = _old_run(target)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    target.rename(tmp_path / f".run{STAGING_MARK}replaced-{dead}")
    with pytest.raises(RunExistsError, match="already holds a run"):
        run_simulation(RunConfig(task="synthetic-seg", rounds=1, **TINY), target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == old and not _staging(target)


def test_the_aggregators_rerun_keeps_the_earlier_run_beside_the_new_one(tmp_path) -> None:
    """The OpenFL aggregator writes run/ the same way (RunDirectory(force=True), then
    commit(keep_previous=True)): nothing under run/ changes until the new run is complete, and
    then the earlier run is kept whole as run.previous-1."""
    from fedfair_med.runtime.rundir import RunDirectory

    target = tmp_path / "run"
    old = _old_run(target)
    rundir = RunDirectory(target, RunConfig(method="flexfair"), force=True)
    rundir.log_round({"round": 1, "metric": 0.5})
    assert {p.name: p.read_bytes() for p in target.iterdir()} == old  # not yet replaced
    rundir.commit(keep_previous=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "run.previous-1").iterdir()} == old
    assert read_status(target)["status"] == "complete" and read_metrics(target) == [
        {"round": 1, "metric": 0.5}]
    assert not _staging(target)


def test_flag_only_simulate_names_do_not_collide() -> None:
    from fedfair_med.cli.run_commands import default_run_name

    names = {default_run_name(load_config({}, task=t, method=m, seed=s))
             for t in ("synthetic-seg", "synthetic-cls") for m in ("fedavg", "flexfair") for s in (0, 1)}
    assert len(names) == 8 and "run" not in names
    lam = load_config({"method": "flexfair", "method_params": {"lam": 2.0}})
    assert default_run_name(lam) == "synthetic-seg-flexfair-lam2-seed0"
    assert default_run_name(load_config({"name": "mine"})) == "mine"


def test_model_audits_of_different_sites_do_not_collide(tmp_path) -> None:
    from fedfair_med.runtime.model_audit import default_out_dir

    model = tmp_path / "runs" / "fundus-flexfair" / "model.pt"
    a = default_out_dir(model, tmp_path / "sites" / "chase_db1" / "manifest.csv")
    b = default_out_dir(model, tmp_path / "sites" / "stare" / "manifest.csv")
    assert a != b and a.name == "audit-fundus-flexfair-chase_db1"
    assert default_out_dir(tmp_path / "other" / "model.pt", tmp_path / "sites" / "stare" / "manifest.csv") != b
    out = tmp_path / "audit"
    out.mkdir()
    (out / "report.json").write_text("{}")
    result = CliRunner().invoke(app, ["report", "--model", str(model), "--manifest",
                                      str(tmp_path / "m.csv"), "--task", "fundus", "--out", str(out)])
    assert result.exit_code == 1 and "already holds files" in result.output, result.output
    assert (out / "report.json").read_text() == "{}"


def test_report_refuses_an_unfinished_run_directory(tmp_path) -> None:
    target = tmp_path / "run"
    _old_run(target)
    (target / "status.json").write_text(json.dumps({"status": "running", "started": "x"}))
    result = _report(target)
    assert result.exit_code == 1 and "unfinished run" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_data_import_over_an_existing_site_refuses_a_changed_split(tmp_path) -> None:
    from fixtures_data import shared_data_dir

    stare = shared_data_dir() / "stare"
    if not stare.is_dir():
        pytest.skip(f"public datasets not found at {stare}")
    out = tmp_path / "sites"
    args = ["data", "import", "stare", str(stare), "--out", str(out), "--limit", "2"]
    assert CliRunner().invoke(app, args).exit_code == 0
    manifest = out / "stare" / "manifest.csv"
    first = manifest.read_text()
    assert CliRunner().invoke(app, args).exit_code == 0  # the same split again: nothing changes
    refused = CliRunner().invoke(app, [*args, "--seed", "5"])
    assert refused.exit_code == 1 and "--force" in refused.output, refused.output
    assert manifest.read_text() == first and not list(out.glob(".import-*"))
    forced = CliRunner().invoke(app, [*args, "--seed", "5", "--force"])
    assert forced.exit_code == 0 and "(replaced)" in forced.output
    assert manifest.read_text() != first


def test_quick_benchmarks_never_overwrite_the_committed_results(tmp_path) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import _common as bench
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    full = bench.write_result("method_overhead", {"quick": False, "x": 1}, tmp_path)
    quick = bench.write_result("method_overhead", {"quick": True, "x": 2}, tmp_path)
    assert full != quick and json.loads(full.read_text())["x"] == 1
    for script in ROOT.glob("benchmarks/*.py"):  # every script that writes says whether it is quick
        text = script.read_text()
        if "write_result(" in text and script.name != "_common.py":
            assert '"quick": args.quick' in text, script.name


# ---- item 6: long work that looks alive ----------------------------------------------------------
class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def round_started(self, r, total, steps):
        self.events.append(("round", r))

    def advance(self, steps):
        pass

    def evaluation_started(self, r, split, samples):
        self.events.append(("eval", r, split, samples))

    def evaluated(self, samples):
        self.events.append(("evaluated", samples))

    def round_finished(self, r, record):
        self.events.append(("done", r))


def test_eval_every_skips_evaluation_but_never_the_last_round(tmp_path) -> None:
    recorder = Recorder()
    config = RunConfig(task="synthetic-seg", rounds=3, eval_every=2, **TINY)
    result = run_simulation(config, tmp_path / "run", progress=recorder)
    rounds = read_metrics(result.path)
    assert [("metric" in r, r.get("evaluated", True)) for r in rounds] == [
        (False, False), (True, True), (True, True)]
    evals = [e for e in recorder.events if e[0] == "eval"]
    assert [e[1] for e in evals if e[2] == "test"] == [2, 3] and all(e[3] > 0 for e in evals)
    per_site = [e[1] for e in recorder.events if e[0] == "evaluated"]
    assert sum(per_site) == sum(e[3] for e in evals)  # progress covers every evaluated sample
    assert _report(result.path).exit_code == 0  # the report reads rounds without a metric
    assert "| 1 | – |" in (result.path / "report.md").read_text()
    with pytest.raises(ValueError, match="eval_every"):
        RunConfig(eval_every=0).validate()


def test_simulate_prints_one_plain_line_per_round_when_not_a_terminal(tmp_path) -> None:
    result = CliRunner().invoke(app, ["simulate", "--task", "synthetic-seg", "--rounds", "2",
                                      "--max-steps", "1", "--eval-every", "2",
                                      "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    lines = [l for l in result.output.splitlines() if " round " in l and "elapsed" in l]
    assert len(lines) == 2, result.output
    assert "round 1/2" in lines[0] and "ETA" in lines[0] and "not evaluated" in lines[0]
    assert "round 2/2" in lines[1] and "metric" in lines[1] and "EA" in lines[1]


# ---- item 7: shipped configs, report header, gap CI, exit codes, --help ---------------------------
@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_shipped_configs_do_not_trigger_the_adam_warning(name) -> None:
    from fedfair_med.runtime.setup import resolve
    from fedfair_med.tasks import build_task

    config = load_config(ROOT / "configs" / name)
    optimizer = resolve(config, build_task(config.task)).settings.optimizer
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        local.warn_if_penalty_is_normalised_away(config, optimizer)
    with pytest.warns(UserWarning, match="Adam normalises"):  # the check itself still works
        local.warn_if_penalty_is_normalised_away(
            RunConfig(method="flexfair", criterion="ea"), "adam")


def test_a_single_run_of_an_sgd_only_method_at_adam_settings_warns(tmp_path) -> None:
    """Sweeps refuse such an arm; a single run still runs, but says SGD replaced Adam at its rate."""
    base = {"task": "synthetic-seg", "rounds": 1, "max_steps": 1, "data": {"scale": 0.25}}
    with pytest.warns(UserWarning, match=r"scaffold trains with local sgd, not the configured 'adam', at lr 0.001"):
        local.run_simulation(load_config({**base, "method": "scaffold", "optimizer": "adam", "lr": 0.001}),
                             tmp_path / "adam")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        local.run_simulation(load_config({**base, "method": "scaffold", "optimizer": "sgd", "lr": 0.05}),
                             tmp_path / "sgd")


def test_report_header_names_resolved_rounds_and_lambda() -> None:
    """run.yaml's rounds is null when the task default applied; the header shows the number."""
    from fedfair_med.reporting.render import _title

    title, subtitle = _title({"task": "synthetic-seg", "method": "flexfair",
                              "method_params": {"lam": 2.5, "tau": 1}, "criterion": "ea",
                              "attribute": "site", "seed": 0, "rounds": None,
                              "resolved": {"rounds": 20}})
    assert title == "synthetic-seg · flexfair"
    assert "rounds 20" in subtitle and "None" not in subtitle
    assert subtitle.startswith("λ 2.5, tau 1") and "criterion ea over site" in subtitle


def test_gap_has_a_bootstrap_interval_that_separates_a_real_gap_from_none() -> None:
    rng = np.random.default_rng(0)
    sites = ["a"] * 200 + ["b"] * 200
    unequal = np.concatenate([rng.normal(0.8, 0.05, 200), rng.normal(0.6, 0.05, 200)])
    low, high = gap_ci(unequal, sites, n_boot=300, seed=0)
    assert 0.09 < low < 0.1 < high < 0.11  # true gap: |0.8 - 0.7| = 0.1
    equal = rng.normal(0.7, 0.05, 400)
    assert gap_ci(equal, sites, n_boot=300, seed=0)[1] < 0.02
    assert all(np.isnan(gap_ci(equal, ["a"] * 400, n_boot=10, seed=0)))
    frame = pd.DataFrame({"id": [str(i) for i in range(400)], "site": sites, "metric": unequal})
    report = build_run_report(frame, kind="segmentation", attributes=[], primary_metric="dice",
                          n_boot=200)
    low, high = report["gaps_ci95"]["ea"]
    assert low <= report["gaps"]["ea"] + 0.01 and high >= report["gaps"]["ea"] - 0.01


def test_every_command_exits_1_on_its_own_errors(tmp_path) -> None:
    runner = CliRunner()
    bad = tmp_path / "bad.yaml"
    bad.write_text("nope: 1\n")
    for args in (["simulate", "--method", "nope", "--out", str(tmp_path / "x")],
                 ["report", str(tmp_path / "missing")],
                 ["sweep", str(bad), "--out", str(tmp_path / "s")],
                 ["data", "check", str(tmp_path / "missing.csv"), "--task", "fundus"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 1 and "Traceback" not in result.output, (args, result.output)
    assert runner.invoke(app, ["simulate", "--no-such-option"]).exit_code == 2  # usage: the parser's


def test_help_texts_for_seed_rounds_name_and_manifest() -> None:
    command = typer.main.get_command(app)
    wanted = {("simulate",): ("seed", "rounds"), ("init-federation",): ("rounds", "seed"),
              ("collaborator", "start"): ("name", "manifest")}
    for path, options in wanted.items():
        node = command
        for part in path:
            node = node.commands[part]
        helps = {p.name: (p.help or "") for p in node.params}
        for option in options:
            assert len(helps[option]) > 10, (path, option)
