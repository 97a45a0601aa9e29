"""FedProx, FedNova and SCAFFOLD against FedAvg and against their update rules done by hand.

Real (tiny) training: a MONAI UNet with channels (4, 8) and BatchNorm on 16 × 16 synthetic
images, so float buffers (running statistics) and an integer buffer travel with the weights.
Every site's ``client_update`` is seeded, so two methods see the same batches and initial state.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from fedfair_med.algorithms import build_algorithm
from fedfair_med.algorithms.averaging import weighted_average
from fedfair_med.algorithms.base import Algorithm, aggregate_round, float_state
from fedfair_med.algorithms.fedavg import FedAvg
from fedfair_med.algorithms.fedavgm import TRAINABLE, VELOCITY, FedAvgM
from fedfair_med.algorithms.fednova import FedNova
from fedfair_med.algorithms.fedprox import FedProx
from fedfair_med.algorithms.scaffold import Scaffold
from fedfair_med.contracts import ClientUpdate, LocalSettings, Objective, SiteContext, StateDict
from fedfair_med.data.federation import GroupedDataset
from fedfair_med.data.synthetic import synthetic_segmentation
from fedfair_med.fairness.criteria import Criterion
from fedfair_med.models import build_network
from fedfair_med.tasks.synthetic import SyntheticSegmentation

torch.set_num_threads(1)

FEDERATION = synthetic_segmentation(seed=0, size=16, scale=0.25)  # sites of unequal size
SITES = FEDERATION.site_names
OBJECTIVE = SyntheticSegmentation().objective(Criterion())


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return build_network("unet", in_channels=1, out_channels=1, spatial_dims=2, channels=(4, 8))


def contexts(settings: LocalSettings, batch_size: int = 4, round_index: int = 0) -> dict[str, SiteContext]:
    out = {}
    for k, site in enumerate(FEDERATION.sites):
        data = GroupedDataset(site.train, "site", SITES)
        out[site.name] = SiteContext(
            site=site.name, site_index=k, loader=DataLoader(data, batch_size=batch_size, shuffle=False),
            objective=OBJECTIVE, settings=settings, round=round_index, num_groups=len(SITES),
        )
    return out


def run_round(
    algorithm: Algorithm,
    global_state: StateDict,
    ctxs: dict[str, SiteContext],
    server_state: StateDict | None = None,
    site_states: dict[str, StateDict] | None = None,
) -> tuple[StateDict, StateDict, dict[str, ClientUpdate]]:
    """One in-process round, every site seeded the same way so methods are comparable."""
    if server_state is None:
        server_state = algorithm.init_server_state(global_state, list(ctxs))
    site_states = {} if site_states is None else site_states
    updates = {}
    for k, (site, ctx) in enumerate(sorted(ctxs.items())):
        torch.manual_seed(100 + k)
        model = make_model()
        updates[site] = algorithm.client_update(
            ctx, model, global_state, algorithm.broadcast(server_state, site),
            site_states.setdefault(site, {}),
        )
    new_state, new_server = aggregate_round(algorithm, global_state, updates, server_state)
    return new_state, new_server, updates


def parameter_names() -> list[str]:
    return [name for name, _ in make_model().named_parameters()]


def assert_states_close(a: StateDict, b: StateDict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name].double(), b[name].double(), atol=atol, rtol=0), name


def max_difference(a: StateDict, b: StateDict, names: list[str]) -> float:
    return max(float((a[n].double() - b[n].double()).abs().max()) for n in names)


GLOBAL = float_state(make_model())
SGD = LocalSettings(epochs=1, lr=0.05, optimizer="sgd")


# ---- FedProx -------------------------------------------------------------------------------

def test_fedprox_with_mu_zero_is_fedavg() -> None:
    settings = LocalSettings(epochs=1, lr=3e-3, optimizer="adam", max_steps=2)
    fedavg, _, _ = run_round(FedAvg(), GLOBAL, contexts(settings))
    fedprox, _, _ = run_round(FedProx(mu=0.0), GLOBAL, contexts(settings))
    assert_states_close(fedprox, fedavg)


def test_fedprox_adds_exactly_the_proximal_gradient() -> None:
    """After one backward pass, grad(μ) − grad(0) = μ (w − w_g) for every parameter."""
    ctx = contexts(SGD)["site-a"]
    batch = next(iter(ctx.loader))
    mu = 0.7
    model = make_model()
    model.load_state_dict(GLOBAL)
    prox = FedProx(mu=mu)
    prox.on_round_start(ctx, model, {}, {})
    with torch.no_grad():  # move away from w_g so the proximal gradient is not zero
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.train()

    def gradients(after_backward: Callable[[nn.Module, SiteContext], None]) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        OBJECTIVE.task_loss(model(batch["image"]), batch).backward()
        after_backward(model, ctx)
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = gradients(lambda m, c: None)
    proximal = gradients(prox.after_backward)
    for name, p in model.named_parameters():
        expected = mu * (p.detach() - GLOBAL[name])
        assert torch.allclose(proximal[name] - plain[name], expected, atol=1e-6), name


def test_fedprox_keeps_the_local_model_near_the_global_model() -> None:
    ctxs = contexts(LocalSettings(epochs=2, lr=0.1, optimizer="sgd"))
    ctx = {"site-a": ctxs["site-a"]}
    names = parameter_names()

    def drift(mu: float) -> float:
        _, _, updates = run_round(FedProx(mu=mu), GLOBAL, ctx)
        local = updates["site-a"].state
        return sum(float(((local[n] - GLOBAL[n]) ** 2).sum()) for n in names) ** 0.5

    free, held = drift(0.0), drift(2.0)
    assert free > 0
    assert held < 0.95 * free


# ---- FedAvgM -------------------------------------------------------------------------------

def test_fedavgm_without_momentum_at_unit_rate_is_fedavg_bit_for_bit() -> None:
    settings = LocalSettings(epochs=1, lr=3e-3, optimizer="adam", max_steps=2)
    fedavg, _, _ = run_round(FedAvg(), GLOBAL, contexts(settings))
    fedavgm, server, updates = run_round(FedAvgM(beta=0.0, server_lr=1.0), GLOBAL, contexts(settings))
    for name in fedavg:
        assert torch.equal(fedavgm[name], fedavg[name]), name
    names = set(parameter_names())
    assert {k[len(TRAINABLE):] for k in updates["site-a"].extras if k.startswith(TRAINABLE)} == names
    assert {k[len(VELOCITY):] for k in server} == names  # no velocity for BatchNorm's statistics


def test_fedavgm_applies_the_momentum_recursion_to_parameters_only() -> None:
    """Two real rounds: x₂ = x₁ − η (β v₁ + x₁ − avg₂) with v₁ = x₀ − avg₁, per parameter;
    running statistics take FedAvg's average; the velocity is never broadcast."""
    beta, lr = 0.5, 1.5
    method = FedAvgM(beta=beta, server_lr=lr)
    settings = LocalSettings(epochs=1, lr=0.05, optimizer="sgd", max_steps=2)
    ctxs = contexts(settings)
    x1, server, updates1 = run_round(method, GLOBAL, ctxs)
    assert method.broadcast(server, "site-a") == {}
    x2, server2, updates2 = run_round(method, x1, ctxs, server_state=server)
    weights = {s: float(u.num_samples) for s, u in updates2.items()}
    average1 = weighted_average({s: u.state for s, u in updates1.items()}, weights)
    average2 = weighted_average({s: u.state for s, u in updates2.items()}, weights)
    names = parameter_names()
    for name in names:
        v1 = GLOBAL[name].double() - average1[name].double()
        v2 = beta * v1 + x1[name].double() - average2[name].double()
        assert torch.allclose(x1[name].double(), GLOBAL[name].double() - lr * v1, atol=1e-6), name
        assert torch.allclose(x2[name].double(), x1[name].double() - lr * v2, atol=1e-6), name
        assert torch.allclose(server2[VELOCITY + name].double(), v2, atol=1e-6), name
    buffers = [n for n in x2 if n not in names]
    assert any("running_var" in n for n in buffers)
    for name in buffers:
        assert torch.equal(x2[name], average2[name]), name
    assert max_difference(x2, average2, names) > 1e-4


