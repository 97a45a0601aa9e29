"""Manifest parsing, validation of real (and really broken) files, and the ``data`` CLI."""

from __future__ import annotations

import csv
import gzip
import string
from pathlib import Path

import numpy as np
import pytest
import typer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from fedfair_med.cli import data_commands
from fedfair_med.data.manifest import (
    Manifest, ManifestError, ManifestRow, Problem, load_manifest, parse_manifest, write_manifest,
)
from fedfair_med.data.validate import (
    SKIN_CLASSES, check_manifest, check_manifest_for_task,
)
from fixtures_data import (
    IMAGE_SIZE, classification_site, grey_image, nifti, rgb_image, segmentation_site, singular_nifti,
    square_mask_array, truncated_copy, volume_site, write_manifest_text,
)

HEADER = "id,image,label,split,sex,age"


def problems_of(path: Path) -> list[Problem]:
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    return caught.value.problems


def seg_check(manifest: Manifest, **kwargs):
    return check_manifest(manifest, task_kind="segmentation", image_format="2d", **kwargs)


def only(problems: list[Problem], field: str) -> Problem:
    matching = [p for p in problems if p.field == field]
    assert len(matching) == 1, problems
    return matching[0]


# ---- parsing ---------------------------------------------------------------------------------
def test_problem_text_names_file_row_and_field():
    problem = Problem("site.csv", 7, "age", "'abc' is not a number")
    assert str(problem) == "site.csv, row 7, field 'age': 'abc' is not a number"
    assert str(Problem("site.csv", None, None, "file not found")) == "site.csv: file not found"


def test_valid_manifest_parses_paths_attributes_and_comments(tmp_path):
    path = segmentation_site(tmp_path, n_train=3, n_test=1)
    manifest = load_manifest(path)
    assert manifest.site == "hospital-a" and manifest.task == "polyp"
    assert manifest.attribute_names == ("sex", "age")
    first = manifest.rows[0]
    # two comment lines and the header come first, so the first sample is on line 4
    assert first.line == 4
    assert first.image == tmp_path / "images" / "case0.png"
    assert first.label_path == tmp_path / "masks" / "case0.png"
    assert [r.attributes["sex"] for r in manifest.rows] == ["female", "male", "female", "male"]
    assert [r.attributes["age"] for r in manifest.rows] == ["34", "71", "50", "66"]
    assert [r.id for r in manifest.split("train")] == ["case0", "case1", "case2"]
    assert [r.id for r in manifest.split("TEST")] == ["case3"]
    assert manifest.warnings == []
    assert load_manifest(path, site="override").site == "override"


def test_site_defaults_to_folder_for_manifest_csv(tmp_path):
    path = write_manifest_text(tmp_path / "clinic-b" / "manifest.csv", "id,image,label,split", ["a,x.png,0,train"])
    assert load_manifest(path).site == "clinic-b"


def test_absolute_paths_are_kept(tmp_path):
    image = rgb_image(tmp_path / "elsewhere" / "a.png")
    path = write_manifest_text(tmp_path / "site" / "m.csv", "id,image,label,split", [f"a,{image},1,train"])
    assert load_manifest(path).rows[0].image == image


def test_bad_age_is_reported_with_file_row_and_field(tmp_path):
    path = write_manifest_text(tmp_path / "site.csv", HEADER, [
        "a,a.png,0,train,F,40", "b,b.png,0,train,F,abc", "c,c.png,0,test,M,130", "d,d.png,0,test,M,-2",
    ])
    problems = problems_of(path)
    assert [str(p) for p in problems] == [
        f"{path}, row 3, field 'age': 'abc' is not a number",
        f"{path}, row 4, field 'age': '130' is out of range 0-120 years",
        f"{path}, row 5, field 'age': '-2' is out of range 0-120 years",
    ]


def test_unknown_sex_is_reported(tmp_path):
    path = write_manifest_text(tmp_path / "site.csv", HEADER, ["a,a.png,0,train,F,40", "b,b.png,0,train,x,41"])
    problem = only(problems_of(path), "sex")
    assert (problem.file, problem.row) == (str(path), 3)
    assert "'x' is not a known sex" in problem.message


def test_duplicate_ids_name_both_rows(tmp_path):
    path = write_manifest_text(tmp_path / "site.csv", "id,image,label,split",
                               ["a,a.png,0,train", "b,b.png,0,train", "a,c.png,0,test"])
    problem = only(problems_of(path), "id")
    assert problem.row == 4 and "duplicate id 'a' (first used on row 2)" in problem.message


