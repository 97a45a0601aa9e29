"""DICOM series in (fedfair_med/data/dicom.py): real series written here with SimpleITK's GDCM
writer, with chosen header values (some broken), through the real importer, checker and MRI task."""

from __future__ import annotations

import locale

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import typer
from typer.testing import CliRunner

from fedfair_med.cli.data_commands import register
from fedfair_med.config import RunConfig
from fedfair_med.data.dicom import age_from_dates, parse_age
from fedfair_med.runtime.local import run_simulation
from fedfair_med.tasks.mri import MRITask

TINY_UNET = {"channels": (4, 8), "strides": (2,), "num_res_units": 0}
IDENTIFIERS = {"0010|0010": "DOE^JANE", "0010|0030": "19700615", "0008|0020": "20200101",
               "0008|0050": "ACC98765", "0008|0080": "St Elsewhere Hospital"}


def cli(*args: object):
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    register(app)
    return CliRunner().invoke(app, [str(a) for a in args])


def volume(seed: int = 0, size: tuple[int, int, int] = (24, 24, 10)) -> tuple[sitk.Image, sitk.Image]:
    """An int16 'MRI' with a bright ellipsoid organ, and its 0/1 mask; 8 × 8 × 6 mm voxels."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[:size[2], :size[1], :size[0]]
    organ = ((x - 12) / 7.0) ** 2 + ((y - 11) / 6.0) ** 2 + ((z - 5) / 3.5) ** 2 <= 1.0
    pixels = (200 + 600 * organ + rng.normal(0, 40, organ.shape)).astype(np.int16)
    image, mask = sitk.GetImageFromArray(pixels), sitk.GetImageFromArray(organ.astype(np.uint8))
    for im in (image, mask):
        im.SetSpacing((8.0, 8.0, 6.0))
        im.SetOrigin((-90.0, -100.0, 30.0 + seed))
    return image, mask


def write_series(vol: sitk.Image, folder: Path, tags: dict[str, str], *, drop: tuple[int, ...] = (),
                 shift: dict[int, float] | None = None, tilt: tuple[int, ...] = (),
                 modality: str = "MR") -> Path:
    """One file per slice with ``tags`` (tag → value) plus the geometry tags GDCM sorts by."""
    folder.mkdir(parents=True)
    series_uid = f"1.2.826.0.1.3680043.2.1125.{abs(hash(str(folder))) % 10**12}"
    direction = np.asarray(vol.GetDirection()).reshape(3, 3)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetImageIO("GDCMImageIO")  # files without an extension, as PACS exports them
    for k in range(vol.GetDepth()):
        if k in drop:
            continue
        image = vol[:, :, k]
        x = np.asarray(vol.TransformIndexToPhysicalPoint((0, 0, k)))
        x[2] += (shift or {}).get(k, 0.0)
        cosines = [*direction[:, 0], *direction[:, 1]]
        if k in tilt:  # a slice in another orientation
            cosines = [1, 0, 0, 0, 0.8, 0.6]
        header = {"0008|0060": modality, "0020|000e": series_uid, "0020|000d": series_uid + ".1",
                  "0008|0016": "1.2.840.10008.5.1.4.1.1.4", "0008|0018": f"{series_uid}.{k + 1}",
                  "0020|0013": str(k + 1), "0020|0032": "\\".join(f"{v:.6f}" for v in x),
                  "0020|0037": "\\".join(f"{v:.6f}" for v in cosines), **tags}
        for key, value in header.items():
            image.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"IM{k:04d}"))
        locale_before = locale.setlocale(locale.LC_ALL, None)
        writer.Execute(image)
        # GDCM's writer leaves the process in the "C" locale (measured: LC_ALL C.UTF-8 -> C),
        # which turns every later default-encoding read in the test session into ASCII
        locale.setlocale(locale.LC_ALL, locale_before)
    return folder


def patient(sex: str, age: str | None, pid: str) -> dict[str, str]:
    tags = {**IDENTIFIERS, "0010|0020": pid, "0010|0040": sex}
    if age is not None:
        tags["0010|1010"] = age
    return tags


def read_manifest(path: Path) -> list[dict[str, str]]:
    lines = [line for line in path.read_text().splitlines() if not line.startswith("#")]
    return list(csv.DictReader(lines))


def test_dicom_ages_and_dates() -> None:
    assert parse_age("045Y") == (45.0, None)
    assert parse_age("030M")[0] == pytest.approx(2.5)
    assert parse_age("010W")[0] == pytest.approx(70 / 365.25)
    assert parse_age("005D")[0] == pytest.approx(5 / 365.25)
    assert parse_age("") == (None, None)
    for bad in ("45", "045", "45Y", "045y", "0450Y", "abcY"):
        assert parse_age(bad)[0] is None and "not a DICOM age" in parse_age(bad)[1]
    assert age_from_dates("19700615", "20200101") == 49.0
    assert age_from_dates("19700615", "20200615") == 50.0
    assert age_from_dates("19700615", "") is None and age_from_dates("1970-06-15", "20200101") is None


@pytest.fixture(scope="module")
def hospital(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four patients: mask series or NIfTI beside, age from PatientAge or from the dates."""
    root = tmp_path_factory.mktemp("pacs") / "export"
    cases = [("case01", patient("M", "045Y", "MRN001"), "series"),
             ("case02", patient("F", "030M", "MRN002"), "nifti"),
             ("case03", patient("F", None, "MRN003"), "series"),
             ("nested/case04", patient("", "071Y", "MRN004"), "nifti")]
    for k, (name, tags, mask_kind) in enumerate(cases):
        image, mask = volume(seed=k)
        folder = write_series(image, root / name, tags)
        if mask_kind == "series":
            write_series(mask, folder.with_name(folder.name + "_seg"), {**tags, "0008|0060": "MR"})
        else:
            sitk.WriteImage(mask, str(folder.with_name(folder.name + "_seg.nii.gz")))
    return root


