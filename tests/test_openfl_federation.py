"""The real federation: OpenFL aggregator and collaborators as separate processes, mutual TLS.

Each federation test starts one aggregator and three collaborators (the synthetic federation has
three sites, and the simulation it is compared with uses all of them) for a tiny U-Net on a
quarter-size synthetic-seg federation. Workspaces live in tmp_path; ports are free ports.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import typer
import yaml
from typer.testing import CliRunner

from fedfair_med.cli.federation_commands import register
from fedfair_med.config import RunConfig
from fedfair_med.fairness.bootstrap import DEFAULT_REPLICATES, poisson_bootstrap
from fedfair_med.runtime.local import run_simulation
from fedfair_med.runtime.openfl.schedule import EVALUATE, STATISTICS, TRAIN, Schedule
from fedfair_med.runtime.openfl.wire import (
    SUMMARY_FIELDS, LosslessPipeline, pack_state, summary_to_tables, tables_to_summary, unpack_state,
)
from fedfair_med.runtime.openfl.workspace import available_methods, render_plan
from fedfair_med.runtime.rundir import read_metrics

pytestmark = pytest.mark.openfl

SITES = ["site-a", "site-b", "site-c"]
TINY = {"rounds": 2, "max_steps": 2, "data": {"scale": 0.25}}


def _app() -> typer.Typer:
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    register(app)
    return app


def cli(*args: str) -> "typer.testing.Result":
    return CliRunner().invoke(_app(), [str(a) for a in args])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_federation(tmp_path: Path, method: str, config: dict, *extra: str) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    result = cli("init-federation", "fed", "--task", "synthetic-seg", "--method", method,
                 "--sites", ",".join(SITES), "--port", free_port(), "--config", tmp_path / "run.yaml",
                 "--workspaces-dir", tmp_path / "workspaces", *extra)
    assert result.exit_code == 0, result.output
    ws = tmp_path / "workspaces" / "fed"
    for site in SITES:
        assert cli("collaborator", "setup", ws / "bundles" / f"{site}.zip", "--name", site).exit_code == 0
    requests = [ws / "bundles" / s / "cert/client" / f"col_{s}.csr" for s in SITES]
    assert cli("certify", "--workspace", ws, *requests).exit_code == 0
    return ws


class Processes:
    """Aggregator and collaborators as subprocesses; all killed on exit."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path, self.procs = tmp_path, {}
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                    "FEDFAIR_WIRE_LOG": str(tmp_path / "wire.jsonl")}

    def start(self, label: str, *args: str) -> subprocess.Popen:
        log = open(self.tmp_path / f"{label}.log", "w")
        self.procs[label] = subprocess.Popen(
            [sys.executable, "-m", "fedfair_med.cli.federation_commands", *map(str, args)],
            stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=Path(__file__).resolve().parents[1])
        return self.procs[label]

    def log(self, label: str) -> str:
        return (self.tmp_path / f"{label}.log").read_text()

    def wait(self, label: str, timeout: float) -> int:
        try:
            return self.procs[label].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{label} still running after {timeout} s:\n{self.log(label)[-2000:]}")

    def __enter__(self) -> "Processes":
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)


def run_federation(tmp_path: Path, ws: Path, agg_args: tuple = (), kill: str | None = None) -> Processes:
    with Processes(tmp_path) as procs:
        procs.start("aggregator", "aggregator", "start", "--workspace", ws, "--timeout", 150, *agg_args)
        for site in SITES:
            procs.start(site, "collaborator", "start", ws / "bundles" / site, "--name", site,
                        "--certificate", ws / "certified" / f"col_{site}.crt", "--connect-timeout", 90)
        if kill is not None:  # kill that site as soon as it has trained once, before it reports
            deadline = time.monotonic() + 120
            while "train round 1" not in procs.log(kill):
                assert time.monotonic() < deadline and procs.procs[kill].poll() is None, procs.log(kill)
                time.sleep(0.05)
            procs.procs[kill].send_signal(signal.SIGKILL)
        assert procs.wait("aggregator", 170) == 0, procs.log("aggregator")
        for site in SITES:
            if site != kill:
                assert procs.wait(site, 30) == 0, procs.log(site)
    return procs


def simulate(ws: Path, tmp_path: Path) -> list[dict]:
    plan = yaml.safe_load((ws / "plan/plan.yaml").read_text())
    config = RunConfig(**{**plan["fedfair"]["settings"]["spec"]["run"], "runtime": "local"})
    # The collaborators run with one torch thread (OMP_NUM_THREADS=1); convolution kernels may
    # sum in another order with more threads, so the simulation uses one thread too.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_simulation(config, tmp_path / "simulation").history
    finally:
        torch.set_num_threads(threads)


