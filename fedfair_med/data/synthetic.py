"""The built-in synthetic federation: small, seeded, generated on the fly, no patient data.

Segmentation: single-channel 32 × 32 images of blobs and a curved vessel. Sites differ in
appearance (contrast, brightness, noise); the last site's scanner is brighter with weaker
contrast and thinner structures, and it has a third of the others' training images, so
sample-weighted FedAvg under-serves it — the equal-accuracy gap FlexFair narrows.

Classification: three-channel 32 × 32 'lesions' whose class is carried by a texture; the base
rate of the positive class differs by sex and age band, and older patients' images are darker —
a demographic-parity gap to close.

Every site also has a small ``val`` split for model selection (sweeps choose hyper-parameters
on it, never on ``test``). It is drawn from its own RNG stream, so adding or resizing it leaves
the train and test images bit-identical.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from fedfair_med.contracts import age_band
from fedfair_med.data.federation import Federation, SiteData


@dataclass(frozen=True)
class SiteStyle:
    """How one synthetic site's scanner renders the same anatomy."""

    name: str
    n_train: int
    n_test: int
    contrast: float
    brightness: float
    noise: float
    thickness: float
    n_val: int = 0


SEGMENTATION_SITES = (
    SiteStyle("site-a", 48, 24, contrast=1.0, brightness=0.0, noise=0.10, thickness=1.0, n_val=16),
    SiteStyle("site-b", 48, 24, contrast=0.8, brightness=0.25, noise=0.15, thickness=1.0, n_val=16),
    SiteStyle("site-c", 16, 24, contrast=0.5, brightness=0.35, noise=0.12, thickness=0.8, n_val=16),
)

# RNG stream index per split: train and test keep the streams they had before val existed.
_STREAM = {"train": 0, "test": 1, "val": 2}


def _split_sizes(style: SiteStyle, scale: float, n_val: int | None, minimum: int) -> list[tuple[str, int]]:
    """(split, size) pairs; a val split of size 0 (``n_val=0``) is left out."""
    sizes = [("train", max(minimum, int(round(style.n_train * scale)))),
             ("test", max(minimum, int(round(style.n_test * scale))))]
    val = style.n_val if n_val is None else n_val
    if val > 0:
        sizes.append(("val", max(minimum, int(round(val * scale)))))
    return sizes


