"""The run-directory module: what it writes for a run it reads back, file by file.

Every runtime writes through :class:`RunDirectory` and every reader (reports, sweeps, the CLI)
goes through the ``read_*`` functions, so a format change that breaks one side shows here.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from fedfair_med.config import RunConfig, load_config
from fedfair_med.fairness.site_summaries import site_summary
from fedfair_med.runtime.rundir import (
    RunDirectory, RunDirectoryError, read_json, read_metrics, read_model, read_predictions,
    read_report, read_run_yaml, read_status, round_record, write_report, write_reports,
)

FACTS = {"kind": "classification", "primary_metric": "accuracy", "attributes": ["sex"],
         "sites": ["site-a", "site-b"], "rounds": 2, "batch_size": 4,
         "local": {"epochs": 1, "lr": 0.01}, "device": "cpu", "precision": "32"}


def _predictions(site: str, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 8)
    score = rng.random(8)
    return pd.DataFrame({"id": [f"{site}-00{i}" for i in range(8)], "site": site,
                         "sex": ["female", "male", "", "male", "female", "male", "female", "male"],
                         "y_true": y, "score": score, "y_pred": (score >= 0.5).astype(int),
                         "metric": ((score >= 0.5) == (y == 1)).astype(float)})


def test_every_file_written_reads_back_the_same(tmp_path) -> None:
    config = RunConfig(task="synthetic-cls", method="flexfair", method_params={"lam": 2.0},
                       criterion="dp", attribute="sex", seed=5)
    rundir = RunDirectory(tmp_path / "run", config, **FACTS)
    assert read_status(rundir.staging)["status"] == "running"

    frames = {s: _predictions(s, k) for k, s in enumerate(FACTS["sites"])}
    summaries = {s: site_summary(f, ["site", "sex"]) for s, f in frames.items()}
    records = [
        round_record(1, elapsed_s=1.23456, train_loss={"site-a": 0.5, "site-b": float("nan")},
                     test=None, classification=True),
        round_record(2, elapsed_s=2.5, train_loss={"site-a": np.float32(0.25), "site-b": 0.125},
                     test=summaries, val=summaries, classification=True, dropped=["site-c"],
                     privacy={"epsilon": 1.5}),
    ]
    for record in records:
        rundir.log_round(record)
    predictions = pd.concat(frames.values(), ignore_index=True)
    rundir.save_predictions(predictions)
    state = {"w": torch.randn(3, 2, dtype=torch.float64), "bn.num_batches_tracked": torch.tensor(7)}
    rundir.save_model(state)
    rundir.write_json("privacy.json", {"statistics": {"epsilon": 8.0, "delta": 1e-5}})
    path = rundir.commit()

    assert read_status(path)["status"] == "complete"
    written = read_run_yaml(path)
    assert written["resolved"] == FACTS
    assert load_config(path / "run.yaml").to_dict() == config.to_dict()

    rounds = read_metrics(path)
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[0] == {"round": 1, "elapsed_s": 1.235, "evaluated": False,
                         "train_loss": {"site-a": 0.5, "site-b": None}}  # strict JSON: NaN is null
    assert rounds[1]["train_loss"] == {"site-a": 0.25, "site-b": 0.125}
    assert rounds[1]["dropped"] == ["site-c"] and rounds[1]["privacy"] == {"epsilon": 1.5}
    assert rounds[1]["metric"] == pytest.approx(predictions["metric"].mean(), abs=1e-12)
    assert rounds[1]["val"]["gaps"] == rounds[1]["gaps"]
    assert set(rounds[1]["gaps"]) >= {"ea", "dp:sex", "eo:sex"}

    back = read_predictions(path)
    assert back["id"].tolist() == predictions["id"].tolist()  # ids stay text ("-007", not 7)
    assert back["sex"].fillna("").tolist() == predictions["sex"].tolist()  # '' is missing
    for column in ("y_true", "y_pred", "score", "metric"):
        assert np.array_equal(back[column].to_numpy(), predictions[column].to_numpy()), column

    model = read_model(path)
    assert model.keys() == state.keys()
    assert all(model[k].dtype == state[k].dtype and torch.equal(model[k], state[k]) for k in state)
    assert read_json(path, "privacy.json") == {"statistics": {"epsilon": 8.0, "delta": 1e-5}}
    assert read_json(path, "federation.json") is None

    # report.json: recomputed from the predictions with the facts run.yaml carries
    paths = write_reports(path, n_boot=50)
    report = read_report(path)
    assert paths["json"] == path / "report.json" and paths["html"].exists()
    assert report["kind"] == "classification" and report["primary_metric"] == "accuracy"
    assert report["overall"]["metric"] == pytest.approx(rounds[1]["metric"], abs=1e-12)
    assert report["gaps"]["dp:sex"] == pytest.approx(rounds[1]["gaps"]["dp:sex"], abs=1e-12)


def test_a_given_report_is_written_as_strict_json_and_a_broken_one_is_refused(tmp_path) -> None:
    tmp_path.mkdir(exist_ok=True)
    content = {"overall": {"n": 3, "metric": float("nan")}, "groups": [], "gaps": {"ea": np.float64(0.5)}}
    written = write_report(tmp_path, content)
    assert read_report(tmp_path) == written == {"overall": {"n": 3, "metric": None}, "groups": [],
                                                "gaps": {"ea": 0.5}}
    (tmp_path / "report.json").write_text('{"overall": {}}')
    with pytest.raises(RunDirectoryError, match="not a fedfair-med report"):
        read_report(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"round": 2}\n\n{"round": 1}\n{"loss": 1}\n')
    with pytest.raises(RunDirectoryError, match=r"metrics.jsonl:4 is not a round record"):
        read_metrics(tmp_path)
    assert read_metrics(tmp_path / "absent") == []
