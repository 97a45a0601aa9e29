"""The in-process runtime: determinism, the run-directory contract, what leaves a site."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
import typer
import yaml
from typer.testing import CliRunner

from fedfair_med.config import ConfigError, RunConfig, load_config
from fedfair_med.runtime.local import build_sites, run_simulation
from fedfair_med.runtime.rundir import read_metrics
from fedfair_med.runtime.setup import RunSetup, build_global_model
from fedfair_med.tasks import build_task

FAST = dict(rounds=2, max_steps=2, data={"scale": 0.25})


def _without_timing(rows):
    return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]


def test_same_seed_gives_bit_identical_metrics_and_model(tmp_path) -> None:
    cfg = RunConfig(task="synthetic-seg", method="flexfair", method_params={"lam": 1.0}, seed=7, **FAST)
    a = run_simulation(cfg, tmp_path / "a")
    b = run_simulation(cfg, tmp_path / "b")
    assert _without_timing(read_metrics(a.path)) == _without_timing(read_metrics(b.path))
    ma, mb = torch.load(a.path / "model.pt"), torch.load(b.path / "model.pt")
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    c = run_simulation(RunConfig(**{**cfg.to_dict(), "seed": 8}), tmp_path / "c")
    assert _without_timing(read_metrics(c.path)) != _without_timing(read_metrics(a.path))


def test_run_directory_contract_classification(tmp_path) -> None:
    cfg = RunConfig(task="synthetic-cls", method="fedavg", criterion="dp", attribute="sex", **FAST)
    result = run_simulation(cfg, tmp_path / "run")
    for name in ("run.yaml", "metrics.jsonl", "predictions.csv", "report.json", "report.html", "model.pt"):
        assert (result.path / name).is_file(), name
    resolved = yaml.safe_load((result.path / "run.yaml").read_text())
    assert resolved["method"] == "fedavg" and resolved["resolved"]["kind"] == "classification"
    assert load_config(result.path / "run.yaml").to_dict() == cfg.to_dict()  # reproducible from run.yaml
    rows = read_metrics(result.path)
    assert [r["round"] for r in rows] == [1, 2]
    assert set(rows[-1]["sites"]) == {"site-a", "site-b", "site-c"}
    assert {"ea", "dp:sex", "eo:sex", "dp:age_band"} <= set(rows[-1]["gaps"])

    predictions = pd.read_csv(result.path / "predictions.csv")
    test_sizes = sum(len(s.test_set) for s in build_sites(RunSetup.create(cfg)))
    assert len(predictions) == test_sizes
    assert {"id", "site", "sex", "age", "age_band", "y_true", "score", "y_pred", "metric"} <= set(predictions)
    # The round metrics combined from site summaries equal the pooled predictions.
    assert rows[-1]["metric"] == pytest.approx(predictions["metric"].mean(), abs=1e-12)
    per_site = predictions.groupby("site")["metric"].mean()
    assert rows[-1]["gaps"]["ea"] == pytest.approx((per_site - predictions["metric"].mean()).abs().max())
    by_sex = predictions.groupby("sex")["score"].mean()
    assert rows[-1]["gaps"]["dp:sex"] == pytest.approx((by_sex - predictions["score"].mean()).abs().max())
    report = json.loads((result.path / "report.json").read_text())
    assert report["gaps"]["ea"] == pytest.approx(rows[-1]["gaps"]["ea"])


def test_only_fixed_size_aggregates_leave_a_site() -> None:
    """A site's update is the model plus small extras; its evaluation summary has no sample ids."""
    from fedfair_med.algorithms import build_algorithm

    sizes = {}
    for scale in (0.25, 0.5):
        cfg = RunConfig(task="synthetic-cls", method="flexfair", criterion="dp", attribute="sex",
                        method_params={"lam": 1.0}, rounds=1, max_steps=1, data={"scale": scale})
        task = build_task(cfg.task)
        site = build_sites(RunSetup.create(cfg, task))[0]
        model = build_global_model(cfg, task)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        update = site.train(build_algorithm("flexfair", lam=1.0), model, state, {}, 1)
        assert set(update.state) == set(state)
        assert all(update.state[k].shape == state[k].shape for k in state)
        predictions, summary = site.evaluate(model, update.state)
        text = json.dumps(summary)
        assert not any(i in text for i in predictions["id"])
        structure = {a: sorted(g) for a, g in summary["groups"].items()}
        sizes[scale] = (structure, {k: v.numel() for k, v in update.extras.items()}, len(predictions))
    (small_keys, small_extras, n_small), (big_keys, big_extras, n_big) = sizes.values()
    assert n_big > n_small
    assert small_extras == big_extras and small_keys == big_keys  # sizes do not grow with data
    assert "age" not in big_keys  # raw ages would single out patients; bands are shared instead


@pytest.mark.parametrize("override, message", [
    ({"method": "fedmagic"}, "unknown method"),
    ({"rounds": 0}, "rounds"),
    ({"method": "flexfair", "method_params": {"lam": -1}}, "lam"),
    ({"criterion": "dp"}, "sensitive attribute"),
    ({"colour": "blue"}, "unknown configuration key"),
    ({"task": "ct-scan"}, "unknown task"),
])
def test_bad_configuration_is_one_clear_error(override, message) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config({"task": "synthetic-seg", **override})


