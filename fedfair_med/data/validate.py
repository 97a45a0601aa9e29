"""Open every file a manifest names and report what would break (or bias) training.

:func:`check_manifest` never raises and never skips a row silently: each unreadable or
inconsistent file becomes a :class:`~fedfair_med.data.manifest.Problem` naming the manifest,
the row (CSV line) and the column. Findings that are expected in real data — missing age or
sex, an empty mask — are *warnings*, kept in a separate list so they never fail a check.

Rules (also in ``docs/data.md``):

* **2D images** (PNG/JPEG/TIFF…) are opened and fully decoded with Pillow; a truncated or
  corrupt file is a problem.
* **2D masks** are read as 8-bit grey (RGB masks: the maximum over the colour channels, so a
  red or white mask both count). Foreground is ``value > mask_threshold`` (127). JPEG masks
  carry grey edges, so a few ambiguous values are fine; a mask is **not binary** when more
  than 5 % of its pixels lie in the ambiguous band 32..223, or when it is coded 0/1 (the
  threshold would erase its foreground — store foreground as 255).
* **NIfTI** files are read with nibabel, falling back to SimpleITK. A volume must be 3D (a 4D
  file with one volume is accepted); its affine must be regular (every voxel spacing > 0 and
  a non-zero determinant). A NIfTI mask is binary when it holds at most two distinct integer
  values; foreground is ``value > 0`` (``mask_threshold`` concerns 8-bit 2D masks only).
* A mask (or ``fov``) must have its image's spatial shape.
* Classification labels must be one of the task's known classes (``0``/``1`` or a name the
  task maps, see :data:`TASK_FORMATS`).
* Each site needs a non-empty ``train`` and ``test`` split; ``val`` may be empty.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from fedfair_med.contracts import CLASSIFICATION, SEGMENTATION, age_band
from fedfair_med.data.manifest import (
    HAM10000_BENIGN, HAM10000_MALIGNANT,
    SPLITS, Manifest, ManifestRow, Problem, normalise_age, normalise_sex,
)

FORMAT_2D = "2d"
FORMAT_NIFTI = "nifti"

AMBIGUOUS_BAND = (32, 223)
MAX_AMBIGUOUS_FRACTION = 0.05
NIFTI_SUFFIXES = (".nii", ".nii.gz")
#: Age bands shown in summaries; the same edge as the fairness default (≤60 / >60).
SUMMARY_AGE_EDGES = (60,)

BINARY_CLASSES: Mapping[str, int] = {"0": 0, "1": 1}
#: 0/1, benign/malignant, or a HAM10000 diagnosis code (data/manifest.py says which are malignant)
SKIN_CLASSES: Mapping[str, int] = {
    **BINARY_CLASSES, "benign": 0, "malignant": 1,
    **{code: 1 for code in HAM10000_MALIGNANT}, **{code: 0 for code in HAM10000_BENIGN},
}


@dataclass(frozen=True)
class TaskFormat:
    """How a task's manifest is read: the label kind, the image format and known classes."""

    kind: str
    image_format: str
    classes: Mapping[str, int] | None = None


TASK_FORMATS: dict[str, TaskFormat] = {
    "polyp": TaskFormat(SEGMENTATION, FORMAT_2D),
    "fundus": TaskFormat(SEGMENTATION, FORMAT_2D),
    "mri": TaskFormat(SEGMENTATION, FORMAT_NIFTI),
    "skin": TaskFormat(CLASSIFICATION, FORMAT_2D, SKIN_CLASSES),
}


def task_format(task: str) -> TaskFormat:
    try:
        return TASK_FORMATS[task]
    except KeyError:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASK_FORMATS)}") from None


@dataclass
class ManifestSummary:
    """What a site holds, per split: counts, groups, image sizes, class balance."""

    site: str
    task_kind: str
    split_counts: dict[str, int]
    group_counts: dict[str, dict[str, dict[str, int]]]  # attribute → group → split → n
    image_sizes: dict[str, int]  # "W×H" (2D) or "X×Y×Z" (NIfTI) → n
    class_counts: dict[str, dict[str, int]] = field(default_factory=dict)  # split → class → n
    foreground_fraction: dict[str, float] = field(default_factory=dict)  # split → mean

    @property
    def total(self) -> int:
        return sum(self.split_counts.values())