def assert_same_numbers(ws: Path, tmp_path: Path) -> None:
    federated = read_metrics(ws / "run")
    simulated = simulate(ws, tmp_path)
    assert [r["round"] for r in federated] == [r["round"] for r in simulated] == [1, 2]
    for fed, sim in zip(federated, simulated):
        # same seeds, same float64 summation order, lossless wire ⇒ bit-identical numbers
        for key in ("metric", "n", "sites", "groups", "gaps", "train_loss"):
            assert fed[key] == sim[key], key
    fed_model = torch.load(ws / "run/model.pt")
    sim_model = torch.load(tmp_path / "simulation/model.pt")
    assert fed_model.keys() == sim_model.keys()
    for name in sim_model:
        assert torch.equal(fed_model[name], sim_model[name]), name
    assert_same_resolved_facts(ws / "run", tmp_path / "simulation")


def assert_same_resolved_facts(federated_run: Path, simulated_run: Path) -> None:
    """Both runtimes write run.yaml's ``resolved`` section from one run set-up (RunSetup.facts).

    Only ``device`` legitimately differs: the simulation records the device it computed on, the
    aggregator the plan's setting (each site records its own in its bundle's device.json).
    """
    federated = yaml.safe_load((federated_run / "run.yaml").read_text())["resolved"]
    simulated = yaml.safe_load((simulated_run / "run.yaml").read_text())["resolved"]
    plan = yaml.safe_load((federated_run.parent / "plan/plan.yaml").read_text())
    assert federated.pop("device") == plan["fedfair"]["settings"]["spec"]["run"]["device"]
    assert simulated.pop("device") == "cpu"
    assert {"kind", "primary_metric", "attributes", "sites", "rounds", "batch_size", "local",
            "precision"} <= set(simulated)
    assert federated == simulated
    assert simulated["sites"] == SITES and simulated["rounds"] == 2


def assert_wire_is_clean(wire_log: Path, ws: Path) -> None:
    """Only model tensors, empty placeholders and fixed-size aggregate tables leave a site."""
    model = torch.load(ws / "run/model.pt")
    logged = [json.loads(line) for line in wire_log.read_text().splitlines()]
    # What is sent: the packed model (all its bytes, or an empty placeholder), the server-state
    # placeholder and one packed tensor of everything else -- three tensors per task.
    model_bytes = sum(v.numel() * v.element_size() for v in model.values())
    sent = [e for e in logged if e["kind"] == "wire"]
    assert {e["name"] for e in sent} == {"fedfair.model", "__server_state__", "fedfair.packed:fedfair_train",
                                         "fedfair.packed:fedfair_evaluate"}
    for e in sent:
        assert e["dtype"] == "uint8", e
        if e["name"] == "fedfair.model":
            assert e["shape"] in ([model_bytes], [0]), e
        elif e["name"] == "__server_state__":
            assert e["shape"] == [0], e
    # What it carries, tensor by tensor:
    entries = [e for e in logged if e["kind"] == "content"]
    assert {e["site"] for e in entries} == set(SITES)
    sample_counts = {12, 6}  # quarter-size train / test sets: a per-sample vector would show it
    final_round = max(e["round"] for e in entries)
    shapes_by_name: dict[str, set] = {}
    for e in entries:
        shapes_by_name.setdefault(e["name"], set()).add(tuple(e["shape"]))
        if e["name"] in model:
            assert e["shape"] in (list(model[e["name"]].shape), [0]), e
        elif e["name"] == "__server_state__":
            assert e["shape"] == [0], e
        elif e["name"].startswith("summary/"):
            assert e["task"] == EVALUATE and e["shape"][-1] == len(SUMMARY_FIELDS) and len(e["shape"]) <= 2, e
        elif e["name"].startswith("bootstrap/"):  # B replicates of fixed-size tables, once
            assert e["task"] == EVALUATE and e["round"] == final_round, e
            assert e["shape"][0] == DEFAULT_REPLICATES and e["shape"][-1] == 5 and len(e["shape"]) <= 3, e
        else:
            assert e["name"].startswith("extra/"), e
            assert sum(e["shape"]) <= 8 and not set(e["shape"]) & sample_counts, e
        if e["name"] not in model:
            assert not any(k in e["name"] for k in ("image", "mask", "label", "pred", "/id")), e
    # fixed size: every name has one shape across sites and rounds (placeholders aside)
    assert all(len(s - {(0,)}) <= 1 for s in shapes_by_name.values()), shapes_by_name


