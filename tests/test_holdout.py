"""Leave one site out (issue 16, item 6): ``holdout:`` in a sweep file.

Real parts: three tiny polyp sites (PNG images and masks written with Pillow, real manifests),
real training through the sweep runner (1 round, 1 local step, a 4/8-channel MONAI UNet at
16²), the real ``fedfair-med report --model`` CLI to compare the fold audits against, and the
real results renderer.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import typer
import yaml
from typer.testing import CliRunner

from fedfair_med.experiments import holdout as holdout_module
from fedfair_med.experiments.plan import HOLDOUT_FILE, is_finished
from fedfair_med.experiments.results import collect, has_summary, load_study, render_section
from fedfair_med.experiments.sweep import SweepError, load_sweep, plan_status, run_sweep
from fixtures_data import segmentation_site

torch.set_num_threads(1)
SITES = ("site-a", "site-b", "site-c")


def _sites(root: Path) -> list[str]:
    manifests = []
    for name in SITES:
        path = segmentation_site(root / name, n_train=3, n_test=2, name="manifest.csv")
        path.write_text(path.read_text().replace("# site: hospital-a", f"# site: hospital-{name[-1]}"))
        manifests.append(str(path))
    return manifests


def _study(manifests: list[str], **extra) -> dict:
    return {
        "name": "loso",
        "base": {"task": "polyp", "rounds": 1, "max_steps": 1, "batch_size": 2,
                 "network": "unet", "network_kwargs": {"channels": [4, 8], "strides": [2]},
                 "data": {"manifests": manifests, "image_size": 16}},
        "seeds": [0],
        "holdout": "all",
        "methods": {"fedavg": {"method": "fedavg"},
                    "flexfair": {"method": "flexfair", "fixed": {"lam": 1.0}}},
        **extra,
    }


# ---- planning (no training) ------------------------------------------------------------------
def test_plan_leaves_each_site_out_of_its_folds_training(tmp_path: Path) -> None:
    manifests = [f"sites/{name}/manifest.csv" for name in SITES]
    sweep = load_sweep(_study(manifests, seeds=[0, 1]))
    assert sweep.holdout == dict(zip(SITES, manifests))
    assert len(sweep.runs) == 2 * 3 * 2
    assert {r.relpath for r in sweep.runs if r.label == "fedavg" and r.seed == 1} == {
        f"runs/fedavg/holdout={s}/seed-1" for s in SITES}
    for run in sweep.runs:
        trained = run.config.data["manifests"]
        assert run.holdout not in trained and len(trained) == 2
        assert run.holdout == manifests[SITES.index(run.fold)]
    # A subset of sites, and a grid: the fold leads the setting folder.
    grid = _study(manifests, holdout=["site-b"])
    grid["methods"]["flexfair"] = {"method": "flexfair", "grid": {"lam": [0.5, 2.0]}}
    relpaths = sorted(r.relpath for r in load_sweep(grid).runs)
    assert relpaths == ["runs/fedavg/holdout=site-b/seed-0",
                        "runs/flexfair/holdout=site-b,lam=0.5/seed-0",
                        "runs/flexfair/holdout=site-b,lam=2.0/seed-0"]


@pytest.mark.parametrize("change, fragment", [
    ({"holdout": ["site-z"]}, "'all' or a list of sites among"),
    ({"base": {"task": "polyp", "data": {"manifests": ["sites/a/manifest.csv"]}}}, "at least two sites"),
    ({"base": {"task": "polyp", "data": {"manifests": ["a/manifest.csv", "b/a.csv"]}}}, "same site name"),
    ({"methods": {"fedavg": {"method": "fedavg", "settings": {"data": {"image_size": 8}}}}},
     "data is set per fold"),
])
def test_bad_holdout_studies_are_refused_before_anything_runs(change: dict, fragment: str) -> None:
    study = _study([f"sites/{name}/manifest.csv" for name in SITES])
    study.update(change)
    with pytest.raises(SweepError, match="holdout|settings") as error:
        load_sweep(study)
    assert fragment in str(error.value)


# ---- a real study: train, audit, interrupt, resume, render --------------------------------------
@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tiny study run once with one fold's audit failing, then resumed."""
    root = tmp_path_factory.mktemp("loso")
    manifests = _sites(root / "sites")
    (root / "loso.yaml").write_text(yaml.safe_dump(_study(manifests), sort_keys=False))
    sweep = load_sweep(root / "loso.yaml")
    results = root / "results" / "loso"
    real_audit = holdout_module.audit_fold
    broken = "runs/flexfair/holdout=site-c/seed-0"

    def audit_dies_once(run_dir, manifest, *args, **kwargs):
        if Path(run_dir).parent.parent.name == "flexfair" and "site-c" in str(run_dir):
            raise RuntimeError("killed during the held-out audit")
        return real_audit(run_dir, manifest, *args, **kwargs)

    holdout_module.audit_fold = audit_dies_once
    try:
        with pytest.raises(SweepError, match="1 run\\(s\\) failed"):
            run_sweep(sweep, root / "out", results=results)
    finally:
        holdout_module.audit_fold = real_audit
    interrupted = {
        "partial": sorted(p.name for p in (root / "out" / "runs/flexfair/holdout=site-c").iterdir()),
        "page": render_section(root / "results"),
        "status": plan_status(sweep, root / "out", results),
    }
    resumed = run_sweep(sweep, root / "out", results=results)
    return {"root": root, "sweep": sweep, "manifests": manifests, "results": results,
            "interrupted": interrupted, "resumed": resumed, "broken": broken}


