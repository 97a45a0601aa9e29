"""Derived field-of-view masks for CHASE_DB1 and STARE, on the real photographs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedfair_med.data.fov import FieldOfViewError, fundus_fov, write_fundus_fov
from fedfair_med.data.importers import import_dataset
from fedfair_med.data.manifest import load_manifest
from fixtures_data import shared_data_dir

DATA = shared_data_dir()
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"public datasets not found at {DATA}")


def _pairs() -> list[tuple[Path, Path]]:
    chase = DATA / "chasedb1" / "CHASEDB1"
    stare = DATA / "stare"
    pairs = [(p, chase / f"{p.stem}_1stHO.png") for p in sorted(chase.glob("Image_*.jpg"))[:6]]
    pairs += [(p, stare / "labels-ah" / f"{p.stem}.ah.png") for p in sorted((stare / "images").glob("*.png"))]
    return pairs


@pytest.mark.realdata
@needs_data
def test_fov_holds_the_retina_and_drops_the_border():
    pairs = _pairs()
    assert len(pairs) >= 20
    for image_path, label_path in pairs:
        image = np.asarray(Image.open(image_path).convert("RGB"))
        vessels = np.asarray(Image.open(label_path).convert("L")) > 127
        fov = fundus_fov(image)
        assert 0.6 < fov.mean() < 0.85, (image_path, fov.mean())
        # The corners are the camera's dark border, the centre is retina.
        h, w = fov.shape
        assert not fov[:5, :5].any() and not fov[-5:, -5:].any(), image_path
        assert fov[h // 2 - 5:h // 2 + 5, w // 2 - 5:w // 2 + 5].all(), image_path
        # A manual annotator marks vessels only on the retina.
        assert (vessels & fov).sum() >= 0.996 * vessels.sum(), (image_path, (vessels & ~fov).sum())


def test_a_dark_image_is_refused_naming_the_file(tmp_path):
    dark = tmp_path / "dark.png"
    Image.fromarray(np.full((64, 64, 3), 10, np.uint8)).save(dark)
    with pytest.raises(FieldOfViewError, match="dark.png"):
        write_fundus_fov(dark, tmp_path / "fov.png")
    flat = tmp_path / "flat.png"  # no border to tell the aperture from
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(flat)
    with pytest.raises(FieldOfViewError, match="flat.png"):
        write_fundus_fov(flat, tmp_path / "fov.png")


def test_a_noisy_border_is_left_out_and_a_dark_lesion_kept(tmp_path):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:128, :128]
    disc = (yy - 64) ** 2 + (xx - 64) ** 2 < 55 ** 2
    image = rng.integers(0, 30, size=(128, 128, 3)).astype(np.uint8)  # STARE-like noisy border
    image[disc] = (170, 80, 40)
    image[60:68, 60:68] = (20, 10, 5)  # a dark lesion inside the retina
    path = tmp_path / "disc.png"
    Image.fromarray(image).save(path)
    mask = np.asarray(Image.open(write_fundus_fov(path, tmp_path / "disc-fov.png"))) > 0
    assert (mask == disc).mean() > 0.99
    assert mask[60:68, 60:68].all()


@pytest.mark.realdata
@needs_data
def test_fundus_import_writes_one_mask_per_image_beside_the_manifest(tmp_path):
    (site,) = import_dataset("stare", DATA / "stare", tmp_path, limit=2)
    manifest = load_manifest(site.manifest)
    assert manifest.rows
    for row in manifest.rows:
        assert row.fov is not None and row.fov.parent == tmp_path / "stare" / "fov"
        with Image.open(row.fov) as mask, Image.open(row.image) as image:
            assert mask.size == image.size
            assert set(np.unique(np.asarray(mask))) <= {0, 255}
    assert not any(p.name == "fov" for p in (DATA / "stare").iterdir())  # the source stays untouched
