r"""The shared machinery of the real-data tasks: manifest rows → MONAI dictionary transforms → samples.

One site is one manifest (:mod:`fedfair_med.data.manifest`). Each row becomes a *record* — a dict
with the image path, the label (a mask path or a class index), an optional field-of-view path,
``id``, ``site`` and the row's sensitive attributes — and a task's MONAI dictionary transforms
turn it into the sample dict of :mod:`fedfair_med.data.federation`:

* ``image``: float32 tensor, C × spatial; ``label``: float32 1 × spatial mask in {0, 1}, or an
  ``int`` class; optional ``fov``: float32 1 × spatial mask in {0, 1};
* ``id``, ``site`` and every manifest attribute as a string (``""`` when missing), except
  ``age``, which is a number — ``NaN`` when missing, so a batch mixing known and unknown ages
  still collates (``age_band`` of a missing age is ``""``, and :func:`attribute_values` reports
  it as ``""``);
* ``age_band`` derived from ``age`` with the run's band edges.

Datasets are :class:`monai.data.Dataset` (or :class:`monai.data.CacheDataset` with
``cache=True``, which keeps the output of the deterministic transforms in memory). Their random
transforms are seeded from the run seed and the site index, so a run is reproducible.

Masked segmentation (:class:`MaskedSegmentationTask`): when a batch carries ``fov``, only pixels
with ``m = 1`` count. With prediction ``p = σ(z)`` and target ``y``:

.. math::

    \mathcal{L}_{Dice} = 1 - \frac{2\sum m p y + \epsilon}{\sum m p + \sum m y + \epsilon},\qquad
    \mathcal{L}_{BCE} = \frac{\sum m\,\ell(z, y)}{\sum m},\qquad
    \text{Dice} = \frac{2\sum m \hat y y}{\sum m \hat y + \sum m y}

so anything outside the mask — background of a fundus photograph, zero-padded MRI slices — is
invisible to training and to the metric.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Hashable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import CacheDataset, get_track_meta, set_track_meta
from monai.data import Dataset as MonaiDataset
from monai.transforms import (
    Compose, EnsureTyped, LoadImaged, MapTransform, RandAdjustContrastd, RandFlipd,
    RandRotate90d, RandScaleIntensityd, RandScaleIntensityFixedMeand, RandShiftIntensityd,
    Resized, ScaleIntensityRanged,
)
from torch.utils.data import Dataset

from fedfair_med.contracts import MISSING, SEGMENTATION, age_band
from fedfair_med.data.federation import Federation, SiteData
from fedfair_med.data.manifest import Manifest, ManifestError, ManifestRow, load_manifest
from fedfair_med.tasks.base import Task, hard_dice, keyword_names, soft_dice_loss

IMAGE, LABEL, FOV = "image", "label", "fov"
#: Record keys that are never sensitive attributes.
RESERVED = frozenset({IMAGE, LABEL, FOV, "id", "site", "group"})


# ---- manifests and records ---------------------------------------------------------------
def load_manifests(manifests: Any, task: str) -> list[Manifest]:
    """Load every site manifest; a clear ``ValueError`` naming the file when one cannot be used."""
    if manifests is None or isinstance(manifests, (str, Path)):
        manifests = [] if manifests is None else [manifests]
    paths = [Path(p) for p in manifests]
    if not paths:
        raise ValueError(
            f"task {task!r}: no site manifests given; pass data.manifests = [path/to/site/manifest.csv, ...] "
            f"(one manifest per site; 'fedfair-med data import' writes them)"
        )
    loaded: list[Manifest] = []
    for path in paths:
        try:
            loaded.append(load_manifest(path))
        except ManifestError as err:
            raise ValueError(f"task {task!r}: manifest {path} cannot be loaded:\n{err}") from None
    names = [m.site for m in loaded]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ValueError(f"task {task!r}: site name(s) {duplicated} appear in more than one manifest "
                         f"({', '.join(map(str, paths))}); give each site its own '# site:' name")
    return loaded


def age_value(raw: str) -> float:
    """Age as a float, NaN when missing (a number either way, so batches collate)."""
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return math.nan
    return value


def public_value(value: Any) -> Any:
    """A record value as reported by :meth:`ManifestDataset.attribute_values` (NaN → '')."""
    if isinstance(value, float) and value != value:
        return MISSING
    return value


def _seed_for(seed: int, *parts: int) -> int:
    """A 32-bit seed for MONAI's RandomState from the run seed and e.g. the site index."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *parts]).generate_state(1)[0])


