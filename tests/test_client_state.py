"""A site's memory lives in the ClientState the runtime holds for it (``ctx.state``), not on the
method instance: one instance serving every site, in alternation, gives exactly what one
instance per site gives — the rounds really train, and the methods that keep state between the
statistics pass, the hooks and the next round (FlexFair, FairFed, SCAFFOLD, FedProx, Fair
Mixup) are all in.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from fedfair_med.algorithms import build_algorithm
from fedfair_med.algorithms.base import load_state
from fedfair_med.algorithms.flexfair import FlexFair
from fedfair_med.contracts import ClientState, ClientUpdate, LocalSettings, SiteContext

from tests.flexfair_toy import make_sites, objective, start_model
from tests.test_optimisation_methods import GLOBAL, SITES, contexts, make_model

torch.set_num_threads(1)

SETTINGS = LocalSettings(epochs=1, lr=0.05, optimizer="sgd", max_steps=2)
METHODS = {
    "fedprox": ("fedprox", {"mu": 0.1}),
    "scaffold": ("scaffold", {}),
    "fednova": ("fednova", {"rho": 0.5}),
    "flexfair-carried": ("flexfair", {"lam": 1.0}),
    "flexfair-fresh": ("flexfair", {"lam": 1.0, "statistics": "fresh"}),
    "flexfair-linear": ("flexfair", {"lam": 1.0, "statistics": "fresh", "penalty": "linear"}),
    "fairfed": ("fairfed", {"beta": 1.0}),
    "fairmixup": ("fairmixup", {"weight": 0.5, "attribute": "sex"}),
}


def federate(method: str, shared: bool, rounds: int = 2) -> list[dict[str, ClientUpdate]]:
    """``rounds`` rounds over the synthetic sites: statistics pass (every site) when the method
    wants one, then each site's update in turn. ``shared``: one instance for every site and the
    server; else one per site and one for the server."""
    name, params = METHODS[method]
    server = build_algorithm(name, **params)
    sites = {s: (server if shared else build_algorithm(name, **params)) for s in SITES}
    states = {s: ClientState() for s in SITES}  # what the runtime holds, one per site
    global_state, server_state = GLOBAL, server.init_server_state(GLOBAL, list(SITES))
    history = []
    for r in range(1, rounds + 1):
        ctxs = {s: replace(c, state=states[s]) for s, c in contexts(SETTINGS, round_index=r).items()}
        if server.wants_statistics(r, server_state):
            statistics = {}
            for s in SITES:  # every site's pass before any site trains
                model = make_model()
                load_state(model, global_state)
                with torch.no_grad():
                    statistics[s] = sites[s].client_statistics(ctxs[s], model)
            server_state = server.absorb_statistics(server_state, statistics)
        aggregation = server.start_aggregation(global_state, server_state)
        updates = {}
        for k, s in enumerate(sorted(SITES)):
            torch.manual_seed(100 * r + k)
            updates[s] = sites[s].client_update(ctxs[s], make_model(), global_state,
                                                server.broadcast(server_state, s))
            aggregation.add(s, updates[s])
        global_state, server_state = aggregation.result()
        history.append(updates)
    return history


@pytest.mark.parametrize("method", sorted(METHODS))
def test_one_instance_for_every_site_equals_one_instance_per_site(method: str) -> None:
    shared, separate = federate(method, shared=True), federate(method, shared=False)
    for r, (a, b) in enumerate(zip(shared, separate), start=1):
        for site in SITES:
            for part in ("state", "extras"):
                x, y = getattr(a[site], part), getattr(b[site], part)
                assert x.keys() == y.keys(), (r, site, part)
                for key in x:
                    assert torch.equal(x[key], y[key]), (r, site, part, key)
    # the rounds trained: the second round's models moved away from the first round's
    moved = max(float((shared[1][s].state[n] - shared[0][s].state[n]).abs().max())
                for s in SITES for n in GLOBAL if torch.is_floating_point(GLOBAL[n]))
    assert moved > 1e-5


def test_round_memory_is_emptied_and_kept_memory_stays_after_an_update() -> None:
    """After client_update the round part is empty (nothing of one round leaks into the next);
    the kept part holds what the method keeps between rounds (SCAFFOLD's c_i here)."""
    ctx = contexts(SETTINGS, round_index=1)[SITES[0]]
    build_algorithm("scaffold").client_update(ctx, make_model(), GLOBAL, {})
    assert ctx.state.round == {}
    kept = [k for k in ctx.state.kept if k.startswith("scaffold.ci.")]
    assert kept and any(float(ctx.state.kept[k].abs().max()) > 0 for k in kept)


def test_flexfair_hooks_of_two_sites_interleaved_see_each_site_s_own_live_estimate() -> None:
    """Two sites' rounds open on the same instance before either computes a loss (what
    concurrent sites would do): each site's penalty is the one it gets alone."""
    sites = make_sites(0)
    settings = LocalSettings(epochs=1, lr=0.5, optimizer="sgd")
    algorithm, obj = FlexFair(lam=2.0), objective()
    model = start_model(0)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    states = {s: ClientState() for s in sites}
    server = algorithm.init_server_state(start, sorted(sites))
    aggregation = algorithm.start_aggregation(start, server)
    for k, s in enumerate(sorted(sites)):
        ctx = SiteContext(s, k, [sites[s]], obj, settings, round=1, num_groups=2, state=states[s])
        aggregation.add(s, algorithm.client_update(ctx, model, start, {}))
    global_state, server = aggregation.result()

    def opened(s: str, state: ClientState) -> SiteContext:
        ctx = SiteContext(s, sorted(sites).index(s), [sites[s]], obj, settings, round=2,
                          num_groups=2, state=state)
        algorithm.on_round_start(ctx, model, algorithm.broadcast(server, s), state.kept)
        return ctx

    def penalty(ctx: SiteContext) -> float:
        batch = sites[ctx.site]
        return float(algorithm.extra_loss(model, batch, model(batch["image"]), ctx).detach())

    model.load_state_dict(global_state)
    alone = {s: penalty(opened(s, ClientState(kept=dict(states[s].kept)))) for s in sites}
    ctx_a, ctx_b = (opened(s, states[s]) for s in sorted(sites))  # both open, then both compute
    together = {ctx_a.site: penalty(ctx_a), ctx_b.site: penalty(ctx_b)}
    assert together == alone
    assert alone["site-a"] != alone["site-b"] and min(alone.values()) > 1e-6