def test_fedavgm_moves_further_along_a_direction_every_round_shares() -> None:
    """Sites that each round move by the same d_s from the global model: FedAvg moves the mean d
    per round; FedAvgM with β = 0.5 moves 1, 1.5 and 1.75 times it (Σ = 4.25 after 3 rounds)."""
    zero = {"w": torch.zeros(3), "bn.running_var": torch.ones(3)}
    moves = {"a": torch.tensor([1.0, 2.0, 0.0]), "b": torch.tensor([3.0, -2.0, 0.0])}
    mean_move = (1 * moves["a"] + 3 * moves["b"]) / 4

    def rounds(method: Algorithm, n: int) -> StateDict:
        state, server = dict(zero), method.init_server_state(zero, ["a", "b"])
        for _ in range(n):
            updates = {s: ClientUpdate(state={"w": state["w"] + d, "bn.running_var": torch.full((3,), 2.0)},
                                       num_samples=1 if s == "a" else 3,
                                       extras={TRAINABLE + "w": torch.ones(())})
                       for s, d in moves.items()}
            state, server = aggregate_round(method, state, updates, server)
        return state

    assert torch.allclose(rounds(FedAvg(), 3)["w"], 3 * mean_move)
    momentum = rounds(FedAvgM(beta=0.5), 3)
    assert torch.allclose(momentum["w"], 4.25 * mean_move)
    assert torch.equal(momentum["bn.running_var"], torch.full((3,), 2.0))