@dataclass
class CheckResult:
    """``problems`` fail a check; ``warnings`` are reported but expected in real data."""

    problems: list[Problem]
    warnings: list[Problem]
    summary: ManifestSummary

    @property
    def ok(self) -> bool:
        return not self.problems


class _Unreadable(Exception):
    """A file that could not be opened; the message says why, in words for a data manager."""


# ---- readers -------------------------------------------------------------------------------
def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def _check_exists(path: Path) -> None:
    try:
        if not path.exists():
            raise _Unreadable("file not found")
        if path.is_dir():
            raise _Unreadable("is a folder, not a file")
    except (OSError, ValueError) as exc:  # e.g. a NUL byte or an over-long name
        raise _Unreadable(f"not a usable path ({exc})") from None


def _open_2d(path: Path) -> Any:
    """A fully decoded Pillow image (decoding is what exposes truncated files)."""
    from PIL import Image

    _check_exists(path)
    if _is_nifti(path):
        raise _Unreadable("is a NIfTI volume, but this task expects 2D images")
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError… for bad files
        raise _Unreadable(f"corrupt or not an image ({type(exc).__name__}: {exc})") from None


def _mask_array(image: Any) -> np.ndarray:
    """8-bit grey values of a mask: mode '1' → 0/255, colour → max over channels."""
    if image.mode == "1":
        return np.asarray(image, dtype=np.uint8) * 255
    if image.mode in ("RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV"):
        return np.asarray(image.convert("RGB"), dtype=np.uint8).max(axis=2)
    if image.mode in ("L", "LA", "P", "PA"):
        return np.asarray(image.convert("L"), dtype=np.uint8)
    raise _Unreadable(f"mask has pixel mode {image.mode!r}; save masks as 8-bit grey (0 and 255)")


@dataclass
class _Volume:
    data: np.ndarray  # spatial array, (x, y, z) order
    spacing: tuple[float, ...]
    determinant: float


def _verify_gzip(path: Path) -> None:
    """Decompress a ``.gz`` to its end: a cut file must not pass as a short volume."""
    import gzip
    import zlib

    try:
        with gzip.open(path, "rb") as stream:
            while stream.read(1 << 20):
                pass
    except (OSError, EOFError, zlib.error) as exc:
        raise _Unreadable(f"corrupt NIfTI (gzip stream: {exc})") from None


def _open_volume(path: Path) -> _Volume:
    """Read a NIfTI with nibabel; SimpleITK only when nibabel rejects the header itself.

    Both give (x, y, z) order. Data-level failures are never retried with SimpleITK, which
    can read a cut file without complaint. A folder is a DICOM series (:func:`_open_series`).
    """
    if path.is_dir():
        return _open_series(path)
    _check_exists(path)
    if not _is_nifti(path):
        raise _Unreadable("is not a NIfTI file (.nii or .nii.gz), but this task expects volumes")
    if path.name.lower().endswith(".gz"):
        _verify_gzip(path)
    import nibabel as nib

    try:
        image = nib.load(str(path))
    except Exception as nibabel_error:  # a header nibabel cannot parse: let SimpleITK try
        try:
            import SimpleITK as sitk

            image = sitk.ReadImage(str(path))
            data = np.transpose(sitk.GetArrayFromImage(image))  # (z, y, x) → (x, y, z)
            if image.GetNumberOfComponentsPerPixel() > 1:
                data = np.moveaxis(data, 0, -1)
            dimension = image.GetDimension()
            direction = np.asarray(image.GetDirection(), dtype=float).reshape(dimension, dimension)
            linear = (direction * np.asarray(image.GetSpacing()))[:3, :3]
        except Exception as sitk_error:
            reason = str(sitk_error).strip().splitlines()
            raise _Unreadable(
                f"corrupt NIfTI (nibabel: {nibabel_error}; "
                f"SimpleITK: {reason[-1] if reason else type(sitk_error).__name__})"
            ) from None
    else:
        try:
            data = np.asanyarray(image.dataobj)
        except Exception as exc:  # truncated or inconsistent data block
            raise _Unreadable(f"corrupt NIfTI (data: {type(exc).__name__}: {exc})") from None
        linear = np.asarray(image.affine, dtype=float)[:3, :3]
    if not np.all(np.isfinite(linear)):
        spacing, determinant = (float("nan"),) * 3, float("nan")
    else:
        spacing = tuple(float(s) for s in np.linalg.norm(linear, axis=0))
        determinant = float(np.linalg.det(linear)) if linear.shape == (3, 3) else 0.0
    return _Volume(data=data, spacing=spacing, determinant=determinant)


