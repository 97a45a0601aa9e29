r"""DICOM series in, as a site manifest: sex and age from the headers, pixel data left where it is.

Hospital MRI leaves PACS as DICOM series. :func:`import_dicom` walks a folder, takes every folder
holding one DICOM series as one case, reads only the headers (SimpleITK/GDCM; no pydicom), and
writes ``manifest.csv`` with ``id, image, label, split, sex, age``: ``image`` is the series folder
itself, which the MRI task reads directly (:func:`read_series`), so nothing is converted or copied.

Supported layout (``--mask-suffix``, default ``_seg``)::

    DIR/case01/            image series: one folder = one series = one case (files of any name)
    DIR/case01_seg/        its segmentation as a mask series (same slices, voxel values 0 / label)
    DIR/case02/
    DIR/case02_seg.nii.gz  or as a NIfTI file beside the series (.nii.gz or .nii)

Folders may be nested. DICOM-SEG objects and multi-frame (enhanced) DICOM are not supported:
they are reported, not guessed at.

Attributes: ``sex`` from PatientSex (0010,0040), M → male, F → female, empty → missing (a
warning), anything else is a problem; ``age`` in years from PatientAge (0010,1010), ``nnnY`` /
``nnnM`` / ``nnnW`` / ``nnnD``, else from PatientBirthDate (0010,0030) and StudyDate (0008,0020).
**No other header value is written**: names, patient IDs, dates and UIDs stay in the files. The
patient ID is read only to keep one patient's series in one split; the manifest ids are
``<site>-0001``… in path order.

Problems — each one line naming the series and the tag, like the manifest checker's: more than one
series in a folder; slices missing (a gap in ImagePositionPatient (0020,0032) along the slice
normal); slice spacing that varies; orientation (0020,0037), pixel spacing (0028,0030) or size
(0028,0010/0011) that changes between slices; a malformed or absent PatientAge with no dates; an
unknown sex code; a mask series whose slices do not match its image's. Any problem: no manifest.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = [
    "DicomImportError", "SeriesHeaders", "parse_age", "age_from_dates", "read_headers",
    "geometry_problems", "series_problems", "read_series", "import_dicom", "is_series_folder",
]

TAG = {
    "PatientSex": "0010|0040", "PatientAge": "0010|1010", "PatientBirthDate": "0010|0030",
    "StudyDate": "0008|0020", "PatientID": "0010|0020", "Modality": "0008|0060",
    "ImagePositionPatient": "0020|0032", "ImageOrientationPatient": "0020|0037",
    "PixelSpacing": "0028|0030", "Rows": "0028|0010", "Columns": "0028|0011",
    "NumberOfFrames": "0028|0008",
}
SEX_CODES = {"M": "male", "F": "female"}
_AGE = re.compile(r"^(\d{3})([DWMY])$")
_DAYS_PER = {"D": 1.0, "W": 7.0, "M": 365.25 / 12.0, "Y": 365.25}
NIFTI_SUFFIXES = (".nii.gz", ".nii")


def _tag(name: str) -> str:
    """``(0010,1010) PatientAge`` — how every problem names a tag."""
    group, element = TAG[name].split("|")
    return f"({group.upper()},{element.upper()}) {name}"


class DicomImportError(ValueError):
    """Every problem found, one line each (the importer writes nothing)."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


# ---- attributes -----------------------------------------------------------------------------
def parse_age(raw: str) -> tuple[float | None, str | None]:
    """(years, error) from a DICOM age string ``nnnY/M/W/D``; (None, None) when empty."""
    text = (raw or "").strip()
    if not text:
        return None, None
    match = _AGE.match(text)
    if not match:
        return None, f"{text!r} is not a DICOM age (three digits and D, W, M or Y, e.g. 045Y)"
    return int(match.group(1)) * _DAYS_PER[match.group(2)] / 365.25, None


def _dicom_date(raw: str) -> date | None:
    text = (raw or "").strip()
    if not re.fullmatch(r"\d{8}", text):
        return None
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None


def age_from_dates(birth: str, study: str) -> float | None:
    """Whole years between PatientBirthDate and StudyDate (YYYYMMDD); None if either is unusable."""
    born, seen = _dicom_date(birth), _dicom_date(study)
    if born is None or seen is None or seen < born:
        return None
    return float(seen.year - born.year - ((seen.month, seen.day) < (born.month, born.day)))