# ---- fast checks (no processes) ------------------------------------------------------------
def test_every_method_has_a_plan_that_renders_to_a_valid_run() -> None:
    assert set(available_methods()) >= {"fedavg", "fedprox", "fednova", "scaffold", "fairfed",
                                        "fairmixup", "flexfair-ea", "flexfair-dp", "flexfair-eo", "dynamicfl"}
    for method in available_methods():
        rendered = render_plan(method, task="synthetic-cls", sites=SITES, overrides={"rounds": 3})
        spec = rendered.plan["fedfair"]["settings"]["spec"]
        assert spec["run"]["method"] == rendered.config.method
        assert rendered.plan["aggregator"]["settings"]["rounds_to_train"] == \
            Schedule(3, spec["schedule"]["statistics"]).openfl_rounds
    dp = render_plan("flexfair-dp", task="synthetic-cls", sites=SITES).config
    assert (dp.method, dp.criterion, dp.attribute) == ("flexfair", "dp", "sex")


def test_schedule_evaluates_every_round_after_its_aggregation() -> None:
    for statistics in (False, True):
        schedule = Schedule(3, statistics)
        trained, evaluated, stats = [], [], []
        for k in range(schedule.openfl_rounds):
            tasks = schedule.tasks(k)
            assert tasks, k
            if EVALUATE in tasks:
                evaluated.append((k, schedule.evaluated_round(k)))
            if TRAIN in tasks:
                trained.append((k, schedule.train_round(k)))
            if STATISTICS in tasks:
                stats.append((k, schedule.statistics_round(k)))
        assert [r for _, r in trained] == [r for _, r in evaluated] == [1, 2, 3]
        # a round is evaluated in a later OpenFL round than the one that trained it
        assert all(ke > kt for (kt, _), (ke, _) in zip(trained, evaluated))
        assert [r for _, r in stats] == ([1, 2, 3] if statistics else [])
        assert all(ks < kt for (ks, _), (kt, _) in zip(stats, trained))


def test_wire_codec_is_lossless_and_summaries_round_trip() -> None:
    import numpy as np

    pipe = LosslessPipeline()
    for array in (np.array([0.1, 1e-300], dtype=np.float64), np.arange(6, dtype=np.int64).reshape(2, 3),
                  np.zeros(0, dtype=np.uint8), np.array(3.5, dtype=np.float32)):
        data, meta = pipe.forward(array)
        back = pipe.backward(data, meta)
        assert back.dtype == array.dtype and back.shape == array.shape and np.array_equal(back, array)
    state = {"c": torch.tensor([0.25, 0.5], dtype=torch.float64)}
    assert torch.equal(unpack_state(pack_state(state))["c"], state["c"])
    row = {"n": 3, "metric": 1.5, "score": 0.7, "n_pos": 1, "score_pos": 0.2, "metric_pos": 1.0}
    summary = {"overall": row, "groups": {"sex": {"male": dict(row)}}}
    vocab = {"sex": ["female", "male"]}
    assert tables_to_summary(summary_to_tables(summary, vocab), vocab) == summary
    with pytest.raises(ValueError, match="vocabulary"):
        summary_to_tables({**summary, "groups": {"sex": {"other": summary["overall"]}}}, vocab)


