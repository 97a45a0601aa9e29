"""Recipe runs as committed summaries (issue 16, item 1): collect-run and the generated section.

Run directories are written by the real writer (:class:`fedfair_med.runtime.rundir.RunDirectory`:
a staging folder while the run is going, renamed into place by ``commit``) with hand-made round
records, so no training runs; the rendered section is checked on hand-written summaries with
known answers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from fedfair_med.cli.main import app
from fedfair_med.config import RunConfig
from fedfair_med.experiments.recipes import QUALITY_BARS, recipes_markdown
from fedfair_med.experiments.results import render_section
from fedfair_med.runtime.rundir import RunDirectory, write_report

SITES = ("rosendahl", "vidir_modern")


def _round(rnd: int, metric: float, val: float, **extra) -> dict:
    return {"round": rnd, "elapsed_s": 60.0 * rnd, "train_loss": {s: 0.5 for s in SITES},
            "metric": metric, "n": 20,
            "sites": {SITES[0]: {"n": 10, "metric": metric + 0.05},
                      SITES[1]: {"n": 10, "metric": metric - 0.05}},
            "gaps": {"ea": 0.05, "dp:sex": 0.02}, "val": {"metric": val, "gaps": {"ea": 0.04}},
            **extra}


def _skin_run(path: Path, force: bool = False) -> RunDirectory:
    config = RunConfig(name="skin-r18", task="skin", rounds=3, epochs=1, lr=0.001, optimizer="adam",
                       batch_size=32, network="resnet18", network_kwargs={"norm": "group"},
                       data={"manifests": ["a.csv", "b.csv"], "image_size": [64, 64],
                             "class_weights": "balanced"})
    return RunDirectory(path, config, force=force, kind="classification", primary_metric="accuracy",
                        sites=list(SITES), rounds=3, batch_size=32,
                        local={"epochs": 1, "lr": 0.001, "optimizer": "adam"})


def _collect(*args: str):
    return CliRunner().invoke(app, ["results", "collect-run", *args])


def test_collect_run_marks_a_running_run_incomplete_and_the_finished_run_replaces_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    run = _skin_run(tmp_path / "runs" / "recipes" / "skin-r18")
    run.log_round(_round(1, 0.60, 0.61))
    run.log_round(_round(2, 0.66, 0.64))
    with open(run.staging / "metrics.jsonl", "a") as fh:  # the writer is mid-way through round 3
        fh.write('{"round": 3, "elapsed_s": 1')
    assert run.staging.name.startswith(".skin-r18.incomplete-")

    # default --into: results/recipes/NAME; a note says what run.yaml cannot
    result = _collect(str(run.staging), "--note", "weights were pooled when this ran")
    assert result.exit_code == 0, result.output
    summary = tmp_path / "results" / "recipes" / "skin-r18"
    assert "incomplete: 2 of 3 rounds" in result.output
    status = json.loads((summary / "status.json").read_text())
    assert status["status"] == "incomplete" and status["run_status"] == "running"
    assert (status["rounds_done"], status["rounds_planned"]) == (2, 3)
    assert not (summary / "report.json").exists()
    assert [json.loads(line)["round"] for line in (summary / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert "incomplete: 2 of 3 rounds" in recipes_markdown(tmp_path / "results" / "recipes")

    # The run finishes: round 3, predictions, report; collecting it replaces the summary.
    (run.staging / "metrics.jsonl").write_text(
        "".join(json.dumps(_round(r, m, m)) + "\n" for r, m in ((1, 0.6), (2, 0.66), (3, 0.7))))
    # AUC 1.0 (every positive scores above every negative); recall 0.5 and 1.0 -> balanced 0.75.
    run.save_predictions(pd.DataFrame({"id": list("abcd"), "site": [SITES[0]] * 2 + [SITES[1]] * 2,
                                       "y_true": [0, 0, 1, 1], "y_pred": [0, 1, 1, 1],
                                       "score": [0.1, 0.6, 0.7, 0.9], "metric": [1, 0, 1, 1]}))
    write_report(run.staging, {"overall": {"n": 4, "metric": 0.75, "auc": 1.0}, "groups": [], "gaps": {}})
    final = run.commit()
    result = _collect(str(final), "--into", str(summary))
    assert result.exit_code == 0, result.output
    status = json.loads((summary / "status.json").read_text())
    assert status["status"] == "complete" and "run_status" not in status
    assert status["note"] == "weights were pooled when this ran"  # kept by a collect without one
    assert status["final_test"] == pytest.approx({"auc": 1.0, "balanced_accuracy": 0.75})
    assert sorted(p.name for p in summary.iterdir()) == ["metrics.jsonl", "report.json",
                                                         "run.yaml", "status.json"]
    text = recipes_markdown(tmp_path / "results" / "recipes")
    assert "#### Recipe `skin-r18` (complete)" in text
    assert "Note: weights were pooled when this ran" in text
    # Skin's bars: AUC 1.000 >= 0.80 but balanced accuracy 0.750 >= 0.70 too -> reached.
    assert "**reached** — AUC 1.000 ≥ 0.80; balanced accuracy 0.750 ≥ 0.70." in text

    # A leftover staging folder must not silently replace the complete evidence.
    stale = _skin_run(tmp_path / "runs" / "recipes" / "skin-r18-again")
    result = _collect(str(stale.staging), "--into", str(summary))
    assert result.exit_code == 1 and "needs --force" in result.output
    assert json.loads((summary / "status.json").read_text())["status"] == "complete"


@pytest.mark.parametrize("make", ["empty", "not-yaml", "no-metrics", "missing"])
def test_collect_run_refuses_a_folder_that_is_not_a_run(tmp_path: Path, make: str):
    folder = tmp_path / "folder"
    if make != "missing":
        folder.mkdir()
    if make == "not-yaml":
        (folder / "run.yaml").write_text("- [unclosed\n")
        (folder / "metrics.jsonl").write_text("")
    if make == "no-metrics":
        (folder / "run.yaml").write_text("task: fundus\n")
    result = _collect(str(folder), "--into", str(tmp_path / "out"))
    assert result.exit_code == 1
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "out").exists()


def _summary(root: Path, name: str, task: str, primary: str, rounds: int, records: list[dict],
             status: dict, local: dict | None = None) -> None:
    folder = root / "recipes" / name
    folder.mkdir(parents=True)
    (folder / "run.yaml").write_text(yaml.safe_dump({
        "task": task, "method": "fedavg", "seed": 0, "rounds": rounds, "network": "unet",
        "network_kwargs": {"channels": [16, 32]}, "data": {"image_size": [256, 256]},
        "resolved": {"kind": "segmentation" if primary == "dice" else "classification",
                     "primary_metric": primary, "sites": list(SITES), "rounds": rounds,
                     "batch_size": 4, "local": local or {"epochs": 2, "lr": 0.05, "optimizer": "sgd",
                                                         "momentum": 0.9}}}))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "status.json").write_text(json.dumps(status))


def test_recipes_section_rows_statuses_and_bars(tmp_path: Path):
    root = tmp_path / "results"
    # Fundus, complete: round 2 not evaluated; last evaluated round 3 at Dice 0.72 -> reached.
    _summary(root, "fundus-256", "fundus", "dice", 3,
             [_round(1, 0.40, 0.41), {"round": 2, "elapsed_s": 120.0, "evaluated": False},
              _round(3, 0.72, 0.71)], {"status": "complete", "rounds_done": 3, "rounds_planned": 3})
    # Polyp, incomplete 2 of 30 rounds, Dice 0.65 -> not reached.
    _summary(root, "polyp-128", "polyp", "dice", 30, [_round(1, 0.5, 0.5), _round(2, 0.65, 0.6)],
             {"status": "incomplete", "rounds_done": 2, "rounds_planned": 30})
    # Skin, incomplete: the round record holds an AUC above its bar but no balanced accuracy.
    _summary(root, "skin-a", "skin", "accuracy", 6, [_round(1, 0.8, 0.8, auc=0.85)],
             {"status": "incomplete", "rounds_done": 1, "rounds_planned": 6},
             local={"epochs": 1, "lr": 0.001, "optimizer": "adam", "optimizer_state": "keep"})
    text = render_section(root, plots_link="plots")
    assert "* `fundus-256` (fundus, round 3, complete): **reached** — Dice 0.720 ≥ 0.70." in text
    assert ("* `polyp-128` (polyp, round 2, incomplete: 2 of 30 rounds): **not reached** — "
            "Dice 0.650 < 0.70.") in text
    assert ("* `skin-a` (skin, round 1, incomplete: 1 of 6 rounds): **not reached** — AUC 0.850 ≥ "
            "0.80; balanced accuracy not measured (bar 0.70).") in text
    fundus = text[text.index("#### Recipe `fundus-256` (complete)"):text.index("#### Recipe `polyp-128`")]
    assert ("| round | elapsed | val dice | test dice | test dice rosendahl | test dice vidir_modern "
            "| EA gap | DP:SEX gap |") in fundus
    assert "| 1 | 1.0 min | 0.410 | 0.400 | 0.450 | 0.350 | 0.050 | 0.020 |" in fundus
    assert "| 3 | 3.0 min | 0.710 | 0.720 | 0.770 | 0.670 | 0.050 | 0.020 |" in fundus
    assert "| 2 |" not in fundus  # not evaluated: no row
    assert ("network `unet` {\"channels\": [16, 32]}, image size 256×256, optimiser sgd "
            "(momentum 0.9), lr 0.05, batch 4, 2 epochs × 3 rounds") in fundus
    assert "![fundus-256 learning curve](plots/recipe-fundus-256.png)" in fundus
    skin = text[text.index("#### Recipe `skin-a`"):]
    assert "| test AUC |" in skin and "| 0.850 |" in skin
    assert "optimiser adam, each site's state kept across rounds, lr 0.001" in skin
    assert "1 epoch × 6 rounds" in skin
    assert "state kept" not in fundus
    assert "#### Recipe `polyp-128` (incomplete: 2 of 30 rounds)" in text


def test_render_writes_a_curve_per_recipe_and_the_bars_come_from_one_table(tmp_path: Path):
    root = tmp_path / "results"
    _summary(root, "fundus-256", "fundus", "dice", 1, [_round(1, 0.69, 0.7)],
             {"status": "complete", "rounds_done": 1, "rounds_planned": 1})
    text = render_section(root, plots=tmp_path / "plots", plots_link="plots")
    assert (tmp_path / "plots" / "recipe-fundus-256.png").stat().st_size > 1000
    assert "**not reached** — Dice 0.690 < 0.70." in text
    bars = dict(QUALITY_BARS)
    try:
        QUALITY_BARS["fundus"] = {"dice": 0.65}
        assert "**reached** — Dice 0.690 ≥ 0.65." in render_section(root)
    finally:
        QUALITY_BARS.clear()
        QUALITY_BARS.update(bars)


def test_round_records_carry_the_balanced_accuracy_the_final_predictions_give(tmp_path: Path):
    """Per-round balanced accuracy from the sites' sums equals ½(TPR + TNR) of the pooled
    predictions, which is what collect-run reads from a finished run's predictions.csv."""
    from fedfair_med.experiments.recipes import _final_quality
    from fedfair_med.fairness.site_summaries import combine_summaries, site_summary
    from fedfair_med.runtime.rundir import round_record

    # Site a: 2 positives (1 found), 2 negatives (1 right); site b: 4 negatives, all right.
    # Pooled TPR 1/2, TNR 5/6 -> balanced accuracy 2/3, while plain accuracy is 6/8.
    y_true = [1, 1, 0, 0, 0, 0, 0, 0]
    y_pred = [1, 0, 1, 0, 0, 0, 0, 0]
    frame = pd.DataFrame({"id": [str(i) for i in range(8)], "site": ["a"] * 4 + ["b"] * 4,
                          "y_true": y_true, "y_pred": y_pred,
                          "score": [0.9, 0.3, 0.7, 0.4, 0.2, 0.1, 0.35, 0.05],
                          "metric": [float(t == p) for t, p in zip(y_true, y_pred)]})
    summaries = {s: site_summary(part, ["site"]) for s, part in frame.groupby("site")}
    record = round_record(1, elapsed_s=1.0, train_loss={}, test=summaries, val=summaries,
                          classification=True)
    assert record["balanced_accuracy"] == pytest.approx(2 / 3)
    assert record["val"]["balanced_accuracy"] == pytest.approx(2 / 3)
    assert record["metric"] == pytest.approx(0.75)
    one_class = site_summary(frame[frame["y_true"] == 0], ["site"])
    assert math.isnan(combine_summaries({"b": one_class}, classification=True)["balanced_accuracy"])
    assert "balanced_accuracy" not in combine_summaries(summaries, classification=False)
    frame.to_csv(tmp_path / "predictions.csv", index=False)
    assert _final_quality(tmp_path)["balanced_accuracy"] == pytest.approx(2 / 3)
    # Within sites only site a has both classes: 0.9 beats 0.7 and 0.4, 0.3 beats neither.
    assert _final_quality(tmp_path)["auc_within_site"] == pytest.approx(0.5)


