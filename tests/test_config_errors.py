"""Bad configurations and manifests end in one clear line, never a traceback (issue 12, item 5).

Each case runs the real command (``fedfair-med simulate`` / ``data check``) in-process on a file
written here, and asserts on the message, the exit code and the absence of a Python traceback.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedfair_med.config import ConfigError, load_config
from fedfair_med.data.manifest import SHOWN_PROBLEMS, ManifestError, Problem, load_manifest, problem_lines


def _invoke(*args: str):
    from fedfair_med.cli.main import app

    return CliRunner().invoke(app, [str(a) for a in args])


def _refused(result) -> str:
    """The command failed on purpose (an exit code, not an escaped exception); its output, unwrapped."""
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    return " ".join(result.output.split())


TINY = "task: {task}\nmethod: fedavg\nrounds: 1\nmax_steps: 1\n"


@pytest.mark.parametrize("task, extra, message", [
    ("synthetic-seg", "data: {bogus: 1}", "data: unknown option(s) ['bogus'] for task 'synthetic-seg'"),
    ("synthetic-seg", "data: {scale: 0}", "scale: must be a positive number"),
    ("synthetic-seg", "data: {scale: .nan}", "data: scale: must be finite numbers, got nan"),
    ("synthetic-seg", "lr: .inf", "lr: must be a finite number"),
    ("synthetic-seg", "momentum: .nan", "momentum: must be a finite number"),
    ("synthetic-seg", "network: resnet18", "network resnet18: its output has shape (1, 1), but task "
                                           "synthetic-seg (segmentation) needs (1, 1, 32, 32)"),
    ("synthetic-cls", "network: unet", "needs (1, 2) — a classification network, e.g. small_cnn"),
    ("synthetic-seg", "network_kwargs: {channels: [8]}", "network_kwargs.channels: unet needs a list of at "
                                                         "least two positive channel counts"),
    ("synthetic-seg", "network_kwargs: {depth: 3}", "network unet with network_kwargs {'depth': 3} does not "
                                                    "work for task synthetic-seg"),
    ("synthetic-seg", "network: resnet1000", "network: unknown network 'resnet1000'"),
    ("fundus", "data: {image_size: 4}", "image_size must be 2 sizes of at least 8"),
    ("skin", "data: {augmentation: colour}", "augmentation must be one of full, geometric, none, got 'colour'"),
    ("mri", "data: {pixdim: [1, .inf, 1]}", "data: pixdim: must be finite numbers, got [1, inf, 1]"),
    ("skin", "data: {class_weights: [1, .nan]}", "data: class_weights: must be finite numbers"),
])
def test_a_bad_run_configuration_is_one_line_before_anything_runs(tmp_path: Path, task: str, extra: str,
                                                                  message: str) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(TINY.format(task=task) + extra + "\n")
    out = tmp_path / "run"
    said = _refused(_invoke("simulate", config, "--out", out))
    assert message in said
    assert not (out / "model.pt").exists() and not (out / "metrics.jsonl").exists()
    with pytest.raises(ConfigError, match="invalid configuration"):
        load_config(config)


def test_the_network_check_accepts_what_the_tasks_ship_with() -> None:
    """The checks refuse only what cannot work: chosen networks that fit their task pass."""
    for raw in ({"task": "synthetic-seg", "network": "unet", "network_kwargs": {"channels": [4, 8]}},
                {"task": "synthetic-seg", "network": "basicunet"},
                {"task": "synthetic-cls", "network": "resnet18"},
                {"task": "synthetic-seg", "data": {"scale": 0.25, "size": 16, "n_val": 0}},
                {"task": "skin", "network": "small_cnn", "data": {"metadata_inputs": ["age", "sex"]}},
                {"task": "mri", "data": {"augmentation": "none"}},
                {"task": "skin", "data": {"augmentation": "geometric"}}):
        load_config(raw)


def test_a_semicolon_separated_manifest_gets_a_delimiter_hint(tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("id;image;label;split\na;a.png;0;train\n")
    said = _refused(_invoke("data", "check", manifest, "--task", "skin"))
    assert "missing required column(s)" in said and "semicolon-separated" in said
    with pytest.raises(ManifestError, match="semicolon-separated"):
        load_manifest(manifest)


def test_thousands_of_bad_rows_print_the_first_ones_and_a_count(tmp_path: Path) -> None:
    rows = 3000
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("id,image,label,split,sex\n" + "".join(
        f"r{i},img/{i}.png,0,{'train' if i % 2 else 'test'},{'X' if i % 3 == 0 else 'male'}\n"
        for i in range(rows)))
    result = _invoke("data", "check", manifest, "--task", "skin")
    said = _refused(result)
    assert len(result.output.splitlines()) < SHOWN_PROBLEMS + 10
    # the sex problems come first (found while parsing); every missing image is only counted
    assert f"{rows:,} × image: cannot use '…': file not found" in said
    assert f"{rows // 3 - SHOWN_PROBLEMS:,} × sex: '…' is not a known sex" in said
    everything = _invoke("data", "check", manifest, "--task", "skin", "--show", "0")
    assert len(everything.output.splitlines()) > rows  # --show 0 lists them all
    with pytest.raises(ManifestError) as caught:  # the strict loader's message is capped too
        load_manifest(manifest)
    assert len(str(caught.value).splitlines()) == SHOWN_PROBLEMS + 1
    assert len(caught.value.problems) == rows // 3 + (rows % 3 > 0)


def test_problem_lines_count_the_rest_by_kind() -> None:
    problems = [Problem("m.csv", i + 2, "image", f"image img/{i}.png not found") for i in range(100_000)]
    problems += [Problem("m.csv", 7, "age", "'abc' is not an age")]
    lines = problem_lines(problems)
    assert lines[:SHOWN_PROBLEMS] == [str(p) for p in problems[:SHOWN_PROBLEMS]]
    assert len(lines) == SHOWN_PROBLEMS + 1
    assert lines[-1].startswith(f"… and {100_001 - SHOWN_PROBLEMS:,} more problem(s) (100,001 in all")
    assert f"{100_000 - SHOWN_PROBLEMS:,} × image: image … not found" in lines[-1]
    assert "1 × age: '…' is not an age" in lines[-1]
    assert problem_lines(problems[:3]) == [str(p) for p in problems[:3]]
