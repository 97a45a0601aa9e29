"""``data deal``: pooled and IID diagnostic sites made from real manifests, every row once."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from fedfair_med.cli import data_commands
from fedfair_med.data.deal import DealError, deal_sites
from fedfair_med.data.manifest import load_manifest
from fedfair_med.data.validate import check_manifest_for_task
from fixtures_data import rgb_image, segmentation_site, write_manifest_text


def skin_site(root: Path, name: str, labels: list[str], splits: list[str]) -> Path:
    """A skin site with real JPEGs; ids carry the site name so two sites never collide."""
    rows = []
    for index, (label, split) in enumerate(zip(labels, splits)):
        rgb_image(root / "images" / f"{name}{index}.jpg", seed=index)
        rows.append(f"{name}-{index},images/{name}{index}.jpg,{label},{split},{'MF'[index % 2]},{30 + index}")
    return write_manifest_text(root / "manifest.csv", "id,image,label,split,sex,age", rows,
                               preamble=[f"# site: {name}", "# task: skin"])


@pytest.fixture()
def two_sites(tmp_path):
    # Label-skewed like HAM10000's sites: one nearly all benign, one half malignant.
    a = skin_site(tmp_path / "a", "a", ["0"] * 7 + ["1"] + ["0", "0", "1"],
                  ["train"] * 8 + ["val", "test", "test"])
    b = skin_site(tmp_path / "b", "b", ["1", "0"] * 4 + ["1", "0", "1"],
                  ["train"] * 8 + ["val", "test", "test"])
    return a, b


def rows_by_id(paths):
    return {row.id: row for path in paths for row in load_manifest(path).rows}


def test_iid_sites_hold_every_row_once_with_its_split_label_and_attributes(two_sites, tmp_path):
    sources = rows_by_id(two_sites)
    written = deal_sites(two_sites, tmp_path / "iid", sites=3, seed=0, prefix="iid")
    assert [p.parent.name for p in written] == ["iid0", "iid1", "iid2"]
    dealt = [load_manifest(p) for p in written]
    ids = [row.id for m in dealt for row in m.rows]
    assert Counter(ids) == Counter(sources.keys())  # every row exactly once
    for manifest in dealt:
        assert manifest.site == manifest.path.parent.name and manifest.task == "skin"
        for row in manifest.rows:
            source = sources[row.id]
            assert (row.split, row.label, row.attributes) == (source.split, source.label, source.attributes)
            assert row.image == source.image.resolve() and row.image.is_file()
        assert check_manifest_for_task(manifest, "skin").ok  # opens every image
    for split in ("train", "val", "test"):
        sizes = [len(m.split(split)) for m in dealt]
        assert max(sizes) - min(sizes) <= 1, (split, sizes)
    # Dealt at random: each site mixes both sources' rows (the point of an IID diagnostic).
    train_sources = [{row.id[0] for row in m.split("train")} for m in dealt]
    assert any(len(s) == 2 for s in train_sources)


def test_the_deal_is_fixed_by_the_seed(two_sites, tmp_path):
    def deal(seed, folder):
        return [[r.id for r in load_manifest(p).rows]
                for p in deal_sites(two_sites, tmp_path / folder, sites=2, seed=seed, prefix="s")]
    first = deal(0, "x")
    assert first == deal(0, "y")
    assert first != deal(1, "z")


def test_one_site_pools_everything_under_its_name(two_sites, tmp_path):
    [path] = deal_sites(two_sites, tmp_path / "pooled", sites=1, prefix="pooled")
    manifest = load_manifest(path)
    assert manifest.site == "pooled" and path.parent.name == "pooled"
    assert sorted(r.id for r in manifest.rows) == sorted(rows_by_id(two_sites))


def test_segmentation_masks_are_written_absolute(tmp_path):
    source = segmentation_site(tmp_path / "seg", n_train=3, n_test=2, name="manifest.csv")
    written = deal_sites([source], tmp_path / "out", sites=2, seed=0, prefix="half")
    for path in written:
        manifest = load_manifest(path)
        for row in manifest.rows:
            assert Path(row.label).is_absolute() and row.label_path.is_file()
        assert check_manifest_for_task(manifest, "polyp").ok


def test_refusals_name_the_problem(two_sites, tmp_path):
    a, _ = two_sites
    with pytest.raises(DealError, match=r"id 'a-0' is in both .*a.*manifest.csv"):
        deal_sites([a, a], tmp_path / "dup", sites=2)
    with pytest.raises(DealError, match="only 2 test row"):
        deal_sites([a], tmp_path / "many", sites=3)
    seg = segmentation_site(tmp_path / "seg", name="manifest.csv")
    with pytest.raises(DealError, match="one common '# task:'"):
        deal_sites([a, seg], tmp_path / "mixed", sites=1)
    deal_sites([a], tmp_path / "once", sites=1, prefix="p")
    with pytest.raises(DealError, match="already exist"):
        deal_sites([a], tmp_path / "once", sites=1, prefix="p")
    deal_sites([a], tmp_path / "once", sites=1, prefix="p", force=True)  # replaced on request


def test_cli_deals_and_refuses_without_a_traceback(two_sites, tmp_path):
    app = typer.Typer()
    data_commands.register(app)
    runner = CliRunner()
    result = runner.invoke(app, ["data", "deal", *map(str, two_sites), "--sites", "2",
                                 "--out", str(tmp_path / "iid")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "iid" / "iid0" / "manifest.csv").is_file()
    assert (tmp_path / "iid" / "iid1" / "manifest.csv").is_file()
    again = runner.invoke(app, ["data", "deal", *map(str, two_sites), "--sites", "2",
                                "--out", str(tmp_path / "iid")])
    assert again.exit_code == 1 and "already exist" in again.output and "--force" in again.output
    assert again.exception is None or isinstance(again.exception, SystemExit)
    missing = runner.invoke(app, ["data", "deal", str(tmp_path / "nope.csv"), "--sites", "1",
                                  "--out", str(tmp_path / "p")])
    assert missing.exit_code == 1 and "nope.csv" in missing.output
    assert missing.exception is None or isinstance(missing.exception, SystemExit)