def test_bad_split_and_empty_required_values(tmp_path):
    path = write_manifest_text(tmp_path / "site.csv", "id,image,label,split",
                               ["a,a.png,0,training", ",b.png,0,train", "c,,0,test"])
    problems = problems_of(path)
    assert {(p.row, p.field) for p in problems} == {(2, "split"), (3, "id"), (4, "image")}
    assert "'training' is not a split" in only(problems, "split").message


def test_missing_column_and_nameless_column_are_fatal(tmp_path):
    path = write_manifest_text(tmp_path / "site.csv", "id,image,split,", ["a,a.png,train,"])
    messages = [str(p) for p in problems_of(path)]
    assert any("row 1" in m and "missing required column(s) label" in m for m in messages)
    assert any("column 4 of the header has no name" in m for m in messages)


def test_row_with_wrong_number_of_values(tmp_path):
    path = write_manifest_text(tmp_path / "site.csv", "id,image,label,split", ["a,a.png,0,train,extra"])
    problem = problems_of(path)[0]
    assert problem.row == 2 and "has 5 values but the header has 4 columns" in problem.message


def test_one_image_in_two_splits_is_a_leak(tmp_path):
    path = write_manifest_text(tmp_path / "site.csv", "id,image,label,split",
                               ["a,same.png,0,train", "b,same.png,0,test"])
    problem = only(problems_of(path), "image")
    assert problem.row == 3 and "row 2" in problem.message and "leaks" in problem.message


def test_missing_metadata_is_a_warning_not_an_error(tmp_path):
    path = write_manifest_text(tmp_path / "site.csv", HEADER, [
        "a,a.png,0,train,F,40", "b,b.png,0,train,,", "c,c.png,0,test,unknown,NaN", "d,d.png,0,test,M,",
    ])
    manifest = load_manifest(path)
    assert [r.attributes["sex"] for r in manifest.rows] == ["female", "", "", "male"]
    warnings = {w.field: w for w in manifest.warnings}
    assert set(warnings) == {"sex", "age"}
    assert "2 row(s) (rows 3, 4)" in warnings["sex"].message
    assert "3 row(s) (rows 3, 4, 5)" in warnings["age"].message


def test_error_message_lists_every_problem_one_per_line(tmp_path):
    path = write_manifest_text(tmp_path / "site.csv", HEADER, ["a,a.png,0,train,Q,40", "a,b.png,0,test,F,200"])
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    lines = str(caught.value).splitlines()
    assert len(lines) == 3 and all(line.startswith(f"{path}, row ") for line in lines)


@pytest.mark.parametrize("content, expected", [
    (b"", "no header row"),
    (b"# site: x\n\n", "no header row"),
    (b"id,image,label,split\na,\xff\xfe.png,0,train\n", "not UTF-8"),
])
def test_unusable_files(tmp_path, content, expected):
    path = tmp_path / "site.csv"
    path.write_bytes(content)
    assert expected in str(problems_of(path)[0])


def test_lenient_parse_keeps_rows_so_images_can_still_be_checked(tmp_path):
    path = segmentation_site(tmp_path)
    path.write_text(path.read_text().replace(",71", ",abc"))
    manifest, problems = parse_manifest(path)
    assert [(p.row, p.field) for p in problems] == [(5, "age")]
    assert [row.id for row in manifest.rows] == ["case0", "case1", "case2"]
    assert manifest.rows[1].attributes["age"] == "abc"


def test_missing_manifest_file(tmp_path):
    problem = problems_of(tmp_path / "nope.csv")[0]
    assert problem.file.endswith("nope.csv") and problem.message == "file not found"


# ---- fuzzing the parser ------------------------------------------------------------------------
FUZZ = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _parse_or_manifest_error(path: Path) -> None:
    try:
        manifest = load_manifest(path)
    except ManifestError as exc:
        assert exc.problems and all(isinstance(p, Problem) for p in exc.problems)
    else:
        assert all(row.split in ("train", "val", "test") for row in manifest.rows)


@FUZZ
@given(text=st.text(max_size=300))
def test_arbitrary_text_only_raises_manifest_error(tmp_path, text):
    path = tmp_path / "fuzz.csv"
    path.write_text(text, encoding="utf-8", newline="")
    _parse_or_manifest_error(path)