def _years_text(years: float) -> str:
    rounded = round(years, 2)
    return f"{rounded:.0f}" if float(rounded).is_integer() else f"{rounded:g}"


# ---- headers and geometry ------------------------------------------------------------------------
@dataclass
class SeriesHeaders:
    """One folder's series: its files and, per file, the header values this module uses."""

    folder: Path
    files: list[str]
    values: list[dict[str, str]] = field(default_factory=list)
    series_count: int = 1

    def first(self, name: str) -> str:
        return self.values[0].get(name, "").strip() if self.values else ""


def is_series_folder(folder: Path) -> bool:
    """True when GDCM finds at least one DICOM series directly in ``folder``."""
    import SimpleITK as sitk

    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # GDCM warns about every non-DICOM folder
    try:
        return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def read_headers(folder: str | Path) -> SeriesHeaders:
    """File names (GDCM's slice order) and header values of the series in ``folder`` (no pixels)."""
    import SimpleITK as sitk

    folder = Path(folder)
    ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not ids:
        return SeriesHeaders(folder, [], [], 0)
    files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), ids[0]))
    values = []
    for name in files:
        reader = sitk.ImageFileReader()
        reader.SetFileName(name)
        reader.LoadPrivateTagsOff()
        reader.ReadImageInformation()
        values.append({key: reader.GetMetaData(tag) for key, tag in TAG.items() if reader.HasMetaDataKey(tag)})
    return SeriesHeaders(folder, files, values, len(ids))


def _floats(text: str, count: int) -> np.ndarray | None:
    try:
        parts = [float(p) for p in text.replace(" ", "").split("\\") if p != ""]
    except ValueError:
        return None
    return np.asarray(parts) if len(parts) == count and all(map(math.isfinite, parts)) else None


def _positions(headers: SeriesHeaders) -> tuple[list[str], np.ndarray | None]:
    """(problems, each slice's position along the slice normal, in file order)."""
    shown = str(headers.folder)
    problems: list[str] = []
    orientations = [_floats(v.get("ImageOrientationPatient", ""), 6) for v in headers.values]
    if any(o is None for o in orientations):
        return [f"series {shown}: {_tag('ImageOrientationPatient')} missing or malformed on "
                f"{sum(o is None for o in orientations)} slice(s)"], None
    if max(float(np.abs(o - orientations[0]).max()) for o in orientations) > 1e-4:
        problems.append(f"series {shown}: {_tag('ImageOrientationPatient')} differs between slices "
                        "(inconsistent orientation)")
    positions = [_floats(v.get("ImagePositionPatient", ""), 3) for v in headers.values]
    if any(p is None for p in positions):
        return problems + [f"series {shown}: {_tag('ImagePositionPatient')} missing or malformed on "
                           f"{sum(p is None for p in positions)} slice(s)"], None
    normal = np.cross(orientations[0][:3], orientations[0][3:])
    return problems, np.array([float(normal @ p) for p in positions])


