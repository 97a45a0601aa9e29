"""``fedfair-med report --model … --manifest …``: auditing a model on one hospital's own data.

Nothing is trained: a tiny untrained network for the real ``skin`` task is saved as a state dict
and audited on 12 HAM10000 images through a hand-written manifest. Group sizes are counted from
the manifest, group accuracies recomputed from predictions.csv, and every score recomputed by
running the saved weights on the images read with Pillow — independently of the task's
MONAI transforms.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import typer
import yaml
from PIL import Image
from typer.testing import CliRunner

from fedfair_med.cli.report_commands import register
from fedfair_med.tasks import build_task

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

SHARED = Path(os.environ.get("FEDFAIR_SHARED_DATA",
                             Path(__file__).resolve().parents[2] / "shared" / "data"))
HAM = SHARED / "ham10000"
needs_ham = pytest.mark.skipif(not (HAM / "HAM10000_metadata.csv").is_file(),
                               reason=f"HAM10000 not found under {SHARED}")

MALIGNANT = ("mel", "bcc", "akiec")
IMAGE_SIZE = 32
WIDTH = 4
#: Test rows per (sex, age band) with edges 40, 60: some cells are deliberately tiny.
CELLS = {("male", ">60"): 3, ("female", ">60"): 2, ("male", "40-60"): 2,
         ("female", "<=40"): 2, ("male", "<=40"): 1}


def _band(age: float) -> str:
    return "<=40" if age <= 40 else ("40-60" if age <= 60 else ">60")


def _app() -> typer.Typer:
    app = typer.Typer()
    register(app)

    @app.command("noop")
    def noop() -> None:  # a second command so Typer keeps "report" as a sub-command name
        pass

    return app


def _invoke(*args: str):
    return CliRunner().invoke(_app(), ["report", *map(str, args)])


def _chosen_rows() -> tuple[list[dict], list[dict]]:
    """(train rows, test rows) of HAM10000 metadata filling :data:`CELLS`, one malignant >60 male."""
    with open(HAM / "HAM10000_metadata.csv", newline="") as handle:
        meta = sorted(csv.DictReader(handle), key=lambda r: r["image_id"])
    known = [r for r in meta if r["age"] and r["sex"] in ("male", "female")]
    test: list[dict] = []
    for (sex, band), count in CELLS.items():
        cell = [r for r in known if r["sex"] == sex and _band(float(r["age"])) == band]
        if (sex, band) == ("male", ">60"):
            cell = [r for r in cell if r["dx"] in MALIGNANT][:1] + [r for r in cell if r["dx"] == "nv"]
        test += cell[:count]
    used = {r["image_id"] for r in test}
    train = [r for r in known if r["image_id"] not in used][:2]
    return train, test


def _write_manifest(path: Path, rows_by_split: dict[str, list[dict]]) -> Path:
    """A manifest typed as a data manager would, pointing at the shared images where they lie."""
    lines = ["# site: hospital-audit", "id,image,label,split,sex,age"]
    for split, rows in rows_by_split.items():
        for r in rows:
            image = HAM / "images_200x150" / f"{r['image_id']}.jpg"
            lines.append(f"{r['image_id']},{image},{r['dx']},{split},{r['sex'][0].upper()},{r['age']}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _save_tiny_model(path: Path, width: int = WIDTH, seed: int = 3) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_task("skin").build_model("small_cnn", width=width)
    # Non-zero BatchNorm statistics, so the saved buffers matter for the scores.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    torch.save(model.state_dict(), path)
    return model.eval()


def _run_yaml(path: Path) -> Path:
    """The fields of a run directory's run.yaml the audit reads (plus ones it must ignore)."""
    path.write_text(yaml.safe_dump({
        "task": "skin", "method": "flexfair", "network": "small_cnn",
        "network_kwargs": {"width": WIDTH}, "seed": 0,
        "data": {"manifests": ["elsewhere/train.csv"], "image_size": IMAGE_SIZE,
                 "class_weights": "balanced"},
    }), encoding="utf-8")
    return path