@FUZZ
@given(data=st.binary(max_size=200))
def test_arbitrary_bytes_only_raise_manifest_error(tmp_path, data):
    path = tmp_path / "fuzz.csv"
    path.write_bytes(b"id,image,label,split\n" + data)
    _parse_or_manifest_error(path)


CELL = st.text(alphabet=string.printable + "éß\x00", max_size=8)
COLUMN = st.sampled_from(["id", "image", "label", "split", "fov", "sex", "age", "Site", "", "ID"])


@FUZZ
@given(header=st.lists(COLUMN, min_size=1, max_size=7),
       rows=st.lists(st.lists(CELL, max_size=8), max_size=6))
def test_table_shaped_fuzz_only_raises_manifest_error(tmp_path, header, rows):
    path = tmp_path / "fuzz.csv"
    with path.open("w", encoding="utf-8", newline="") as handle:
        csv.writer(handle).writerows([header, *rows])
    _parse_or_manifest_error(path)


SAFE = st.text(alphabet=string.ascii_letters + string.digits + " ,\"'-_é", min_size=1, max_size=10).map(str.strip).filter(bool)


@st.composite
def manifest_rows(draw):
    ids = draw(st.lists(SAFE, min_size=1, max_size=6, unique=True))
    rows = []
    for index, sample_id in enumerate(ids):
        rows.append({
            "id": sample_id,
            "image": f"img/{index}_{draw(SAFE)}.png",
            "label": draw(SAFE),
            "split": draw(st.sampled_from(["train", "val", "test", "Train", "TEST"])),
            "sex": draw(st.sampled_from(["", "m", "F", "Male", "female"])),
            "age": draw(st.one_of(st.just(""), st.integers(0, 120).map(str),
                                  st.floats(0, 120, allow_nan=False).map(lambda a: f"{a:.2f}"))),
            "ward": draw(SAFE),
        })
    return rows


@FUZZ
@given(rows=manifest_rows())
def test_valid_manifests_round_trip(tmp_path, rows):
    path = write_manifest(tmp_path / "rt" / "manifest.csv", rows, attribute_names=("sex", "age", "ward"),
                          site="round-trip", task="polyp")
    manifest = load_manifest(path)
    assert manifest.site == "round-trip" and manifest.attribute_names == ("sex", "age", "ward")
    assert len(manifest.rows) == len(rows)
    for written, parsed in zip(rows, manifest.rows):
        assert parsed.id == written["id"] and parsed.label == written["label"]
        assert parsed.image == path.parent / written["image"]
        assert parsed.split == written["split"].lower()
        assert parsed.attributes["sex"] == {"": "", "m": "male", "male": "male"}.get(
            written["sex"].lower(), "female" if written["sex"] else "")
        if written["age"]:
            assert float(parsed.attributes["age"]) == pytest.approx(float(written["age"]))
        assert parsed.attributes["ward"] == written["ward"]


# ---- validation: 2D --------------------------------------------------------------------------
def test_valid_segmentation_site_passes_with_summary(tmp_path):
    result = seg_check(load_manifest(segmentation_site(tmp_path, n_train=3, n_test=1)))
    assert result.problems == [] and result.warnings == []
    summary = result.summary
    assert summary.split_counts == {"train": 3, "val": 0, "test": 1}
    assert summary.image_sizes == {f"{IMAGE_SIZE[0]}×{IMAGE_SIZE[1]}": 4}
    square = 16 / (IMAGE_SIZE[0] * IMAGE_SIZE[1])
    assert summary.foreground_fraction == pytest.approx({"train": square, "test": square})
    assert summary.group_counts["sex"] == {"female": {"train": 2, "val": 0, "test": 0},
                                           "male": {"train": 1, "val": 0, "test": 1}}
    assert summary.group_counts["age"][">60"] == {"train": 1, "val": 0, "test": 1}


