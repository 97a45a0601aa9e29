"""Streaming aggregation: the server folds each site's update in and drops it.

Checked for every method: folding updates one at a time (what the in-process runtime does)
gives exactly what aggregating the whole round at once gives (what the OpenFL aggregator does),
the folded models and SCAFFOLD's model-sized Δc_i are no longer referenced once folded, and the
weighted average equals the float64 average computed by hand.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from fedfair_med.algorithms import build_algorithm
from fedfair_med.algorithms.averaging import CollectingAggregation, WeightedSum, weighted_average
from fedfair_med.algorithms.base import aggregate_round
from fedfair_med.algorithms.scaffold import DELTA_C
from fedfair_med.contracts import ClientUpdate, LocalSettings, StateDict

from tests.test_optimisation_methods import GLOBAL, contexts, make_model

torch.set_num_threads(1)

SGD = LocalSettings(epochs=1, lr=0.05, optimizer="sgd")
METHODS = {
    "fedavg": {}, "fedprox": {"mu": 0.1}, "fednova": {"rho": 0.5}, "scaffold": {},
    "flexfair": {"lam": 1.0}, "fairfed": {"beta": 1.0}, "dynamicfl": {"capacity": {"site-a": 1}},
}


def train_round(method: str, round_index: int = 1) -> tuple[object, StateDict, dict[str, ClientUpdate]]:
    """Real local training at every synthetic site, seeded per site."""
    algorithm = build_algorithm(method, **METHODS[method])
    ctxs = contexts(SGD, round_index=round_index)
    server_state = algorithm.init_server_state(GLOBAL, list(ctxs))
    if algorithm.wants_statistics(round_index, server_state):
        stats = {s: algorithm.client_statistics(c, _loaded()) for s, c in ctxs.items()}
        server_state = algorithm.absorb_statistics(server_state, stats)
    updates = {}
    for k, (site, ctx) in enumerate(sorted(ctxs.items())):
        torch.manual_seed(100 + k)
        updates[site] = algorithm.client_update(ctx, make_model(), GLOBAL,
                                                algorithm.broadcast(server_state, site), {})
    return algorithm, server_state, updates


def _loaded() -> torch.nn.Module:
    model = make_model()
    model.load_state_dict(GLOBAL)
    return model


def assert_states_equal(a: StateDict, b: StateDict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("method", sorted(METHODS))
def test_folding_one_site_at_a_time_equals_aggregating_the_round(method: str) -> None:
    algorithm, server_state, updates = train_round(method)
    whole_state, whole_server = aggregate_round(algorithm, GLOBAL, updates, server_state)

    aggregation = algorithm.start_aggregation(GLOBAL, server_state)
    for site in sorted(updates):
        aggregation.add(site, updates[site])
    folded_state, folded_server = aggregation.result()

    assert_states_equal(folded_state, whole_state)
    assert_states_equal(folded_server, whole_server)
    # and the round did move the model (a no-op aggregation would also be "equal")
    moved = max(float((folded_state[n].double() - GLOBAL[n].double()).abs().max())
                for n in GLOBAL if torch.is_floating_point(GLOBAL[n]))
    assert moved > 1e-4


@pytest.mark.parametrize("method", ["fedavg", "fednova", "scaffold", "flexfair", "dynamicfl"])
def test_a_folded_update_is_not_kept(method: str, monkeypatch) -> None:
    """Memory stays flat in the number of sites: nothing model-sized survives a fold (here a
    window of one state; by default up to WeightedSum.GROUP states wait, see the next test)."""
    monkeypatch.setattr(WeightedSum, "GROUP", 1)
    algorithm, server_state, updates = train_round(method)
    aggregation = algorithm.start_aggregation(GLOBAL, server_state)
    assert not isinstance(aggregation, CollectingAggregation)
    watched = []
    for site in sorted(updates):
        update = updates.pop(site)
        watched += [weakref.ref(t) for t in update.state.values()]
        watched += [weakref.ref(v) for k, v in update.extras.items() if k.startswith(DELTA_C)]
        aggregation.add(site, update)
        del update
    gc.collect()
    alive = [w for w in watched if w() is not None]
    assert watched and not alive, f"{len(alive)} of {len(watched)} folded tensors still referenced"
    aggregation.result()  # the round still completes from the running sums


def test_fairfed_collects_the_round_because_its_weights_need_every_site() -> None:
    algorithm, server_state, _ = train_round("fairfed")
    assert isinstance(algorithm.start_aggregation(GLOBAL, server_state), CollectingAggregation)


def test_weighted_sum_is_the_float64_average_of_the_states() -> None:
    generator = torch.Generator().manual_seed(0)
    states = {f"s{i}": {"w": torch.randn(70_000, generator=generator),  # > one 64 Ki block
                        "b": torch.randn(3, 5, generator=generator),
                        "count": torch.tensor(i, dtype=torch.long)} for i in range(4)}
    weights = {"s0": 3.0, "s1": 1.0, "s2": 7.0, "s3": 2.0}
    average = weighted_average(states, weights)
    total = sum(weights.values())
    for name in ("w", "b"):
        expected = sum(weights[s] * states[s][name].double() for s in states) / total
        assert average[name].dtype == torch.float32
        assert average[name].shape == states["s0"][name].shape
        assert torch.allclose(average[name].double(), expected, rtol=0, atol=1e-6)
    assert int(average["count"]) == 0  # integer buffers: the first site's value


def test_weighted_sum_refuses_zero_total_weight_and_duplicate_sites() -> None:
    acc = WeightedSum()
    acc.add({"w": torch.ones(3)}, 0.0)
    with pytest.raises(ValueError, match="sum to zero"):
        acc.result()
    algorithm, server_state, updates = train_round("fedavg")
    aggregation = algorithm.start_aggregation(GLOBAL, server_state)
    site = sorted(updates)[0]
    aggregation.add(site, updates[site])
    with pytest.raises(ValueError, match="two updates"):
        aggregation.add(site, updates[site])


def test_a_method_that_collects_sees_every_update_through_the_same_path() -> None:
    """A server step that needs the whole round returns a CollectingAggregation from
    start_aggregation; the runtimes still only call add and result."""
    from fedfair_med.algorithms.base import Algorithm

    class MedianAggregation(CollectingAggregation):
        def result(self):
            self.algorithm.seen = sorted(self.updates)
            stacked = {k: torch.stack([u.state[k].double() for u in self.updates.values()])
                       for k in self.global_state if torch.is_floating_point(self.global_state[k])}
            new = {k: (stacked[k].median(0).values.to(v.dtype) if k in stacked else v)
                   for k, v in self.global_state.items()}
            return new, self.server_state

    class MedianOfSites(Algorithm):
        name = "median-of-sites"

        def start_aggregation(self, global_state, server_state):
            return MedianAggregation(self, global_state, server_state)

    _, server_state, updates = train_round("fedavg")
    algorithm = MedianOfSites()
    aggregation = algorithm.start_aggregation(GLOBAL, server_state)
    for site in sorted(updates):
        aggregation.add(site, updates[site])
    new_state, _ = aggregation.result()
    assert algorithm.seen == sorted(updates)
    name = next(k for k in GLOBAL if GLOBAL[k].is_floating_point())
    expected = torch.stack([updates[s].state[name].double() for s in updates]).median(0).values
    assert torch.equal(new_state[name], expected.to(GLOBAL[name].dtype))


def test_a_collecting_aggregation_settles_the_weights_once_the_round_is_in() -> None:
    """settle() sees every update before the fold: here it gives each site the same weight,
    whatever its size, and the result is the plain mean of the sites' models."""
    from fedfair_med.algorithms.base import Algorithm

    class EqualWeights(CollectingAggregation):
        def settle(self, updates):
            self.fixed_weights = {s: 1.0 for s in updates}

    class EqualSites(Algorithm):
        name = "equal-sites"

        def start_aggregation(self, global_state, server_state):
            return EqualWeights(self, global_state, server_state)

    _, server_state, updates = train_round("fedavg")
    assert len({u.num_samples for u in updates.values()}) > 1  # sizes differ: weights matter
    new_state, _ = aggregate_round(EqualSites(), GLOBAL, updates, server_state)
    assert_states_equal(new_state, weighted_average({s: u.state for s, u in updates.items()},
                                                    {s: 1.0 for s in updates}))
    fedavg, _ = aggregate_round(build_algorithm("fedavg"), GLOBAL, updates, server_state)
    assert any(not torch.equal(new_state[k], fedavg[k]) for k in new_state
               if torch.is_floating_point(new_state[k]))


@pytest.mark.parametrize("method", ["fedavg", "fednova", "scaffold"])
def test_the_fold_window_changes_memory_not_bits(method: str, monkeypatch) -> None:
    """Up to GROUP states wait and are folded together; the result is the same to the bit."""
    results = {}
    for group in (1, 2, 8):
        monkeypatch.setattr(WeightedSum, "GROUP", group)
        algorithm, server_state, updates = train_round(method)
        aggregation = algorithm.start_aggregation(GLOBAL, server_state)
        watched = []
        for site in sorted(updates):
            update = updates.pop(site)
            watched.append([weakref.ref(t) for t in update.state.values()])
            aggregation.add(site, update)
            del update
        gc.collect()
        waiting = sum(any(w() is not None for w in refs) for refs in watched)
        assert waiting == len(watched) % group if group > 1 else waiting == 0
        results[group] = aggregation.result()
        gc.collect()
        assert not any(w() is not None for refs in watched for w in refs)  # all released
    for group in (2, 8):
        assert_states_equal(results[group][0], results[1][0])
