"""Committed run summaries: resuming a sweep from them, both protocols, the generated page.

The protocol tests write metrics.jsonl files by hand with known answers; the resume test runs a
real tiny sweep (2 rounds, 1 local step, data scale 0.25: about a second a run).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from fedfair_med.experiments.analysis import load_runs, paper_table, select_settings
from fedfair_med.experiments.results import (
    BEGIN,
    END,
    collect,
    has_summary,
    load_rounds,
    load_study,
    render_section,
    split_doc,
    study_markdown,
    top_k_protocol,
    update_doc,
)
from fedfair_med.experiments.sweep import Selection, SweepError, load_sweep, run_sweep

REPO = Path(__file__).resolve().parents[1]


# ---- constructed summaries with known answers ---------------------------------------------------
def _record(rnd: int, metric: float, gap: float, val_metric: float, val_gap: float) -> dict:
    return {"round": rnd, "metric": metric, "gaps": {"ea": gap},
            "val": {"metric": val_metric, "gaps": {"ea": val_gap}}}


def _summary(root: Path, label: str, method: str, point: str, params: dict, seed: int,
             records: list[dict]) -> None:
    folder = root / label / point / f"seed-{seed}"
    folder.mkdir(parents=True)
    (folder / "run.yaml").write_text(yaml.safe_dump({
        "task": "synthetic-seg", "method": method, "method_params": params, "seed": seed,
        "resolved": {"kind": "segmentation", "primary_metric": "dice"}}))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "report.json").write_text("{}")


@pytest.fixture
def constructed(tmp_path: Path) -> Path:
    """Study 'toy': FlexFair λ ∈ {1, 2} and FedAvg, seeds 0 and 1, two rounds each.

    Seed 0, FlexFair: λ=1 test (0.5, gap 0.1), (0.7, 0.3); λ=2 (0.6, 0.2), (0.9, 0.05).
    Seed 1, FlexFair: λ=1 (0.4, 0.1), (0.4, 0.2); λ=2 (0.3, 0.5), (0.4, 0.6).
    Validation at the last round: λ=1 val 0.8, gap 0.1 (score 0.7); λ=2 val 0.9, gap 0.3 (0.6).
    """
    root = tmp_path / "results" / "toy"
    root.mkdir(parents=True)
    (root / "sweep.yaml").write_text(yaml.safe_dump({
        "name": "toy", "base": {"task": "synthetic-seg", "rounds": 2}, "seeds": [0, 1],
        "methods": {"fedavg": {"method": "fedavg"},
                    "flexfair": {"method": "flexfair", "grid": {"lam": [1.0, 2.0]}}},
        "select": {"metric_weight": 1.0, "gap_weight": 1.0, "gap": "ea"}, "reference": "flexfair"}))
    test = {(0, 1.0): [(0.5, 0.1), (0.7, 0.3)], (0, 2.0): [(0.6, 0.2), (0.9, 0.05)],
            (1, 1.0): [(0.4, 0.1), (0.4, 0.2)], (1, 2.0): [(0.3, 0.5), (0.4, 0.6)]}
    val = {1.0: (0.8, 0.1), 2.0: (0.9, 0.3)}
    for (seed, lam), values in test.items():
        records = [_record(r + 1, m, g, *val[lam]) for r, (m, g) in enumerate(values)]
        _summary(root, "flexfair", "flexfair", f"lam={lam!r}", {"lam": lam}, seed, records)
    for seed, last in ((0, 0.6), (1, 0.5)):
        _summary(root, "fedavg", "fedavg", "default", {}, seed,
                 [_record(1, 0.2, 0.4, 0.5, 0.2), _record(2, last, 0.2, 0.7, 0.1)])
    return root


def test_paper_protocol_top_k_per_seed_known_answer(constructed: Path):
    study = load_study(constructed)
    table = top_k_protocol(load_rounds(study), "ea", k=2).set_index("label")
    # Seed 0: top-2 by dice are 0.9 (gap 0.05) and 0.7 (0.3): dice 0.8, gap 0.175.
    # Seed 1: three records tie at 0.4; rounds first, then setting: round 1 λ=1 (gap 0.1),
    # round 2 λ=1 (0.2) → dice 0.4, gap 0.15. Over seeds: dice 0.6 ± √0.08, gap 0.1625 ± …
    flex = table.loc["flexfair"]
    assert flex["n"] == 2 and flex["records"] == 2
    assert flex["metric_mean"] == pytest.approx(0.6)
    assert flex["metric_std"] == pytest.approx(math.sqrt(0.08))
    assert flex["gap_mean"] == pytest.approx(0.1625)
    assert flex["gap_std"] == pytest.approx(0.025 / math.sqrt(2))
    # FedAvg has one setting; k = 20 takes both of its rounds per seed.
    wide = top_k_protocol(load_rounds(study), "ea").set_index("label")
    assert wide.loc["fedavg", "records"] == 2
    assert wide.loc["fedavg", "metric_mean"] == pytest.approx(((0.2 + 0.6) / 2 + (0.2 + 0.5) / 2) / 2)
    with pytest.raises(ValueError):
        top_k_protocol(load_rounds(study), "ea", k=0)


def test_primary_protocol_selects_on_validation_and_reports_last_round_test(constructed: Path):
    study = load_study(constructed)
    assert (study.finished, study.planned) == (6, 6)
    runs = load_runs(study.sweep, constructed, summaries=True)
    chosen = select_settings(runs, study.sweep.selection).set_index("label")
    # λ=1 has the better validation score (0.7 vs 0.6) although λ=2 has the best test rounds.
    assert chosen.loc["flexfair", "point"] == "lam=1.0"
    table = paper_table(runs, chosen.reset_index(), "ea", "flexfair").set_index("label")
    assert table.loc["flexfair", "metric_mean"] == pytest.approx((0.7 + 0.4) / 2)
    assert table.loc["flexfair", "gap_mean"] == pytest.approx((0.3 + 0.2) / 2)
    assert table.loc["fedavg", "metric_mean"] == pytest.approx(0.55)
    text = render_section(constructed.parent, plots_link="plots")
    assert text.startswith(BEGIN) and text.rstrip().endswith(END)
    assert "| flexfair | lam=1.0 | 2 | 0.550 ± 0.212 |" in text  # protocol (a)
    assert "| flexfair | 2 | 20 |" not in text and "| flexfair | 2 | 4 | 0." in text  # protocol (b)
    assert "6 of 6 planned runs finished" in text and "; last round; 2 seeds." in text
    # Two rounds × settings cannot fill a top 20: the page says so rather than imply a best-of-20.
    assert "Fewer than 20 records per seed for fedavg, flexfair" in text


def test_incomplete_summaries_are_not_counted(constructed: Path):
    (constructed / "flexfair/lam=2.0/seed-1/metrics.jsonl").unlink()
    shutil.copytree(constructed / "fedavg/default/seed-0",
                    constructed / "fedavg/default/seed-2.partial")
    study = load_study(constructed)
    assert (study.finished, study.planned) == (5, 6)
    assert "5 of 6 planned runs finished" in render_section(constructed.parent)


def test_the_caption_counts_the_seeds_finished_not_those_planned(constructed: Path):
    """After a sitting of seed 0 only, the table is n = 1 per row: its caption must not say 2 seeds."""
    for seed_dir in list(constructed.rglob("seed-1")):
        shutil.rmtree(seed_dir)
    text = render_section(constructed.parent)
    assert "; last round; 1 of 2 planned seeds so far." in text and "2 seeds." not in text


def test_the_caption_says_when_rows_have_different_numbers_of_seeds(constructed: Path):
    """Mid-sitting, some arms have seed 1 and others not: the caption gives the range."""
    shutil.rmtree(constructed / "fedavg/default/seed-1")
    text = render_section(constructed.parent)
    assert "| fedavg | default | 1 |" in text
    assert "; last round; 1 to 2 seeds (each row's in column n)." in text


def test_update_doc_replaces_only_the_generated_block(tmp_path: Path):
    doc = tmp_path / "page.md"
    doc.write_text(f"# Title\n\nhand text\n\n{BEGIN}\nold\n{END}\n\n## After\n")
    section = f"{BEGIN}\nnew\n{END}\n"
    assert update_doc(doc, section) is True
    assert doc.read_text() == f"# Title\n\nhand text\n\n{section}\n## After\n"
    assert update_doc(doc, section) is False
    assert split_doc(doc.read_text())[1] == section


# ---- a real sweep resumed from its summaries on a "new machine" --------------------------------
TINY = {"name": "tiny", "base": {"task": "synthetic-seg", "rounds": 2, "max_steps": 1,
                                 "data": {"scale": 0.25}},
        "seeds": [0], "methods": {"fedavg": {"method": "fedavg"},
                                     "flexfair": {"method": "flexfair", "grid": {"lam": [1.0]}}}}


def test_sweep_writes_summaries_and_resumes_from_them_without_run_dirs(tmp_path: Path):
    sweep = load_sweep(TINY)
    results = tmp_path / "results" / "tiny"
    first = run_sweep(sweep, tmp_path / "machine-1", results=results)
    assert len(first.executed) == 2
    for run in sweep.runs:
        summary = run.summary_path(results)
        assert has_summary(summary)
        assert sorted(p.name for p in summary.iterdir()) == ["metrics.jsonl", "report.json", "run.yaml"]
        assert (summary / "metrics.jsonl").read_bytes() == (run.path(tmp_path / "machine-1") / "metrics.jsonl").read_bytes()
    # A fresh checkout: no run directories, only the committed summaries.
    shutil.rmtree(tmp_path / "machine-1")
    second = run_sweep(sweep, tmp_path / "machine-2", results=results)
    assert second.executed == [] and len(second.skipped) == 2
    table = (tmp_path / "machine-2" / "table.csv").read_text()
    assert "fedavg" in table and "flexfair" in table
    # A lost summary is the one run redone.
    shutil.rmtree(sweep.runs[0].summary_path(results))
    third = run_sweep(sweep, tmp_path / "machine-3", results=results)
    assert [r.relpath for r in third.executed] == [sweep.runs[0].relpath]
    assert has_summary(sweep.runs[0].summary_path(results))
    # collect: the same summaries from a run folder.
    copied = collect(tmp_path / "machine-3", tmp_path / "collected")
    assert len(copied) == 1 and (tmp_path / "collected" / "sweep.yaml").is_file()


def test_committed_results_page_matches_what_render_generates():
    """docs/results.md's generated block is exactly `fedfair-med results render`'s output."""
    from fedfair_med.cli.main import app

    # The committed example really is committed: every planned run has its summary (a layout
    # under a folder named runs/ would be git-ignored and vanish from a fresh checkout).
    example = load_study(REPO / "results" / "example")
    assert example.finished == example.planned == 6
    doc = REPO / "docs" / "results.md"
    expected = render_section(REPO / "results", plots_link="results/generated")
    actual = split_doc(doc.read_text())[1]
    assert actual == expected
    assert (REPO / "docs" / "results" / "generated" / "example-pareto.png").is_file()
    result = CliRunner().invoke(app, ["results", "render", str(REPO / "results"), "--doc", str(doc),
                                      "--check"])
    assert result.exit_code == 0, result.output


def test_classification_study_shows_auc_calibration_and_decision_gaps(tmp_path: Path):
    """A skin-like study: the page shows, at each selected setting, what the DP gap could hide."""
    root = tmp_path / "results" / "skin"
    root.mkdir(parents=True)
    (root / "sweep.yaml").write_text(yaml.safe_dump({
        "name": "skin", "base": {"task": "skin", "rounds": 1}, "seeds": [0, 1],
        "methods": {"fedavg": {"method": "fedavg"}, "flexfair": {"method": "flexfair"}},
        "select": {"gap": "dp:age_band"}, "reference": "flexfair"}))
    # FlexFair: smaller DP gap on scores, but a worse ranking model (AUC 0.55 vs 0.80).
    for label, auc, seed_gaps in (("fedavg", 0.80, (0.10, 0.12)), ("flexfair", 0.55, (0.02, 0.04))):
        for seed, dp in enumerate(seed_gaps):
            folder = root / label / "default" / f"seed-{seed}"
            folder.mkdir(parents=True)
            (folder / "run.yaml").write_text(yaml.safe_dump({
                "method": label, "seed": seed,
                "resolved": {"kind": "classification", "primary_metric": "accuracy"}}))
            record = {"round": 1, "metric": 0.8, "gaps": {"ea": 0.1, "dp:age_band": dp},
                      "val": {"metric": 0.8, "gaps": {"ea": 0.1, "dp:age_band": dp}}}
            (folder / "metrics.jsonl").write_text(json.dumps(record) + "\n")
            (folder / "report.json").write_text(json.dumps({
                "overall": {"auc": auc + 0.01 * seed, "ece": 0.1},
                "decision_gaps": {"dp:age_band": 0.3 + seed * 0.1},
                "groups": [{"attribute": "age_band", "group": "<=60", "auc": auc},
                           {"attribute": "age_band", "group": ">60", "auc": None},
                           {"attribute": "sex", "group": "male", "auc": 0.9}]}))
    text = render_section(tmp_path / "results")
    assert "| method | setting | ROC AUC | ECE | DP:AGE_BAND gap on decisions | AUC age_band=<=60 | AUC age_band=>60 |" in text
    assert "| flexfair | default | 0.555 | 0.100 | 0.350 | 0.550 | — |" in text
    assert "| fedavg | default | 0.805 | 0.100 | 0.350 | 0.800 | — |" in text


def test_a_study_whose_reference_has_not_run_yet_renders_without_p_values(constructed: Path):
    """A sweep done in sittings (seed 0 of FedAvg first) must render before FlexFair has run."""
    shutil.rmtree(constructed / "flexfair")
    text = render_section(constructed.parent)
    assert "2 of 6 planned runs finished" in text
    assert "| fedavg | default | 2 | 0.550 ± 0.071 | 0.200 ± 0.000 | — | — |" in text
    assert "No p-values yet: no run of the reference `flexfair` has finished." in text
    with pytest.raises(SweepError, match="reference 'flexfair' has no selected setting"):
        runs = load_runs(load_study(constructed).sweep, constructed, summaries=True)
        paper_table(runs, select_settings(runs, Selection()), "ea", "flexfair")


# ---- the paper's numbers beside ours -------------------------------------------------------------
def _paper_markdown_rows(text: str, heading: str) -> list[list[str]]:
    block = text.split(heading, 1)[1].split("\n## ", 1)[0]
    return [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in block.splitlines() if line.startswith("| ") and "---" not in line][1:]


def test_the_papers_numbers_are_those_of_the_shared_tables():
    """Every number kept in fedfair_med.experiments.paper is the one printed in the paper's tables."""
    from fedfair_med.experiments.paper import PAPER, parse_pm

    tables = REPO.parent / "shared" / "paper" / "flexfair-tables.md"
    if not tables.is_file():
        pytest.skip("../shared/paper is not beside this checkout")
    text = tables.read_text(encoding="utf-8")
    table1 = _paper_markdown_rows(text, "## Table 1")
    for offset, task in ((1, "polyp"), (4, "fundus"), (7, "mri")):
        column = PAPER[(task, "ea", "site")]
        assert {row[0]: (row[offset], row[offset + 1]) for row in table1} == dict(column.rows)
    table2 = _paper_markdown_rows(text, "## Table 2")
    for offset, key in ((1, ("dp", "age_band")), (3, ("eo", "age_band")), (5, ("dp", "sex")), (7, ("eo", "sex"))):
        column = PAPER[("skin", *key)]
        assert {row[0]: (row[offset], row[offset + 1]) for row in table2} == dict(column.rows)
    assert parse_pm(PAPER[("polyp", "ea", "site")].rows["FlexFair"][0]) == (0.885, 0.004)


