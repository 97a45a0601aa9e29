"""Write site manifests for public datasets where they lie (nothing is copied).

Each importer reads a dataset's own folder layout and writes ``OUT/<site>/manifest.csv`` with
absolute paths into the source folder. Splits keep everything that could leak between train
and test on one side — a patient's two eyes, a video's frames, a lesion's photographs — and
are deterministic for a given ``seed``.

=============  =====================  =======  =====  ================================================
dataset        site(s)                default  def.   how the split is made
                                      test     val
=============  =====================  =======  =====  ================================================
chase          chase_db1              0.25     0.15   by child: ``Image_NNL``/``Image_NNR`` share a
                                                      split; a seeded shuffle of children, the first
                                                      quarter is test. Label: first observer
                                                      ``*_1stHO.png``.
stare          stare                  0.25     0.15   seeded shuffle of images (one eye per patient).
                                                      Label: Hoover ``labels-ah/*.ah.png``.
kvasir         kvasir_seg             0.10     0.15   seeded shuffle of images (no patient ids).
cvc-clinicdb   cvc_clinicdb           0.10     =test  by video (``frame_sequence.csv``): the last 10 %
                                                      of videos are test; as many other videos, drawn
                                                      with the seed, are val; frames never straddle
                                                      splits.
ham10000       one per ``dataset``    0.20     0.15   by ``lesion_id``: per site, a seeded shuffle of
               value (vidir_molemax,                  lesions fills test up to the fraction of its
               vidir_modern,                          images; a lesion's photographs share a split,
               rosendahl, vienna_dias)                across sites too (9 lesions were imaged at two
                                                      sites). Label 1 for dx in {mel, bcc, akiec},
                                                      else 0; attributes sex and age (blank when HAM
                                                      records none).
=============  =====================  =======  =====  ================================================

Validation (model selection must never look at test) is carved from the *training side* only,
after test has been drawn exactly as it would be without it: ``val_fraction`` of the non-test
groups (children, images, videos, lesions' images) with the same grouping rule and its own
seeded shuffle, so the test split does not depend on ``val_fraction``. At least one group is
always left for training; ``val_fraction=0`` writes no val rows. CVC-ClinicDB keeps its
published-protocol behaviour (as many val videos as test videos) unless ``val_fraction`` is given.

``limit`` keeps at most that many images per split (a seeded sample, whole groups not
required: a subset of a leak-free split is still leak-free), for quick tests.

Fundus sites (chase, stare) also get a field-of-view mask per image, derived from the photograph
(:mod:`fedfair_med.data.fov`) and written to ``OUT/<site>/fov/`` beside the manifest, which
names it in its ``fov`` column: neither dataset ships one.
"""

from __future__ import annotations

import csv
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from fedfair_med.data.fov import write_fundus_fov
from fedfair_med.data.manifest import HAM10000_MALIGNANT, normalise_age, normalise_sex, write_manifest


class DatasetLayoutError(ValueError):
    """The source folder does not look like the dataset it was named as."""


@dataclass(frozen=True)
class ImportedSite:
    """One manifest an importer wrote, with its row counts per split."""

    site: str
    task: str
    manifest: Path
    split_counts: dict[str, int]


DEFAULT_TEST_FRACTION = {
    "chase": 0.25, "stare": 0.25, "kvasir": 0.10, "cvc-clinicdb": 0.10, "ham10000": 0.20,
}
#: Share of the non-test groups used for validation; None = the dataset's own rule (CVC: as
#: many val videos as test videos).
DEFAULT_VAL_FRACTION: dict[str, float | None] = {
    "chase": 0.15, "stare": 0.15, "kvasir": 0.15, "cvc-clinicdb": None, "ham10000": 0.15,
}


# ---- helpers ---------------------------------------------------------------------------------
def _require(path: Path, what: str, dataset: str) -> Path:
    if not path.exists():
        raise DatasetLayoutError(f"{dataset}: expected {what} at {path}")
    return path


def _find_folder(src: Path, marker: str, dataset: str) -> Path:
    """``src`` itself or the first sub-folder holding files matching ``marker``."""
    if any(src.glob(marker)):
        return src
    for folder in sorted(p for p in src.rglob("*") if p.is_dir()):
        if any(folder.glob(marker)):
            return folder
    raise DatasetLayoutError(f"{dataset}: no files matching {marker!r} under {src}")


def _split_groups(groups: Sequence[str], fraction: float, seed: int) -> tuple[set[str], set[str]]:
    """Seeded shuffle of group keys; the first ``round(fraction·n)`` (≥ 1) are test."""
    keys = sorted(set(groups))
    random.Random(seed).shuffle(keys)
    n_test = min(len(keys) - 1, max(1, math.floor(fraction * len(keys) + 0.5))) if len(keys) > 1 else 0
    return set(keys[:n_test]), set(keys[n_test:])


