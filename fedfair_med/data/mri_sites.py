"""A small multi-site MRI federation derived from one real abdominal MRI volume.

No public multi-site MRI set small enough for tests ships with this project, so
:func:`derive_mri_federation` makes one from the TotalSegmentator example MRI in
``shared/data/mri_abdomen_totalseg`` (117 × 91 × 20 voxels, 3 mm, with a model-made organ label
map). Each *site* plays a different scanner and protocol:

* **intensity** — ``y = g · (x / x₉₉)^γ · B(u, v) · s + b + n``: gain ``g``, gamma ``γ``, a smooth
  multiplicative bias field ``B = exp(a·u + c·v + e·u·v)`` over normalised in-plane
  coordinates (coil inhomogeneity), offset ``b`` and Gaussian noise ``n``;
* **resolution** — the crop is resampled to the site's voxel size (linear for the image,
  nearest for the label), the affine's columns scaled to match;
* **orientation** — axis flips and a permutation of the stored array, each compensated in the
  affine, so the anatomy sits at the same world coordinates but a reader that ignored the affine
  would see it mirrored or transposed.

Each site gets several volumes cropped from different (random, organ-containing) boxes of the
source, so it has distinct train and test volumes. The binary target is one organ of the label
map (liver, label 5, by default: the largest organ, present in every slice). Every volume of
every site comes from the *same* patient, so this federation tests harmonisation
(orientation, spacing, intensity) and the pipeline, not generalisation across patients.

Files: ``out_dir/<site>/images/<id>.nii.gz``, ``labels/<id>.nii.gz`` and ``manifest.csv``
(paths relative to the manifest). Nothing is written into the repository.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from fedfair_med.data.manifest import write_manifest

#: TotalSegmentator ``total_mr`` label values of a few large organs.
ORGAN_LABELS = {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "liver": 5, "stomach": 6}


@dataclass(frozen=True)
class MRISiteStyle:
    """How one derived site's scanner stores and renders the anatomy."""

    name: str
    voxel_size: tuple[float, float, float]  # mm along the source array's axes
    permutation: tuple[int, int, int]  # stored axis j = source axis permutation[j]
    flips: tuple[bool, bool, bool]  # flip stored axis j
    gain: float
    gamma: float
    bias: float
    field: tuple[float, float, float]  # bias-field coefficients a, c, e
    noise: float


PRESET_STYLES = (
    MRISiteStyle("mri-site-a", (3.0, 3.0, 3.0), (0, 1, 2), (False, False, False),
                 gain=1.0, gamma=1.0, bias=0.0, field=(0.0, 0.0, 0.0), noise=4.0),
    MRISiteStyle("mri-site-b", (2.5, 2.5, 4.0), (0, 1, 2), (True, True, False),
                 gain=1.6, gamma=0.75, bias=60.0, field=(0.35, -0.2, 0.1), noise=8.0),
    MRISiteStyle("mri-site-c", (4.0, 4.0, 3.5), (1, 0, 2), (False, True, True),
                 gain=0.7, gamma=1.35, bias=-20.0, field=(-0.25, 0.3, -0.15), noise=12.0),
)


def site_styles(sites: int, seed: int = 0) -> list[MRISiteStyle]:
    """The three preset styles, then random ones for further sites."""
    styles = list(PRESET_STYLES[:sites])
    rng = np.random.default_rng([seed, 7919])
    for k in range(len(styles), sites):
        perm = tuple(int(i) for i in rng.permutation(3))
        styles.append(MRISiteStyle(
            f"mri-site-{chr(ord('a') + k) if k < 26 else k}",
            tuple(float(v) for v in rng.choice([2.5, 3.0, 3.5, 4.0], size=3)),  # type: ignore[arg-type]
            perm,  # type: ignore[arg-type]
            tuple(bool(b) for b in rng.integers(0, 2, size=3)),  # type: ignore[arg-type]
            gain=float(rng.uniform(0.6, 1.6)), gamma=float(rng.uniform(0.7, 1.4)),
            bias=float(rng.uniform(-30, 80)),
            field=tuple(float(v) for v in rng.uniform(-0.35, 0.35, size=3)),  # type: ignore[arg-type]
            noise=float(rng.uniform(3, 12)),
        ))
    return styles


def _crop_box(rng: np.random.Generator, shape: Sequence[int], organ: np.ndarray) -> tuple[slice, ...]:
    """A random box of 65–85 % of each in-plane extent (and 70–90 % of the slices) that keeps
    the organ's in-plane bounding box whole when it fits."""
    where = np.argwhere(organ)
    lo, hi = where.min(0), where.max(0)
    box = []
    for axis, n in enumerate(shape):
        frac = rng.uniform(0.65, 0.85) if axis < 2 else rng.uniform(0.7, 0.9)
        size = max(int(round(n * frac)), min(n, 4))
        if axis < 2:
            size = min(n, max(size, int(hi[axis] - lo[axis] + 1)))
            start_min, start_max = max(0, int(hi[axis]) + 1 - size), min(int(lo[axis]), n - size)
        else:
            start_min, start_max = 0, n - size
        start = int(rng.integers(start_min, max(start_min, start_max) + 1))
        box.append(slice(start, start + size))
    return tuple(box)