def test_held_out_site_never_trains(study: dict) -> None:
    for run in study["sweep"].runs:
        summary = run.summary_path(study["results"])
        config = yaml.safe_load((summary / "run.yaml").read_text())
        audit = json.loads((summary / HOLDOUT_FILE).read_text())
        held_out = f"hospital-{run.fold[-1]}"
        assert config["data"]["manifests"] == [m for m in study["manifests"] if m != run.holdout]
        assert config["resolved"]["sites"] == [f"hospital-{s[-1]}" for s in SITES if s != run.fold]
        assert audit["holdout"]["site"] == held_out
        assert audit["holdout"]["training_sites"] == config["resolved"]["sites"]
        assert [g["group"] for g in audit["groups"] if g["attribute"] == "site"] == [held_out]
        assert audit["overall"]["n"] == 2  # the held-out site's two test rows


def test_fold_audit_equals_report_model_on_the_held_out_site(study: dict, tmp_path: Path) -> None:
    from fedfair_med.cli.report_commands import register

    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)  # keeps "report" a sub-command
    for run in study["sweep"].runs:
        if run.label != "fedavg":
            continue
        run_dir = run.path(study["root"] / "out")
        out = tmp_path / run.fold
        result = CliRunner().invoke(app, ["report", "--model", str(run_dir / "model.pt"),
                                          "--run-yaml", str(run_dir / "run.yaml"),
                                          "--manifest", run.holdout, "--out", str(out)])
        assert result.exit_code == 0, result.output
        cli = json.loads((out / "report.json").read_text())
        fold = json.loads((run.summary_path(study["results"]) / HOLDOUT_FILE).read_text())
        assert {k: v for k, v in fold.items() if k != "holdout"} == cli


def test_an_interrupted_fold_is_visibly_unfinished_and_the_resume_redoes_only_it(study: dict) -> None:
    interrupted = study["interrupted"]
    # Trained, not audited: still the .partial folder, model and report but no holdout.json.
    assert interrupted["partial"] == ["seed-0.partial"]
    assert [r.relpath for r in interrupted["status"].to_run] == [study["broken"]]
    page = interrupted["page"]
    assert "**5 of 6 planned fold runs finished**" in page
    assert "**Not finished (not counted above):** `flexfair/holdout=site-c/seed-0`." in page
    assert "| hospital-c | flexfair |" not in page and "| hospital-c | fedavg |" in page
    resumed = study["resumed"]
    assert [r.relpath for r in resumed.executed] == [study["broken"]] and len(resumed.skipped) == 5
    assert set(resumed.outputs) == {"holdout.csv", "holdout.md"}