def _val_count(fraction: float, n_groups: int) -> int:
    """round(fraction·n) groups for val, at least one when fraction > 0, never all of them."""
    if fraction <= 0 or n_groups < 2:
        return 0
    return min(n_groups - 1, max(1, math.floor(fraction * n_groups + 0.5)))


def _carve_val(train_groups: Sequence[str], fraction: float, seed: int) -> set[str]:
    """Val groups from the training side, from a shuffle independent of the test draw."""
    keys = sorted(set(train_groups))
    random.Random(f"{seed}-val").shuffle(keys)
    return set(keys[:_val_count(fraction, len(keys))])


def _assign(group: str, test: set[str], val: set[str]) -> str:
    return "test" if group in test else "val" if group in val else "train"


def _limit(rows: list[dict[str, str]], limit: int | None, seed: int) -> list[dict[str, str]]:
    """At most ``limit`` rows per split, a seeded sample, in their original order."""
    if limit is None:
        return rows
    by_split: dict[str, list[int]] = {}
    for index, row in enumerate(rows):
        by_split.setdefault(row["split"], []).append(index)
    keep: set[int] = set()
    for split, indices in sorted(by_split.items()):
        chosen = list(indices)
        random.Random(f"{seed}-{split}").shuffle(chosen)
        keep.update(chosen[:limit])
    return [row for index, row in enumerate(rows) if index in keep]


def _write(out: Path, site: str, task: str, dataset: str, rows: list[dict[str, str]],
           attributes: Sequence[str], split_rule: str, limit: int | None, seed: int,
           derive_fov: bool = False) -> ImportedSite:
    rows = _limit(rows, limit, seed)
    if derive_fov:  # derived masks live beside the manifest; the source folder stays untouched
        for row in rows:
            write_fundus_fov(Path(row["image"]), out / site / "fov" / f"{row['id']}.png")
            row["fov"] = f"fov/{row['id']}.png"  # relative: the site folder may be moved into place
    path = write_manifest(
        out / site / "manifest.csv", rows, attribute_names=attributes, site=site, task=task,
        comments=[f"imported from {dataset}; split: {split_rule}; seed {seed}"
                  + (f"; limit {limit} per split" if limit is not None else "")],
    )
    counts = {s: sum(r["split"] == s for r in rows) for s in ("train", "val", "test")}
    return ImportedSite(site=site, task=task, manifest=path, split_counts=counts)


# ---- datasets --------------------------------------------------------------------------------
_CHASE_NAME = re.compile(r"^Image_(\d+)([LR])$")


def import_chase(src: Path, out: Path, *, test_fraction: float, seed: int, limit: int | None,
                 val_fraction: float | None = 0.15) -> list[ImportedSite]:
    """CHASE_DB1: 14 children × 2 eyes; both eyes of a child share a split."""
    folder = _find_folder(src, "Image_*_1stHO.png", "chase")
    rows: list[dict[str, str]] = []
    for image in sorted(folder.glob("Image_*.jpg")):
        match = _CHASE_NAME.match(image.stem)
        if not match:
            continue
        rows.append({"id": image.stem, "image": str(image.resolve()), "child": match.group(1),
                     "label": str((folder / f"{image.stem}_1stHO.png").resolve())})
    if not rows:
        raise DatasetLayoutError(f"chase: no Image_NN[LR].jpg files in {folder}")
    test, rest = _split_groups([r["child"] for r in rows], test_fraction, seed)
    val = _carve_val(sorted(rest), val_fraction or 0.0, seed)
    for row in rows:
        row["split"] = _assign(row.pop("child"), test, val)
    return [_write(out, "chase_db1", "fundus", "CHASE_DB1", rows, (), "by child (both eyes together)", limit, seed,
                   derive_fov=True)]


def _split_by_image(rows: list[dict[str, str]], test_fraction: float,
                    val_fraction: float | None, seed: int) -> None:
    """Seeded test/val/train split by image id, for datasets with one image per patient."""
    test, rest = _split_groups([r["id"] for r in rows], test_fraction, seed)
    val = _carve_val(sorted(rest), val_fraction or 0.0, seed)
    for row in rows:
        row["split"] = _assign(row["id"], test, val)