def geometry_problems(headers: SeriesHeaders) -> list[str]:
    """One line per geometric problem of a series: slices missing, spacing or orientation varying."""
    shown = str(headers.folder)
    if headers.series_count == 0:
        return [f"series {shown}: no DICOM files"]
    if headers.series_count > 1:
        return [f"series {shown}: holds {headers.series_count} series (SeriesInstanceUID); "
                "put each series in its own folder"]
    if headers.first("Modality").upper() == "SEG":
        return [f"series {shown}: {_tag('Modality')} is SEG: DICOM-SEG is not supported; export the "
                "segmentation as a mask series or a NIfTI file beside the series"]
    frames = headers.first("NumberOfFrames")
    if len(headers.files) < 2:
        what = f"a multi-frame file ({_tag('NumberOfFrames')} {frames})" if frames not in ("", "1") else "one slice"
        return [f"series {shown}: {what}; one file per slice is needed (enhanced/multi-frame DICOM is "
                "not supported)"]
    problems: list[str] = []
    for name in ("Rows", "Columns", "PixelSpacing"):
        seen = {v.get(name, "").strip() for v in headers.values}
        if name == "PixelSpacing":
            parsed = [_floats(v.get(name, ""), 2) for v in headers.values]
            if any(p is None for p in parsed):
                problems.append(f"series {shown}: {_tag(name)} missing or malformed on "
                                f"{sum(p is None for p in parsed)} slice(s)")
                continue
            if max(float(np.abs(p - parsed[0]).max()) for p in parsed) > 1e-4 * max(1.0, float(parsed[0].max())):
                problems.append(f"series {shown}: {_tag(name)} differs between slices ({', '.join(sorted(seen))})")
        elif len(seen) > 1:
            problems.append(f"series {shown}: {_tag(name)} differs between slices ({', '.join(sorted(seen))})")
    found, along = _positions(headers)
    problems += found
    if along is None:
        return problems
    ordered = np.sort(along)
    steps = np.diff(ordered)
    step = float(np.median(steps))
    if step <= 1e-6 or (steps <= 1e-3 * step).any():
        problems.append(f"series {shown}: {_tag('ImagePositionPatient')}: "
                        f"{int((steps <= max(1e-3 * step, 1e-6)).sum())} slice(s) share a position (duplicates)")
        return problems
    gaps = [(float(a), float(b), s) for a, b, s in zip(ordered[:-1], ordered[1:], steps) if s > 1.5 * step]
    if gaps:
        missing = sum(int(round(s / step)) - 1 for _, _, s in gaps)
        where = "; ".join(f"between {a:.4g} and {b:.4g} mm" for a, b, _ in gaps[:3])
        problems.append(f"series {shown}: {_tag('ImagePositionPatient')}: {missing} slice(s) missing "
                        f"({where} along the slice normal; slice spacing {step:.4g} mm)")
    elif float(np.abs(steps - step).max()) > 0.01 * step + 1e-3:
        problems.append(f"series {shown}: {_tag('ImagePositionPatient')}: slice spacing varies from "
                        f"{float(steps.min()):.4g} to {float(steps.max()):.4g} mm (inconsistent spacing)")
    return problems


def series_problems(folder: str | Path) -> list[str]:
    """Geometry problems of the series in ``folder`` (what the manifest checker reports)."""
    return geometry_problems(read_headers(folder))


def read_series(folder: str | Path) -> Any:
    """The series as one SimpleITK image (slices in GDCM's position order, LPS geometry)."""
    import SimpleITK as sitk

    ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if len(ids) != 1:
        raise ValueError(f"series {folder}: expected one DICOM series in the folder, found {len(ids)}")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), ids[0]))
    return reader.Execute()


# ---- import -----------------------------------------------------------------------------------
def _attributes(headers: SeriesHeaders) -> tuple[dict[str, str], list[str], list[str]]:
    """({sex, age}, problems, warnings) from the first slice's header."""
    shown = str(headers.folder)
    problems, warnings = [], []
    sex_code = headers.first("PatientSex").upper()
    sex = ""
    if sex_code in SEX_CODES:
        sex = SEX_CODES[sex_code]
    elif sex_code:
        problems.append(f"series {shown}: {_tag('PatientSex')} {sex_code!r} is not a known sex code "
                        "(M or F; leave it empty if unknown)")
    else:
        warnings.append(f"series {shown}: {_tag('PatientSex')} is empty; this case has no sex group")
    years, error = parse_age(headers.first("PatientAge"))
    if error:
        problems.append(f"series {shown}: {_tag('PatientAge')} {error}")
    elif years is None:
        years = age_from_dates(headers.first("PatientBirthDate"), headers.first("StudyDate"))
        if years is None:
            problems.append(f"series {shown}: {_tag('PatientAge')} is missing and no usable "
                            f"{_tag('PatientBirthDate')} with {_tag('StudyDate')} (YYYYMMDD) to derive it")
    if years is not None and not 0.0 <= years <= 120.0:
        problems.append(f"series {shown}: {_tag('PatientAge')}: {years:g} years is out of range 0-120")
        years = None
    return {"sex": sex, "age": "" if years is None else _years_text(years)}, problems, warnings