# ---- FedNova -------------------------------------------------------------------------------

def test_fednova_with_equal_steps_and_no_momentum_is_fedavg() -> None:
    settings = LocalSettings(epochs=1, lr=0.05, optimizer="sgd", max_steps=2)  # τ_i = 2 everywhere
    ctxs = contexts(settings, batch_size=2)
    fedavg, _, _ = run_round(FedAvg(), GLOBAL, ctxs)
    fednova, _, updates = run_round(FedNova(rho=0.0), GLOBAL, ctxs)
    assert {float(u.extras["fednova.a"]) for u in updates.values()} == {2.0}
    assert_states_close(fednova, fedavg)


def test_fednova_with_unequal_steps_matches_the_normalised_update() -> None:
    ctxs = contexts(SGD, batch_size=2)
    for site, tau in zip(SITES, (3, 2, 1)):  # every site holds at least two batches of two
        ctxs[site].settings = replace(SGD, max_steps=tau)
    fedavg, _, _ = run_round(FedAvg(), GLOBAL, ctxs)
    fednova, _, updates = run_round(FedNova(), GLOBAL, ctxs)
    taus = {s: float(u.extras["steps"]) for s, u in updates.items()}
    assert taus == dict(zip(SITES, (3.0, 2.0, 1.0)))

    n = {s: u.num_samples for s, u in updates.items()}
    total = sum(n.values())
    tau_eff = sum(n[s] / total * taus[s] for s in SITES)
    names = parameter_names()
    for name in names:
        x = GLOBAL[name].double()
        step = sum(n[s] / total * (x - updates[s].state[name].double()) / taus[s] for s in SITES)
        expected = x - tau_eff * step
        assert torch.allclose(fednova[name].double(), expected, atol=1e-6), name
    buffers = [k for k in GLOBAL if k not in names]
    assert any("running_var" in k for k in buffers)
    average = weighted_average({s: u.state for s, u in updates.items()}, n)
    for name in buffers:  # running statistics: FedAvg's average, not normalised
        assert torch.equal(fednova[name], average[name]), name
    assert max_difference(fednova, fedavg, names) > 1e-4


