"""Every shipped configuration loads and validates, and names a task and method that exist."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedfair_med.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_is_a_config_per_clinical_task() -> None:
    assert {p.stem for p in CONFIGS} >= {"fundus", "polyp", "skin", "mri"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_validates_and_points_at_its_task(path: Path) -> None:
    config = load_config(path)
    assert config.task == path.stem
    manifests = config.data["manifests"]
    assert manifests and all(m.startswith(f"sites/{path.stem}/") for m in manifests)