def import_stare(src: Path, out: Path, *, test_fraction: float, seed: int, limit: int | None,
                 val_fraction: float | None = 0.15) -> list[ImportedSite]:
    """STARE: 18 images with Hoover (``ah``) vessel labels."""
    images = _require(src / "images", "an images/ folder", "stare")
    labels = _require(src / "labels-ah", "a labels-ah/ folder", "stare")
    rows = [{"id": image.stem, "image": str(image.resolve()),
             "label": str((labels / f"{image.stem}.ah.png").resolve())}
            for image in sorted(images.glob("*.png"))]
    if not rows:
        raise DatasetLayoutError(f"stare: no PNG images in {images}")
    _split_by_image(rows, test_fraction, val_fraction, seed)
    return [_write(out, "stare", "fundus", "STARE", rows, (), "seeded, by image", limit, seed,
                   derive_fov=True)]


def import_kvasir(src: Path, out: Path, *, test_fraction: float, seed: int, limit: int | None,
                 val_fraction: float | None = 0.15) -> list[ImportedSite]:
    """Kvasir-SEG: image/mask pairs with the same file name in ``images/`` and ``masks/``."""
    images = _require(src / "images", "an images/ folder", "kvasir")
    masks = _require(src / "masks", "a masks/ folder", "kvasir")
    rows = [{"id": image.stem, "image": str(image.resolve()), "label": str((masks / image.name).resolve())}
            for image in sorted(images.glob("*.jpg"))]
    if not rows:
        raise DatasetLayoutError(f"kvasir: no JPEG images in {images}")
    _split_by_image(rows, test_fraction, val_fraction, seed)
    return [_write(out, "kvasir_seg", "polyp", "Kvasir-SEG", rows, (), "seeded, by image", limit, seed)]


def read_frame_sequences(src: Path) -> dict[str, str]:
    """CVC-ClinicDB frame number → video sequence, from ``frame_sequence.csv``."""
    table = _require(src / "frame_sequence.csv", "frame_sequence.csv (frame → video)", "cvc-clinicdb")
    with table.open(newline="", encoding="utf-8") as handle:
        return {row["frame"].strip(): row["sequence"].strip() for row in csv.DictReader(handle)}


def import_cvc(src: Path, out: Path, *, test_fraction: float, seed: int, limit: int | None,
               val_fraction: float | None = None) -> list[ImportedSite]:
    """CVC-ClinicDB: 612 frames from 29 videos; a video's frames share a split."""
    originals = _require(src / "Original", "an Original/ folder", "cvc-clinicdb")
    truths = _require(src / "Ground Truth", "a 'Ground Truth/' folder", "cvc-clinicdb")
    sequences = read_frame_sequences(src)
    videos = sorted(set(sequences.values()), key=lambda v: (len(v), v))
    n_test = max(1, math.floor(test_fraction * len(videos) + 0.5))
    test_videos = set(videos[-n_test:])
    others = [v for v in videos if v not in test_videos]
    random.Random(seed).shuffle(others)
    n_val = n_test if val_fraction is None else _val_count(val_fraction, len(others))
    val_videos = set(others[:n_val])
    rows = []
    for image in sorted(originals.glob("*.png"), key=lambda p: (len(p.stem), p.stem)):
        video = sequences.get(image.stem)
        if video is None:
            raise DatasetLayoutError(f"cvc-clinicdb: frame {image.name} is not in frame_sequence.csv")
        split = "test" if video in test_videos else "val" if video in val_videos else "train"
        rows.append({"id": f"frame{image.stem}", "image": str(image.resolve()),
                     "label": str((truths / image.name).resolve()), "split": split})
    if not rows:
        raise DatasetLayoutError(f"cvc-clinicdb: no PNG frames in {originals}")
    return [_write(out, "cvc_clinicdb", "polyp", "CVC-ClinicDB", rows, (),
                   "by video: last videos test, seeded other videos val", limit, seed)]


def _ham_images(src: Path) -> dict[str, Path]:
    """image_id → file, wherever the JPEGs sit under ``src`` (layouts differ between mirrors)."""
    return {path.stem: path.resolve() for path in src.rglob("ISIC_*.jpg")}