def test_demo_prints_a_smaller_ea_gap_for_flexfair(tmp_path) -> None:
    """The demo's promise, on its default seed: FlexFair narrows the EA gap FedAvg leaves."""
    from fedfair_med.cli.main import app

    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    gaps = {m: read_metrics(tmp_path / m)[-1]["gaps"]["ea"] for m in ("fedavg", "flexfair")}
    assert gaps["flexfair"] < gaps["fedavg"]
    assert "EA gap" in result.output and "site-c" in result.output
    assert (tmp_path / "flexfair" / "report.html").is_file()


def test_simulate_reports_bad_flags_without_traceback(tmp_path) -> None:
    from fedfair_med.cli.main import app

    result = CliRunner().invoke(app, ["simulate", "--method", "nope", "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert "unknown method" in result.output and "Traceback" not in result.output


def test_unknown_fairness_attribute_is_a_clear_error(tmp_path) -> None:
    cfg = RunConfig(task="synthetic-cls", method="flexfair", criterion="dp", attribute="gender", **FAST)
    with pytest.raises(ValueError, match="attribute 'gender' has no value.*available attributes"):
        run_simulation(cfg, tmp_path / "run")


def test_age_edges_define_the_age_bands_everywhere(tmp_path) -> None:
    cfg = RunConfig(task="synthetic-cls", method="fedavg", criterion="dp", attribute="age_band",
                    age_edges=[40.0, 70.0], **FAST)
    result = run_simulation(cfg, tmp_path / "run")
    predictions = pd.read_csv(result.path / "predictions.csv")
    assert set(predictions["age_band"]) == {"<=40", "40-70", ">70"}
    assert set(result.final["groups"]["age_band"]) == {"<=40", "40-70", ">70"}
    report = json.loads((result.path / "report.json").read_text())
    assert {r["group"] for r in report["groups"] if r["attribute"] == "age_band"} == {"<=40", "40-70", ">70"}


def test_flexfair_ea_under_adam_warns_and_sgd_does_not(tmp_path) -> None:
    common = dict(task="synthetic-seg", method="flexfair", method_params={"lam": 1.0}, rounds=1,
                  max_steps=1, data={"scale": 0.25})
    with pytest.warns(UserWarning, match="largely cancels the per-site penalty"):
        run_simulation(RunConfig(optimizer="adam", **common), tmp_path / "adam")
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_simulation(RunConfig(optimizer="sgd", **common), tmp_path / "sgd")
    assert not any("per-site penalty" in str(w.message) for w in caught)


def test_load_state_copies_like_load_state_dict_and_refuses_mismatches() -> None:
    from fedfair_med.algorithms.base import float_state, load_state
    from fedfair_med.models import build_network

    def unet(seed: int):
        torch.manual_seed(seed)
        return build_network("unet", in_channels=1, out_channels=1, spatial_dims=2, channels=(4, 8))

    target, source = unet(0), unet(1)
    with torch.no_grad():  # make the buffers differ too (running statistics, step counter)
        for name, buffer in source.named_buffers():
            buffer.add_(3 if buffer.is_floating_point() else 5)
    wanted = float_state(source)
    parameters = [id(p) for p in target.parameters()]
    load_state(target, wanted)
    loaded = target.state_dict()
    assert all(torch.equal(loaded[k], wanted[k]) for k in wanted)
    assert [id(p) for p in target.parameters()] == parameters  # copied in place: optimisers stay valid
    missing = dict(wanted)
    missing.pop(next(iter(missing)))
    with pytest.raises(RuntimeError, match="Missing key"):
        load_state(target, missing)
    reshaped = {k: (v[:1] if v.ndim and v.shape[0] > 1 else v) for k, v in wanted.items()}
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_state(target, reshaped)


def test_allocator_tuning_keeps_freed_model_sized_blocks_in_the_heap(tmp_path) -> None:
    """After the tuning, a freed 40 MB tensor's pages are reused: RSS does not drop and rise."""
    import subprocess
    import sys
    import textwrap

    probe = textwrap.dedent("""
        import os, sys, torch
        from fedfair_med.runtime.malloc_tuning import keep_freed_memory
        def rss():
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        applied = keep_freed_memory()
        x = torch.ones(10_000_000); del x          # 40 MB, written, then freed
        after_free = rss()
        print(applied, after_free)
    """)
    results = {}
    for setting in ("1", "0"):
        env = {**__import__("os").environ, "FEDFAIR_MALLOC_TUNING": setting}
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        applied, after_free = done.stdout.split()
        results[setting] = (applied == "True", int(after_free))
    if not results["1"][0]:
        pytest.skip("the C library has no mallopt (not glibc)")
    assert results["0"][0] is False
    # tuned: the freed 40 MB stay resident for reuse; untuned: glibc unmapped them
    assert results["1"][1] - results["0"][1] > 30_000_000