def test_missing_image_and_mask_are_reported(tmp_path):
    path = segmentation_site(tmp_path)
    (tmp_path / "images" / "case1.png").unlink()
    (tmp_path / "masks" / "case2.png").unlink()
    problems = seg_check(load_manifest(path)).problems
    assert [(p.file, p.row, p.field) for p in problems] == [(str(path), 5, "image"), (str(path), 6, "label")]
    assert all("file not found" in p.message for p in problems)
    assert "case1.png" in problems[0].message


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_image_is_reported_as_corrupt(tmp_path, suffix):
    path = segmentation_site(tmp_path)
    big = rgb_image(tmp_path / f"big{suffix}", size=(64, 64))
    target = tmp_path / "images" / f"broken{suffix}"
    truncated_copy(big, target)
    text = path.read_text().replace("images/case0.png", f"images/broken{suffix}")
    path.write_text(text)
    problem = only(seg_check(load_manifest(path)).problems, "image")
    assert problem.row == 4 and "corrupt" in problem.message and f"broken{suffix}" in problem.message


def test_text_file_named_png_is_corrupt(tmp_path):
    path = segmentation_site(tmp_path)
    (tmp_path / "masks" / "case0.png").write_text("not an image")
    problem = only(seg_check(load_manifest(path)).problems, "label")
    assert problem.row == 4 and "corrupt or not an image" in problem.message


def test_mask_size_must_match_image(tmp_path):
    path = segmentation_site(tmp_path)
    grey_image(tmp_path / "masks" / "case1.png", square_mask_array(size=(20, 12)))
    problem = only(seg_check(load_manifest(path)).problems, "label")
    assert problem.row == 5 and "mask size 20×12 differs from the image's 16×12" in problem.message


def test_greyscale_gradient_mask_is_not_binary(tmp_path):
    path = segmentation_site(tmp_path)
    gradient = np.tile(np.linspace(0, 255, IMAGE_SIZE[0]), (IMAGE_SIZE[1], 1))
    grey_image(tmp_path / "masks" / "case0.png", gradient)
    problem = only(seg_check(load_manifest(path)).problems, "label")
    assert problem.row == 4 and "is not binary" in problem.message and "between 32 and 223" in problem.message


def test_jpeg_mask_grey_edges_are_tolerated(tmp_path):
    # A real JPEG of a 0/255 square: compression leaves a few grey pixels along the edge.
    path = segmentation_site(tmp_path)
    size = (64, 48)
    values = np.zeros((size[1], size[0]), dtype=np.uint8)
    values[10:30, 15:40] = 255
    rgb_image(tmp_path / "images" / "case0.png", size=size)
    jpeg = grey_image(tmp_path / "masks" / "case0.jpg", values, quality=75)
    decoded = np.asarray(Image.open(jpeg))
    assert len(np.unique(decoded)) > 2  # the edge really is grey
    path.write_text(path.read_text().replace("masks/case0.png", "masks/case0.jpg"))
    result = seg_check(load_manifest(path))
    assert result.problems == []
    assert result.summary.foreground_fraction["train"] > 0


def test_zero_one_coded_mask_is_reported(tmp_path):
    path = segmentation_site(tmp_path)
    grey_image(tmp_path / "masks" / "case2.png", square_mask_array(value=1))
    problem = only(seg_check(load_manifest(path)).problems, "label")
    assert problem.row == 6 and "coded 0/1" in problem.message


def test_empty_mask_is_only_a_warning(tmp_path):
    path = segmentation_site(tmp_path)
    grey_image(tmp_path / "masks" / "case0.png", np.zeros((IMAGE_SIZE[1], IMAGE_SIZE[0])))
    result = seg_check(load_manifest(path))
    assert result.problems == []
    assert [(w.row, w.field) for w in result.warnings] == [(4, "label")]


def test_fov_mask_is_checked_like_a_mask(tmp_path):
    rgb_image(tmp_path / "a.png")
    rgb_image(tmp_path / "b.png", seed=1)
    grey_image(tmp_path / "m.png", square_mask_array())
    grey_image(tmp_path / "fov_ok.png", np.full((IMAGE_SIZE[1], IMAGE_SIZE[0]), 255))
    grey_image(tmp_path / "fov_small.png", np.full((5, 5), 255))
    path = write_manifest_text(tmp_path / "site.csv", "id,image,label,split,fov",
                               ["a,a.png,m.png,train,fov_ok.png", "b,b.png,m.png,test,fov_small.png"])
    manifest = load_manifest(path)
    assert manifest.rows[0].fov == tmp_path / "fov_ok.png" and manifest.attribute_names == ()
    problem = only(seg_check(manifest).problems, "fov")
    assert problem.row == 3 and "differs from the image's" in problem.message


