"""The cosine learning-rate schedule across rounds (``lr_final``): its values, and that the sites
really train at the round's rate in both runtimes' shared site code."""

from __future__ import annotations

import math

import pytest
import torch

from fedfair_med.config import ConfigError, RunConfig
from fedfair_med.contracts import LocalSettings
from fedfair_med.runtime.local import run_simulation
from fedfair_med.runtime.rundir import read_model, read_run_yaml

FAST = dict(task="synthetic-seg", method="fedavg", max_steps=2, data={"scale": 0.25}, seed=3)


def test_the_rate_runs_from_lr_to_lr_final_along_a_half_cosine() -> None:
    settings = LocalSettings(lr=0.1, lr_final=0.01)
    rates = [settings.for_round(r, 5).lr for r in range(1, 6)]
    assert rates[0] == pytest.approx(0.1) and rates[-1] == pytest.approx(0.01)
    assert rates[2] == pytest.approx(0.055)  # halfway: the mean of the two
    assert all(a > b for a, b in zip(rates, rates[1:]))
    assert rates[1] == pytest.approx(0.01 + 0.045 * (1 + math.cos(math.pi / 4)))
    assert settings.for_round(1, 5).epochs == settings.epochs  # only the rate changes
    constant = LocalSettings(lr=0.1)
    assert {constant.for_round(r, 5).lr for r in range(1, 6)} == {0.1}


def test_a_zero_final_rate_freezes_the_last_round(tmp_path) -> None:
    """With lr_final 0 the last round trains at rate 0, so a 2-round run ends with the model that
    a 1-round run at the constant rate makes (round 1's batches are the same in both)."""
    two = run_simulation(RunConfig(**FAST, rounds=2, lr_final=0.0), tmp_path / "two")
    one = run_simulation(RunConfig(**FAST, rounds=1), tmp_path / "one")
    constant = run_simulation(RunConfig(**FAST, rounds=2), tmp_path / "constant")
    a, b, c = read_model(two.path), read_model(one.path), read_model(constant.path)
    floats = [k for k in a if a[k].is_floating_point() and "running" not in k]
    assert all(torch.equal(a[k], b[k]) for k in floats)
    assert not all(torch.equal(a[k], c[k]) for k in floats)  # without the schedule round 2 moves it
    assert read_run_yaml(two.path)["resolved"]["local"]["lr_final"] == 0.0


@pytest.mark.parametrize("bad", [-0.1, "low", float("inf")])
def test_a_bad_final_rate_is_refused_by_name(bad) -> None:
    with pytest.raises(ConfigError, match="lr_final"):
        RunConfig(task="synthetic-seg", lr_final=bad).validate()