def test_a_polyp_study_shows_the_papers_row_beside_each_arm(tmp_path: Path):
    root = tmp_path / "results" / "polyp"
    root.mkdir(parents=True)
    (root / "sweep.yaml").write_text(yaml.safe_dump({
        "name": "polyp", "base": {"task": "polyp", "criterion": "ea", "attribute": "site", "rounds": 2,
                                  "data": {"image_size": [128, 128]}},
        "seeds": [0, 1], "reference": "flexfair",
        "methods": {"fedavg-sgd": {"method": "fedavg"}, "dynamicfl": {"method": "dynamicfl"},
                    "flexfair": {"method": "flexfair"}},
        "select": {"metric_weight": 1.0, "gap_weight": 1.0, "gap": "ea"}}))
    for label, method, lasts in (("fedavg-sgd", "fedavg", (0.6, 0.8)), ("dynamicfl", "dynamicfl", (0.5, 0.5)),
                                 ("flexfair", "flexfair", (0.7, 0.7))):
        for seed, last in enumerate(lasts):
            _summary(root, label, method, "default", {}, seed,
                     [_record(1, 0.1, 0.3, 0.2, 0.3), _record(2, last, 0.05, 0.6, 0.1)])
    text = render_section(root.parent)
    assert "**Beside the paper** (Table 1 (segmentation, EA over sites), polyp;" in text
    # the SGD arm of FedAvg sits beside the paper's FedAvg. (b): both records per seed (fewer than
    # 20), seed means 0.35 and 0.45; (a): the last round, 0.6 and 0.8
    assert ("| fedavg-sgd | FedAvg | 0.867 ± 0.009 | 0.012 ± 0.009 | 0.400 ± 0.071 | 0.175 ± 0.000 "
            "| 0.700 ± 0.141 | 0.050 ± 0.000 | 2 |") in text
    assert "| dynamicfl | — (not in the paper) | — | — |" in text
    assert "| flexfair | FlexFair | 0.885 ± 0.004 | 0.009 ± 0.007 |" in text
    assert "* Image size: ours 128×128" in text and "CVC-300 (550 train / 60 test)" in text


def test_a_study_without_a_counterpart_in_the_paper_has_no_paper_table(constructed: Path):
    assert "Beside the paper" not in render_section(constructed.parent)  # synthetic task


def test_protocol_b_says_when_methods_pick_from_pools_of_different_sizes(constructed: Path):
    """FlexFair's two settings give it 4 records per seed, FedAvg 2: under (b) the larger grid
    is favoured whatever it does, and the page must say so (even when no method is short)."""
    text = study_markdown(load_study(constructed), k=2)
    assert "Fewer than 2 records" not in text
    assert "pools of 2 to 4 test records per seed" in text
    shutil.rmtree(constructed / "flexfair")
    assert "pools of" not in study_markdown(load_study(constructed), k=2)
