"""Re-deal sites' rows into new sites: a pooled site, or equal sites with the pooled mix.

Why: when a federation learns slowly, the first question is whether the data pipeline, the
averaging or the sites' split is to blame. Training the same rows as one site (``sites=1``,
centralised training) and as N sites dealt at random (IID: every site gets the pooled label and
scanner mix) separates the three. These are diagnostics run on data one party already holds
(public datasets), never a step of a real federation: real hospitals cannot pool their rows.

Each row keeps its split, label and attributes; the rows of each split are shuffled with
``seed`` and dealt in turn, so the new sites' splits differ in size by at most one row. Image,
region-mask and (for segmentation) mask paths are written absolute, so the new manifests can
live anywhere.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Sequence

from fedfair_med.data.manifest import SPLITS, Manifest, ManifestRow, load_manifest, write_manifest
from fedfair_med.data.validate import SEGMENTATION, task_format

__all__ = ["DealError", "dealt_site_names", "deal_sites"]


class DealError(ValueError):
    """The manifests cannot be dealt together; the message names the files and rows."""


def dealt_site_names(sites: int, prefix: str) -> list[str]:
    """``prefix`` alone for one site, else ``prefix0`` … ``prefix{N-1}``."""
    return [prefix] if sites == 1 else [f"{prefix}{k}" for k in range(sites)]


def _common_task(manifests: Sequence[Manifest], task: str | None) -> str:
    declared = {m.task for m in manifests if m.task}
    if task is None:
        if len(declared) != 1:
            found = ", ".join(f"{m.path}: {m.task or 'none'}" for m in manifests)
            raise DealError(f"the manifests do not declare one common '# task:' ({found}); pass the task")
        task = declared.pop()
    elif declared - {task}:
        clash = ", ".join(f"{m.path}: {m.task}" for m in manifests if m.task and m.task != task)
        raise DealError(f"task {task!r} given, but manifests declare another ({clash})")
    task_format(task)  # ValueError naming the known tasks
    return task


def _row_record(row: ManifestRow, label_is_path: bool) -> dict[str, object]:
    return {"id": row.id, "image": str(row.image.resolve()),
            "label": str(row.label_path.resolve()) if label_is_path else row.label,
            "split": row.split, "fov": str(row.fov.resolve()) if row.fov else None,
            **row.attributes}


def deal_sites(manifests: Sequence[str | Path], out_dir: str | Path, *, sites: int, seed: int = 0,
               prefix: str = "dealt", task: str | None = None, force: bool = False) -> list[Path]:
    """Write ``sites`` manifests under ``out_dir/<name>/manifest.csv`` holding every row once.

    Raises :class:`DealError` on duplicate ids (naming both files), mixed tasks, ``sites``
    larger than a split that must be shared, or a manifest already there (unless ``force``:
    runs made on it would silently change meaning); a bad source raises its ``ManifestError``.
    """
    if sites < 1:
        raise DealError(f"sites must be at least 1, got {sites}")
    if not manifests:
        raise DealError("no manifest given")
    loaded = [load_manifest(path) for path in manifests]
    task = _common_task(loaded, task)
    label_is_path = task_format(task).kind == SEGMENTATION

    seen: dict[str, Path] = {}
    by_split: dict[str, list[ManifestRow]] = {split: [] for split in SPLITS}
    for manifest in loaded:
        for row in manifest.rows:
            if row.id in seen:
                raise DealError(f"id {row.id!r} is in both {seen[row.id]} and {manifest.path} "
                                f"(row {row.line}); dealt sites need unique ids")
            seen[row.id] = manifest.path
            by_split[row.split].append(row)
    for split in ("train", "test"):  # every site needs both (fedfair-med data check)
        if len(by_split[split]) < sites:
            raise DealError(f"only {len(by_split[split])} {split} row(s) for {sites} sites: "
                            "every dealt site needs at least one")

    names = dealt_site_names(sites, prefix)
    out = Path(out_dir)
    existing = [str(out / name / "manifest.csv") for name in names if (out / name / "manifest.csv").exists()]
    if existing and not force:
        raise DealError(f"{', '.join(existing)} already exist(s); choose another output folder, "
                        "or replace them with --force")
    dealt: list[list[dict[str, object]]] = [[] for _ in names]
    rng = random.Random(seed)
    for split in SPLITS:
        rows = list(by_split[split])
        rng.shuffle(rows)
        for index, row in enumerate(rows):
            dealt[index % sites].append(_row_record(row, label_is_path))

    attribute_names: list[str] = []
    for manifest in loaded:
        attribute_names += [a for a in manifest.attribute_names if a not in attribute_names]
    sources = ", ".join(f"{m.site} ({m.path})" for m in loaded)
    comments = [f"diagnostic: rows of {sources}",
                f"shuffled within each split (seed {seed}) and dealt in turn into {sites} site(s): "
                + ", ".join(names)]
    return [write_manifest(out / name / "manifest.csv", rows, attribute_names=attribute_names,
                           site=name, task=task, comments=comments)
            for name, rows in zip(names, dealt)]
