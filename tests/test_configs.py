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


def test_derive_mri_command_writes_checked_manifests(tmp_path: Path) -> None:
    """The README's MRI step: derived sites whose manifests pass the MRI checks."""
    import typer
    from typer.testing import CliRunner

    from fedfair_med.cli import data_commands
    from fedfair_med.data.manifest import load_manifest
    from fedfair_med.data.validate import check_manifest_for_task
    from fixtures_data import shared_data_dir

    source = shared_data_dir() / "mri_abdomen_totalseg"
    if not source.is_dir():
        pytest.skip("shared data not available")
    app = typer.Typer()
    data_commands.register(app)
    app.command("noop")(lambda: None)
    args = ["data", "derive-mri", str(source / "example_mr_sm.nii.gz"),
            str(source / "example_seg_mr.nii.gz"), "--out", str(tmp_path), "--sites", "2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    manifests = sorted(tmp_path.glob("*/manifest.csv"))
    assert len(manifests) == 2
    for path in manifests:
        assert check_manifest_for_task(load_manifest(path), "mri").ok
    bad = CliRunner().invoke(app, ["data", "derive-mri", str(tmp_path / "nope.nii.gz"),
                                   str(tmp_path / "nope.nii.gz"), "--out", str(tmp_path / "x")])
    assert bad.exit_code == 1 and "cannot derive MRI sites" in bad.output