def test_empty_train_and_test_splits_are_reported(tmp_path):
    path = segmentation_site(tmp_path, n_train=2, n_test=0)
    problems = seg_check(load_manifest(path)).problems
    assert [(p.row, p.field) for p in problems] == [(None, "split")]
    assert "'test' split is empty" in problems[0].message
    only_val = write_manifest_text(tmp_path / "val.csv", "id,image,label,split", ["a,images/case0.png,masks/case0.png,val"])
    messages = [p.message for p in seg_check(load_manifest(only_val)).problems]
    assert any("'train' split is empty" in m for m in messages) and any("'test' split is empty" in m for m in messages)


def test_hand_built_manifest_gets_the_cheap_checks(tmp_path):
    segmentation_site(tmp_path)
    rows = [ManifestRow(id="x", image=tmp_path / "images" / f"case{i}.png", label=f"masks/case{i}.png",
                        split=split, fov=None, attributes={"sex": sex, "age": age}, line=i + 2, folder=tmp_path)
            for i, (split, sex, age) in enumerate([("train", "F", "300"), ("test", "robot", "40")])]
    manifest = Manifest(path=tmp_path / "built.csv", site="built", rows=rows, attribute_names=("sex", "age"))
    problems = seg_check(manifest).problems
    assert {(p.row, p.field) for p in problems} == {(2, "age"), (3, "id"), (3, "sex")}


def test_unreadable_path_is_reported_not_raised(tmp_path):
    rgb_image(tmp_path / "a.png")
    grey_image(tmp_path / "m.png", square_mask_array())
    rows = [ManifestRow(id="a", image=tmp_path / "a\x00.png", label="m.png", split="train", fov=None,
                        attributes={}, line=2, folder=tmp_path),
            ManifestRow(id="b", image=tmp_path / "a.png", label="m.png", split="test", fov=None,
                        attributes={}, line=3, folder=tmp_path)]
    problems = seg_check(Manifest(tmp_path / "m.csv", "s", rows, ())).problems
    assert [(p.row, p.field) for p in problems] == [(2, "image")]


# ---- validation: classification -------------------------------------------------------------
def test_classification_labels_and_balance(tmp_path):
    path = classification_site(tmp_path, labels=("0", "1", "1", "cat"))
    result = check_manifest(load_manifest(path), task_kind="classification", image_format="2d")
    problem = only(result.problems, "label")
    assert problem.row == 5 and "'cat' is not a known class" in problem.message
    assert result.summary.class_counts == {"train": {"0": 1, "1": 1}, "test": {"1": 1}}


def test_skin_task_accepts_diagnosis_names(tmp_path):
    path = classification_site(tmp_path, labels=("nv", "MEL", "bcc", "bkl"))
    result = check_manifest_for_task(load_manifest(path), "skin")
    assert result.problems == []
    assert result.summary.class_counts == {"train": {"0": 1, "1": 1}, "test": {"0": 1, "1": 1}}
    assert SKIN_CLASSES["akiec"] == 1
    assert check_manifest(load_manifest(path), task_kind="classification", image_format="2d").problems


# ---- validation: NIfTI -------------------------------------------------------------------------
def nifti_check(path: Path):
    return check_manifest(load_manifest(path), task_kind="segmentation", image_format="nifti")


def test_valid_volume_site_passes(tmp_path):
    result = nifti_check(volume_site(tmp_path))
    assert result.problems == []
    assert result.summary.image_sizes == {"8×7×5": 3}
    assert result.summary.foreground_fraction["test"] == pytest.approx(18 / (8 * 7 * 5))


def test_corrupt_nifti_is_reported(tmp_path):
    path = volume_site(tmp_path)
    truncated_copy(tmp_path / "vol0.nii.gz", tmp_path / "vol0.nii.gz")  # a cut .nii.gz
    raw = gzip.decompress((tmp_path / "vol1.nii.gz").read_bytes())
    (tmp_path / "vol1.nii").write_bytes(raw[: len(raw) - 100])  # a cut plain .nii
    (tmp_path / "vol2_seg.nii.gz").write_bytes(b"\x1f\x8b" + b"garbage" * 20)
    path.write_text(path.read_text().replace("vol1.nii.gz", "vol1.nii"))
    problems = nifti_check(path).problems
    assert [(p.row, p.field) for p in problems] == [(2, "image"), (3, "image"), (4, "label")]
    assert all("corrupt NIfTI" in p.message for p in problems)
    assert "vol0.nii.gz" in problems[0].message and "vol1.nii" in problems[1].message