def _resample(array: np.ndarray, ratio: np.ndarray, order: int) -> np.ndarray:
    """Resample so output voxel j samples input position j · ratio (per axis)."""
    from scipy.ndimage import affine_transform

    shape = tuple(int(np.floor((n - 1) / r)) + 1 for n, r in zip(array.shape, ratio))
    return affine_transform(array, np.diag(ratio), output_shape=shape, order=order, mode="nearest")


def _reorient(array: np.ndarray, affine: np.ndarray, permutation: Sequence[int],
              flips: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    """Permute/flip the stored axes and compose the affine so world coordinates are unchanged."""
    out = np.transpose(array, permutation)
    move = np.zeros((4, 4))
    move[3, 3] = 1.0
    for j, i in enumerate(permutation):
        move[i, j] = 1.0  # source index i = stored index j
    affine = affine @ move
    for j, flip in enumerate(flips):
        if flip:
            out = np.flip(out, axis=j)
            undo = np.eye(4)
            undo[j, j] = -1.0
            undo[j, 3] = out.shape[j] - 1  # stored index j' ↦ previous index n−1−j'
            affine = affine @ undo
    return np.ascontiguousarray(out), affine


def _intensity(image: np.ndarray, style: MRISiteStyle, rng: np.random.Generator) -> np.ndarray:
    scale = float(np.percentile(image, 99)) or 1.0
    x = np.clip(image / scale, 0.0, None) ** style.gamma
    u, v = np.meshgrid(np.linspace(-1, 1, image.shape[0]), np.linspace(-1, 1, image.shape[1]),
                       indexing="ij")
    a, c, e = style.field
    field = np.exp(a * u + c * v + e * u * v)[..., None]
    y = style.gain * x * field * scale + style.bias + rng.normal(0.0, style.noise, size=image.shape)
    return y.astype(np.float32)


def derive_mri_federation(src_image: str | Path, src_label: str | Path, out_dir: str | Path,
                          sites: int = 3, seed: int = 0, volumes_per_site: int = 4,
                          test_per_site: int = 1, organ: str | int = "liver",
                          val_per_site: int = 0) -> list[Path]:
    """Write ``sites`` site folders of derived NIfTI volumes and return their manifest paths.

    The last ``test_per_site`` volumes of a site are test and the ``val_per_site`` before them
    val (model selection in sweeps must not look at test); the rest train.
    """
    import nibabel as nib

    if sites < 1 or volumes_per_site < 2 or not 1 <= test_per_site < volumes_per_site:
        raise ValueError("need sites >= 1 and 1 <= test_per_site < volumes_per_site")
    if not 0 <= val_per_site < volumes_per_site - test_per_site:
        raise ValueError("need 0 <= val_per_site < volumes_per_site - test_per_site (one train volume at least)")
    label_value = ORGAN_LABELS[organ] if isinstance(organ, str) else int(organ)
    src = nib.load(str(src_image))
    image = np.asarray(src.dataobj, dtype=np.float32)
    labels = np.asarray(nib.load(str(src_label)).dataobj)
    if labels.shape != image.shape:
        raise ValueError(f"{src_label}: label shape {labels.shape} differs from image {image.shape}")
    organ_mask = labels == label_value
    if not organ_mask.any():
        raise ValueError(f"{src_label}: no voxel has label {label_value} ({organ!r})")
    source_affine = np.asarray(src.affine, dtype=np.float64)
    source_zooms = np.sqrt((source_affine[:3, :3] ** 2).sum(0))
    out_dir = Path(out_dir)
    manifests = []
    for k, style in enumerate(site_styles(sites, seed)):
        rng = np.random.default_rng([seed, k])
        folder = out_dir / style.name
        (folder / "images").mkdir(parents=True, exist_ok=True)
        (folder / "labels").mkdir(parents=True, exist_ok=True)
        rows = []
        for j in range(volumes_per_site):
            box = _crop_box(rng, image.shape, organ_mask)
            crop_affine = source_affine.copy()
            crop_affine[:3, 3] = source_affine[:3, :3] @ np.array([b.start for b in box]) + source_affine[:3, 3]
            ratio = np.asarray(style.voxel_size) / source_zooms
            img = _resample(image[box], ratio, order=1)
            lab = _resample(organ_mask[box].astype(np.float32), ratio, order=0)
            affine = crop_affine @ np.diag([*ratio, 1.0])
            img = _intensity(img, style, rng)
            img, new_affine = _reorient(img, affine, style.permutation, style.flips)
            lab, _ = _reorient(lab, affine, style.permutation, style.flips)
            volume_id = f"{style.name}-vol{j}"
            for array, sub, dtype in ((img, "images", np.float32), (lab, "labels", np.uint8)):
                nifti = nib.Nifti1Image(array.astype(dtype), new_affine)
                nifti.set_qform(new_affine, code=1)
                nifti.set_sform(new_affine, code=1)
                nib.save(nifti, str(folder / sub / f"{volume_id}.nii.gz"))
            first_test = volumes_per_site - test_per_site
            split = ("test" if j >= first_test else
                     "val" if j >= first_test - val_per_site else "train")
            rows.append({"id": volume_id, "image": f"images/{volume_id}.nii.gz",
                         "label": f"labels/{volume_id}.nii.gz", "split": split})
        manifests.append(write_manifest(
            folder / "manifest.csv", rows, site=style.name, task="mri",
            comments=[f"derived from {Path(src_image).name} (organ label {label_value}); "
                      f"voxel {style.voxel_size} mm, axes {style.permutation}, flips {style.flips}"],
        ))
    return manifests