class ConstantSlope(nn.Module):
    """f(x) = w · x with a loss whose gradient never changes, so SGD's path is known exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w


@pytest.mark.parametrize("rho", [0.0, 0.5, 0.9])
def test_fednova_normaliser_is_the_accumulated_momentum_coefficient(rho: float) -> None:
    """With a constant gradient g, τ momentum steps move w by exactly η a(τ, ρ) g."""
    steps, lr = 5, 0.1
    data = [{"image": torch.tensor([1.0, -2.0, 0.5]), "label": torch.tensor(0.0), "group": 0}] * steps
    objective = Objective(task_loss=lambda logits, batch: logits.mean(), sample_risk=lambda l, b: l)
    ctx = SiteContext(site="s", site_index=0, loader=DataLoader(data, batch_size=1), objective=objective,
                      settings=LocalSettings(lr=lr, optimizer="adam"), round=0, num_groups=1)
    model = ConstantSlope()
    start = float_state(model)
    update = FedNova(rho=rho).client_update(ctx, model, start, {}, {})
    gradient = torch.tensor([1.0, -2.0, 0.5])
    realised = (start["w"] - update.state["w"]) / (lr * gradient)  # the optimiser ran SGD, not adam
    assert torch.allclose(realised, update.extras["fednova.a"].float().expand(3), atol=1e-5)
    if rho > 0:
        assert float(update.extras["fednova.a"]) > steps  # momentum amplifies the step count


# ---- SCAFFOLD ------------------------------------------------------------------------------

def test_scaffold_first_round_is_fedavg_with_sgd() -> None:
    ctxs = contexts(SGD)
    fedavg, _, _ = run_round(FedAvg(), GLOBAL, ctxs)
    scaffold, _, _ = run_round(Scaffold(server_lr=1.0), GLOBAL, ctxs)
    assert_states_close(scaffold, fedavg)


def test_scaffold_server_variate_is_the_mean_of_site_variates() -> None:
    algorithm = Scaffold()
    ctxs = contexts(SGD)
    site_states: dict[str, StateDict] = {}
    state, server, updates = run_round(algorithm, GLOBAL, ctxs, site_states=site_states)
    names = parameter_names()

    def check() -> None:
        for name in names:
            mean_ci = sum(site_states[s]["scaffold.ci." + name] for s in SITES) / len(SITES)
            assert torch.allclose(server["scaffold.c." + name], mean_ci, atol=1e-6), name

    check()
    assert max(float(server["scaffold.c." + n].abs().max()) for n in names) > 0
    # extras: a Δc shaped like each parameter and the step count, nothing per sample
    shapes = dict(make_model().named_parameters())
    for update in updates.values():
        for key, value in update.extras.items():
            if value.dim() == 0:  # the shared loop's step count and mean loss
                assert key in {"steps", "loss"}
            else:
                assert key.startswith("scaffold.dc.")
                assert value.shape == shapes[key[len("scaffold.dc."):]].shape
        assert {k for k in update.extras if k.startswith("scaffold.")} == {"scaffold.dc." + n for n in names}

    # round 2 with site-c dropped: c ← c + (|S|/N)·mean Δc keeps c = mean over all three sites
    ctxs = contexts(SGD, round_index=1)
    del ctxs["site-c"]
    state, server, _ = run_round(algorithm, state, ctxs, server_state=server, site_states=site_states)
    check()


def test_scaffold_corrects_each_gradient_by_c_minus_ci() -> None:
    """One SGD step: y = x − η (g + c − c_i), and option II then gives c_i⁺ = g."""
    settings = LocalSettings(epochs=1, lr=0.05, optimizer="sgd", max_steps=1)
    ctx = contexts(settings)["site-a"]
    params = dict(make_model().named_parameters())
    generator = torch.Generator().manual_seed(1)
    c = {n: torch.randn(p.shape, generator=generator) * 0.1 for n, p in params.items()}
    c_i = {n: torch.randn(p.shape, generator=generator) * 0.1 for n, p in params.items()}
    broadcast = {"scaffold.c." + n: t for n, t in c.items()}
    site_state = {"scaffold.ci." + n: t.clone() for n, t in c_i.items()}

    # the plain gradient at x on the first batch
    model = make_model()
    model.load_state_dict(GLOBAL)
    model.train()
    batch = next(iter(ctx.loader))
    OBJECTIVE.task_loss(model(batch["image"]), batch).backward()
    gradient = {n: p.grad.clone() for n, p in model.named_parameters()}

    update = Scaffold().client_update(ctx, make_model(), GLOBAL, broadcast, site_state)
    for name in params:
        expected = GLOBAL[name] - settings.lr * (gradient[name] + c[name] - c_i[name])
        assert torch.allclose(update.state[name], expected, atol=1e-6), name
        assert torch.allclose(site_state["scaffold.ci." + name], gradient[name], atol=1e-4), name
        assert torch.allclose(update.extras["scaffold.dc." + name], gradient[name] - c_i[name], atol=1e-4)


def test_scaffold_server_lr_scales_the_parameter_step_only() -> None:
    ctxs = contexts(SGD)
    fedavg, _, _ = run_round(FedAvg(), GLOBAL, ctxs)
    scaffold, _, _ = run_round(Scaffold(server_lr=0.5), GLOBAL, ctxs)
    names = parameter_names()
    for name in GLOBAL:
        if name in names:
            expected = GLOBAL[name].double() + 0.5 * (fedavg[name].double() - GLOBAL[name].double())
            assert torch.allclose(scaffold[name].double(), expected, atol=1e-6), name
        else:  # BatchNorm running statistics: averaged, not stepped
            assert torch.equal(scaffold[name], fedavg[name]), name


# ---- parameters ----------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("method", "params", "named"),
    [
        ("fedprox", {"mu": -0.1}, "mu"),
        ("fedprox", {"mu": float("nan")}, "mu"),
        ("fednova", {"rho": 1.0}, "rho"),
        ("fednova", {"rho": -0.2}, "rho"),
        ("scaffold", {"server_lr": 0.0}, "server_lr"),
        ("fedprox", {"lambda_": 1.0}, "lambda_"),
        ("fednova", {"momentum": 0.9}, "momentum"),
        ("scaffold", {"lr": 0.1}, "lr"),
    ],
)
def test_bad_parameters_name_the_parameter(method: str, params: dict[str, Any], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        build_algorithm(method, **params)


def test_registry_builds_each_method_with_its_defaults() -> None:
    assert build_algorithm("fedprox").params == {"mu": 0.01}
    assert build_algorithm("fednova").params == {"rho": 0.0}
    assert build_algorithm("scaffold").params == {"server_lr": 1.0}