def test_model_and_task_outputs_pack_into_one_tensor_each_losslessly() -> None:
    import numpy as np

    from fedfair_med.models import build_network
    from fedfair_med.runtime.openfl.wire import (
        MODEL_BLOB, PACKED, ModelLayout, expand_packed, pack_arrays, unpack_arrays,
    )

    torch.manual_seed(0)
    net = build_network("unet", in_channels=1, out_channels=1, spatial_dims=2, channels=(4, 8))
    state = net.state_dict()  # float32 weights and int64 BatchNorm counters
    layout = ModelLayout(state)
    blob = layout.pack(state)
    assert blob.dtype == np.uint8 and blob.size == sum(v.numel() * v.element_size() for v in state.values())
    back = layout.unpack(blob)
    assert list(back) == list(state)
    assert all(back[k].dtype == state[k].numpy().dtype and np.array_equal(back[k], state[k].numpy())
               for k in state)
    with pytest.raises(ValueError, match="bytes"):
        layout.unpack(blob[:-4])
    wrong = dict(state)
    first = next(iter(wrong))
    wrong[first] = wrong[first].double()
    with pytest.raises(ValueError, match=first):
        layout.pack(wrong)

    arrays = {("extra/flexfair.sums", "fedfair_extra"): np.array([0.1, 1e-300]),
              ("extra/steps", "fedfair_extra"): np.array(7.0),  # 0-d stays 0-d
              ("w", "trained"): np.arange(6, dtype=np.uint64).reshape(2, 3),
              ("summary/sex", "fedfair_summary"): np.zeros((2, 5))}
    unpacked = unpack_arrays(pack_arrays(arrays))
    assert list(unpacked) == list(arrays)
    for key, value in arrays.items():
        assert unpacked[key].dtype == value.dtype and unpacked[key].shape == value.shape
        assert np.array_equal(unpacked[key], value)
    assert unpack_arrays(np.zeros(0, np.uint8)) == {}

    # a round's rows: packed tensors are replaced by what they carry, keeping the site's tag
    rows = {(MODEL_BLOB, frozenset({"trained", "site-a"})): blob,
            (MODEL_BLOB, frozenset({"trained", "site-b"})): np.zeros(0, np.uint8),  # placeholder
            (PACKED + ":fedfair_train", frozenset({"fedfair_extra", "site-a"})): pack_arrays(arrays),
            ("__server_state__", frozenset({"model"})): np.zeros(3, np.uint8)}
    expanded = expand_packed(rows, layout)
    assert np.array_equal(expanded[(first, frozenset({"trained", "site-a"}))], state[first].numpy())
    assert not any("site-b" in tags for _, tags in expanded)
    assert np.array_equal(expanded[("w", frozenset({"trained", "site-a"}))], arrays[("w", "trained")])
    assert ("extra/steps", frozenset({"fedfair_extra", "site-a"})) in expanded
    assert ("__server_state__", frozenset({"model"})) in expanded


def test_certify_signs_plan_sites_only_and_commands_fail_in_one_line(tmp_path: Path) -> None:
    ws = make_federation(tmp_path, "fedavg", TINY)
    assert (ws / "certified/col_site-a.crt").exists()
    assert sorted(p.name for p in (ws / "bundles").glob("*.zip")) == [f"{s}.zip" for s in SITES]
    bundle = ws / "bundles/site-a"
    assert not list(bundle.rglob("*signing-ca*")) and not list(bundle.rglob("root-ca.key"))
    # a request for a name that is not in the plan is refused
    from fedfair_med.runtime.openfl.workspace import make_certificate_request

    intruder = make_certificate_request(tmp_path / "intruder", "mallory")
    result = cli("certify", "--workspace", ws, intruder)
    assert result.exit_code == 1
    assert "mallory" in result.output and "not a site" in result.output
    assert "Traceback" not in result.output and not (ws / "certified/col_mallory.crt").exists()
    # a hospital cannot set up under another site's name
    result = cli("collaborator", "setup", ws / "bundles/site-a", "--name", "site-b")
    assert result.exit_code == 1 and "site-a" in result.output and "Traceback" not in result.output
    result = cli("init-federation", "x", "--task", "synthetic-seg", "--method", "nope", "--sites", "a",
                 "--workspaces-dir", tmp_path / "w2")
    assert result.exit_code == 1 and "nope" in result.output and "Traceback" not in result.output


# ---- real federations ---------------------------------------------------------------------
def test_fedavg_federation_equals_simulation_refuses_foreign_ca_and_sends_only_aggregates(tmp_path: Path) -> None:
    ws = make_federation(tmp_path, "fedavg", TINY)
    with Processes(tmp_path) as procs:
        procs.start("aggregator", "aggregator", "start", "--workspace", ws, "--timeout", 150)
        # an impostor: a valid site name, but a certificate from another certificate authority
        other = make_federation(tmp_path / "other", "fedavg", TINY)
        impostor = tmp_path / "impostor"
        shutil.copytree(ws / "bundles/site-c", impostor)
        shutil.copyfile(other / "certified/col_site-c.crt", impostor / "cert/client/col_site-c.crt")
        shutil.copyfile(other / "bundles/site-c/cert/client/col_site-c.key", impostor / "cert/client/col_site-c.key")
        # (with its own CA chain too: a foreign certificate under this bundle's chain is refused
        # locally, before connecting — see test_federation_errors.py)
        shutil.copyfile(other / "cert/cert_chain.crt", impostor / "cert/cert_chain.crt")
        result = cli("collaborator", "start", impostor, "--name", "site-c", "--connect-timeout", 3)
        assert result.exit_code == 1 and "aggregator" in result.output, result.output
        for site in SITES:
            procs.start(site, "collaborator", "start", ws / "bundles" / site, "--name", site,
                        "--certificate", ws / "certified" / f"col_{site}.crt", "--connect-timeout", 90)
        assert procs.wait("aggregator", 170) == 0, procs.log("aggregator")
        for site in SITES:
            assert procs.wait(site, 30) == 0, procs.log(site)
    run = ws / "run"
    for name in ("run.yaml", "metrics.jsonl", "report.json", "model.pt"):
        assert (run / name).exists(), name
    assert not (run / "predictions.csv").exists()  # predictions stay at the sites
    assert all((ws / "bundles" / s / "run/predictions.csv").exists() for s in SITES)
    assert all("dropped" not in r for r in read_metrics(run))
    assert_same_numbers(ws, tmp_path)
    assert_wire_is_clean(tmp_path / "wire.jsonl", ws)
    assert_report_has_the_pooled_poisson_bootstrap(ws)


