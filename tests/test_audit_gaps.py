"""Audit gaps: ``report --model`` reports the gap over every requested attribute, and
``data check --audit`` accepts a manifest that is only scored (test rows, no train rows).

Real files throughout: PNG images and masks written with Pillow, a real (untrained, tiny) MONAI
UNet saved as a state dict, the real CLI commands.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import typer
import yaml
from typer.testing import CliRunner

from fedfair_med.cli import data_commands
from fedfair_med.cli.report_commands import register
from fedfair_med.tasks import build_task
from fixtures_data import segmentation_site

torch.set_num_threads(1)
DISEASES = ("adenoma", "hyperplastic", "adenoma", "serrated", "adenoma", "hyperplastic")


def _app() -> typer.Typer:
    app = typer.Typer()
    register(app)
    data_commands.register(app)
    return app


def _audit_only_site(root: Path) -> Path:
    """Six test rows, no train rows, with a ``disease`` column beside sex and age."""
    path = segmentation_site(root, n_train=0, n_test=len(DISEASES))
    lines = path.read_text().splitlines()
    head = lines.index("id,image,label,split,sex,age")
    lines[head] += ",disease"
    for offset, disease in enumerate(DISEASES, start=1):
        lines[head + offset] += f",{disease}"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_data_check_audit_mode_accepts_a_test_only_manifest(tmp_path):
    manifest = _audit_only_site(tmp_path)
    runner = CliRunner()
    refused = runner.invoke(_app(), ["data", "check", str(manifest), "--task", "polyp"])
    assert refused.exit_code == 1
    assert "'train' split is empty" in refused.output and "--audit" in refused.output
    accepted = runner.invoke(_app(), ["data", "check", str(manifest), "--task", "polyp", "--audit"])
    assert accepted.exit_code == 0, accepted.output
    assert "OK" in accepted.output and "(6 rows checked)" in accepted.output
    # Audit mode still checks every row, and still needs rows to score.
    (tmp_path / "images" / "case2.png").unlink()
    broken = runner.invoke(_app(), ["data", "check", str(manifest), "--task", "polyp", "--audit"])
    assert broken.exit_code == 1 and "case2.png" in broken.output
    train_only = segmentation_site(tmp_path / "train", n_train=2, n_test=0)
    empty = runner.invoke(_app(), ["data", "check", str(train_only), "--task", "polyp", "--audit"])
    assert empty.exit_code == 1 and "'test' split is empty" in empty.output


def test_model_audit_reports_the_gap_over_every_requested_attribute(tmp_path):
    manifest = _audit_only_site(tmp_path / "site")
    torch.manual_seed(0)
    model = build_task("polyp").build_model("unet", channels=(4, 8), strides=(2,))
    torch.save(model.state_dict(), tmp_path / "model.pt")
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(yaml.safe_dump({"task": "polyp", "network": "unet",
                                        "network_kwargs": {"channels": [4, 8], "strides": [2]},
                                        "data": {"image_size": 16}}))
    out = tmp_path / "audit"
    result = CliRunner().invoke(_app(), [
        "report", "--model", str(tmp_path / "model.pt"), "--manifest", str(manifest),
        "--run-yaml", str(run_yaml), "--attribute", "disease", "--attribute", "sex",
        "--out", str(out), "--min-group-size", "1"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    predictions = pd.read_csv(out / "predictions.csv", dtype={"id": str})
    dice = predictions["metric"].to_numpy()
    assert np.ptp(dice) > 0  # otherwise every gap is trivially 0

    def gap(column: str) -> float:
        return float((predictions.groupby(column)["metric"].mean() - dice.mean()).abs().max())

    assert set(report["gaps"]) == {"ea", "ea:disease", "ea:sex"}
    assert report["gaps"]["ea"] == pytest.approx(0.0)  # one site: no site gap to speak of
    assert report["gaps"]["ea:disease"] == pytest.approx(gap("disease"))
    assert report["gaps"]["ea:sex"] == pytest.approx(gap("sex"))
    assert report["gaps"]["ea:disease"] > 0
    assert "disease" in report["definitions"]["ea:disease"]
    # Printed, and in the Markdown report.
    assert "ea:disease" in result.output and "ea:sex" in result.output
    markdown = (out / "report.md").read_text()
    assert f"| `ea:disease` | {report['gaps']['ea:disease']:.4f} |" in markdown


def test_classification_report_carries_auc_calibration_and_decision_gaps():
    """A skin-style report: DP/EO on scores and on decisions, AUC and ECE overall and per group."""
    from sklearn.metrics import roc_auc_score

    from fedfair_med.fairness import expected_calibration_error
    from fedfair_med.reporting.run_report import build_run_report
    from fedfair_med.reporting.render import render_html, render_markdown

    rng = np.random.default_rng(7)
    n = 120
    y = rng.integers(0, 2, n)
    age = rng.uniform(20, 90, n)
    # Older patients get higher scores regardless of the label: a DP gap over age on scores.
    score = np.clip(0.35 * y + 0.004 * (age - 20) + rng.uniform(0, 0.3, n), 0, 1)
    y_pred = (score >= 0.5).astype(int)
    frame = pd.DataFrame({"id": [f"i{k}" for k in range(n)], "site": rng.choice(["a", "b"], n),
                          "sex": rng.choice(["female", "male"], n), "age": age, "y_true": y,
                          "score": score, "y_pred": y_pred, "metric": (y_pred == y).astype(float)})
    report = build_run_report(frame, kind="classification", attributes=["sex", "age"],
                          primary_metric="accuracy", n_boot=50, intersections=False)
    assert report["overall"]["auc"] == pytest.approx(roc_auc_score(y, score))
    assert report["overall"]["ece"] == pytest.approx(expected_calibration_error(y, score))
    band = np.where(age <= 60, "<=60", ">60")
    old = band == ">60"
    # Decision gaps on y_pred, two groups: max(n_a, n_b)/n × |rate_a − rate_b|.
    share = max(old.sum(), (~old).sum()) / n
    assert report["decision_gaps"]["dp:age_band"] == pytest.approx(
        share * abs(y_pred[old].mean() - y_pred[~old].mean()))
    pos = y == 1
    share_pos = max((old & pos).sum(), (~old & pos).sum()) / pos.sum()
    assert report["decision_gaps"]["eo:age_band"] == pytest.approx(
        share_pos * abs(y_pred[old & pos].mean() - y_pred[~old & pos].mean()))
    assert report["decision_gaps"]["dp:age_band"] != pytest.approx(report["gaps"]["dp:age_band"])
    rows = {r["group"]: r for r in report["groups"] if r["attribute"] == "age_band"}
    assert rows[">60"]["auc"] == pytest.approx(roc_auc_score(y[old], score[old]))
    assert rows["<=60"]["ece"] == pytest.approx(expected_calibration_error(y[~old], score[~old]))
    markdown = render_markdown(report, {}, [])
    assert "## Discrimination, calibration and decisions" in markdown
    assert f"| dp:age_band | {report['decision_gaps']['dp:age_band']:.4f} |" in markdown
    html = render_html(report, {}, [])
    assert 'id="decision-gaps"' in html and f"{report['overall']['auc']:.4f}" in html
    json.dumps(report, allow_nan=False)


def test_federated_classification_report_without_predictions_still_renders():
    """A federated run's report.json (no predictions, so no AUC/ECE) renders without those parts."""
    from fedfair_med.reporting.render import render_html, render_markdown

    report = {"kind": "classification", "primary_metric": "accuracy",
              "overall": {"n": 30, "metric": 0.7, "ci95": [0.5, 0.8]},
              "groups": [{"attribute": "site", "group": "a", "n": 30, "metric": 0.7,
                          "ci95": [0.5, 0.8], "small": False, "positive_rate": 0.3,
                          "mean_score": 0.4}],
              "gaps": {"ea": 0.0, "dp:sex": 0.1}, "definitions": {}, "warnings": []}
    html = render_html(report, {}, [])
    markdown = render_markdown(report, {}, [])
    assert "<th>positive rate</th>" in html and 'id="decision-gaps"' not in html
    assert "| positive rate | mean score |" in markdown and "Discrimination" not in markdown
