"""MRI organ segmentation from NIfTI volumes, one manifest per scanner site.

Pipeline (MONAI dictionary transforms, image and label together): ``LoadImaged`` (nibabel by
default; ``reader: simpleitk`` reads through SimpleITK instead, ``reader: itk`` uses MONAI's ITK
reader if ``itk`` is installed) → ``Orientationd`` to RAS → ``Spacingd`` to ``pixdim`` (linear
for the image, nearest for the label) → percentile intensity scaling (0.5th–99.5th percentile of
the volume → [0, 1], clipped; robust to each site's gain, offset and outliers) → label map to a
{0, 1} mask (any non-zero label, or ``foreground_labels``) → in-plane pad/crop to ``image_size``
(a fixed physical field of view of ``image_size × pixdim`` mm, 256 mm by default, centred).

**2D slices, volume evaluation** — the choice for CPU budgets. A 3D network at useful
resolution is too slow on two CPU cores, and axial slices of a harmonised volume are a good 2D
problem. So:

* *training* samples are axial (RAS ``S``-axis) slices: each training volume is drawn
  ``slices_per_volume`` times per epoch, and each draw picks a slice that contains foreground
  with probability ``foreground_fraction`` (default 0.75), otherwise a background slice (any
  slice when the volume has none) — foreground-rich batches, with enough background that the
  network learns to predict empty slices;
* *evaluation* yields one sample per **volume** (C × H × W × D). The task's model wraps the 2D
  network in :class:`SliceWise`, which runs it on every axial slice and stacks the logits back
  into a volume, so the metric is **one Dice per volume** — what a clinician reads, and what
  sites are compared on. Volumes of one split are zero-padded along ``S`` to a common depth
  (computed from the NIfTI headers) so they batch; a ``fov`` mask marks the real slices and the
  masked loss/metric of :class:`~fedfair_med.tasks.imaging.MaskedSegmentationTask` ignores the
  padding.

The Dice is computed on the resampled grid (``pixdim``), the one the model sees.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.data.image_reader import ImageReader
from monai.transforms import (
    Compose, LoadImaged, MapTransform, Orientationd, RandAdjustContrastd, RandBiasFieldd,
    RandGaussianNoised, Randomizable, RandScaleIntensityd, RandShiftIntensityd,
    ResizeWithPadOrCropd, ScaleIntensityRangePercentilesd, Spacingd, SpatialPadd,
)
from monai.utils import MetaKeys, SpaceKeys
from torch import nn
from torch.utils.data import Dataset

from fedfair_med.contracts import SEGMENTATION
from fedfair_med.tasks.base import TaskDefaults
from fedfair_med.tasks.imaging import (
    FOV, IMAGE, LABEL, ForegroundMaskd, FullMaskd, MaskedSegmentationTask, finish, make_dataset,
    public_value,
)

READERS = ("nibabel", "simpleitk", "itk")


# ---- readers ---------------------------------------------------------------------------------
class SimpleITKReader(ImageReader):
    """A MONAI image reader backed by SimpleITK.

    SimpleITK returns arrays in (z, y, x) order with an LPS world frame; MONAI (like nibabel)
    uses (x, y, z) and RAS. So the array is transposed to (x, y, z) and the affine built as
    ``diag(−1, −1, 1, 1) · [D · diag(spacing) | origin]`` (``D`` the direction cosines).
    """

    def verify_suffix(self, filename: Any) -> bool:
        names = [filename] if isinstance(filename, (str, Path)) else list(filename)
        suffixes = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd")
        return all(str(n).lower().endswith(suffixes) or Path(n).is_dir() for n in names)

    def read(self, data: Any, **kwargs: Any) -> Any:
        import SimpleITK as sitk

        from fedfair_med.data.dicom import read_series

        names = [data] if isinstance(data, (str, Path)) else list(data)
        # a folder is a DICOM series (data/dicom.py): read in place, no conversion step
        images = [read_series(name) if Path(name).is_dir() else sitk.ReadImage(str(name)) for name in names]
        return images[0] if len(images) == 1 else images

    def get_data(self, img: Any) -> tuple[np.ndarray, dict]:
        import SimpleITK as sitk

        if isinstance(img, (list, tuple)):
            if len(img) != 1:
                raise ValueError("SimpleITKReader reads one file per key")
            img = img[0]
        ndim = img.GetDimension()
        array = sitk.GetArrayFromImage(img)
        components = img.GetNumberOfComponentsPerPixel()
        spatial_axes = tuple(reversed(range(ndim)))
        array = np.transpose(array, spatial_axes + ((ndim,) if components > 1 else ()))
        direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(ndim, ndim)
        affine = np.eye(ndim + 1)
        affine[:ndim, :ndim] = direction @ np.diag(img.GetSpacing())
        affine[:ndim, ndim] = img.GetOrigin()
        lps_to_ras = np.diag([-1.0, -1.0] + [1.0] * (ndim - 2) + [1.0]) if ndim >= 2 else np.eye(ndim + 1)
        affine = lps_to_ras @ affine
        meta = {
            MetaKeys.AFFINE: affine,
            MetaKeys.ORIGINAL_AFFINE: affine.copy(),
            MetaKeys.SPATIAL_SHAPE: np.asarray(img.GetSize()),
            MetaKeys.SPACE: SpaceKeys.RAS,
            MetaKeys.ORIGINAL_CHANNEL_DIM: -1 if components > 1 else float("nan"),
            "spacing": np.asarray(img.GetSpacing()),
        }
        return np.ascontiguousarray(array), meta


class SeriesOrFileReader(ImageReader):
    """``base`` for files, :class:`SimpleITKReader` for a folder (a DICOM series), so a manifest may
    mix NIfTI volumes and DICOM series whatever the configured reader."""

    def __init__(self, base: ImageReader) -> None:
        super().__init__()
        self.base, self.series = base, SimpleITKReader()

    def verify_suffix(self, filename: Any) -> bool:
        return self.series.verify_suffix(filename) or self.base.verify_suffix(filename)

    def read(self, data: Any, **kwargs: Any) -> Any:
        names = [data] if isinstance(data, (str, Path)) else list(data)
        if all(Path(n).is_dir() for n in names):
            return ("series", self.series.read(data, **kwargs))
        return ("file", self.base.read(data, **kwargs))

    def get_data(self, img: Any) -> tuple[np.ndarray, dict]:
        kind, image = img
        return (self.series if kind == "series" else self.base).get_data(image)


def make_reader(name: str) -> ImageReader | str:
    key = str(name).strip().lower()
    if key == "nibabel":
        from monai.data import NibabelReader

        return SeriesOrFileReader(NibabelReader())
    if key == "simpleitk":
        return SimpleITKReader()
    if key == "itk":
        return "ITKReader"
    raise ValueError(f"task 'mri': unknown reader {name!r}; choose one of {', '.join(READERS)}")


def volume_depth(path: str | Path, pixdim_s: float) -> int:
    """Upper bound of the number of axial slices after ``Orientationd`` RAS + ``Spacingd``.

    The extent along world S of the voxel-centre bounding box, over the target spacing, plus
    one (centres → count) and one of slack for rounding.
    """
    import nibabel as nib

    name = str(path).lower()
    if Path(path).is_dir():  # a DICOM series: the first slice's geometry, the slices' count
        from fedfair_med.data.dicom import read_headers

        headers = read_headers(path)
        import SimpleITK as sitk

        first, last = sitk.ImageFileReader(), sitk.ImageFileReader()
        first.SetFileName(headers.files[0])
        last.SetFileName(headers.files[-1])
        first.ReadImageInformation()
        last.ReadImageInformation()
        o1, o2 = np.asarray(first.GetOrigin()[:3]), np.asarray(last.GetOrigin()[:3])
        cosines = np.asarray(first.GetDirection()).reshape(len(first.GetSize()), -1)[:3, :3]
        spacing = first.GetSpacing()
        size = first.GetSize()
        corners = [o + cosines[:, 0] * spacing[0] * i + cosines[:, 1] * spacing[1] * j
                   for o in (o1, o2) for i in (0, size[0] - 1) for j in (0, size[1] - 1)]
        z = np.array([c[2] for c in corners])  # LPS z = RAS S
        return int(math.ceil((z.max() - z.min()) / pixdim_s)) + 2
    if name.endswith((".nii", ".nii.gz")):
        header = nib.load(str(path))
        shape, affine = header.shape[:3], np.asarray(header.affine)
    else:
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        shape = reader.GetSize()[:3]
        direction = np.asarray(reader.GetDirection()).reshape(len(reader.GetSize()), -1)[:3, :3]
        affine = np.eye(4)
        affine[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ direction @ np.diag(reader.GetSpacing()[:3])
    corners = np.array([[i, j, k] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1)
                        for k in (0, shape[2] - 1)], dtype=np.float64)
    z = corners @ affine[:3, :3].T[:, 2]
    return int(math.ceil((z.max() - z.min()) / pixdim_s)) + 2


# ---- transforms ------------------------------------------------------------------------------
class RandAxialSliced(Randomizable, MapTransform):
    """Pick one axial slice (last axis) of a (C, H, W, D) volume: foreground with probability
    ``foreground_fraction``, else background (any slice when one kind is absent)."""

    def __init__(self, keys: Sequence[str], label_key: str = LABEL,
                 foreground_fraction: float = 0.75) -> None:
        MapTransform.__init__(self, keys)
        self.label_key, self.foreground_fraction = label_key, foreground_fraction

    def randomize(self, data: Any = None) -> None:
        pass

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        label = d[self.label_key]
        per_slice = label.reshape(-1, label.shape[-1]).sum(0)
        foreground = np.flatnonzero(np.asarray(per_slice > 0))
        background = np.flatnonzero(np.asarray(per_slice <= 0))
        want_foreground = self.R.rand() < self.foreground_fraction
        pool = foreground if (want_foreground and len(foreground)) or not len(background) else background
        z = int(pool[self.R.randint(len(pool))])
        for key in self.key_iterator(d):
            d[key] = d[key][..., z]
        d["id"] = f"{d['id']}#z{z}"
        return d


class CheckDepthd(MapTransform):
    """Fail clearly if a volume is deeper than the split's padded depth (it would not batch)."""

    def __init__(self, key: str, depth: int) -> None:
        super().__init__([key])
        self.depth = depth

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        depth = data[self.keys[0]].shape[-1]
        if depth != self.depth:
            raise ValueError(f"volume {data.get('id')!r} has {depth} axial slices after resampling, "
                             f"more than the {self.depth} estimated from the split's headers")
        return dict(data)