def test_degenerate_affine_is_reported(tmp_path):
    path = volume_site(tmp_path)
    singular_nifti(tmp_path / "vol1.nii.gz")
    problem = only(nifti_check(path).problems, "image")
    assert problem.row == 3 and "degenerate affine" in problem.message


def test_wrong_dimensionality_is_reported(tmp_path):
    path = volume_site(tmp_path)
    nifti(tmp_path / "vol0.nii.gz", np.zeros((8, 7), dtype=np.float32))
    nifti(tmp_path / "vol1.nii.gz", np.zeros((8, 7, 5, 2), dtype=np.float32))
    problems = nifti_check(path).problems
    assert [(p.row, p.field) for p in problems] == [(2, "image"), (3, "image")]
    assert "has 2 dimensions" in problems[0].message
    assert "4D with 2 volumes" in problems[1].message


def test_single_volume_4d_is_accepted(tmp_path):
    path = volume_site(tmp_path)
    nifti(tmp_path / "vol2.nii.gz", np.zeros((8, 7, 5, 1), dtype=np.float32))
    assert nifti_check(path).problems == []


def test_volume_mask_shape_and_labels(tmp_path):
    path = volume_site(tmp_path)
    nifti(tmp_path / "vol0_seg.nii.gz", np.zeros((8, 7, 4), dtype=np.uint8))
    multi = np.zeros((8, 7, 5), dtype=np.uint8)
    multi[1, 1, 1], multi[2, 2, 2] = 1, 5
    nifti(tmp_path / "vol2_seg.nii.gz", multi)
    problems = nifti_check(path).problems
    assert [(p.row, p.field) for p in problems] == [(2, "label"), (4, "label")]
    assert "mask shape 8×7×4 differs from the image's 8×7×5" in problems[0].message
    assert "not binary: 3 distinct values" in problems[1].message


def test_png_given_to_a_volume_task(tmp_path):
    path = segmentation_site(tmp_path)
    problems = nifti_check(path).problems
    assert problems and all("is not a NIfTI file" in p.message for p in problems)


# ---- CLI ---------------------------------------------------------------------------------------
@pytest.fixture()
def cli():
    app = typer.Typer()
    data_commands.register(app)
    runner = CliRunner()
    return lambda *args: runner.invoke(app, ["data", *map(str, args)])


def test_cli_check_ok_prints_summary(cli, tmp_path):
    result = cli("check", segmentation_site(tmp_path, n_train=3), "--task", "polyp")
    assert result.exit_code == 0, result.output
    assert "site 'hospital-a'" in result.output and "OK (4 rows checked)" in result.output
    assert "16×12" in result.output and "female" in result.output


def test_cli_check_lists_problems_and_exits_1(cli, tmp_path):
    path = segmentation_site(tmp_path)
    (tmp_path / "images" / "case1.png").unlink()
    text = path.read_text().replace(",71", ",seventy")
    path.write_text(text)
    result = cli("check", path, "--task", "polyp")
    assert result.exit_code == 1
    assert f"{path}, row 5, field 'age': 'seventy' is not a number" in result.output
    assert f"{path}, row 5, field 'image': cannot use" in result.output
    assert "Traceback" not in result.output


def test_cli_check_unreadable_manifest(cli, tmp_path):
    result = cli("check", tmp_path / "missing.csv", "--task", "skin")
    assert result.exit_code == 1 and "file not found" in result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)


def test_cli_check_warns_on_task_mismatch_and_missing_metadata(cli, tmp_path):
    path = classification_site(tmp_path)
    path.write_text("# task: fundus\n" + path.read_text().replace(",F,41", ",,41"))
    result = cli("check", path, "--task", "skin")
    assert result.exit_code == 0, result.output
    assert "field 'sex': no value in 1 row(s)" in result.output and "checked as 'skin'" in result.output


def test_cli_check_rejects_unknown_task(cli, tmp_path):
    assert cli("check", segmentation_site(tmp_path), "--task", "heart").exit_code == 2


def test_rgb_volume_mask_is_reported(tmp_path):
    path = volume_site(tmp_path)
    rgb = np.zeros((8, 7, 5), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nifti(tmp_path / "vol0_seg.nii.gz", rgb)
    problem = only(nifti_check(path).problems, "label")
    assert problem.row == 2 and "voxel type" in problem.message