def test_a_fold_without_its_audit_is_not_finished(study: dict, tmp_path: Path) -> None:
    run = study["sweep"].runs[0]
    copy = tmp_path / "runs" / run.label / run.point / "seed-0"
    shutil.copytree(run.path(study["root"] / "out"), copy)
    assert is_finished(copy)
    (copy / HOLDOUT_FILE).unlink()
    assert not is_finished(copy) and not has_summary(copy)
    # collect copies each finished fold's audit with its summary, and skips the rest.
    (tmp_path / "sweep.yaml").write_text((study["root"] / "out" / "sweep.yaml").read_text())
    assert collect(tmp_path, tmp_path / "collected") == []
    written = collect(study["root"] / "out", tmp_path / "collected")
    assert len(written) == 6 and all((p / HOLDOUT_FILE).is_file() for p in written)


def test_generated_page_tabulates_each_fold_from_the_summaries(study: dict) -> None:
    page = render_section(study["root"] / "results")
    loaded = load_study(study["results"])
    assert (loaded.finished, loaded.planned) == (6, 6)
    assert "### Study `loso`: leave one site out" in page
    assert "**6 of 6 planned fold runs finished**" in page and "Not finished" not in page
    for run in study["sweep"].runs:
        summary = run.summary_path(study["results"])
        audit = json.loads((summary / HOLDOUT_FILE).read_text())
        last = json.loads((summary / "metrics.jsonl").read_text().splitlines()[-1])
        low, high = audit["overall"]["ci95"]
        held = audit["overall"]["metric"]
        row = (f"| hospital-{run.fold[-1]} | {run.label} | default | 1 | {last['metric']:.3f} | "
               f"{held:.3f} [{low:.3f}, {high:.3f}] | {held - last['metric']:.3f} |")
        assert row in page, row
    # Per-group results of the held-out site, and its gaps over sex and age band (not the
    # one-site EA over sites, always 0).
    assert "EA:SEX gap (held-out) ↓ | EA:AGE_BAND gap (held-out) ↓ |" in page
    assert "| sex=female | sex=male |" in page


@pytest.mark.parametrize("name, folds", [("skin-loso", 4), ("mri-loso", 3)])
def test_shipped_leave_one_site_out_studies_plan_every_fold(name: str, folds: int) -> None:
    sweep = load_sweep(Path(__file__).resolve().parents[1] / "configs" / "study" / f"{name}.yaml")
    assert len(sweep.holdout) == folds and set(sweep.methods) == {"fedavg", "flexfair"}
    assert len(sweep.runs) == folds * 2 * len(sweep.seeds)
    for run in sweep.runs:
        assert run.config.data["manifests"] == [m for m in sweep.base["data"]["manifests"]
                                                if m != run.holdout]


def test_sweep_command_resumes_a_finished_study_from_its_summaries(study: dict, tmp_path: Path) -> None:
    """A fresh checkout: `fedfair-med sweep --results` trains nothing and prints the fold table."""
    from fedfair_med.cli.main import app

    runner = CliRunner()
    source = str(study["root"] / "loso.yaml")
    plan = runner.invoke(app, ["sweep", source, "--out", str(tmp_path / "out"),
                               "--results", str(study["results"]), "--dry-run"])
    assert plan.exit_code == 0, plan.output
    assert "6 runs planned" in plan.output and "6 already finished, 0 to run" in plan.output
    result = runner.invoke(app, ["sweep", source, "--out", str(tmp_path / "out"),
                                 "--results", str(study["results"])])
    assert result.exit_code == 0, result.output
    assert "ran 0 run(s), skipped 6 already finished" in result.output
    assert "| hospital-b | flexfair | default | 1 |" in result.output
    assert not list((tmp_path / "out" / "runs").rglob("model.pt"))


