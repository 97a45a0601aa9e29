"""A round a site is asked to train again gives the same update.

An OpenFL aggregator that restarts after a site reported asks that site for the round again
(docs/federation.md). The site's kept memory (SCAFFOLD's c_i, FlexFair's own statistics, a kept
optimiser state) was already advanced by the first attempt; the redo must start from the memory
the round first started from, or the resumed federation drifts from an uninterrupted one.
"""

from __future__ import annotations

import pytest
import torch

from fedfair_med.config import RunConfig
from fedfair_med.runtime.local import build_sites
from fedfair_med.runtime.setup import RunSetup

torch.set_num_threads(1)

CASES = {
    "scaffold": {"method": "scaffold"},
    "fedavg-kept-optimiser": {"method": "fedavg", "optimizer_state": "keep"},
    "flexfair": {"method": "flexfair", "method_params": {"lam": 1.0}},
}


def _train(setup: RunSetup, site, round_index: int, global_state):
    model = setup.build_model()
    broadcast = setup.algorithm.broadcast(setup.algorithm.init_server_state(global_state, [site.name]),
                                          site.name)
    return site.train(setup.algorithm, model, global_state, broadcast, round_index)


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_redone_round_gives_the_first_attempt_s_update(case: str) -> None:
    config = RunConfig(task="synthetic-seg", rounds=3, max_steps=3, data={"scale": 0.25},
                       **CASES[case]).validate()
    setup = RunSetup.create(config)
    site = build_sites(setup)[0]
    start = {k: v.detach().clone() for k, v in setup.build_model().state_dict().items()}
    first = _train(setup, site, 1, start)
    assert site.client_state.kept  # the method (or the optimiser) keeps something between rounds
    attempt = _train(setup, site, 2, first.state)
    redo = _train(setup, site, 2, first.state)
    for key in attempt.state:
        assert torch.equal(attempt.state[key], redo.state[key]), key
    for key in attempt.extras:
        assert torch.equal(attempt.extras[key], redo.extras[key]), key
    # and the memory after the redo is what one attempt leaves: round 3 as if round 2 ran once
    after_redo = _train(setup, site, 3, redo.state)
    once = build_sites(setup)[0]
    _train(setup, once, 1, start)
    _train(setup, once, 2, first.state)
    uninterrupted = _train(setup, once, 3, redo.state)
    for key in uninterrupted.state:
        assert torch.equal(after_redo.state[key], uninterrupted.state[key]), key
