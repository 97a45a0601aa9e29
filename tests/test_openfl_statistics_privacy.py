"""DP on the shared statistics in an OpenFL federation: each collaborator noises the 2K numbers
it sends exactly as the in-process runtime does (same σ, same seeded stream per site and round),
the aggregator clamps the pooled noisy statistics and writes privacy.json. Never a silent no-op.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from fedfair_med.config import RunConfig
from fedfair_med.runtime.local import run_simulation

from fedfair_med.runtime.openfl.workspace import render_plan
from fedfair_med.runtime.rundir import read_metrics

from test_openfl_federation import (
    SITES, TINY, assert_same_numbers, make_federation, run_federation,
)

PRIVATE = {"privacy": {"statistics_epsilon": 2.0, "statistics_delta": 1e-5},
           "method_params": {"lam": 2.0}}


@pytest.mark.parametrize("method", ["flexfair-ea", "flexfair-dp"])
def test_the_plan_carries_the_statistics_privacy_to_every_process(method):
    task = "synthetic-seg" if method == "flexfair-ea" else "synthetic-cls"
    plan = render_plan(method, task=task, sites=["site-a", "site-b"], overrides=PRIVATE)
    assert plan.config.privacy["statistics_epsilon"] == 2.0


@pytest.mark.openfl
@pytest.mark.slow
def test_private_statistics_are_noised_at_each_collaborator_like_the_simulation(tmp_path: Path) -> None:
    ws = make_federation(tmp_path, "flexfair-ea", {**TINY, **PRIVATE})
    run_federation(tmp_path, ws)
    # Bit-identical to the simulation with the same privacy option: the collaborators added the
    # very noise the in-process sites add (and the aggregator clamped the same way).
    assert_same_numbers(ws, tmp_path)
    federated = read_metrics(ws / "run")
    simulated = read_metrics(tmp_path / "simulation")
    assert [r["privacy"] for r in federated] == [r["privacy"] for r in simulated]
    fed_privacy = json.loads((ws / "run/privacy.json").read_text())
    assert fed_privacy == json.loads((tmp_path / "simulation/privacy.json").read_text())
    assert fed_privacy["statistics"]["sigma"] > 0
    # ... and the noise is real: without it the same run trains another model.
    plan = yaml.safe_load((ws / "plan/plan.yaml").read_text())
    run = {k: v for k, v in plan["fedfair"]["settings"]["spec"]["run"].items() if k != "privacy"}
    exact = RunConfig(**{**run, "runtime": "local"})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the collaborators (OMP_NUM_THREADS=1) and simulate()
    try:
        exact_model = run_simulation(exact, tmp_path / "exact").state
    finally:
        torch.set_num_threads(threads)
    noisy_model = torch.load(ws / "run/model.pt")
    assert any(not torch.equal(noisy_model[k], exact_model[k]) for k in exact_model)
    # the statistics on the wire are still K numbers per site, nothing per sample
    wire = [json.loads(line) for line in (tmp_path / "wire.jsonl").read_text().splitlines()]
    sums = [e for e in wire if e["name"] == "extra/flexfair.sums"]
    assert sums and all(e["shape"] == [len(SITES)] for e in sums)