def _write_fold(folder: Path, *, federation: float, held: float, ci: list, auc: float, dp: float,
                dp_ci: list, decision: float, female: float) -> None:
    folder.mkdir(parents=True)
    (folder / "run.yaml").write_text(yaml.safe_dump({"task": "skin", "resolved": {
        "kind": "classification", "primary_metric": "accuracy", "sites": ["hospital-x"]}}))
    (folder / "metrics.jsonl").write_text(json.dumps({"round": 1, "metric": 0.1}) + "\n"
                                          + json.dumps({"round": 2, "metric": federation}) + "\n")
    (folder / "report.json").write_text("{}")
    (folder / HOLDOUT_FILE).write_text(json.dumps({
        "holdout": {"fold": folder.parent.name, "site": "hospital-" + folder.parent.name[-1],
                    "training_sites": ["hospital-x"]},
        "primary_metric": "accuracy", "kind": "classification",
        "overall": {"n": 40, "metric": held, "ci95": ci, "auc": auc, "ece": 0.1},
        "groups": [{"attribute": "site", "group": "x", "n": 40, "metric": held},
                   {"attribute": "sex", "group": "female", "n": 20, "metric": female, "auc": auc},
                   {"attribute": "sex×age_band", "group": "female & >60", "n": 5, "metric": 0.0}],
        "gaps": {"ea": 0.0, "dp:sex": dp}, "gaps_ci95": {"ea": [None, None], "dp:sex": dp_ci},
        "decision_gaps": {"dp:sex": decision}}))


def test_fold_table_known_answer_seeds_intervals_and_classification_quality(tmp_path: Path) -> None:
    """Hand-written summaries: mean ± std over seeds, one seed's interval, AUC and the missing run."""
    root = tmp_path / "results" / "skin-loso"
    root.mkdir(parents=True)
    (root / "sweep.yaml").write_text(yaml.safe_dump({
        "name": "skin-loso", "base": {"task": "skin", "rounds": 2}, "seeds": [0, 1],
        "methods": {"fedavg": {"method": "fedavg"}},
        "holdout": {"site-a": "s/site-a/manifest.csv", "site-b": "s/site-b/manifest.csv"}}))
    _write_fold(root / "fedavg/holdout=site-a/seed-0", federation=0.8, held=0.7, ci=[0.5, 0.9],
                auc=0.75, dp=0.1, dp_ci=[0.0, 0.2], decision=0.2, female=0.6)
    _write_fold(root / "fedavg/holdout=site-a/seed-1", federation=0.7, held=0.6, ci=[0.4, 0.8],
                auc=0.65, dp=0.3, dp_ci=[0.1, 0.5], decision=0.4, female=0.4)
    _write_fold(root / "fedavg/holdout=site-b/seed-0", federation=0.9, held=0.55, ci=[0.4, 0.7],
                auc=0.6, dp=0.25, dp_ci=[0.05, 0.45], decision=0.1, female=0.5)
    shutil.copytree(root / "fedavg/holdout=site-b/seed-0", root / "fedavg/holdout=site-b/seed-1")
    (root / "fedavg/holdout=site-b/seed-1" / HOLDOUT_FILE).unlink()  # trained, never audited
    page = render_section(tmp_path / "results")
    assert "**3 of 4 planned fold runs finished**" in page
    assert ("| hospital-a | fedavg | default | 2 | 0.750 ± 0.071 | 0.650 ± 0.071 | -0.100 ± 0.000 "
            "| 0.200 ± 0.141 |") in page
    assert "| hospital-b | fedavg | default | 1 | 0.900 | 0.550 [0.400, 0.700] | -0.350 | 0.250 [0.050, 0.450] |" in page
    assert "| held-out site | method | setting | n | sex=female | AUC sex=female |" in page
    assert "| hospital-a | fedavg | default | 40 | 0.500 | 0.700 |" in page
    assert "| hospital-a | fedavg | default | 0.700 | 0.100 | 0.300 |" in page  # AUC, ECE, decisions
    assert "**Not finished (not counted above):** `fedavg/holdout=site-b/seed-1`." in page


def test_fold_table_without_gaps_has_as_many_header_cells_as_columns() -> None:
    """Sites with no sex or age (the derived MRI) have no held-out gap: no empty header cell."""
    frame = pd.DataFrame([{"fold": "a", "label": "fedavg", "point": "default", "site": "mri-site-a",
                           "metric_name": "dice", "federation_metric": 0.7, "heldout_metric": 0.8,
                           "heldout_lo": 0.75, "heldout_hi": 0.85, "drop": 0.1}])
    header, rule, row = holdout_module.holdout_tables(frame)[:3]
    assert header.count("|") == rule.count("|") == row.count("|") == 8
    assert header.endswith("| held-out − federation |")
