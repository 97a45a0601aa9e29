"""The data contract between tasks, runtimes and methods.

A site's dataset yields dicts with ``image`` (float tensor, C × spatial), ``label`` (a 1 × spatial
binary mask, or a class index), ``id`` (str), ``site`` (str) and one entry per sensitive
attribute (``sex``, ``age``, ``age_band``…; missing values are ``""``). :class:`GroupedDataset`
adds ``group``, the index of the sample's fairness group, or −1 when the attribute is missing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from fedfair_med.contracts import MISSING


@dataclass
class SiteData:
    """One hospital's splits. ``val`` may be empty; ``test`` never leaves the site."""

    name: str
    train: Dataset
    test: Dataset
    val: Dataset | None = None
    attributes: tuple[str, ...] = ()


@dataclass
class Federation:
    """The sites of a run and the sensitive attributes their manifests share."""

    sites: list[SiteData]
    attributes: tuple[str, ...] = ()
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def site_names(self) -> list[str]:
        return [s.name for s in self.sites]

    def group_vocabulary(self, attribute: str) -> list[str]:
        """Sorted values of ``attribute`` over every split of every site (or the site names).

        Values are fixed before training, so a group's index is the same at every site; only
        the list of values, never a sample, is needed to agree on it.
        """
        if attribute == "site":
            return self.site_names
        values: set[str] = set()
        for site in self.sites:
            for ds in (site.train, site.val, site.test):
                if ds is None:
                    continue
                values.update(str(v) for v in attribute_values(ds, attribute) if str(v) != MISSING)
        return sorted(values)


def attribute_values(dataset: Dataset, attribute: str) -> list[Any]:
    """Per-sample values of one attribute, without loading images when the dataset can."""
    getter = getattr(dataset, "attribute_values", None)
    if getter is not None:
        return list(getter(attribute))
    return [dataset[i].get(attribute, MISSING) for i in range(len(dataset))]  # type: ignore[arg-type]


class GroupedDataset(Dataset):
    """Adds ``group`` (index in ``vocabulary`` of the sample's ``attribute`` value, or −1)."""

    def __init__(self, base: Dataset, attribute: str, vocabulary: Sequence[str]) -> None:
        self.base = base
        self.attribute = attribute
        self.index = {v: i for i, v in enumerate(vocabulary)}

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = dict(self.base[i])
        item["group"] = self.index.get(str(item.get(self.attribute, MISSING)), -1)
        return item

    def attribute_values(self, attribute: str) -> list[Any]:
        return attribute_values(self.base, attribute)


def make_loader(
    dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int, num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """A deterministic loader: shuffling is driven by a generator seeded from ``seed``.

    ``pin_memory`` (only for a CUDA site) puts batches in page-locked memory so the copy to the
    GPU can overlap compute; the batches themselves are unchanged.
    """
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
        num_workers=num_workers, drop_last=False, pin_memory=pin_memory,
    )