def _open_series(path: Path) -> _Volume:
    """A DICOM series folder (data/dicom.py): its geometry problems, else its voxels (x, y, z)."""
    import SimpleITK as sitk

    from fedfair_med.data.dicom import read_series, series_problems

    problems = series_problems(path)
    if problems:
        raise _Unreadable("; ".join(problems))
    try:
        image = read_series(path)
    except Exception as exc:  # GDCM's errors are long; the last line says what is wrong
        lines = str(exc).strip().splitlines()
        raise _Unreadable(f"unreadable DICOM series ({lines[-1] if lines else type(exc).__name__})") from None
    linear = (np.asarray(image.GetDirection(), dtype=float).reshape(3, 3) * np.asarray(image.GetSpacing()))
    return _Volume(data=np.transpose(sitk.GetArrayFromImage(image)),
                   spacing=tuple(float(s) for s in image.GetSpacing()),
                   determinant=float(np.linalg.det(linear)))


def _spatial_volume(volume: _Volume) -> np.ndarray:
    """The 3D array of a volume, or _Unreadable for 2D, multi-volume 4D or 5D+ data."""
    shape = volume.data.shape
    if len(shape) == 3:
        return volume.data
    if len(shape) >= 4 and all(n == 1 for n in shape[3:]):
        return volume.data.reshape(shape[:3])
    if len(shape) == 4:
        raise _Unreadable(f"is 4D with {shape[3]} volumes (shape {_size(shape)}); expected one 3D volume")
    raise _Unreadable(f"has {len(shape)} dimensions (shape {_size(shape)}); expected a 3D volume")


def _size(shape: tuple[int, ...]) -> str:
    return "×".join(str(int(n)) for n in shape)