def test_collect_run_takes_several_runs_and_a_finished_run_beats_its_own_staging_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    finished = _skin_run(tmp_path / "runs" / "recipes" / "done")
    for rnd in (1, 2, 3):
        finished.log_round(_round(rnd, 0.7, 0.7))
    write_report(finished.staging, {"overall": {"n": 4, "metric": 0.7}, "groups": [], "gaps": {}})
    done = finished.commit()
    rerun = _skin_run(done, force=True)  # a rerun of "done" is going: its staging folder sits beside it
    running = _skin_run(tmp_path / "runs" / "recipes" / "going")
    running.log_round(_round(1, 0.6, 0.6))
    result = _collect(str(done), str(rerun.staging), str(running.staging),
                      "runs/recipes/.*.nothing-*")  # an unmatched shell pattern is passed as is
    # The finished run is collected last and wins; its staging folder came first.
    assert result.exit_code == 0, result.output
    summaries = tmp_path / "results" / "recipes"
    assert json.loads((summaries / "done" / "status.json").read_text())["status"] == "complete"
    assert json.loads((summaries / "going" / "status.json").read_text())["rounds_done"] == 1
    result = _collect(str(done), str(running.staging), "--into", str(summaries / "x"))
    assert result.exit_code == 1 and not (summaries / "x").exists()


def test_a_failed_run_kept_aside_is_collected_under_its_name_as_incomplete(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    run = _skin_run(tmp_path / "runs" / "recipes" / "skin-r18")
    run.log_round(_round(1, 0.6, 0.6))
    failed = run.keep_failed(RuntimeError("disk full"))
    assert failed.name == "skin-r18.failed"
    result = _collect(str(failed))
    assert result.exit_code == 0, result.output
    status = json.loads((tmp_path / "results/recipes/skin-r18/status.json").read_text())
    assert status["status"] == "incomplete" and status["run_status"] == "failed"
    assert status["error"] == "RuntimeError: disk full" and status["rounds_done"] == 1
    assert "(incomplete: 1 of 3 rounds, the run failed)" in recipes_markdown(tmp_path / "results/recipes")
    # The rerun finishes; given after its failed try on the command line, it still wins.
    again = _skin_run(tmp_path / "runs" / "recipes" / "skin-r18")
    again.log_round(_round(3, 0.7, 0.7))
    write_report(again.staging, {"overall": {"n": 4, "metric": 0.7}, "groups": [], "gaps": {}})
    result = _collect(str(again.commit()), str(failed))
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "results/recipes/skin-r18/status.json").read_text())["status"] == "complete"
