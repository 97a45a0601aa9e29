"""Run-directory reports: report.json values, the self-contained HTML, Markdown and the CLI.

The run directory is written by hand here (predictions.csv, two rounds of metrics.jsonl,
run.yaml) and every number in report.json is recomputed independently with numpy masks.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import typer
import yaml
from typer.testing import CliRunner

from fedfair_med.cli.report_commands import register
from fedfair_med.reporting.run_report import build_run_report
from fedfair_med.reporting.render import render_markdown
from fedfair_med.runtime.rundir import RunDirectoryError, write_reports

SITES = ("site-a", "site-b", "site-c")


def _classification_predictions(seed: int = 0, per_site: int = 16) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for s, site in enumerate(SITES):
        for i in range(per_site):
            y_true = int(rng.random() < 0.4)
            score = float(np.clip(rng.normal(0.35 + 0.3 * y_true + 0.05 * s, 0.2), 0.0, 1.0))
            y_pred = int(score >= 0.5)
            age = int(rng.integers(25, 90))
            rows.append({
                "id": f"{site}-test-{i:03d}", "site": site,
                "sex": str(rng.choice(["female", "male"])), "age": age,
                "age_band": ">60" if age > 60 else "<=60",
                "y_true": y_true, "score": round(score, 6), "y_pred": y_pred,
                "metric": float(y_pred == y_true),
            })
    frame = pd.DataFrame(rows)
    frame.loc[[3, 20, 40], "sex"] = ""  # three samples without sex
    frame.loc[[5, 33], ["age", "age_band"]] = [np.nan, ""]  # two without age
    return frame


def _segmentation_predictions(seed: int = 1) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for s, site in enumerate(SITES):
        for i in range(12 if s < 2 else 6):
            dice = float(np.clip(rng.normal(0.85 - 0.25 * (s == 2), 0.08), 0, 1))
            rows.append({"id": f"{site}-{i}", "site": site, "sex": str(rng.choice(["female", "male"])),
                         "age": int(rng.integers(25, 90)), "y_true": 1, "score": 0.2,
                         "y_pred": 1, "metric": dice})
    return pd.DataFrame(rows)


def _write_run_dir(path: Path, predictions: pd.DataFrame, task: str = "synthetic-cls") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "task": task, "method": "flexfair", "method_params": {"lam": 0.5},
        "criterion": {"name": "dp", "attribute": "sex"}, "seed": 0, "rounds": 2,
        "sites": list(SITES), "local": {"epochs": 1, "lr": 0.003}, "runtime": "local",
    }
    (path / "run.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    with open(path / "metrics.jsonl", "w", encoding="utf-8") as handle:
        for r, (metric, ea) in enumerate([(0.61, 0.12), (0.72, 0.07)], start=1):
            record = {
                "round": r, "elapsed_s": 1.5 * r,
                "train_loss": {s: 0.7 / r for s in SITES},
                "sites": {s: {"n": 16, "metric": metric + 0.01 * k} for k, s in enumerate(SITES)},
                "metric": metric, "gaps": {"ea": ea, "dp:sex": ea / 2, "eo:sex": ea / 3},
            }
            handle.write(json.dumps(record) + "\n")
    predictions.to_csv(path / "predictions.csv", index=False)
    return path


def _gap(values: np.ndarray, groups: np.ndarray) -> float:
    """Independent max |group mean − pooled mean| over samples with a known group."""
    known = groups != ""
    pooled = values[known].mean()
    return max(abs(values[known & (groups == g)].mean() - pooled) for g in set(groups[known]))


def _rows(report: dict, attribute: str) -> dict[str, dict]:
    return {row["group"]: row for row in report["groups"] if row["attribute"] == attribute}


# ---- build_run_report ----------------------------------------------------------------------------
def test_classification_report_matches_numpy():
    frame = _classification_predictions()
    report = build_run_report(frame, kind="classification", attributes=["sex", "age", "age_band"],
                          primary_metric="accuracy", n_boot=300, seed=0, min_group_size=10)
    metric = frame["metric"].to_numpy()
    score = frame["score"].to_numpy()
    positive = frame["y_true"].to_numpy() == 1
    site = frame["site"].to_numpy()
    sex = frame["sex"].to_numpy()
    ages = frame["age"].to_numpy()
    band = np.where(np.isnan(ages), "", np.where(ages > 60, ">60", "<=60"))

    assert report["primary_metric"] == "accuracy"
    assert report["overall"]["n"] == len(frame)
    assert report["overall"]["metric"] == pytest.approx(metric.mean())
    lo, hi = report["overall"]["ci95"]
    assert lo <= metric.mean() <= hi

    from sklearn.metrics import roc_auc_score

    pairs = {name: int(positive[site == name].sum() * (~positive[site == name]).sum()) for name in SITES}
    within = sum(pairs[name] * roc_auc_score(positive[site == name], score[site == name])
                 for name in SITES) / sum(pairs.values())
    assert report["overall"]["auc_within_site"] == pytest.approx(within)
    assert report["overall"]["auc"] == pytest.approx(roc_auc_score(positive, score))
    markdown = render_markdown(report, {}, [])
    assert f"| ROC AUC within sites |" in markdown and f"| {within:.4f} |" in markdown

    sites = _rows(report, "site")
    assert sorted(sites) == list(SITES)
    for name, row in sites.items():
        assert row["n"] == int((site == name).sum())
        assert row["metric"] == pytest.approx(metric[site == name].mean())
        assert row["positive_rate"] == pytest.approx(frame["y_pred"].to_numpy()[site == name].mean())
        assert row["ci95"][0] <= row["metric"] <= row["ci95"][1]

    sexes = _rows(report, "sex")
    assert set(sexes) == {"female", "male"}
    assert sum(r["n"] for r in sexes.values()) == len(frame) - 3
    assert sexes["male"]["mean_score"] == pytest.approx(score[sex == "male"].mean())

    # A numeric age column is banded, never grouped raw.
    assert "age" not in {row["attribute"] for row in report["groups"]}
    bands = _rows(report, "age_band")
    assert {g: r["n"] for g, r in bands.items()} == {
        g: int((band == g).sum()) for g in ("<=60", ">60")}

    cross = _rows(report, "sex×age_band")
    assert cross["female & >60"]["n"] == int(((sex == "female") & (band == ">60")).sum())
    assert cross["female & >60"]["metric"] == pytest.approx(
        metric[(sex == "female") & (band == ">60")].mean())

    gaps = report["gaps"]
    assert set(gaps) == {"ea", "dp:sex", "eo:sex", "dp:age_band", "eo:age_band"}
    assert gaps["ea"] == pytest.approx(_gap(metric, site))
    assert gaps["dp:sex"] == pytest.approx(_gap(score, sex))
    assert gaps["eo:sex"] == pytest.approx(_gap(score[positive], sex[positive]))
    assert gaps["dp:age_band"] == pytest.approx(_gap(score, band))
    assert set(report["definitions"]) == set(gaps)

    warnings = " | ".join(report["warnings"])
    assert "3 of 48 samples have no sex" in warnings
    assert "2 of 48 samples have no age_band" in warnings
    small = [r for r in report["groups"] if r["n"] < 10]
    assert small and all(r["small"] for r in small)
    assert all(f"{r['attribute']}={r['group']} has only {r['n']}" in warnings for r in small)
    json.dumps(report, allow_nan=False)  # strict JSON: no NaN anywhere


def test_segmentation_report_has_ea_only_and_respects_age_edges():
    frame = _segmentation_predictions()
    report = build_run_report(frame, kind="segmentation", attributes=["sex", "age"],
                          primary_metric="dice", age_edges=(40, 60), n_boot=200,
                          intersections=False)
    metric = frame["metric"].to_numpy()
    assert list(report["gaps"]) == ["ea"]
    assert report["gaps"]["ea"] == pytest.approx(_gap(metric, frame["site"].to_numpy()))
    assert "positive_rate" not in report["groups"][0]
    bands = _rows(report, "age_band")
    ages = frame["age"].to_numpy()
    assert bands["40-60"]["n"] == int(((ages > 40) & (ages <= 60)).sum())
    assert set(bands) <= {"<=40", "40-60", ">60"}
    assert not any("×" in row["attribute"] for row in report["groups"])
    # The small site (6 images < 10) is flagged.
    assert _rows(report, "site")["site-c"]["small"] is True


def test_build_report_rejects_bad_input():
    frame = _classification_predictions()
    with pytest.raises(ValueError, match="kind"):
        build_run_report(frame, kind="detection", attributes=[], primary_metric="x")
    with pytest.raises(ValueError, match="score"):
        build_run_report(frame.drop(columns="score"), kind="classification", attributes=[],
                     primary_metric="accuracy")


# ---- write_reports and the HTML ----------------------------------------------------------------
def test_write_reports_writes_self_contained_html(tmp_path):
    frame = _classification_predictions()
    run_dir = _write_run_dir(tmp_path / "run", frame)
    paths = write_reports(run_dir, n_boot=200)
    assert {p.name for p in paths.values()} == {"report.json", "report.md", "report.html"}
    report = json.loads(paths["json"].read_text())
    assert report == build_run_report(frame, kind="classification",
                                  attributes=["sex", "age", "age_band"], primary_metric="accuracy",
                                  n_boot=200)

    html = paths["html"].read_text()
    site_a = _rows(report, "site")["site-a"]
    assert re.search(rf"<td>site</td><td>site-a</td>\s*<td class=\"num\">{site_a['n']}</td>"
                     rf"<td class=\"num\">{site_a['metric']:.4f}</td>", html)
    assert "<td>sex×age_band</td><td>female &amp; &gt;60</td>" in html
    for gap in ("ea", "dp:sex", "eo:sex", "dp:age_band"):
        assert f"<code>{gap}</code>" in html
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(images) >= 5  # one chart per attribute (4) + training curves
    assert not re.search(r"(src|href)\s*=\s*[\"']?\s*https?://", html, flags=re.I)
    assert "http://" not in html and "https://" not in html
    assert "flexfair" in html and "<td class=\"num\">2</td>" in html  # config and round 2

    markdown = paths["markdown"].read_text()
    assert "| `ea` |" in markdown and f"| site | site-a | {site_a['n']} |" in markdown
    assert "## Per-round metrics" in markdown
    # Definitions contain |x|; escaped, every gap row still has exactly four cells.
    gap_lines = [line for line in markdown.splitlines() if line.startswith("| `")]
    assert len(gap_lines) == len(report["gaps"])
    assert all(len(re.findall(r"(?<!\\)\|", line)) == 5 for line in gap_lines)


def test_write_reports_renders_existing_report_without_predictions(tmp_path):
    run_dir = _write_run_dir(tmp_path / "run", _segmentation_predictions(), task="synthetic-seg")
    first = json.loads(write_reports(run_dir, n_boot=100)["json"].read_text())
    assert first["kind"] == "segmentation" and first["primary_metric"] == "dice"
    (run_dir / "predictions.csv").unlink()  # federated case: predictions stayed at the sites
    (run_dir / "report.html").unlink()
    paths = write_reports(run_dir)
    assert json.loads(paths["json"].read_text()) == first
    assert "data:image/png;base64," in paths["html"].read_text()


def test_write_reports_errors_on_invalid_run_dir(tmp_path):
    with pytest.raises(RunDirectoryError, match="does not exist"):
        write_reports(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunDirectoryError, match="neither predictions.csv nor report.json"):
        write_reports(tmp_path / "empty")


# ---- CLI -----------------------------------------------------------------------------------------
def _app() -> typer.Typer:
    app = typer.Typer()
    register(app)

    @app.command("noop")
    def noop() -> None:  # a second command so Typer keeps "report" as a sub-command name
        pass

    return app


def test_cli_report_writes_files_and_prints_table(tmp_path):
    run_dir = _write_run_dir(tmp_path / "run", _classification_predictions())
    result = CliRunner().invoke(_app(), ["report", str(run_dir), "--min-group-size", "5",
                                         "--age-edges", "40,60"])
    assert result.exit_code == 0, result.output
    assert "site-a" in result.output and "report.html" in result.output
    report = json.loads((run_dir / "report.json").read_text())
    assert report["settings"]["min_group_size"] == 5
    assert {"<=40", "40-60", ">60"} == set(_rows(report, "age_band"))


@pytest.mark.parametrize("make_args", [
    lambda tmp: [str(tmp / "missing-run")],
    lambda tmp: [str(tmp)],  # exists but is not a run directory
    lambda tmp: [str(_write_run_dir(tmp / "run", _classification_predictions())), "--age-edges", "old"],
])
def test_cli_report_invalid_input_exits_1_with_one_line(tmp_path, make_args):
    result = CliRunner().invoke(_app(), ["report", *make_args(tmp_path)])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert result.exception is None or isinstance(result.exception, SystemExit)