# ---- per-row checks --------------------------------------------------------------------------
class _Checker:
    def __init__(self, manifest: Manifest, task_kind: str, image_format: str, mask_threshold: int,
                 classes: Mapping[str, int] | None, audit: bool = False) -> None:
        if task_kind not in (SEGMENTATION, CLASSIFICATION):
            raise ValueError(f"task_kind must be {SEGMENTATION!r} or {CLASSIFICATION!r}, not {task_kind!r}")
        if image_format not in (FORMAT_2D, FORMAT_NIFTI):
            raise ValueError(f"image_format must be {FORMAT_2D!r} or {FORMAT_NIFTI!r}, not {image_format!r}")
        self.manifest = manifest
        self.audit = audit
        self.file = str(manifest.path)
        self.kind = task_kind
        self.format = image_format
        self.threshold = mask_threshold
        self.classes = {k.lower(): v for k, v in (classes or BINARY_CLASSES).items()}
        self.problems: list[Problem] = []
        self.warnings: list[Problem] = []
        self.sizes: Counter[str] = Counter()
        self.class_counts: dict[str, Counter[str]] = defaultdict(Counter)
        self.foreground: dict[str, list[float]] = defaultdict(list)

    def problem(self, row: ManifestRow | None, column: str | None, message: str) -> None:
        self.problems.append(Problem(self.file, row.line if row else None, column, message))

    def warn(self, row: ManifestRow | None, column: str | None, message: str) -> None:
        self.warnings.append(Problem(self.file, row.line if row else None, column, message))

    # -- 2D
    def check_2d(self, row: ManifestRow) -> None:
        try:
            image = _open_2d(row.image)
        except _Unreadable as exc:
            self.problem(row, "image", f"cannot use {str(row.image)!r}: {exc}")
            image = None
        if image is not None:
            self.sizes[_size(image.size)] += 1
        if self.kind == SEGMENTATION:
            self.check_mask_2d(row, "label", row.label_path, image, count=True)
        if row.fov is not None:
            self.check_mask_2d(row, "fov", row.fov, image, count=False)

    def check_mask_2d(self, row: ManifestRow, column: str, path: Path, image: Any, *, count: bool) -> None:
        try:
            values = _mask_array(_open_2d(path))
        except _Unreadable as exc:
            self.problem(row, column, f"cannot use {str(path)!r}: {exc}")
            return
        if image is not None and values.shape != (image.size[1], image.size[0]):
            self.problem(row, column, f"mask size {_size(values.shape[::-1])} differs from the image's "
                                      f"{_size(image.size)} ({str(path)!r})")
        low, high = AMBIGUOUS_BAND
        ambiguous = float(np.mean((values >= low) & (values <= high)))
        foreground = values > self.threshold
        if ambiguous > MAX_AMBIGUOUS_FRACTION:
            self.problem(row, column, f"mask {str(path)!r} is not binary: {ambiguous:.1%} of pixels lie "
                                      f"between {low} and {high} (at most {MAX_AMBIGUOUS_FRACTION:.0%} allowed)")
            return
        if values.max() == 1:
            self.problem(row, column, f"mask {str(path)!r} is coded 0/1; values > {self.threshold} are "
                                      f"foreground, so store foreground as 255")
            return
        if count:
            self.record_foreground(row, float(foreground.mean()), path)

    def record_foreground(self, row: ManifestRow, fraction: float, path: Path) -> None:
        self.foreground[row.split].append(fraction)
        if fraction == 0.0:
            self.warn(row, "label", f"mask {str(path)!r} is empty (no foreground)")

    # -- NIfTI
    def check_nifti(self, row: ManifestRow) -> None:
        shape = None
        try:
            volume = _open_volume(row.image)
            data = _spatial_volume(volume)
            shape = data.shape
            self.sizes[_size(shape)] += 1
            self.check_affine(row, "image", row.image, volume)
        except _Unreadable as exc:
            self.problem(row, "image", f"cannot use {str(row.image)!r}: {exc}")
        if self.kind == SEGMENTATION:
            self.check_mask_nifti(row, "label", row.label_path, shape, count=True)
        if row.fov is not None:
            self.check_mask_nifti(row, "fov", row.fov, shape, count=False)

    def check_affine(self, row: ManifestRow, column: str, path: Path, volume: _Volume) -> None:
        spacing = volume.spacing
        if not all(np.isfinite(spacing)) or min(spacing) <= 1e-6 or not abs(volume.determinant) > 1e-12:
            shown = ", ".join(f"{s:g}" for s in spacing)
            self.problem(row, column, f"{str(path)!r} has a degenerate affine (voxel spacing {shown}; "
                                      f"determinant {volume.determinant:g}): its geometry is missing or singular")

    def check_mask_nifti(self, row: ManifestRow, column: str, path: Path, image_shape: tuple[int, ...] | None,
                         *, count: bool) -> None:
        try:
            volume = _open_volume(path)
            data = _spatial_volume(volume)
        except _Unreadable as exc:
            self.problem(row, column, f"cannot use {str(path)!r}: {exc}")
            return
        self.check_affine(row, column, path, volume)
        if image_shape is not None and data.shape != image_shape:
            self.problem(row, column, f"mask shape {_size(data.shape)} differs from the image's "
                                      f"{_size(image_shape)} ({str(path)!r})")
        if data.dtype.kind not in "biuf":
            self.problem(row, column, f"mask {str(path)!r} has voxel type {data.dtype}; expected integers")
            return
        values = np.unique(data)
        if values.size > 2 or not np.all(np.isfinite(values)) or not np.all(np.mod(values, 1) == 0):
            listed = ", ".join(f"{v:g}" for v in values[:6]) + (" …" if values.size > 6 else "")
            self.problem(row, column, f"mask {str(path)!r} is not binary: {values.size} distinct values "
                                      f"({listed}); keep one label (values > 0 are foreground)")
            return
        if count:
            self.record_foreground(row, float(np.mean(data > 0)), path)

    # -- labels and cheap re-checks
    def check_class(self, row: ManifestRow) -> None:
        key = row.label.strip().lower()
        if key not in self.classes:
            known = ", ".join(sorted(self.classes))
            self.problem(row, "label", f"{row.label!r} is not a known class; expected one of {known}")
            return
        self.class_counts[row.split][str(self.classes[key])] += 1

    def recheck_rows(self) -> None:
        """The cheap checks of load_manifest, for manifests built in code rather than parsed."""
        first: dict[str, int] = {}
        for row in self.manifest.rows:
            if row.id in first:
                self.problem(row, "id", f"duplicate id {row.id!r} (first used on row {first[row.id]})")
            else:
                first[row.id] = row.line
            if row.split not in SPLITS:
                self.problem(row, "split", f"{row.split!r} is not a split; use train, val or test")
            for name, normalise in (("sex", normalise_sex), ("age", normalise_age)):
                if name in row.attributes:
                    _, error = normalise(row.attributes[name])
                    if error:
                        self.problem(row, name, error)
        # An audit-only manifest (a hospital scoring a model it did not train) needs no train rows.
        for split in ("test",) if self.audit else ("train", "test"):
            if not self.manifest.split(split):
                self.problem(None, "split", f"the '{split}' split is empty; " + (
                    "an audit scores the test rows" if self.audit
                    else "every site needs train and test rows (--audit checks a manifest that "
                         "is only audited)"))

    def run(self) -> CheckResult:
        self.recheck_rows()
        for row in self.manifest.rows:
            try:
                if self.format == FORMAT_NIFTI:
                    self.check_nifti(row)
                else:
                    self.check_2d(row)
                if self.kind == CLASSIFICATION:
                    self.check_class(row)
            except Exception as exc:  # the contract is "report, never raise": a last safety net
                self.problem(row, None, f"could not be checked ({type(exc).__name__}: {exc})")
        return CheckResult(problems=list(dict.fromkeys(self.problems)),
                           warnings=list(dict.fromkeys([*self.manifest.warnings, *self.warnings])),
                           summary=self.summary())

    def summary(self) -> ManifestSummary:
        rows = self.manifest.rows
        split_counts = {s: sum(r.split == s for r in rows) for s in SPLITS}
        groups: dict[str, dict[str, dict[str, int]]] = {}
        for name in self.manifest.attribute_names:
            table: dict[str, dict[str, int]] = defaultdict(lambda: {s: 0 for s in SPLITS})
            for row in rows:
                value = row.attributes.get(name, "")
                group = age_band(value, SUMMARY_AGE_EDGES) if name == "age" else value
                if row.split in SPLITS:
                    table[group or "(missing)"][row.split] += 1
            groups[name] = dict(sorted(table.items()))
        return ManifestSummary(
            site=self.manifest.site, task_kind=self.kind, split_counts=split_counts,
            group_counts=groups, image_sizes=dict(self.sizes.most_common()),
            class_counts={s: dict(sorted(c.items())) for s, c in self.class_counts.items()},
            foreground_fraction={s: float(np.mean(v)) for s, v in self.foreground.items() if v},
        )


def check_manifest(
    manifest: Manifest,
    *,
    task_kind: str,
    image_format: str,
    mask_threshold: int = 127,
    classes: Mapping[str, int] | None = None,
    audit: bool = False,
) -> CheckResult:
    """Open every image, mask and region mask of a manifest and report each problem found.

    ``classes`` maps classification labels (lower case) to class indices; ``0``/``1`` by default.
    ``audit``: the manifest is only scored (``fedfair-med report --model``), never trained on, so
    it needs test rows but no train rows; every row is still checked the same way.
    """
    return _Checker(manifest, task_kind, image_format, mask_threshold, classes, audit).run()


def check_manifest_for_task(manifest: Manifest, task: str, *, mask_threshold: int = 127) -> CheckResult:
    """:func:`check_manifest` with the kind, format and classes of a named task."""
    spec = task_format(task)
    return check_manifest(manifest, task_kind=spec.kind, image_format=spec.image_format,
                          mask_threshold=mask_threshold, classes=spec.classes)
