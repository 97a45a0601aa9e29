"""Small real files for the data-layer tests: PNG/JPEG images and masks, NIfTI volumes, CSVs.

Everything is written with Pillow / nibabel into a test's ``tmp_path``, so the validators read
genuine (and genuinely broken) files rather than mocks.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

IMAGE_SIZE = (16, 12)  # (width, height), Pillow's order
SQUARE = (slice(2, 6), slice(3, 7))  # 4 × 4 foreground pixels in a 12 × 16 mask


def shared_data_dir() -> Path:
    """The read-only public datasets: ``$FEDFAIR_SHARED_DATA`` or ``../shared/data``."""
    env = os.environ.get("FEDFAIR_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def rgb_image(path: Path, size: tuple[int, int] = IMAGE_SIZE, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def square_mask_array(size: tuple[int, int] = IMAGE_SIZE, value: int = 255) -> np.ndarray:
    values = np.zeros((size[1], size[0]), dtype=np.uint8)
    values[SQUARE] = value
    return values


def grey_image(path: Path, values: np.ndarray, **save_kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(values.astype(np.uint8), mode="L").save(path, **save_kwargs)
    return path


def truncated_copy(source: Path, target: Path, keep: float = 0.5) -> Path:
    """A file cut part-way, as a failed upload or full disk leaves it."""
    data = source.read_bytes()
    target.write_bytes(data[: max(1, int(len(data) * keep))])
    return target


def write_manifest_text(path: Path, header: str, rows: Sequence[str], preamble: Sequence[str] = ()) -> Path:
    """A manifest written line by line, as a person would type it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([*preamble, header, *rows]) + "\n", encoding="utf-8")
    return path


def segmentation_site(root: Path, *, n_train: int = 2, n_test: int = 1, name: str = "site.csv") -> Path:
    """A valid 2D segmentation site: RGB PNG images, 0/255 square masks, sex and age."""
    rows = []
    sexes, ages = ("F", "male", "Female", "m"), ("34", "71", "50.0", "66")
    for index in range(n_train + n_test):
        rgb_image(root / "images" / f"case{index}.png", seed=index)
        grey_image(root / "masks" / f"case{index}.png", square_mask_array())
        split = "train" if index < n_train else "test"
        rows.append(f"case{index},images/case{index}.png,masks/case{index}.png,{split},"
                    f"{sexes[index % 4]},{ages[index % 4]}")
    return write_manifest_text(root / name, "id,image,label,split,sex,age", rows,
                               preamble=["# site: hospital-a", "# task: polyp"])


def classification_site(root: Path, labels: Sequence[str] = ("0", "1", "0", "1"),
                        splits: Sequence[str] = ("train", "train", "test", "test")) -> Path:
    rows = []
    for index, (label, split) in enumerate(zip(labels, splits)):
        rgb_image(root / "images" / f"lesion{index}.jpg", seed=index)
        rows.append(f"lesion{index},images/lesion{index}.jpg,{label},{split},{'MF'[index % 2]},{40 + index}")
    return write_manifest_text(root / "site.csv", "id,image,label,split,sex,age", rows)


def nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


def volume_site(root: Path, shape: tuple[int, int, int] = (8, 7, 5)) -> Path:
    """A valid NIfTI segmentation site: two train and one test volume with a cube mask."""
    rng = np.random.default_rng(0)
    rows = []
    for index, split in enumerate(("train", "train", "test")):
        nifti(root / f"vol{index}.nii.gz", rng.normal(size=shape).astype(np.float32))
        mask = np.zeros(shape, dtype=np.uint8)
        mask[2:5, 2:5, 1:3] = 1
        nifti(root / f"vol{index}_seg.nii.gz", mask)
        rows.append(f"vol{index},vol{index}.nii.gz,vol{index}_seg.nii.gz,{split},{'FM'[index % 2]},{50 + index}")
    return write_manifest_text(root / "mri.csv", "id,image,label,split,sex,age", rows)


def singular_nifti(path: Path, shape: tuple[int, int, int] = (8, 7, 5)) -> Path:
    """A .nii.gz whose sform has a zero column and whose pixdim has a zero spacing.

    nibabel refuses to *write* such an affine, so the header bytes are patched directly
    (NIfTI-1: pixdim at byte 76, qform_code at 252, srow_y at 296).
    """
    import gzip
    import struct

    import nibabel as nib

    plain = path.with_name("plain_" + path.name.removesuffix(".gz"))
    nib.save(nib.Nifti1Image(np.zeros(shape, dtype=np.float32), np.eye(4)), str(plain))
    header = bytearray(plain.read_bytes())
    header[76 + 8: 76 + 12] = struct.pack("<f", 0.0)
    header[252:254] = struct.pack("<h", 0)
    header[296:312] = struct.pack("<4f", 0.0, 0.0, 0.0, 0.0)
    path.write_bytes(gzip.compress(bytes(header)))
    plain.unlink()
    return path