def _pillow_scores(model: torch.nn.Module, image_ids: list[str]) -> np.ndarray:
    """P(malignant) per image: Pillow → [0, 1] → area resize → network → softmax."""
    images = []
    for image_id in image_ids:
        pixels = np.asarray(Image.open(HAM / "images_200x150" / f"{image_id}.jpg").convert("RGB"))
        tensor = torch.from_numpy(pixels.astype(np.float32) / 255.0).permute(2, 0, 1)
        images.append(F.interpolate(tensor[None], size=(IMAGE_SIZE, IMAGE_SIZE), mode="area")[0])
    with torch.no_grad():
        return torch.softmax(model(torch.stack(images)), dim=1)[:, 1].numpy()


def _rows(report: dict, attribute: str) -> dict[str, dict]:
    return {row["group"]: row for row in report["groups"] if row["attribute"] == attribute}


@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One audit through the CLI on a full site manifest (train and test rows)."""
    if not (HAM / "HAM10000_metadata.csv").is_file():
        pytest.skip(f"HAM10000 not found under {SHARED}")
    root = tmp_path_factory.mktemp("audit")
    train, test = _chosen_rows()
    manifest = _write_manifest(root / "hospital" / "site.csv", {"train": train, "test": test})
    model = _save_tiny_model(root / "model.pt")
    out = root / "out"
    result = _invoke("--model", root / "model.pt", "--manifest", manifest, "--task", "skin",
                     "--run-yaml", _run_yaml(root / "run.yaml"), "--age-edges", "40,60",
                     "--min-group-size", "3", "--out", out)
    assert result.exit_code == 0, result.output
    return {"root": root, "test": test, "model": model, "out": out, "output": result.output,
            "manifest": manifest,
            "report": json.loads((out / "report.json").read_text()),
            "predictions": pd.read_csv(out / "predictions.csv", dtype={"id": str})}


@needs_ham
def test_audit_group_sizes_match_the_manifest(audited: dict) -> None:
    report, test = audited["report"], audited["test"]
    assert report["overall"]["n"] == len(test) == 10
    assert _rows(report, "site")["hospital-audit"]["n"] == len(test)
    sexes = pd.Series([r["sex"] for r in test]).value_counts().to_dict()
    assert {g: row["n"] for g, row in _rows(report, "sex").items()} == sexes
    bands = pd.Series([_band(float(r["age"])) for r in test]).value_counts().to_dict()
    assert {g: row["n"] for g, row in _rows(report, "age_band").items()} == bands
    cells = {f"{sex} & {band}": n for (sex, band), n in CELLS.items()}
    assert {g: row["n"] for g, row in _rows(report, "sex×age_band").items()} == cells
    assert report["settings"]["age_edges"] == [40.0, 60.0]


@needs_ham
def test_audit_flags_small_groups_with_a_warning(audited: dict) -> None:
    report = audited["report"]
    small = {(row["attribute"], row["group"]) for row in report["groups"] if row["small"]}
    expected = {("sex×age_band", f"{sex} & {band}") for (sex, band), n in CELLS.items() if n < 3}
    expected.add(("age_band", "40-60"))  # 2 samples; <=40 has 3, >60 has 5
    assert small == expected
    printed = " ".join(audited["output"].split())  # Rich wraps long warnings
    for attribute, group in small:
        assert any(f"{attribute}={group} has only" in w for w in report["warnings"])
        assert f"warning: {attribute}={group} has only" in printed
    html = (audited["out"] / "report.html").read_text()
    assert html.count('<tr class="small">') == len(small)


@needs_ham
def test_audit_metrics_recompute_from_predictions_and_the_weights(audited: dict) -> None:
    report, predictions, test = audited["report"], audited["predictions"], audited["test"]
    by_id = {r["image_id"]: r for r in test}
    assert sorted(predictions["id"]) == sorted(by_id)
    assert (predictions["site"] == "hospital-audit").all()
    # Labels come from the manifest's diagnoses; metric is correctness of the 0.5 decision.
    truth = predictions["id"].map(lambda i: int(by_id[i]["dx"] in MALIGNANT))
    assert (predictions["y_true"] == truth).all() and truth.sum() >= 1
    assert (predictions["y_pred"] == (predictions["score"] >= 0.5).astype(int)).all()
    correct = (predictions["y_pred"] == predictions["y_true"]).astype(float)
    assert np.array_equal(predictions["metric"].to_numpy(), correct.to_numpy())
    # Scores are those of the saved weights on the real images (read here with Pillow).
    expected = _pillow_scores(audited["model"], list(predictions["id"]))
    np.testing.assert_allclose(predictions["score"].to_numpy(), expected, atol=1e-5)
    # Every group's accuracy is the mean correctness of its rows.
    sex = predictions["id"].map(lambda i: by_id[i]["sex"])
    band = predictions["id"].map(lambda i: _band(float(by_id[i]["age"])))
    for attribute, labels in (("sex", sex), ("age_band", band), ("sex×age_band", sex + " & " + band)):
        for group, row in _rows(report, attribute).items():
            assert row["metric"] == pytest.approx(correct[labels == group].mean()), (attribute, group)
            assert row["mean_score"] == pytest.approx(predictions["score"][labels == group].mean())
    assert report["overall"]["metric"] == pytest.approx(correct.mean())
    # DP over sex: the largest distance of a sex's mean score from the pooled mean score.
    score = predictions["score"]
    dp = max(abs(score[sex == s].mean() - score.mean()) for s in ("female", "male"))
    assert report["gaps"]["dp:sex"] == pytest.approx(dp)


@needs_ham
def test_audit_records_the_model_and_run_settings(audited: dict) -> None:
    html = (audited["out"] / "report.html").read_text()
    markdown = (audited["out"] / "report.md").read_text()
    assert "<td>sex×age_band</td><td>male &amp; &gt;60</td>" in html
    assert "src=\"data:image/png;base64," in html
    for text in (markdown, html):
        assert "model_sha256" in text and "hospital-audit" in text and "flexfair" in text
    assert "class_weights" not in markdown  # a training-only option is not applied to the audit


@needs_ham
def test_audit_only_manifest_scores_every_row_like_a_full_site(audited: dict, tmp_path: Path) -> None:
    """A manifest with only test rows is audited too, with the same scores per image."""
    manifest = _write_manifest(tmp_path / "audit-only.csv", {"test": audited["test"]})
    result = _invoke("--model", audited["root"] / "model.pt", "--manifest", manifest,
                     "--run-yaml", audited["root"] / "run.yaml", "--attribute", "sex",
                     "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert {row["attribute"] for row in report["groups"]} == {"site", "sex"}
    again = pd.read_csv(tmp_path / "out" / "predictions.csv", dtype={"id": str}).set_index("id")
    first = audited["predictions"].set_index("id")
    np.testing.assert_allclose(again.loc[first.index, "score"], first["score"], atol=1e-12)


@needs_ham
def test_audit_default_out_dir_is_named_after_the_model_and_the_site(audited: dict, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = _invoke("--model", audited["root"] / "model.pt", "--manifest", audited["manifest"],
                     "--run-yaml", audited["root"] / "run.yaml", "--attribute", "age")
    assert result.exit_code == 0, result.output
    # audit-<model's run folder>-<manifest stem> (or its folder, for importers' manifest.csv)
    report = json.loads((tmp_path / f"audit-{audited['root'].name}-site" / "report.json").read_text())
    assert set(_rows(report, "age_band")) == {"<=60", ">60"}  # the default edge


@needs_ham
def test_auditing_a_runs_model_reproduces_the_runs_predictions(audited: dict, tmp_path: Path) -> None:
    """Two SGD steps of a real run, then its model.pt audited on its site: the same rows."""
    from fedfair_med.config import RunConfig
    from fedfair_med.runtime.local import run_simulation

    config = RunConfig(name="audit-source", task="skin", rounds=1, max_steps=2, batch_size=4,
                       network="small_cnn", network_kwargs={"width": WIDTH},
                       data={"manifests": [str(audited["manifest"])], "image_size": IMAGE_SIZE})
    run = run_simulation(config, tmp_path / "run").path
    result = _invoke("--model", run / "model.pt", "--run-yaml", run / "run.yaml",
                     "--manifest", audited["manifest"], "--out", tmp_path / "audit")
    assert result.exit_code == 0, result.output
    audit = pd.read_csv(tmp_path / "audit" / "predictions.csv", dtype={"id": str}).set_index("id")
    original = pd.read_csv(run / "predictions.csv", dtype={"id": str}).set_index("id")
    assert sorted(audit.index) == sorted(original.index)
    pd.testing.assert_frame_equal(audit.loc[original.index], original)


# ---- errors: one line, exit 1, no traceback ------------------------------------------------------
def _assert_clean_error(result, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert result.output.startswith("error: ")
    assert result.exception is None or isinstance(result.exception, SystemExit)
    for fragment in fragments:
        assert fragment in result.output, result.output


@needs_ham
def test_weights_of_another_network_width_give_one_clear_error(audited: dict) -> None:
    # The file holds width-4 tensors; without --run-yaml the default small_cnn is width 16.
    result = _invoke("--model", audited["root"] / "model.pt", "--manifest", audited["manifest"],
                     "--task", "skin", "--network", "small_cnn")
    _assert_clean_error(result, "does not match network 'small_cnn'", "of another shape",
                        "--run-yaml")
    assert len(result.output.strip().splitlines()) == 1


@needs_ham
def test_weights_of_another_architecture_give_one_clear_error(audited: dict, tmp_path: Path) -> None:
    torch.save(build_task("polyp").build_model("unet", channels=(4, 8)).state_dict(),
               tmp_path / "unet.pt")
    result = _invoke("--model", tmp_path / "unet.pt", "--manifest", audited["manifest"],
                     "--run-yaml", audited["root"] / "run.yaml")
    _assert_clean_error(result, "missing from the file", "not in the network")


def test_missing_manifest_and_unreadable_weights(tmp_path: Path) -> None:
    weights = tmp_path / "model.pt"
    torch.save(build_task("skin").build_model("small_cnn", width=WIDTH).state_dict(), weights)
    _assert_clean_error(_invoke("--model", weights, "--manifest", tmp_path / "nope.csv",
                                "--task", "skin", "--network", "small_cnn"),
                        "nope.csv does not exist")
    manifest = tmp_path / "site.csv"  # exists; the weights are read before it is parsed
    manifest.write_text("id,image,label,split\n", encoding="utf-8")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    _assert_clean_error(_invoke("--model", tmp_path / "junk.pt", "--manifest", manifest,
                                "--task", "skin"), "is not a PyTorch state dict")
    _assert_clean_error(_invoke("--model", tmp_path / "absent.pt", "--manifest", manifest,
                                "--task", "skin"), "absent.pt does not exist")
    _assert_clean_error(_invoke("--model", weights, "--manifest", tmp_path / "x.csv"),
                        "--task is required")
    _assert_clean_error(_invoke("--model", weights, "--manifest", manifest,
                                "--task", "synthetic-cls"), "has no site manifests")


@needs_ham
def test_unknown_attribute_and_empty_split_are_refused(audited: dict) -> None:
    common = ["--model", audited["root"] / "model.pt", "--manifest", audited["manifest"],
              "--run-yaml", audited["root"] / "run.yaml"]
    _assert_clean_error(_invoke(*common, "--attribute", "ethnicity"),
                        "'ethnicity'", "its attributes are sex, age")
    _assert_clean_error(_invoke(*common, "--split", "val"), "no 'val' rows")


@pytest.mark.parametrize("args, fragment", [
    ([], "give a run directory"),
    (["--model", "m.pt"], "needs both --model and --manifest (missing --manifest)"),
    (["--manifest", "s.csv"], "(missing --model)"),
    (["RUN", "--model", "m.pt", "--manifest", "s.csv"], "not both"),
    (["RUN", "--task", "skin"], "--task only apply to a model audit"),
])
def test_run_dir_and_model_are_exclusive(tmp_path: Path, args: list[str], fragment: str) -> None:
    args = [str(tmp_path) if a == "RUN" else a for a in args]
    _assert_clean_error(_invoke(*args), fragment)
