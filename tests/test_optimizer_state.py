"""``optimizer_state: keep``: a site resumes its own optimiser across rounds.

The claim, tested as such: for one site under FedAvg (the average of one update is that update),
R rounds of one epoch with the state kept are exactly one run of R epochs with one optimiser;
with the state reset they are not. And the kept state stays at the site.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from fedfair_med.algorithms import build_algorithm
from fedfair_med.algorithms.base import OPTIMIZER_STATE, restore_optimizer_state
from fedfair_med.config import ConfigError, RunConfig
from fedfair_med.contracts import ClientState, LocalSettings
from fedfair_med.runtime.setup import resolve
from fedfair_med.tasks import TASKS

from tests.test_optimisation_methods import GLOBAL, SITES, contexts, make_model

torch.set_num_threads(1)

SITE = SITES[0]


def one_site_rounds(settings: LocalSettings, rounds: int) -> tuple[dict[str, torch.Tensor], ClientState]:
    """``rounds`` FedAvg rounds of a one-site federation: the global model is the site's update."""
    algorithm, state = build_algorithm("fedavg"), ClientState()
    global_state = GLOBAL
    for r in range(1, rounds + 1):
        ctx = replace(contexts(settings, round_index=r)[SITE], state=state)
        update = algorithm.client_update(ctx, make_model(), global_state, {})
        global_state = update.state
    return global_state, state


def largest_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a
               if torch.is_floating_point(a[k]))


@pytest.mark.parametrize("optimizer,momentum", [("adam", 0.0), ("sgd", 0.9)])
def test_kept_state_makes_rounds_one_continuous_run(optimizer: str, momentum: float) -> None:
    base = LocalSettings(epochs=1, lr=0.01, optimizer=optimizer, momentum=momentum)
    continuous, _ = one_site_rounds(replace(base, epochs=3), rounds=1)
    kept, _ = one_site_rounds(replace(base, optimizer_state="keep"), rounds=3)
    reset, _ = one_site_rounds(base, rounds=3)
    assert largest_difference(kept, continuous) < 1e-6
    # restarting the optimiser every round is a different trajectory, so the test can tell
    assert largest_difference(reset, continuous) > 1e-4


def test_kept_state_stays_at_the_site_and_is_replaced_each_round() -> None:
    settings = LocalSettings(epochs=1, lr=0.01, optimizer="adam", optimizer_state="keep")
    algorithm, state = build_algorithm("fedavg"), ClientState()
    steps_after = []
    for r in (1, 2):
        ctx = replace(contexts(settings, round_index=r)[SITE], state=state)
        update = algorithm.client_update(ctx, make_model(), GLOBAL, {})
        sent = set(update.state) | set(update.extras)
        assert not any(k.startswith(OPTIMIZER_STATE) for k in sent)
        counts = {k: v for k, v in state.kept.items() if k.startswith(OPTIMIZER_STATE) and k.endswith("/step")}
        assert counts
        steps_after.append(max(float(v) for v in counts.values()))
    # Adam's step count goes on from round 1 (per-batch steps add up) instead of restarting
    assert steps_after[1] == 2 * steps_after[0] > 0


def test_reset_keeps_nothing_in_the_site_memory() -> None:
    _, state = one_site_rounds(LocalSettings(epochs=1, lr=0.01, optimizer="adam"), rounds=2)
    assert not any(k.startswith(OPTIMIZER_STATE) for k in state.kept)


def test_state_for_another_model_is_refused_by_name() -> None:
    _, state = one_site_rounds(LocalSettings(epochs=1, lr=0.01, optimizer_state="keep"), rounds=1)
    small = torch.nn.Linear(2, 1)
    with pytest.raises(ValueError, match="same model every round"):
        restore_optimizer_state(torch.optim.Adam(small.parameters()), state.kept)


def test_config_carries_the_setting_and_refuses_unknown_values() -> None:
    config = RunConfig(task="synthetic-seg", optimizer_state="keep").validate()
    assert resolve(config, TASKS["synthetic-seg"]()).settings.optimizer_state == "keep"
    assert resolve(RunConfig().validate(), TASKS["synthetic-seg"]()).settings.optimizer_state == "reset"
    with pytest.raises(ConfigError, match="optimizer_state: use 'reset'"):
        RunConfig(optimizer_state="persist").validate()


def test_fednova_refuses_a_kept_momentum_buffer() -> None:
    """FedNova's normaliser a_i assumes each round's momentum buffer starts at zero."""
    with pytest.raises(ConfigError, match="fednova needs a fresh optimiser"):
        RunConfig(method="fednova", optimizer_state="keep").validate()
    RunConfig(method="scaffold", optimizer_state="keep").validate()  # plain SGD: nothing to keep