def assert_report_has_the_pooled_poisson_bootstrap(ws: Path) -> None:
    """report.json's CIs are exactly the in-process Poisson bootstrap of the pooled predictions,
    drawn with each site's secret stream (which only the sites hold)."""
    plan = yaml.safe_load((ws / "plan/plan.yaml").read_text())
    spec = plan["fedfair"]["settings"]["spec"]
    pooled = pd.concat([pd.read_csv(ws / "bundles" / s / "run/predictions.csv", dtype={"id": str},
                                    engine="python")  # exact float parsing
                        for s in SITES], ignore_index=True)
    secrets = {s: (ws / "bundles" / s / "run/bootstrap.secret").read_text().strip() for s in SITES}
    assert len(set(secrets.values())) == len(SITES)
    expected = poisson_bootstrap(pooled, spec["vocabularies"], seed=spec["run"]["seed"],
                                 secrets=secrets, classification=False)
    report = json.loads((ws / "run/report.json").read_text())
    assert report["settings"]["n_boot"] == DEFAULT_REPLICATES
    assert report["overall"]["ci95"] == expected["overall"]
    low, high = report["overall"]["ci95"]
    assert low < report["overall"]["metric"] < high
    rows = {(g["attribute"], g["group"]): g["ci95"] for g in report["groups"]}
    for site in SITES:
        assert rows[("site", site)] == expected["sites"][site]
    for attribute, groups in expected["groups"].items():
        for group, interval in groups.items():
            if attribute != "site":
                assert rows[(attribute, group)] == interval
    assert report["gaps_ci95"] == expected["gaps"] and set(report["gaps_ci95"]) == set(report["gaps"])


def test_flexfair_federation_equals_simulation(tmp_path: Path) -> None:
    """Also with each site keeping its optimiser state: equal numbers over two rounds need every
    collaborator to resume its own momentum buffers, as the simulation's sites do."""
    ws = make_federation(tmp_path, "flexfair-ea",
                         {**TINY, "method_params": {"lam": 2.0}, "optimizer_state": "keep"})
    plan = yaml.safe_load((ws / "plan/plan.yaml").read_text())
    assert plan["fedfair"]["settings"]["spec"]["run"]["optimizer_state"] == "keep"
    run_federation(tmp_path, ws)
    assert_same_numbers(ws, tmp_path)
    assert_report_has_the_pooled_poisson_bootstrap(ws)
    wire = [json.loads(line) for line in (tmp_path / "wire.jsonl").read_text().splitlines()]
    sums = [e for e in wire if e["name"] == "extra/flexfair.sums"]
    assert sums and all(e["shape"] == [len(SITES)] for e in sums)  # one sum per group, no more


def test_a_killed_site_is_dropped_and_the_run_finishes(tmp_path: Path) -> None:
    ws = make_federation(tmp_path, "fedavg", {**TINY, "rounds": 1},
                         "--straggler-timeout", "6", "--min-sites", "2")
    started = time.monotonic()
    run_federation(tmp_path, ws, agg_args=("--finish-grace", 2), kill="site-c")
    assert time.monotonic() - started < 160
    records = read_metrics(ws / "run")
    assert [r["round"] for r in records] == [1]
    assert records[0]["dropped"] == ["site-c"]
    assert set(records[0]["sites"]) == {"site-a", "site-b"}
    # site-c is killed right after it logs its training; on a loaded machine its update may
    # already be on the wire by then, so it may or may not count in the aggregate — but it
    # never evaluates, and the run must record it as dropped.
    assert {"site-a", "site-b"} <= set(records[0]["train_loss"]) <= {"site-a", "site-b", "site-c"}
    assert json.loads((ws / "run/federation.json").read_text())["dropped"] == {"1": ["site-c"]}
    assert (ws / "run/model.pt").exists()
