"""Secure aggregation, crashes and restarts, bounded waits and bad configuration (OpenFL runtime).

Process tests start real aggregator / collaborator processes on 127.0.0.1 with the federation's
own certificates (helpers from ``test_openfl_federation``); everything else runs in-process.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openfl.utilities import SingletonABCMeta

from fedfair_med.algorithms import REGISTRY, build_algorithm
from fedfair_med.config import ConfigError, RunConfig, load_config
from fedfair_med.privacy.secure_sum import FRACTION_BITS, SecureSumError, decode
from fedfair_med.runtime.setup import build_global_model, method_params
from fedfair_med.runtime.openfl.aggregation import MethodAggregation
from fedfair_med.runtime.openfl.wire import (
    MODEL_BLOB, MODEL_TAG, SERVER_STATE, TRAINED_TAG, ModelLayout, expand_packed, pack_state,
    unpack_state,
)
from fedfair_med.runtime.openfl.secure import (
    PUBLIC_KEY_PREFIX, RELAY, SECAGG_TAG, SECURE_METHODS, SURVIVORS, TEST_EXIT_ENV, build_decision,
    build_relay, make_site_keys, read_hex_key, summed_update,
)
from fedfair_med.runtime.openfl.taskrunner import SiteTaskRunner
from fedfair_med.runtime.openfl.workspace import FederationError, render_plan
from fedfair_med.runtime.rundir import read_metrics
from fedfair_med.tasks import build_task
from test_openfl_federation import (
    SITES, TINY, Processes, cli, free_port, make_federation, simulate,
)

pytestmark = pytest.mark.openfl


def said(result) -> str:
    """A command's output with rich's line wrapping undone (long paths move the line breaks)."""
    return " ".join(result.output.split())


# ---- secure aggregation, in-process ---------------------------------------------------------
def _one_round(spec: dict, bundles: Path, task: str = "fedfair_train",
               dropped: tuple[str, ...] = ()) -> tuple[dict, dict]:
    """Every site trains once from the same start; MethodAggregation aggregates (as in OpenFL).

    Under secure aggregation the round runs its three steps as the OpenFL runtime does: round
    keys (relayed with the aggregator's own :func:`build_relay`), the masked task, then the
    survivors' unmasking step (:func:`build_decision`). ``dropped`` sites sent their round keys
    but never their update.
    """
    config = RunConfig(**spec["run"])
    state0 = {k: v.detach().clone()
              for k, v in build_global_model(config, build_task(config.task)).state_dict().items()}
    algorithm = build_algorithm(config.method, **method_params(config, REGISTRY[config.method]))
    server = algorithm.init_server_state(state0, SITES)
    for site in SITES:  # what `certify` publishes in the initial server state
        public = read_hex_key(bundles / site / f"cert/client/col_{site}.secagg.pub", "public key")
        server[PUBLIC_KEY_PREFIX + site] = torch.tensor(list(public), dtype=torch.uint8)
    layout = ModelLayout(state0)
    inputs = {MODEL_BLOB: layout.pack(state0), SERVER_STATE: pack_state(server)}
    rows = [(k, 0, (MODEL_TAG,), v) for k, v in inputs.items()]
    runners = {site: SiteTaskRunner(spec, site=site, bundle=bundles / site) for site in SITES}
    survivors = [s for s in SITES if s not in dropped]

    def run(site: str, step: str, given: dict) -> dict:
        out, _ = getattr(runners[site], step)(col_name=site, round_num=0, input_tensor_dict=given)
        rows.extend((key.tensor_name, 0, tuple(sorted((*key.tags, site))), value) for key, value in out.items())
        # what the wire tensors carry, by name (the packed model and the packed task outputs)
        carried = expand_packed({(key.tensor_name, frozenset(key.tags)): value for key, value in out.items()},
                                layout)
        return {name: value for (name, _), value in carried.items()}

    secure = spec["schedule"].get("secure", False)
    if secure:
        relay = build_relay({site: run(site, "fedfair_secagg_keys", inputs) for site in SITES})
        rows.append((RELAY, 0, (SECAGG_TAG,), relay))
        inputs = {**inputs, RELAY: relay}
    sent = {site: run(site, task, inputs) for site in survivors}
    if secure:
        decision = build_decision(SITES, survivors)
        rows.append((SURVIVORS, 0, (SECAGG_TAG,), decision))
        for site in survivors:
            run(site, "fedfair_secagg_unmask", {**inputs, SURVIVORS: decision})
    table = pd.DataFrame(rows, columns=["tensor_name", "round", "tags", "nparray"])
    # OpenFL makes every AggregationFunction a per-process singleton: forget the previous one
    SingletonABCMeta._instances.pop(MethodAggregation, None)
    aggregation = MethodAggregation(spec)
    assert aggregation.spec.secure_aggregation == bool(spec.get("secure_aggregation"))
    reporting = [SimpleNamespace(col_name=s) for s in survivors]
    result = {k: aggregation.call(reporting, table, k, 0, (TRAINED_TAG,)) for k in (MODEL_BLOB, SERVER_STATE)}
    return sent, {**layout.unpack(result[MODEL_BLOB]), SERVER_STATE: result[SERVER_STATE]}


@pytest.mark.parametrize("method", ["fedavg", "flexfair-ea", "fedprox", "fairmixup", "dynamicfl", "scaffold"])
def test_secure_aggregation_gives_the_plain_aggregate_and_hides_every_site(tmp_path: Path, method: str) -> None:
    overrides = {**TINY, "method_params": {"lam": 2.0} if method.startswith("flexfair") else {}}
    secure = render_plan(method, task="synthetic-seg", sites=SITES, overrides=overrides, secure_aggregation=True)
    plain = render_plan(method, task="synthetic-seg", sites=SITES, overrides=overrides)
    for site in SITES:
        make_site_keys(tmp_path / site, site)
    masked_sent, secure_result = _one_round(secure.spec, tmp_path)
    plain_sent, plain_result = _one_round(plain.spec, tmp_path)
    model_keys = [k for k in plain_result if k != SERVER_STATE]
    for name in model_keys:  # the same aggregate, within fixed point (then float32 rounding)
        got, want = secure_result[name].astype(np.float64), plain_result[name].astype(np.float64)
        assert np.allclose(got, want, rtol=1e-6, atol=len(SITES) * 2.0 ** -FRACTION_BITS), name
    got, want = unpack_state(secure_result[SERVER_STATE]), unpack_state(plain_result[SERVER_STATE])
    assert got.keys() == want.keys()
    for key in want:
        assert torch.allclose(got[key].double(), want[key].double(), atol=1e-6), key
    for site in SITES:  # no site's plain tensor (or n_s-weighted tensor) reaches the aggregator
        n = int(plain_sent[site]["extra/__num_samples__"])
        for name, value in masked_sent[site].items():
            if value.dtype != np.uint64:
                continue
            plain_name = name.replace("extra/secure/", "extra/")
            if plain_sent[site][plain_name].size == 0:
                continue
            as_seen = decode(value)
            plain_value = plain_sent[site][plain_name].astype(np.float64)
            assert np.all(np.abs(as_seen - plain_value) > 1e-3) and np.all(np.abs(as_seen - n * plain_value) > 1e-3)
        # in the clear: n_s, loss, step count, the empty placeholder and integer step counters
        clear = {k for k, v in masked_sent[site].items() if v.dtype != np.uint64}
        assert clear - {"extra/loss", "extra/steps", "extra/__num_samples__", SERVER_STATE} == \
            {k for k, v in plain_sent[site].items() if k in model_keys and v.dtype.kind in "iu"}
    # the aggregator refuses a round in which a site is missing (the masks would not cancel)
    like = {k: torch.from_numpy(np.array(v)) for k, v in plain_result.items() if k != SERVER_STATE}
    partial = {s: masked_sent[s] for s in SITES[:2]}
    with pytest.raises(SecureSumError, match="did not report"):
        summed_update(partial, SITES, like, {s: 1 for s in SITES})


@pytest.mark.parametrize("method", ["fedavg", "flexfair-ea"])
def test_a_secure_round_with_a_dropped_site_aggregates_exactly_the_survivors(tmp_path: Path, method: str) -> None:
    """site-c sends its round keys, then never its update: the survivors' key shares remove its
    masks, and the aggregate is the plain aggregate of site-a and site-b."""
    overrides = {**TINY, "method_params": {"lam": 2.0} if method.startswith("flexfair") else {}}
    secure = render_plan(method, task="synthetic-seg", sites=SITES, overrides=overrides, secure_aggregation=True,
                         straggler_cutoff_s=5)
    plain = render_plan(method, task="synthetic-seg", sites=SITES, overrides=overrides)
    for site in SITES:
        make_site_keys(tmp_path / site, site)
    _, secure_result = _one_round(secure.spec, tmp_path, dropped=("site-c",))
    _, plain_result = _one_round(plain.spec, tmp_path, dropped=("site-c",))
    _, all_three = _one_round(plain.spec, tmp_path)
    for name in (k for k in plain_result if k != SERVER_STATE):
        got, want = secure_result[name].astype(np.float64), plain_result[name].astype(np.float64)
        assert np.allclose(got, want, rtol=1e-6, atol=2 * 2.0 ** -FRACTION_BITS), name
    assert any(not np.allclose(plain_result[k], all_three[k]) for k in plain_result if k != SERVER_STATE)
    got, want = unpack_state(secure_result[SERVER_STATE]), unpack_state(plain_result[SERVER_STATE])
    for key in want:
        assert torch.allclose(got[key].double(), want[key].double(), atol=1e-6), key


def test_secure_statistics_phase_pools_the_same_group_statistics(tmp_path: Path) -> None:
    overrides = {**TINY, "method_params": {"lam": 2.0, "statistics": "fresh"}}
    secure = render_plan("flexfair-ea", task="synthetic-seg", sites=SITES, overrides=overrides,
                         secure_aggregation=True)
    plain = render_plan("flexfair-ea", task="synthetic-seg", sites=SITES, overrides=overrides)
    assert secure.spec["schedule"]["statistics"]
    for site in SITES:
        make_site_keys(tmp_path / site, site)
    masked_sent, secure_result = _one_round(secure.spec, tmp_path, "fedfair_statistics")
    _, plain_result = _one_round(plain.spec, tmp_path, "fedfair_statistics")
    got, want = unpack_state(secure_result[SERVER_STATE]), unpack_state(plain_result[SERVER_STATE])
    assert "flexfair.coef" in want and got.keys() == want.keys()
    for key in want:
        assert torch.allclose(got[key].double(), want[key].double(), atol=1e-6), key
    assert all(masked_sent[s]["extra/secure/flexfair.sums"].dtype == np.uint64 for s in SITES)
    assert not any(name == "extra/flexfair.sums" for s in SITES for name in masked_sent[s])


def test_secure_federation_needs_every_sites_public_key(tmp_path: Path) -> None:
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(TINY))
    assert cli("init-federation", "f", "--task", "synthetic-seg", "--method", "fedavg", "--sites",
               ",".join(SITES), "--port", free_port(), "--workspaces-dir", tmp_path,
               "--secure-aggregation").exit_code == 0
    ws = tmp_path / "f"
    for site in SITES:
        assert cli("collaborator", "setup", ws / "bundles" / f"{site}.zip", "--name", site).exit_code == 0
    client = ws / "bundles/site-a/cert/client"
    assert (client / "secagg_site-a.key").stat().st_mode & 0o077 == 0  # the private key stays private
    (client / "col_site-a.secagg.pub").unlink()
    result = cli("certify", "--workspace", ws, client / "col_site-a.csr")
    assert result.exit_code == 1 and "col_site-a.secagg.pub must come with" in said(result)
    for site in SITES[1:]:
        assert cli("certify", "--workspace", ws,
                   ws / "bundles" / site / "cert/client" / f"col_{site}.csr").exit_code == 0
    result = cli("aggregator", "start", "--workspace", ws, "--timeout", 5)
    assert result.exit_code == 1 and "no key-agreement public key for site(s) ['site-a']" in said(result)


def test_secure_schedule_frames_every_masked_phase_with_keys_and_unmasking() -> None:
    from fedfair_med.runtime.openfl.schedule import (
        EVALUATE, SECAGG_KEYS, SECAGG_UNMASK, STATISTICS, TRAIN, Schedule,
    )

    plain, secure = Schedule(2), Schedule(2, secure=True)
    assert [plain.tasks(k) for k in range(3)] == [[TRAIN], [EVALUATE, TRAIN], [EVALUATE]]
    assert [secure.tasks(k) for k in range(3)] == [
        [SECAGG_KEYS, TRAIN, SECAGG_UNMASK], [EVALUATE, SECAGG_KEYS, TRAIN, SECAGG_UNMASK], [EVALUATE]]
    stats = Schedule(1, statistics=True, secure=True)
    assert [stats.tasks(k) for k in range(3)] == [
        [SECAGG_KEYS, STATISTICS, SECAGG_UNMASK], [SECAGG_KEYS, TRAIN, SECAGG_UNMASK], [EVALUATE]]
    assert secure.openfl_rounds == plain.openfl_rounds  # the steps run inside the same OpenFL round


def test_secure_aggregation_is_refused_where_it_cannot_work() -> None:
    for method, reason in (("fednova", "n_s / a_s"), ("fairfed", "per-site")):
        with pytest.raises(FederationError, match=reason):
            render_plan(method, task="synthetic-cls", sites=SITES, secure_aggregation=True)
    for t in (1, 4):  # the rule n/2 < t <= n
        with pytest.raises(FederationError, match="n/2 < t"):
            render_plan("fedavg", task="synthetic-cls", sites=SITES, secure_aggregation=True, secure_threshold=t)
    with pytest.raises(FederationError, match="below the secure-aggregation threshold 3"):
        render_plan("fedavg", task="synthetic-cls", sites=SITES, secure_aggregation=True, secure_threshold=3,
                    straggler_cutoff_s=5, min_sites=2)
    plan = render_plan("fedavg", task="synthetic-cls", sites=SITES, secure_aggregation=True, straggler_cutoff_s=5)
    assert plan.spec["secure_threshold"] == 2 and plan.plan["straggler_handling_policy"]["settings"] == {
        "straggler_cutoff_time": 5, "minimum_reporting": 2}
    with pytest.raises(FederationError, match="two sites"):
        render_plan("fedavg", task="synthetic-cls", sites=["site-a"], secure_aggregation=True)
    assert {"fedavg", "flexfair"} <= set(SECURE_METHODS)


# ---- bad configuration: one clear line before anything starts -------------------------------
def _init(tmp_path: Path, *args: str):
    return cli("init-federation", "bad", "--task", "synthetic-seg", "--workspaces-dir", tmp_path / "ws", *args)


@pytest.mark.parametrize("args, message", [
    (("--method", "nope", "--sites", "site-a,site-b"), "nope"),
    (("--method", "flexfair-ea", "--sites", "site-a,site-b", "--lam", "-1"), "lam"),
    (("--method", "fedavg", "--sites", "site-a,site-b", "--rounds", "0"), "rounds"),
    (("--method", "fedavg", "--sites", "site-a,site-b,site-a"), "more than once"),
    (("--method", "fedavg", "--sites", "site-a,site-b", "--aggregator-host", "no-such-host.invalid"), "resolve"),
    (("--method", "fedavg", "--sites", "site-a,site-b", "--port", "70000"), "port"),
    (("--method", "fednova", "--sites", "site-a,site-b", "--secure-aggregation"), "FedNova"),
])
def test_bad_arguments_fail_in_one_line_and_write_nothing(tmp_path: Path, args: tuple, message: str) -> None:
    result = _init(tmp_path, *args)
    assert result.exit_code == 1, result.output
    assert message in said(result) and "Traceback" not in said(result)
    assert not (tmp_path / "ws/bad/plan").exists()


def test_aggregator_refuses_a_port_in_use_before_serving(tmp_path: Path) -> None:
    port = free_port()
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(TINY))
    assert cli("init-federation", "f", "--task", "synthetic-seg", "--method", "fedavg", "--sites",
               ",".join(SITES), "--port", port, "--workspaces-dir", tmp_path).exit_code == 0
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        result = cli("aggregator", "start", "--workspace", tmp_path / "f", "--timeout", 5)
    assert result.exit_code == 1 and "in use" in said(result) and "Traceback" not in said(result)
    result = cli("aggregator", "start", "--workspace", tmp_path / "f", "--resume")
    assert result.exit_code == 1 and "no checkpoint" in said(result)


def test_a_broken_or_edited_plan_is_refused_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(TINY))
    assert cli("init-federation", "f", "--task", "synthetic-seg", "--method", "flexfair-ea", "--sites",
               ",".join(SITES), "--port", free_port(), "--workspaces-dir", tmp_path).exit_code == 0
    ws = tmp_path / "f"
    plan_path, cols_path = ws / "plan/plan.yaml", ws / "plan/cols.yaml"
    original, cols = plan_path.read_text(), cols_path.read_text()
    plan = yaml.safe_load(original)
    negative = yaml.safe_load(original)
    negative["fedfair"]["settings"]["spec"]["run"]["method_params"]["lam"] = -1.0
    no_spec = yaml.safe_load(original)
    del no_spec["fedfair"]["settings"]["spec"]
    cases = [
        ("aggregator: [unclosed\n", cols, "not valid YAML"),
        (yaml.safe_dump(no_spec), cols, "missing"),
        (yaml.safe_dump(negative), cols, "lam"),
        (original, yaml.safe_dump({"collaborators": ["site-a", "site-b"]}), "do not match"),
    ]
    for plan_text, cols_text, message in cases:
        plan_path.write_text(plan_text)
        cols_path.write_text(cols_text)
        for args in (("aggregator", "start", "--workspace", ws, "--timeout", 5),
                     ("certify", "--workspace", ws, tmp_path / "none.csr")):
            result = cli(*args)
            assert result.exit_code == 1 and message in said(result), (message, result.output)
            assert "Traceback" not in said(result)
    assert plan["fedfair"]["settings"]["spec"]["sites"] == SITES


def test_every_wait_ends_with_a_clear_message(tmp_path: Path) -> None:
    """An aggregator nobody reports to, and a site whose aggregator accepts but never answers."""
    ws = make_federation(tmp_path, "fedavg", TINY)
    started = time.monotonic()
    result = cli("aggregator", "start", "--workspace", ws, "--idle-timeout", 2, "--timeout", 60)
    assert result.exit_code == 1 and "no site reported anything for 2 s" in said(result), result.output
    assert "site-a" in said(result) and time.monotonic() - started < 30
    port = yaml.safe_load((ws / "plan/plan.yaml").read_text())["network"]["settings"]["agg_port"]
    with socket.socket() as silent:  # accepts connections, never speaks TLS
        silent.bind(("127.0.0.1", port))
        silent.listen()
        started = time.monotonic()
        result = cli("collaborator", "start", ws / "bundles/site-a", "--name", "site-a", "--certificate",
                     ws / "certified/col_site-a.crt", "--connect-timeout", 2, "--call-timeout", 1)
    assert result.exit_code == 1 and "no answer from the aggregator" in said(result), result.output
    assert time.monotonic() - started < 30


_KEYS = [f.name for f in dataclasses.fields(RunConfig)]
_SCALARS = (st.none() | st.booleans() | st.integers(-3, 3) | st.floats() | st.text(max_size=6)
            | st.sampled_from(["fedavg", "flexfair", "synthetic-seg", "ea", "dp", "site", "sex", "sgd"]))
_VALUES = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.sampled_from(["lam", "statistics_epsilon", "dp_sgd", "clip", "scale"]) | st.text(max_size=4),
    inner, max_size=3), max_leaves=6)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.dictionaries(st.sampled_from(_KEYS) | st.text(max_size=5) | st.integers(), _VALUES, max_size=6))
def test_load_config_raises_nothing_but_config_error(raw: dict) -> None:
    try:
        config = load_config(raw)
    except ConfigError as err:
        assert str(err).strip()
    else:
        assert isinstance(config, RunConfig)


# ---- crashes and restarts (real processes) --------------------------------------------------
def _start_sites(procs: Processes, ws: Path, sites=SITES, label: str = "", timeout: int = 90) -> None:
    for site in sites:
        procs.start(site + label, "collaborator", "start", ws / "bundles" / site, "--name", site,
                    "--certificate", ws / "certified" / f"col_{site}.crt", "--connect-timeout", timeout)


def _wait_for(predicate, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_secure_flexfair_federation_matches_the_simulation(tmp_path: Path) -> None:
    ws = make_federation(tmp_path, "flexfair-ea", {**TINY, "rounds": 1, "method_params": {"lam": 2.0}},
                         "--secure-aggregation")
    with Processes(tmp_path) as procs:
        procs.start("aggregator", "aggregator", "start", "--workspace", ws, "--timeout", 150)
        _start_sites(procs, ws)
        assert procs.wait("aggregator", 170) == 0, procs.log("aggregator")
        for site in SITES:
            assert procs.wait(site, 30) == 0, procs.log(site)
    federated, simulated = read_metrics(ws / "run"), simulate(ws, tmp_path)
    assert [r["round"] for r in federated] == [r["round"] for r in simulated] == [1]
    for fed, sim in zip(federated, simulated):
        assert fed["metric"] == pytest.approx(sim["metric"], abs=1e-4)
        assert fed["train_loss"] == sim["train_loss"]  # the first round trains from the same model
    model, reference = torch.load(ws / "run/model.pt"), torch.load(tmp_path / "simulation/model.pt")
    for name in reference:
        assert torch.allclose(model[name].double(), reference[name].double(), atol=1e-4), name
    wire = [json.loads(line) for line in (tmp_path / "wire.jsonl").read_text().splitlines()]
    wire = [e for e in wire if e["kind"] == "content"]  # what the packed wire tensors carry
    trained = [e for e in wire if "trained" in e["tags"] and e["shape"] != [0]]
    assert trained and all(e["dtype"] == "uint64" for e in trained  # weights only masked
                           if not e["name"].endswith("num_batches_tracked"))
    sums = [e for e in wire if e["name"].startswith("extra/") and "flexfair" in e["name"]]
    assert sums and all(e["name"].startswith("extra/secure/") and e["dtype"] == "uint64" for e in sums)


def _run_with_dropouts(tmp_path: Path, ws: Path, exits: str, aggregator_rc: int = 0) -> Processes:
    """Run ``ws``; the sites in ``exits`` leave after receiving OpenFL round 0's keys (and
    training) but before uploading (the test-only hook in runtime/openfl/secure.py)."""
    with Processes(tmp_path) as procs:
        procs.env[TEST_EXIT_ENV] = ",".join(f"{s}@0" for s in exits.split(","))
        # generous bounds: four processes start up on a small shared machine (~40 s when idle)
        procs.start("aggregator", "aggregator", "start", "--workspace", ws, "--timeout", 400,
                    "--finish-grace", 2)
        _start_sites(procs, ws, timeout=300)
        assert procs.wait("aggregator", 420) == aggregator_rc, procs.log("aggregator")
        for site in exits.split(","):
            assert procs.wait(site, 30) == 17, procs.log(site)  # it left through the hook
        if aggregator_rc == 0:
            for site in sorted(set(SITES) - set(exits.split(","))):
                assert procs.wait(site, 30) == 0, procs.log(site)
    return procs


def test_a_site_that_drops_after_the_round_keys_is_unmasked_by_the_survivors(tmp_path: Path) -> None:
    config = {**TINY, "rounds": 1}
    # 10 s: long enough that a live but slow survivor (busy machine) is not taken for a drop-out
    secure_ws = make_federation(tmp_path / "secure", "fedavg", config, "--secure-aggregation",
                                "--straggler-timeout", "10")
    plain_ws = make_federation(tmp_path / "plain", "fedavg", config, "--straggler-timeout", "10",
                               "--min-sites", "2")
    assert yaml.safe_load((secure_ws / "plan/plan.yaml").read_text())["fedfair"]["settings"]["spec"][
        "secure_threshold"] == 2
    secure = _run_with_dropouts(tmp_path / "secure", secure_ws, "site-c")
    _run_with_dropouts(tmp_path / "plain", plain_ws, "site-c")
    assert "removed the masks of dropped site(s) site-c" in secure.log("aggregator")
    for ws in (secure_ws, plain_ws):
        records = read_metrics(ws / "run")
        assert [r["round"] for r in records] == [1] and records[0]["dropped"] == ["site-c"]
        assert set(records[0]["train_loss"]) == {"site-a", "site-b"}
    # the secure aggregate is the plain aggregate of the two survivors, to fixed-point precision
    model, reference = torch.load(secure_ws / "run/model.pt"), torch.load(plain_ws / "run/model.pt")
    assert model.keys() == reference.keys()
    for name in reference:
        assert torch.allclose(model[name].double(), reference[name].double(), rtol=1e-6,
                              atol=2 * 2.0 ** -FRACTION_BITS), name
    wire = [json.loads(line) for line in (tmp_path / "secure/wire.jsonl").read_text().splitlines()]
    revealed = [e for e in wire if e["kind"] == "content" and e["name"].startswith("secagg/reveal/")]
    assert {(e["site"], e["name"]) for e in revealed} == {("site-a", "secagg/reveal/site-c"),
                                                         ("site-b", "secagg/reveal/site-c")}
    trained = [e for e in wire if e["kind"] == "content" and "trained" in e["tags"] and e["shape"] != [0]]
    assert trained and all(e["dtype"] == "uint64" for e in trained if not e["name"].endswith("num_batches_tracked"))


def test_below_the_threshold_a_secure_round_fails_naming_the_missing_sites(tmp_path: Path) -> None:
    ws = make_federation(tmp_path, "fedavg", {**TINY, "rounds": 1}, "--secure-aggregation",
                         "--straggler-timeout", "3", "--secure-threshold", "2")
    procs = _run_with_dropouts(tmp_path, ws, "site-b,site-c", aggregator_rc=1)
    assert ("only 1 of 3 sites uploaded their masked update within the 3 s straggler timeout, fewer "
            "than the threshold 2; missing: site-b, site-c") in procs.log("aggregator")
    assert not (ws / "run/model.pt").exists()


def test_aggregator_killed_between_rounds_resumes_to_the_same_model(tmp_path: Path) -> None:
    ws = make_federation(tmp_path, "fedavg", TINY)
    checkpoint = ws / "save/resume.json"
    with Processes(tmp_path) as procs:
        procs.start("aggregator", "aggregator", "start", "--workspace", ws, "--timeout", 150)
        _start_sites(procs, ws)
        _wait_for(lambda: checkpoint.exists() and json.loads(checkpoint.read_text())["openfl_round"] >= 1,
                  "the first checkpoint")
        procs.procs["aggregator"].send_signal(signal.SIGKILL)
        procs.procs["aggregator"].wait(timeout=10)
        # a changed plan is refused
        plan_path = ws / "plan/plan.yaml"
        original = plan_path.read_text()
        plan_path.write_text(original.replace("db_store_rounds: 2", "db_store_rounds: 3", 1))
        result = cli("aggregator", "start", "--workspace", ws, "--resume", "--timeout", 5)
        assert result.exit_code == 1 and "plan changed" in said(result), result.output
        plan_path.write_text(original)
        procs.start("aggregator-2", "aggregator", "start", "--workspace", ws, "--resume", "--timeout", 150)
        assert procs.wait("aggregator-2", 170) == 0, procs.log("aggregator-2")
        for site in SITES:
            assert procs.wait(site, 30) == 0, procs.log(site)
    assert "resuming" in procs.log("aggregator-2")
    assert not checkpoint.exists()  # a finished run leaves nothing to resume
    federated, simulated = read_metrics(ws / "run"), simulate(ws, tmp_path)
    assert [r["round"] for r in federated] == [1, 2]
    for fed, sim in zip(federated, simulated):
        for key in ("metric", "n", "sites", "groups", "gaps", "train_loss"):
            assert fed[key] == sim[key], key
    model, reference = torch.load(ws / "run/model.pt"), torch.load(tmp_path / "simulation/model.pt")
    assert all(torch.equal(model[k], reference[k]) for k in reference)


def test_a_killed_collaborator_restarts_and_rejoins(tmp_path: Path) -> None:
    # 4 rounds: a restarted collaborator needs its start-up time (imports, TLS; 10-20 s on two
    # busy cores) before it can train again, and each round without it waits out the 8 s cut-off.
    ws = make_federation(tmp_path, "fedavg", {**TINY, "rounds": 4},
                         "--straggler-timeout", "8", "--min-sites", "2")
    with Processes(tmp_path) as procs:
        procs.start("aggregator", "aggregator", "start", "--workspace", ws, "--timeout", 170,
                    "--finish-grace", 3)
        _start_sites(procs, ws)
        _wait_for(lambda: "train round 1" in procs.log("site-c"), "site-c to train")
        procs.procs["site-c"].send_signal(signal.SIGKILL)
        # the round goes on without it; then the same command brings it back
        _wait_for(lambda: "site-c dropped out" in procs.log("aggregator"), "the drop-out")
        _start_sites(procs, ws, ["site-c"], label="-again")
        assert procs.wait("aggregator", 190) == 0, procs.log("aggregator")
        for label in ("site-a", "site-b", "site-c-again"):
            assert procs.wait(label, 30) == 0, procs.log(label)
    records = read_metrics(ws / "run")
    assert [r["round"] for r in records] == [1, 2, 3, 4]
    missed = {int(r): s for r, s in json.loads((ws / "run/federation.json").read_text())["dropped"].items()}
    assert missed[1] == ["site-c"]
    # it trained again in a later round; every round whose training or evaluation lacks it is
    # recorded as missed (it may have sent round 1's update just before it was killed)
    rejoined = [r["round"] for r in records if "site-c" in r["train_loss"]]
    assert rejoined and max(rejoined) >= 2
    for record in records:
        absent = "site-c" not in record["train_loss"] or "site-c" not in record["sites"]
        assert absent == (record["round"] in missed) == ("dropped" in record), record["round"]
    assert all(missed[r["round"]] == r["dropped"] for r in records if "dropped" in r)
    assert "site-c" in records[-1]["sites"]  # evaluated by the final model