class TensorSamples(Dataset):
    """In-memory samples: images, labels and per-sample attributes."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, ids: list[str], site: str,
                 attributes: dict[str, list[Any]]) -> None:
        self.images, self.labels, self.ids, self.site = images, labels, ids, site
        self.attributes = attributes

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = {"image": self.images[i], "label": self.labels[i], "id": self.ids[i],
                "site": self.site}
        for key, values in self.attributes.items():
            item[key] = values[i]
        return item

    def attribute_values(self, attribute: str) -> list[Any]:
        if attribute == "site":
            return [self.site] * len(self)
        return list(self.attributes.get(attribute, [""] * len(self)))


def _demographics(rng: np.random.Generator, n: int,
                  age_edges: Sequence[float] = (60,)) -> dict[str, list[Any]]:
    sex = rng.choice(["female", "male"], size=n).tolist()
    age = rng.integers(25, 90, size=n).tolist()
    return {"sex": sex, "age": age, "age_band": [age_band(a, age_edges) for a in age]}


def _segmentation_image(rng: np.random.Generator, style: SiteStyle, size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    mask = np.zeros((size, size), dtype=bool)
    for _ in range(rng.integers(1, 3)):
        cy, cx = rng.uniform(0.25, 0.75, size=2)
        ry, rx = rng.uniform(0.06, 0.16, size=2) * style.thickness
        mask |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    amp, freq, phase = rng.uniform(0.1, 0.3), rng.uniform(1.0, 3.0), rng.uniform(0, 2 * np.pi)
    curve = 0.5 + amp * np.sin(2 * np.pi * freq * xx + phase)
    mask |= np.abs(yy - curve) < 0.035 * style.thickness + 0.01
    background = 0.3 + 0.1 * np.sin(2 * np.pi * rng.uniform(0.5, 2) * (xx + yy))
    image = background + style.contrast * 0.5 * mask + style.brightness
    image = image + rng.normal(0.0, style.noise, size=image.shape)
    return image.astype(np.float32)[None], mask.astype(np.float32)[None]


def _federation(sites: tuple[SiteStyle, ...], seed: int, stream: int, scale: float,
                n_val: int | None, minimum: int, make_split: Callable[..., TensorSamples],
                description: str) -> Federation:
    """Generate every split of every site from its own seeded stream (site k, split)."""
    out = []
    for k, style in enumerate(sites):
        splits = {}
        for split, n in _split_sizes(style, scale, n_val, minimum=minimum):
            rng = np.random.default_rng([seed, stream + k, _STREAM[split]])
            ids = [f"{style.name}-{split}-{i:03d}" for i in range(n)]
            splits[split] = make_split(rng, style, ids)
        out.append(SiteData(style.name, splits["train"], splits["test"], splits.get("val"),
                            attributes=("sex", "age", "age_band")))
    return Federation(out, attributes=("sex", "age", "age_band"), description=description)


def synthetic_segmentation(seed: int = 0, size: int = 32,
                           sites: tuple[SiteStyle, ...] = SEGMENTATION_SITES,
                           scale: float = 1.0, n_val: int | None = None,
                           age_edges: Sequence[float] = (60,)) -> Federation:
    """Three sites of blob-and-vessel images; ``scale`` multiplies every split's size.

    ``n_val`` overrides every site's validation size (0: no val split).
    """
    def make_split(rng: np.random.Generator, style: SiteStyle, ids: list[str]) -> TensorSamples:
        pairs = [_segmentation_image(rng, style, size) for _ in ids]
        images = torch.from_numpy(np.stack([p[0] for p in pairs]))
        masks = torch.from_numpy(np.stack([p[1] for p in pairs]))
        return TensorSamples(images, masks, ids, style.name, _demographics(rng, len(ids), age_edges))

    return _federation(sites, seed, 0, scale, n_val, 2, make_split,
                       "synthetic blob-and-vessel segmentation, 3 sites")


def _classification_image(rng: np.random.Generator, label: int, old: bool, size: int,
                          style: SiteStyle) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    cy, cx = rng.uniform(0.35, 0.65, size=2)
    r = rng.uniform(0.15, 0.3)
    lesion = ((yy - cy) ** 2 + (xx - cx) ** 2) <= r**2
    texture = np.sin(2 * np.pi * 6 * (xx + yy)) if label == 1 else np.zeros_like(xx)
    signal = rng.uniform(0.25, 0.75) * style.contrast
    image = np.stack([
        0.6 + 0.1 * c - lesion * (0.3 - 0.05 * c) + lesion * signal * 0.3 * texture
        for c in range(3)
    ])
    image = image - (0.15 if old else 0.0) + style.brightness
    return (image + rng.normal(0.0, style.noise, size=image.shape)).astype(np.float32)


CLASSIFICATION_SITES = (
    SiteStyle("site-a", 96, 48, contrast=1.0, brightness=0.0, noise=0.10, thickness=1.0, n_val=32),
    SiteStyle("site-b", 96, 48, contrast=0.8, brightness=0.1, noise=0.12, thickness=1.0, n_val=32),
    SiteStyle("site-c", 48, 48, contrast=0.6, brightness=-0.05, noise=0.15, thickness=1.0, n_val=32),
)


def synthetic_classification(seed: int = 0, size: int = 32,
                             sites: tuple[SiteStyle, ...] = CLASSIFICATION_SITES,
                             scale: float = 1.0, n_val: int | None = None,
                             age_edges: Sequence[float] = (60,)) -> Federation:
    """Three sites of textured lesions; P(y=1) is 0.55 for >60 and 0.2 for <=60 (males +0.1).

    ``n_val`` overrides every site's validation size (0: no val split).
    """
    def make_split(rng: np.random.Generator, style: SiteStyle, ids: list[str]) -> TensorSamples:
        demo = _demographics(rng, len(ids), age_edges)
        labels, images = [], []
        for sex, age in zip(demo["sex"], demo["age"]):
            p = (0.55 if age > 60 else 0.2) + (0.1 if sex == "male" else 0.0)
            y = int(rng.random() < p)
            labels.append(y)
            images.append(_classification_image(rng, y, age > 60, size, style))
        return TensorSamples(torch.from_numpy(np.stack(images)),
                             torch.tensor(labels, dtype=torch.long), ids, style.name, demo)

    return _federation(sites, seed, 100, scale, n_val, 4, make_split,
                       "synthetic textured-lesion classification, 3 sites")