def test_import_writes_sex_and_age_only_and_the_mri_task_trains_from_the_series(
        hospital: Path, tmp_path: Path) -> None:
    out = tmp_path / "sites" / "hosp-x"
    result = cli("data", "import", "dicom", hospital, "--out", out, "--test-fraction", "0.25")
    assert result.exit_code == 0, result.output
    assert "PatientSex" in result.output  # case04's empty sex is a warning, not a problem
    manifest = out / "manifest.csv"
    assert sorted(p.name for p in out.iterdir()) == ["manifest.csv"]  # no pixel data copied
    rows = read_manifest(manifest)
    by_image = {Path(r["image"]).name: r for r in rows}
    assert {k: (v["sex"], v["age"]) for k, v in by_image.items()} == {
        "case01": ("male", "45"), "case02": ("female", "2.5"), "case03": ("female", "49"),
        "case04": ("", "71")}
    assert Path(by_image["case01"]["label"]).name == "case01_seg"
    assert by_image["case02"]["label"].endswith("case02_seg.nii.gz")
    assert [r["id"] for r in rows] == ["hosp-x-0001", "hosp-x-0002", "hosp-x-0003", "hosp-x-0004"]
    assert sorted(r["split"] for r in rows) == ["test", "train", "train", "train"]
    text = manifest.read_text()
    for value in ("DOE", "JANE", "MRN", "19700615", "20200101", "ACC98765", "Elsewhere", "1.2.826"):
        assert value not in text, value
    # the manifest checker reads the series in place
    check = cli("data", "check", manifest, "--task", "mri")
    assert check.exit_code == 0, check.output

    # the MRI task reads a DICOM series exactly as the same volume stored as NIfTI
    image, mask = volume(seed=0)
    sitk.WriteImage(image, str(tmp_path / "case01.nii.gz"))
    task = MRITask()
    task.configure(reader="nibabel")
    transform = task.eval_transforms()
    from_dicom = transform({"image": by_image["case01"]["image"], "label": by_image["case01"]["label"],
                            "id": "a"})
    from_nifti = transform({"image": str(tmp_path / "case01.nii.gz"), "label": by_image["case01"]["label"],
                            "id": "a"})
    torch.testing.assert_close(from_dicom["image"], from_nifti["image"])
    assert from_dicom["label"].sum() > 0

    config = RunConfig(name="dicom", task="mri", rounds=1, max_steps=2, batch_size=2,
                       data={"manifests": [str(manifest)], "slices_per_volume": 2},
                       network_kwargs=TINY_UNET)
    run = run_simulation(config, tmp_path / "run")
    assert len(run.predictions) == 1 and run.predictions["id"].tolist() == [
        r["id"] for r in rows if r["split"] == "test"]
    assert math.isfinite(run.final["metric"]) and 0.0 <= run.final["metric"] <= 1.0


def test_broken_series_get_one_line_each_naming_the_series_and_the_tag(tmp_path: Path) -> None:
    root = tmp_path / "export"
    broken = {
        "gap": ({}, {"drop": (4,)}, "(0020,0032) ImagePositionPatient: 1 slice(s) missing"),
        "jitter": ({}, {"shift": {6: 2.5}}, "slice spacing varies"),
        "tilted": ({}, {"tilt": (3,)}, "(0020,0037) ImageOrientationPatient differs"),
        "badage": ({"0010|1010": "45"}, {}, "(0010,1010) PatientAge '45' is not a DICOM age"),
        "noage": ({"0010|1010": "", "0010|0030": "", "0008|0020": ""}, {},
                  "(0010,1010) PatientAge is missing"),
        "sexcode": ({"0010|0040": "X"}, {}, "(0010,0040) PatientSex 'X' is not a known sex code"),
        "seg": ({}, {"modality": "SEG"}, "DICOM-SEG is not supported"),
    }
    for k, (name, (tags, how, _)) in enumerate(broken.items()):
        image, mask = volume(seed=k)
        folder = write_series(image, root / name, {**patient("F", "050Y", f"P{k}"), **tags}, **how)
        sitk.WriteImage(mask, str(folder.with_name(name + "_seg.nii.gz")))
    image, _ = volume(seed=9)
    write_series(image, root / "nomask", patient("M", "060Y", "P9"))
    broken["nomask"] = ({}, {}, "no segmentation")
    out = tmp_path / "sites" / "h"
    result = cli("data", "import", "dicom", root, "--out", out)
    assert result.exit_code == 1
    assert not (out / "manifest.csv").exists()
    lines = [line for line in result.output.splitlines() if line.startswith("series ")]
    assert len(lines) == len(broken), result.output
    for name, (_, _, expected) in broken.items():
        mine = [line for line in lines if f"{root / name}:" in line]
        assert len(mine) == 1 and expected in mine[0], (name, mine)

    # a manifest pointing at a broken series: the checker names the series and the tag too
    good, mask = volume(seed=20)
    ok = write_series(good, tmp_path / "ok", patient("M", "050Y", "Q1"))
    sitk.WriteImage(mask, str(tmp_path / "ok_seg.nii.gz"))
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,image,label,split,sex,age\n"
                        f"a,{ok},{tmp_path / 'ok_seg.nii.gz'},train,male,50\n"
                        f"b,{root / 'gap'},{root / 'gap_seg.nii.gz'},test,female,50\n")
    check = cli("data", "check", manifest, "--task", "mri")
    assert check.exit_code == 1
    problem = [line for line in check.output.splitlines() if str(root / "gap") in line and "image" in line]
    assert len(problem) == 1 and "(0020,0032) ImagePositionPatient" in problem[0], check.output