# ---- datasets ------------------------------------------------------------------------------
class _RecordAttributes:
    """Per-sample attribute values read from the records, without loading any image."""

    data: Sequence[Mapping[str, Any]]

    def attribute_values(self, attribute: str) -> list[Any]:
        return [public_value(record.get(attribute, MISSING)) for record in self.data]


def _single(item: Any) -> Any:
    # A transform that draws several crops returns a list; the sample contract is one dict.
    return item[0] if isinstance(item, list) and len(item) == 1 else item


class ManifestDataset(_RecordAttributes, MonaiDataset):
    """MONAI ``Dataset`` over manifest records; items are sample dicts."""

    def __getitem__(self, index: Any) -> Any:
        return _single(super().__getitem__(index))


class CachedManifestDataset(_RecordAttributes, CacheDataset):
    """MONAI ``CacheDataset``: deterministic transform outputs are computed once and kept.

    Per item only the random augmentations run, and they run with MONAI's metadata tracking
    off: nothing downstream reads it (``finish`` drops it anyway), the pixels are the same, and
    copying metadata through every flip and intensity change cost over half the time of a cached
    item (benchmarks/data_loading.py).
    """

    def __getitem__(self, index: Any) -> Any:
        tracking = get_track_meta()
        set_track_meta(False)
        try:
            return _single(super().__getitem__(index))
        finally:
            set_track_meta(tracking)


def make_dataset(records: list[dict[str, Any]], transform: Callable, cache: bool = False) -> Dataset:
    if cache:
        return CachedManifestDataset(records, transform, cache_rate=1.0, num_workers=0, progress=False)
    return ManifestDataset(records, transform)