def _mask_problems(image: SeriesHeaders, mask: SeriesHeaders) -> list[str]:
    """A mask series must lie on its image's slices: same count, size and positions."""
    problems = geometry_problems(mask)
    if problems:
        return problems
    shown = f"series {mask.folder}"
    if len(mask.files) != len(image.files):
        return [f"{shown}: {len(mask.files)} slices, its image series {image.folder} has {len(image.files)}"]
    for name in ("Rows", "Columns"):
        if mask.first(name) != image.first(name):
            problems.append(f"{shown}: {_tag(name)} {mask.first(name)} differs from its image's {image.first(name)}")
    _, a = _positions(image)
    _, b = _positions(mask)
    if a is not None and b is not None and np.abs(np.sort(a) - np.sort(b)).max() > 1e-3:
        problems.append(f"{shown}: {_tag('ImagePositionPatient')} does not match its image's slices")
    return problems


def _find_mask(folder: Path, suffix: str) -> Path | None:
    sibling = folder.with_name(folder.name + suffix)
    if sibling.is_dir():
        return sibling
    for ext in NIFTI_SUFFIXES:
        candidate = folder.with_name(folder.name + suffix + ext)
        if candidate.is_file():
            return candidate
    return None


def _group_key(headers: SeriesHeaders) -> str:
    """Split unit: the patient (hashed, never written), else the series folder."""
    patient = headers.first("PatientID")
    return "patient-" + hashlib.sha256(patient.encode()).hexdigest()[:16] if patient else str(headers.folder)


def import_dicom(src: str | Path, out: str | Path, *, test_fraction: float = 0.25,
                 val_fraction: float = 0.0, seed: int = 0, mask_suffix: str = "_seg",
                 site: str | None = None) -> tuple[Path, dict[str, int], list[str]]:
    """Write ``out/manifest.csv`` for the DICOM series under ``src``; (path, split counts, warnings).

    Raises :class:`DicomImportError` with every problem (one line each) and writes nothing then.
    """
    from fedfair_med.data.importers import _carve_val, _split_groups
    from fedfair_med.data.manifest import write_manifest

    src, out = Path(src).expanduser().resolve(), Path(out)
    if not src.is_dir():
        raise DicomImportError([f"{src}: not a folder"])
    if not 0.0 < test_fraction < 1.0 or not 0.0 <= val_fraction < 1.0:
        raise DicomImportError([f"test fraction must lie in (0, 1) and val fraction in [0, 1), "
                                f"got {test_fraction} and {val_fraction}"])
    folders = sorted(Path(root) for root, _, files in os.walk(src) if files)
    series = [f for f in folders if not f.name.endswith(mask_suffix) and is_series_folder(f)]
    problems: list[str] = []
    warnings: list[str] = []
    cases = []
    for folder in series:
        headers = read_headers(folder)
        found = geometry_problems(headers)
        attributes, attribute_problems, attribute_warnings = _attributes(headers)
        found += attribute_problems
        warnings += attribute_warnings
        mask = _find_mask(folder, mask_suffix)
        if mask is None:
            found.append(f"series {folder}: no segmentation; expected a mask series {folder.name}{mask_suffix}/ "
                         f"or {folder.name}{mask_suffix}.nii.gz beside it")
        elif mask.is_dir() and not geometry_problems(headers):
            found += _mask_problems(headers, read_headers(mask))
        problems += found
        cases.append((folder, mask, attributes, _group_key(headers)))
    if not series:
        problems.append(f"{src}: no DICOM series found (one folder of DICOM files per series)")
    if problems:
        raise DicomImportError(problems)
    if len({key for *_, key in cases}) < 2:
        raise DicomImportError([f"{src}: {len(cases)} series of one patient; a train and a test "
                                "split need at least two patients"])
    test, train = _split_groups([key for *_, key in cases], test_fraction, seed)
    val = _carve_val(sorted(train), val_fraction, seed)
    name = site or out.name
    rows = [{"id": f"{name}-{k:04d}", "image": str(folder), "label": str(mask),
             "split": "test" if key in test else "val" if key in val else "train", **attributes}
            for k, (folder, mask, attributes, key) in enumerate(cases, start=1)]
    path = write_manifest(out / "manifest.csv", rows, attribute_names=("sex", "age"), site=name, task="mri",
                          comments=[f"imported from {len(rows)} DICOM series (headers only: sex, age); "
                                    f"split by patient, test fraction {test_fraction}, seed {seed}"])
    counts = {s: sum(r["split"] == s for r in rows) for s in ("train", "val", "test")}
    return path, counts, warnings
