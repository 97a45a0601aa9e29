"""Importers on the real public datasets in ../shared/data (skipped when it is absent).

Small ``limit``s keep image checks quick; leak-freedom is checked on full imports, which only
read file names and metadata.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from fedfair_med.cli import data_commands
from fedfair_med.data.importers import DatasetLayoutError, import_dataset
from fedfair_med.data.manifest import load_manifest, parse_manifest
from fedfair_med.data.validate import check_manifest_for_task
from fixtures_data import shared_data_dir

DATA = shared_data_dir()
pytestmark = [
    pytest.mark.realdata,
    pytest.mark.skipif(not DATA.is_dir(), reason=f"public datasets not found at {DATA}"),
]

SOURCES = {
    "chase": "chasedb1",
    "stare": "stare",
    "kvasir": "polyp/kvasir_seg_256",
    "cvc-clinicdb": "polyp/cvc_clinicdb_png",
    "ham10000": "ham10000",
}


def read_rows(manifest: Path) -> list[dict[str, str]]:
    with manifest.open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(line for line in handle if not line.startswith("#")))


@pytest.mark.parametrize("dataset", list(SOURCES))
def test_limited_import_passes_check(tmp_path, dataset):
    sites = import_dataset(dataset, DATA / SOURCES[dataset], tmp_path, limit=3, seed=1)
    assert sites
    for site in sites:
        assert site.manifest == tmp_path / site.site / "manifest.csv"
        manifest = load_manifest(site.manifest)
        assert manifest.site == site.site and manifest.task == site.task
        assert 1 <= len(manifest.split("train")) <= 3 and 1 <= len(manifest.split("test")) <= 3
        assert all(row.image.is_absolute() and row.image.is_relative_to(DATA.resolve())
                   for row in manifest.rows)
        result = check_manifest_for_task(manifest, site.task)
        assert result.problems == [], [str(p) for p in result.problems]
        assert sum(result.summary.image_sizes.values()) == len(manifest.rows)


def test_chase_keeps_both_eyes_of_a_child_together(tmp_path):
    (site,) = import_dataset("chase", DATA / SOURCES["chase"], tmp_path)
    rows = read_rows(site.manifest)
    assert len(rows) == 28
    split_of_child = defaultdict(set)
    for row in rows:
        split_of_child[row["id"][len("Image_"):-1]].add(row["split"])
        assert row["label"].endswith(f"{row['id']}_1stHO.png")
    assert all(len(splits) == 1 for splits in split_of_child.values())
    assert sum(splits == {"test"} for splits in split_of_child.values()) == 4  # 25 % of 14 children


def test_cvc_frames_of_a_video_stay_in_one_split(tmp_path):
    src = DATA / SOURCES["cvc-clinicdb"]
    (site,) = import_dataset("cvc-clinicdb", src, tmp_path, seed=3)
    with (src / "frame_sequence.csv").open() as handle:
        video_of = {f"frame{r['frame']}": int(r["sequence"]) for r in csv.DictReader(handle)}
    splits_of_video = defaultdict(set)
    for row in read_rows(site.manifest):
        splits_of_video[video_of[row["id"]]].add(row["split"])
    assert all(len(s) == 1 for s in splits_of_video.values())
    test_videos = sorted(v for v, s in splits_of_video.items() if s == {"test"})
    val_videos = [v for v, s in splits_of_video.items() if s == {"val"}]
    assert test_videos == [27, 28, 29]  # the last ~10 % of the 29 videos
    assert len(val_videos) == 3 and not set(val_videos) & set(test_videos)
    # val videos are drawn with the seed; test videos are not
    (other,) = import_dataset("cvc-clinicdb", src, tmp_path / "other", seed=4)
    other_val = {video_of[r["id"]] for r in read_rows(other.manifest) if r["split"] == "val"}
    assert other_val != set(val_videos)


def test_ham10000_sites_lesions_labels_and_missing_metadata(tmp_path):
    src = DATA / SOURCES["ham10000"]
    sites = import_dataset("ham10000", src, tmp_path)
    assert sorted(s.site for s in sites) == ["rosendahl", "vidir_modern", "vidir_molemax", "vienna_dias"]
    with (src / "HAM10000_metadata.csv").open() as handle:
        metadata = {r["image_id"]: r for r in csv.DictReader(handle)}
    rows = [row for site in sites for row in read_rows(site.manifest)]
    assert len(rows) == len(metadata) == 10015
    split_of_lesion = defaultdict(set)
    for row in rows:
        record = metadata[row["id"]]
        split_of_lesion[record["lesion_id"]].add(row["split"])
        assert row["label"] == ("1" if record["dx"] in {"mel", "bcc", "akiec"} else "0")
    assert all(len(s) == 1 for s in split_of_lesion.values())
    for site in sites:  # a lesion photographed at two sites is test at both or at neither
        site_rows = read_rows(site.manifest)
        assert 0.18 < sum(r["split"] == "test" for r in site_rows) / len(site_rows) < 0.23
    assert sum(r["sex"] == "" for r in rows) == 57 and sum(r["age"] == "" for r in rows) == 57
    assert {r["sex"] for r in rows} == {"male", "female", ""}
    # incomplete metadata loads (a warning), it is not an error
    modern = load_manifest(tmp_path / "vidir_modern" / "manifest.csv")
    assert {w.field for w in modern.warnings} == {"sex", "age"}


def test_kvasir_split_is_seeded(tmp_path):
    src = DATA / SOURCES["kvasir"]
    first = read_rows(import_dataset("kvasir", src, tmp_path / "a", seed=7)[0].manifest)
    again = read_rows(import_dataset("kvasir", src, tmp_path / "b", seed=7)[0].manifest)
    other = read_rows(import_dataset("kvasir", src, tmp_path / "c", seed=8)[0].manifest)
    test_ids = {r["id"] for r in first if r["split"] == "test"}
    assert test_ids == {r["id"] for r in again if r["split"] == "test"}
    assert test_ids != {r["id"] for r in other if r["split"] == "test"}
    assert len(test_ids) == round(0.1 * len(first))


def test_wrong_source_folder_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetLayoutError, match="Original/ folder"):
        import_dataset("cvc-clinicdb", DATA / SOURCES["kvasir"], tmp_path)
    with pytest.raises(ValueError, match="test fraction"):
        import_dataset("kvasir", DATA / SOURCES["kvasir"], tmp_path, test_fraction=1.5)


def test_cli_import_then_check(tmp_path):
    app = typer.Typer()
    data_commands.register(app)
    runner = CliRunner()
    out = tmp_path / "manifests"
    result = runner.invoke(app, ["data", "import", "stare", str(DATA / SOURCES["stare"]), "--out", str(out),
                                 "--limit", "2", "--test-fraction", "0.3"])
    assert result.exit_code == 0, result.output
    assert f"wrote {out / 'stare' / 'manifest.csv'}" in result.output and "2 train, 2 val, 2 test" in result.output
    no_val = runner.invoke(app, ["data", "import", "stare", str(DATA / SOURCES["stare"]), "--out", str(tmp_path / "nv"),
                                 "--limit", "2", "--val-fraction", "0"])
    assert no_val.exit_code == 0 and "2 train, 2 test" in no_val.output, no_val.output
    checked = runner.invoke(app, ["data", "check", str(out / "stare" / "manifest.csv"), "--task", "fundus"])
    assert checked.exit_code == 0, checked.output
    failed = runner.invoke(app, ["data", "import", "chase", str(tmp_path / "nowhere"), "--out", str(out)])
    assert failed.exit_code == 1 and "does not exist" in failed.output


# ---- validation splits: carved from the training side, test untouched -------------------------
def split_ids(rows: list[dict[str, str]]) -> dict[str, set[str]]:
    ids: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        ids[row["split"]].add(row["id"])
    return ids


@pytest.mark.parametrize("dataset", ["chase", "stare", "kvasir"])
def test_val_comes_from_train_and_leaves_test_unchanged(tmp_path, dataset):
    src = DATA / SOURCES[dataset]
    without = split_ids(read_rows(import_dataset(dataset, src, tmp_path / "a", seed=5, val_fraction=0)[0].manifest))
    default = split_ids(read_rows(import_dataset(dataset, src, tmp_path / "b", seed=5)[0].manifest))
    more = split_ids(read_rows(import_dataset(dataset, src, tmp_path / "c", seed=5, val_fraction=0.4)[0].manifest))
    assert set(without) == {"train", "test"}  # val_fraction=0 is the two-way split
    assert default["test"] == without["test"] == more["test"]  # test never depends on val
    assert default["val"] and default["val"] <= without["train"] and default["train"] | default["val"] == without["train"]
    assert len(more["val"]) > len(default["val"]) and default["train"]  # at least one group is left to train
    # 0.15 of the non-test groups, rounded: chase 0.15·10 children → 2 (4 eyes); stare 0.15·13 → 2;
    # kvasir 0.15·898 → 135
    assert len(default["val"]) == {"chase": 4, "stare": 2, "kvasir": 135}[dataset]


def test_chase_val_holds_whole_children(tmp_path):
    (site,) = import_dataset("chase", DATA / SOURCES["chase"], tmp_path, seed=2, val_fraction=0.3)
    split_of_child = defaultdict(set)
    for row in read_rows(site.manifest):
        split_of_child[row["id"][len("Image_"):-1]].add(row["split"])
    assert all(len(splits) == 1 for splits in split_of_child.values())
    assert sum(splits == {"val"} for splits in split_of_child.values()) == 3  # 0.3 of the 10 non-test children


def test_ham10000_val_lesions_are_disjoint_across_sites_and_test_is_unchanged(tmp_path):
    src = DATA / SOURCES["ham10000"]
    with (src / "HAM10000_metadata.csv").open() as handle:
        lesion_of = {r["image_id"]: r["lesion_id"] for r in csv.DictReader(handle)}
    with_val = [row for s in import_dataset("ham10000", src, tmp_path / "a", seed=1) for row in read_rows(s.manifest)]
    without = [row for s in import_dataset("ham10000", src, tmp_path / "b", seed=1, val_fraction=0)
               for row in read_rows(s.manifest)]
    assert split_ids(with_val)["test"] == split_ids(without)["test"]
    split_of_lesion = defaultdict(set)
    for row in with_val:  # across all four sites: a lesion is wholly train, val or test
        split_of_lesion[lesion_of[row["id"]]].add(row["split"])
    assert all(len(s) == 1 for s in split_of_lesion.values())
    for site in ("rosendahl", "vidir_modern", "vidir_molemax", "vienna_dias"):
        rows = read_rows(tmp_path / "a" / site / "manifest.csv")
        non_test = [r for r in rows if r["split"] != "test"]
        assert 0.12 < sum(r["split"] == "val" for r in non_test) / len(non_test) < 0.19


def test_cvc_keeps_its_val_videos_unless_a_fraction_is_given(tmp_path):
    src = DATA / SOURCES["cvc-clinicdb"]
    with (src / "frame_sequence.csv").open() as handle:
        video_of = {f"frame{r['frame']}": int(r["sequence"]) for r in csv.DictReader(handle)}
    default = split_ids(read_rows(import_dataset("cvc-clinicdb", src, tmp_path / "a", seed=3)[0].manifest))
    wider = split_ids(read_rows(import_dataset("cvc-clinicdb", src, tmp_path / "b", seed=3,
                                               val_fraction=0.3)[0].manifest))
    assert default["test"] == wider["test"]
    assert len({video_of[i] for i in default["val"]}) == 3  # as many as test videos, as before
    assert len({video_of[i] for i in wider["val"]}) == 8  # round(0.3 · 26 non-test videos)
    for ids in (default, wider):
        videos = {split: {video_of[i] for i in members} for split, members in ids.items()}
        assert not videos["val"] & videos["train"] and not videos["val"] & videos["test"]


def test_val_fraction_out_of_range_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="val fraction"):
        import_dataset("stare", DATA / SOURCES["stare"], tmp_path, val_fraction=1.0)


def test_real_mri_volume_checks(tmp_path):
    """The TotalSegmentator MRI: a one-organ mask passes; the multi-organ map is not binary."""
    folder = DATA / "mri_abdomen_totalseg"
    image = folder / "example_mr_sm.nii.gz"
    path = tmp_path / "manifest.csv"
    path.write_text("id,image,label,split\n"
                    f"liver,{image},{folder / 'example_seg_roi_subset_mr.nii.gz'},train\n"
                    f"organs,{image},{folder / 'example_seg_mr.nii.gz'},train\n"
                    f"again,{image},{folder / 'example_seg_roi_subset_mr.nii.gz'},test\n")
    manifest, parse_problems = parse_manifest(path)
    result = check_manifest_for_task(manifest, "mri")
    assert result.summary.image_sizes == {"117×91×20": 3}
    assert [(p.row, p.field) for p in result.problems] == [(3, "label")]
    assert "not binary" in result.problems[0].message
    assert [(p.row, p.field) for p in parse_problems] == [(4, "image")]  # the same volume in train and test
    assert 0 < result.summary.foreground_fraction["train"] < 0.5


def test_derived_mri_sites_can_hold_out_val_volumes(tmp_path):
    """Sweeps select on val, so derived MRI hospitals can hold out volumes before the test ones."""
    from fedfair_med.data.mri_sites import derive_mri_federation

    folder = DATA / "mri_abdomen_totalseg"
    image, label = folder / "example_mr_sm.nii.gz", folder / "example_seg_mr.nii.gz"
    (plain,) = derive_mri_federation(image, label, tmp_path / "plain", sites=1, seed=0)
    (held,) = derive_mri_federation(image, label, tmp_path / "held", sites=1, seed=0,
                                    volumes_per_site=5, val_per_site=1)
    splits = {r["id"].rsplit("-", 1)[1]: r["split"] for r in read_rows(held)}
    assert splits == {"vol0": "train", "vol1": "train", "vol2": "train", "vol3": "val", "vol4": "test"}
    assert {r["split"] for r in read_rows(plain)} == {"train", "test"}  # default: no val, as before
    import nibabel as nib
    import numpy as np

    for row in read_rows(plain)[:3]:  # the same training volumes whether or not val is held out
        for key in ("image", "label"):
            before, after = (np.asarray(nib.load(str(m.parent / row[key])).dataobj) for m in (plain, held))
            assert np.array_equal(before, after), (row["id"], key)
    with pytest.raises(ValueError, match="val_per_site"):
        derive_mri_federation(image, label, tmp_path / "bad", sites=1, volumes_per_site=4, val_per_site=3)