# ---- dictionary transforms -------------------------------------------------------------------
class EnsureChannelsd(MapTransform):
    """Make an image have exactly ``channels`` channels (grey → repeated, RGBA → RGB)."""

    def __init__(self, keys: KeysCollection, channels: int = 3, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.channels = channels

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            c = img.shape[0]
            if c == self.channels:
                continue
            if c == 1:
                d[key] = img.repeat(self.channels, *([1] * (img.ndim - 1)))
            elif c > self.channels:
                d[key] = img[: self.channels]
            else:
                raise ValueError(f"{key}: {c} channels cannot become {self.channels}")
        return d


class BinariseMaskd(MapTransform):
    """One-channel {0, 1} mask from a stored mask image.

    Colour (or JPEG-compressed grey) masks are averaged over channels first. A mask stored as
    0/255 (JPEG/PNG) is foreground where the value is > 127 — JPEG ringing around the edge then
    falls on the right side; a mask already in {0, 1} (1-bit PNG) is foreground where > 0.5.
    """

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            mask = d[key]
            if mask.shape[0] > 1:
                mask = mask[:3].mean(0, keepdim=True) if mask.shape[0] >= 3 else mask[:1]
            threshold = 127.0 if float(mask.max()) > 1.0 else 0.5
            d[key] = (mask > threshold).to(torch.float32)
        return d


class ForegroundMaskd(MapTransform):
    """{0, 1} mask from a label map: any non-zero label, or only the listed label values."""

    def __init__(self, keys: KeysCollection, labels: Sequence[int] | None = None,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.labels = None if labels is None else [int(v) for v in labels]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            label = d[key]
            if self.labels is None:
                mask = label > 0.5
            else:
                rounded = torch.round(torch.as_tensor(label))
                mask = torch.zeros_like(rounded, dtype=torch.bool)
                for value in self.labels:
                    mask |= rounded == value
            d[key] = mask.to(torch.float32) if isinstance(mask, torch.Tensor) else mask.astype(np.float32)
        return d


class FullMaskd(MapTransform):
    """Add ``key`` = all-ones mask shaped like ``like`` when the record has no such mask.

    A site without field-of-view masks then counts every pixel, and every item of a loader has
    the same keys (so batches collate).
    """

    def __init__(self, key: str, like: str) -> None:
        super().__init__([key], allow_missing_keys=True)
        self.key, self.like = key, like

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if d.get(self.key) is None:
            ref = d[self.like]
            d[self.key] = torch.ones((1, *ref.shape[1:]), dtype=torch.float32)
        return d


def load_rgb(keys: Sequence[str]) -> LoadImaged:
    """Load 2D images with PIL in (row, column) order, channel first."""
    return LoadImaged(keys=list(keys), reader="PILReader", reverse_indexing=False, image_only=True,
                      ensure_channel_first=True, allow_missing_keys=True)


def to_unit_range(key: str = IMAGE) -> ScaleIntensityRanged:
    """8-bit intensities 0–255 → 0–1."""
    return ScaleIntensityRanged(keys=[key], a_min=0.0, a_max=255.0, b_min=0.0, b_max=1.0, clip=True)


def resize_pair(image_keys: Sequence[str], mask_keys: Sequence[str], size: Sequence[int]) -> list[MapTransform]:
    """Area interpolation for images (anti-aliased), nearest for masks (they stay binary)."""
    out: list[MapTransform] = [Resized(keys=list(image_keys), spatial_size=tuple(size), mode="area")]
    if mask_keys:
        out.append(Resized(keys=list(mask_keys), spatial_size=tuple(size), mode="nearest",
                           allow_missing_keys=True))
    return out


#: Values of the ``augmentation`` data option (:meth:`ImagingTask.augmentations`).
AUGMENTATIONS = ("full", "geometric", "none")


def geometric_augmentation(keys: Sequence[str]) -> list[MapTransform]:
    """Flips and right-angle rotations applied identically to the image and its masks."""
    keys = list(keys)
    return [
        RandFlipd(keys=keys, spatial_axis=0, prob=0.5, allow_missing_keys=True),
        RandFlipd(keys=keys, spatial_axis=1, prob=0.5, allow_missing_keys=True),
        RandRotate90d(keys=keys, prob=0.5, max_k=3, allow_missing_keys=True),
    ]


def colour_augmentation(key: str = IMAGE) -> list[MapTransform]:
    """Colour robustness for RGB photographs whose camera/processing differs between sites.

    Per-channel gain and offset shift hue and saturation; a mean-preserving scale changes
    contrast; a gamma curve changes the tone response.
    """
    return [
        RandScaleIntensityd(keys=[key], factors=0.15, channel_wise=True, prob=0.8),
        RandShiftIntensityd(keys=[key], offsets=0.08, channel_wise=True, prob=0.8),
        RandScaleIntensityFixedMeand(keys=[key], factors=0.25, prob=0.5),
        RandAdjustContrastd(keys=[key], gamma=(0.7, 1.5), prob=0.5),
    ]


def finish(keys: Sequence[str]) -> EnsureTyped:
    """Plain float32 tensors (no MONAI metadata), so batches collate with PyTorch's default."""
    return EnsureTyped(keys=list(keys), data_type="tensor", dtype=torch.float32, track_meta=False,
                       allow_missing_keys=True)


# ---- masked segmentation maths ------------------------------------------------------------------
def masked_soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                          eps: float = 1e-5) -> torch.Tensor:
    """Per-image soft Dice loss over pixels with mask = 1, shape (B,)."""
    mask = mask.flatten(1).to(logits.dtype)
    prob = torch.sigmoid(logits).flatten(1) * mask
    target = target.flatten(1).to(prob.dtype) * mask
    inter = (prob * target).sum(1)
    return 1.0 - (2.0 * inter + eps) / (prob.sum(1) + target.sum(1) + eps)


def masked_hard_dice(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                     threshold: float = 0.5) -> torch.Tensor:
    """Per-image Dice of the thresholded prediction inside the mask; 1 when both are empty there."""
    mask = mask.flatten(1) > 0.5
    pred = ((torch.sigmoid(logits).flatten(1) > threshold) & mask).to(torch.float64)
    target = ((target.flatten(1) > 0.5) & mask).to(torch.float64)
    inter = (pred * target).sum(1)
    denom = pred.sum(1) + target.sum(1)
    return torch.where(denom > 0, 2.0 * inter / denom.clamp_min(1e-12), torch.ones_like(denom))


# ---- tasks -----------------------------------------------------------------------------------
class ImagingTask(Task):
    """A task whose federation is one manifest per site, read through MONAI transforms.

    Subclasses declare ``name``, ``kind``, ``in_channels``, ``defaults`` and the two transform
    chains; segmentation labels are mask paths, classification labels go through
    :meth:`parse_label`.
    """

    #: Keys loaded as masks (besides ``label``) when a row has them.
    uses_fov = False

    def __init__(self) -> None:
        self.image_size: tuple[int, ...] = tuple(self.defaults.image_size)
        self.augmentation = "full"

    # ---- options ----------------------------------------------------------------------------
    def configure(self, image_size: Sequence[int] | int | None = None,
                  augmentation: str | None = None, **options: Any) -> None:
        """Apply data options from ``config.data``; unknown options are a clear error."""
        if options:
            raise ValueError(f"task {self.name!r}: unknown data option(s) {sorted(options)}")
        if augmentation is not None:
            if augmentation not in AUGMENTATIONS:
                raise ValueError(f"task {self.name!r}: augmentation must be one of "
                                 f"{', '.join(AUGMENTATIONS)}, got {augmentation!r}")
            self.augmentation = augmentation
        if image_size is not None:
            dims = len(self.defaults.image_size)
            size = (int(image_size),) * dims if isinstance(image_size, (int, float)) else tuple(int(s) for s in image_size)
            if len(size) != dims or min(size) < 8:
                raise ValueError(f"task {self.name!r}: image_size must be {dims} sizes of at least 8, got {image_size!r}")
            self.image_size = size

    def data_problems(self, data: Mapping[str, Any]) -> list[str]:
        """Unknown names, then the values ``configure`` refuses (tried on a fresh task)."""
        problems = super().data_problems(data)
        if problems:
            return problems
        names = keyword_names(*(vars(cls)["configure"] for cls in type(self).__mro__ if "configure" in vars(cls)))
        try:
            type(self)().configure(**{k: v for k, v in data.items() if k in names})
        except Exception as err:  # noqa: BLE001 - any refusal of a value is the user's to fix
            problems.append(str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)
        return problems

    # ---- transforms (subclasses) -----------------------------------------------------------
    def augmentations(self, spatial_keys: Sequence[str], image_key: str = IMAGE) -> list[MapTransform]:
        """The random training transforms the ``augmentation`` option asks for: ``full`` flips
        and rotations of ``spatial_keys`` plus colour changes of ``image_key``, ``geometric``
        the flips and rotations only (where colour itself is the signal, as in dermoscopy),
        ``none`` nothing (training then sees the evaluation pixels)."""
        steps: list[MapTransform] = []
        if self.augmentation in ("full", "geometric"):
            steps += geometric_augmentation(spatial_keys)
        if self.augmentation == "full":
            steps += colour_augmentation(image_key)
        return steps

    def train_transforms(self) -> Compose:
        raise NotImplementedError

    def eval_transforms(self) -> Compose:
        raise NotImplementedError

    # ---- records ------------------------------------------------------------------------------
    def parse_label(self, row: ManifestRow, manifest: Manifest) -> Any:
        """The record's label: for segmentation the mask path (checked to exist)."""
        path = row.label_path
        if not path.exists():
            raise ValueError(f"{manifest.path}, row {row.line}: label mask {path} not found")
        return str(path)

    def record(self, row: ManifestRow, manifest: Manifest, age_edges: Sequence[float]) -> dict[str, Any]:
        if not row.image.exists():
            raise ValueError(f"{manifest.path}, row {row.line}: image {row.image} not found")
        rec: dict[str, Any] = {IMAGE: str(row.image), LABEL: self.parse_label(row, manifest),
                               "id": row.id, "site": manifest.site}
        if self.uses_fov and row.fov is not None:
            if not row.fov.exists():
                raise ValueError(f"{manifest.path}, row {row.line}: field-of-view mask {row.fov} not found")
            rec[FOV] = str(row.fov)
        for name, value in row.attributes.items():
            if name in RESERVED:
                continue
            rec[name] = age_value(value) if name == "age" else str(value)
        if "age" in manifest.attribute_names:
            rec["age_band"] = age_band(rec["age"], age_edges)
        return rec

    # ---- datasets --------------------------------------------------------------------------------
    def split_dataset(self, records: list[dict[str, Any]], *, train: bool, seed: int,
                      cache: bool) -> Dataset:
        transform = self.train_transforms() if train else self.eval_transforms()
        transform.set_random_state(seed=seed)
        return make_dataset(records, transform, cache)

    def site_data(self, manifest: Manifest, index: int, *, seed: int, cache: bool,
                  age_edges: Sequence[float]) -> SiteData:
        splits: dict[str, list[dict[str, Any]]] = {}
        for split in ("train", "val", "test"):
            splits[split] = [self.record(row, manifest, age_edges) for row in manifest.split(split)]
        for split in ("train", "test"):
            if not splits[split]:
                raise ValueError(f"{manifest.path}: site {manifest.site!r} has no '{split}' rows; "
                                 f"every site needs both train and test rows")
        datasets = {
            split: self.split_dataset(records, train=(split == "train"),
                                      seed=_seed_for(seed, index, k), cache=cache)
            for k, (split, records) in enumerate(splits.items()) if records
        }
        return SiteData(manifest.site, datasets["train"], datasets["test"], datasets.get("val"),
                        attributes=self.site_attributes(manifest))

    @staticmethod
    def site_attributes(manifest: Manifest) -> tuple[str, ...]:
        names = tuple(n for n in manifest.attribute_names if n not in RESERVED)
        return names + (("age_band",) if "age" in names else ())

    def load_federation(self, seed: int = 0, manifests: Sequence[str | Path] | None = None,
                        cache: bool = False, age_edges: Sequence[float] = (60,),
                        **options: Any) -> Federation:
        """One site per manifest; ``options`` are task data options (e.g. ``image_size``)."""
        self.configure(**options)
        loaded = load_manifests(manifests, self.name)
        edges = tuple(float(e) for e in age_edges)
        sites = [self.site_data(m, k, seed=seed, cache=bool(cache), age_edges=edges)
                 for k, m in enumerate(loaded)]
        shared = [a for a in sites[0].attributes if all(a in s.attributes for s in sites[1:])]
        self.after_load(sites)
        return Federation(sites, attributes=tuple(shared),
                          description=f"{self.name}: {len(sites)} site(s) from manifests "
                                      f"{', '.join(str(m.path) for m in loaded)}")

    def after_load(self, sites: list[SiteData]) -> None:
        """Hook: task-level settings derived from the loaded sites (e.g. class weights)."""


class MaskedSegmentationTask(ImagingTask):
    """Segmentation whose loss, risk and metric ignore pixels outside ``batch['fov']``.

    Without ``fov`` in the batch the base (whole-image) definitions apply unchanged.
    """

    kind = SEGMENTATION

    @staticmethod
    def _mask(batch: Mapping[str, Any]) -> torch.Tensor | None:
        mask = batch.get(FOV)
        return mask if isinstance(mask, torch.Tensor) else None

    def sample_loss(self, logits: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
        mask = self._mask(batch)
        if mask is None:
            return soft_dice_loss(logits, batch[LABEL])
        return masked_soft_dice_loss(logits, batch[LABEL], mask)

    def task_loss(self, logits: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
        mask = self._mask(batch)
        if mask is None:
            return super().task_loss(logits, batch)
        mask = mask.to(logits.dtype)
        bce = F.binary_cross_entropy_with_logits(logits, batch[LABEL].to(logits.dtype), reduction="none")
        bce = (bce * mask).sum() / mask.sum().clamp_min(1.0)
        return masked_soft_dice_loss(logits, batch[LABEL], mask).mean() + bce

    def sample_metric(self, logits: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
        mask = self._mask(batch)
        if mask is None:
            return hard_dice(logits, batch[LABEL])
        return masked_hard_dice(logits, batch[LABEL], mask)