class RepeatDataset(Dataset):
    """``times`` passes over ``base`` per epoch (each pass draws fresh random slices)."""

    def __init__(self, base: Dataset, times: int) -> None:
        self.base, self.times = base, times

    def __len__(self) -> int:
        return len(self.base) * self.times  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        return self.base[index % len(self.base)]  # type: ignore[arg-type]

    def attribute_values(self, attribute: str) -> list[Any]:
        return [public_value(r.get(attribute, "")) for r in self.base.data] * self.times  # type: ignore[attr-defined]


# ---- model ---------------------------------------------------------------------------------------
class SliceWise(nn.Module):
    """Apply a 2D network to (B, C, H, W) slices or, slice by slice, to (B, C, H, W, D) volumes."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4:
            return self.net(x)
        if x.ndim != 5:
            raise ValueError(f"SliceWise expects 4D slices or 5D volumes, got shape {tuple(x.shape)}")
        b, c, h, w, d = x.shape
        slices = x.permute(0, 4, 1, 2, 3).reshape(b * d, c, h, w)
        out = self.net(slices)
        return out.reshape(b, d, out.shape[1], h, w).permute(0, 2, 3, 4, 1)


# ---- task ----------------------------------------------------------------------------------------
class MRITask(MaskedSegmentationTask):
    name = "mri"
    kind = SEGMENTATION
    in_channels = 1
    defaults = TaskDefaults(network="unet", image_size=(64, 64), batch_size=8, lr=1e-3, rounds=10,
                            network_kwargs={"channels": (16, 32, 64)})

    def __init__(self) -> None:
        super().__init__()
        self.reader = "nibabel"
        self.pixdim: tuple[float, float, float] = (4.0, 4.0, 4.0)
        self.slices_per_volume = 8
        self.foreground_fraction = 0.75
        self.foreground_labels: tuple[int, ...] | None = None
        self.eval_depth: int | None = None

    def configure(self, reader: str = "nibabel", pixdim: Sequence[float] | float = (4.0, 4.0, 4.0),
                  slices_per_volume: int = 8, foreground_fraction: float = 0.75,
                  foreground_labels: Sequence[int] | None = None, **options: Any) -> None:
        super().configure(**options)
        make_reader(reader)  # validates the name
        self.reader = str(reader).lower()
        dims = (float(pixdim),) * 3 if isinstance(pixdim, (int, float)) else tuple(float(p) for p in pixdim)
        if len(dims) != 3 or min(dims) <= 0:
            raise ValueError(f"task 'mri': pixdim must be three positive spacings in mm, got {pixdim!r}")
        self.pixdim = dims  # type: ignore[assignment]
        if int(slices_per_volume) < 1 or not 0.0 <= float(foreground_fraction) <= 1.0:
            raise ValueError("task 'mri': slices_per_volume must be >= 1 and foreground_fraction in [0, 1]")
        self.slices_per_volume = int(slices_per_volume)
        self.foreground_fraction = float(foreground_fraction)
        self.foreground_labels = None if foreground_labels is None else tuple(int(v) for v in foreground_labels)

    def build_model(self, network: str | None = None, **kwargs: Any) -> nn.Module:
        return SliceWise(super().build_model(network, **kwargs))

    # ---- transforms ------------------------------------------------------------------------------
    def volume_transforms(self) -> list:
        keys = [IMAGE, LABEL]
        return [
            LoadImaged(keys=keys, reader=make_reader(self.reader), image_only=True,
                       ensure_channel_first=True),
            Orientationd(keys=keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
            Spacingd(keys=keys, pixdim=self.pixdim, mode=("bilinear", "nearest")),
            ScaleIntensityRangePercentilesd(keys=[IMAGE], lower=0.5, upper=99.5, b_min=0.0, b_max=1.0,
                                            clip=True),
            ForegroundMaskd(keys=[LABEL], labels=self.foreground_labels),
            ResizeWithPadOrCropd(keys=keys, spatial_size=(*self.image_size, -1)),
        ]

    def augmentations(self, spatial_keys: Sequence[str], image_key: str = IMAGE) -> list:
        """MRI has no geometric augmentation (the slice is drawn at random anyway): ``full``
        is the scanner-like intensity changes below, ``geometric`` and ``none`` leave them out."""
        if self.augmentation != "full":
            return []
        return [
            RandScaleIntensityd(keys=[image_key], factors=0.15, prob=0.5),
            RandShiftIntensityd(keys=[image_key], offsets=0.05, prob=0.5),
            RandAdjustContrastd(keys=[image_key], gamma=(0.75, 1.4), prob=0.5),
            RandBiasFieldd(keys=[image_key], coeff_range=(0.0, 0.2), prob=0.3),
            RandGaussianNoised(keys=[image_key], std=0.02, prob=0.3),
        ]

    def train_transforms(self) -> Compose:
        """Volume → one random axial slice (C, H, W) → intensity augmentation."""
        return Compose([
            *self.volume_transforms(),
            RandAxialSliced(keys=[IMAGE, LABEL], foreground_fraction=self.foreground_fraction),
            *self.augmentations([IMAGE, LABEL]),
            finish([IMAGE, LABEL]),
        ])

    def eval_transforms(self) -> Compose:
        """Whole volume (C, H, W, D), padded along S to the split's depth, with a ``fov`` of real slices."""
        steps = [*self.volume_transforms(), FullMaskd(FOV, like=LABEL)]
        if self.eval_depth is not None:
            steps += [SpatialPadd(keys=[IMAGE, LABEL, FOV], spatial_size=(-1, -1, self.eval_depth)),
                      CheckDepthd(IMAGE, self.eval_depth)]
        return Compose([*steps, finish([IMAGE, LABEL, FOV])])

    # ---- datasets --------------------------------------------------------------------------------
    def split_dataset(self, records: list[dict[str, Any]], *, train: bool, seed: int,
                      cache: bool) -> Dataset:
        if train:
            transform = self.train_transforms()
            transform.set_random_state(seed=seed)
            return RepeatDataset(make_dataset(records, transform, cache), self.slices_per_volume)
        self.eval_depth = max(volume_depth(r[IMAGE], self.pixdim[2]) for r in records)
        try:
            transform = self.eval_transforms()
        finally:
            self.eval_depth = None
        return make_dataset(records, transform, cache)