def import_ham10000(src: Path, out: Path, *, test_fraction: float, seed: int, limit: int | None,
                    val_fraction: float | None = 0.15) -> list[ImportedSite]:
    """HAM10000: four acquisition sites from the metadata's ``dataset`` column."""
    table = _require(src / "HAM10000_metadata.csv", "HAM10000_metadata.csv", "ham10000")
    with table.open(newline="", encoding="utf-8") as handle:
        records = list(csv.DictReader(handle))
    needed = {"lesion_id", "image_id", "dx", "age", "sex", "dataset"}
    if not records or not needed <= set(records[0]):
        raise DatasetLayoutError(f"ham10000: {table} lacks columns {sorted(needed - set(records[0] if records else ()))}"
                                 " (the current Dataverse version has a 'dataset' column)")
    images = _ham_images(src)
    test_lesions = _lesions_for_test(records, test_fraction, seed)
    val_lesions = _take_lesions(records, val_fraction or 0.0, seed, stream="val", exclude=test_lesions)
    by_site: dict[str, list[dict[str, str]]] = {}
    for record in records:
        by_site.setdefault(record["dataset"].strip(), []).append(record)
    written = []
    for site, site_records in sorted(by_site.items()):
        rows = []
        for record in site_records:
            image_id = record["image_id"].strip()
            image = images.get(image_id, src / "images" / f"{image_id}.jpg")  # a missing file is reported by check
            rows.append({
                "id": image_id, "image": str(image),
                "label": "1" if record["dx"].strip().lower() in HAM10000_MALIGNANT else "0",
                "split": _assign(record["lesion_id"].strip(), test_lesions, val_lesions),
                "sex": normalise_sex(record["sex"])[0], "age": normalise_age(record["age"])[0],
            })
        written.append(_write(out, site, "skin", "HAM10000", rows, ("sex", "age"),
                              "by lesion_id, seeded", limit, seed))
    return written


def _lesions_for_test(records: Sequence[dict[str, str]], fraction: float, seed: int) -> set[str]:
    """Test lesions, taken whole, so that each site's test holds about ``fraction`` of its images.

    A few lesions were photographed at two sites; the choice is global (a lesion is test
    everywhere or nowhere), each lesion being drawn for the site holding most of its images.
    """
    return _take_lesions(records, fraction, seed)


def _take_lesions(records: Sequence[dict[str, str]], fraction: float, seed: int, *,
                  stream: str = "", exclude: set[str] = frozenset()) -> set[str]:
    """Whole lesions not in ``exclude`` filling ``fraction`` of each site's remaining images.

    ``stream`` separates the val shuffle from the test one (empty = the test draw, unchanged).
    """
    if fraction <= 0:
        return set()
    images_at: dict[str, dict[str, int]] = {}
    for record in records:
        if record["lesion_id"].strip() in exclude:
            continue
        per_site = images_at.setdefault(record["lesion_id"].strip(), {})
        site = record["dataset"].strip()
        per_site[site] = per_site.get(site, 0) + 1
    home: dict[str, list[str]] = {}
    for lesion, per_site in sorted(images_at.items()):
        home.setdefault(max(sorted(per_site), key=per_site.__getitem__), []).append(lesion)
    chosen: set[str] = set()
    for site, lesions in sorted(home.items()):
        random.Random(f"{seed}-{site}" + (f"-{stream}" if stream else "")).shuffle(lesions)
        target = fraction * sum(sum(images_at[lesion].values()) for lesion in lesions)
        taken = 0
        for lesion in lesions[:-1]:  # always leave at least one lesion for training
            if taken >= target:
                break
            chosen.add(lesion)
            taken += sum(images_at[lesion].values())
    return chosen


Importer = Callable[..., list[ImportedSite]]
IMPORTERS: dict[str, Importer] = {
    "chase": import_chase,
    "stare": import_stare,
    "kvasir": import_kvasir,
    "cvc-clinicdb": import_cvc,
    "ham10000": import_ham10000,
}


def import_dataset(name: str, src: str | Path, out: str | Path, *, test_fraction: float | None = None,
                   seed: int = 0, limit: int | None = None,
                   val_fraction: float | None = None) -> list[ImportedSite]:
    """Write manifests for dataset ``name`` found at ``src`` under ``out``; see the module table.

    ``val_fraction`` (default per dataset, see ``DEFAULT_VAL_FRACTION``) is the share of the
    non-test groups held out for validation; 0 writes no val split. Test never depends on it.
    """
    try:
        importer = IMPORTERS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(IMPORTERS)}") from None
    fraction = DEFAULT_TEST_FRACTION[name] if test_fraction is None else test_fraction
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"test fraction must lie strictly between 0 and 1, not {fraction}")
    val = DEFAULT_VAL_FRACTION[name] if val_fraction is None else val_fraction
    if val is not None and not 0.0 <= val < 1.0:
        raise ValueError(f"val fraction must lie in [0, 1), not {val}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, not {limit}")
    src = Path(src).expanduser().resolve()
    if not src.is_dir():
        raise DatasetLayoutError(f"{name}: source folder {src} does not exist")
    return importer(src, Path(out), test_fraction=fraction, seed=seed, limit=limit, val_fraction=val)


