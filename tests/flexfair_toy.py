"""The issue-11 toy: logistic regression, two seeded synthetic sites (600 and 200 samples),
demographic parity over a binary attribute, full-batch local steps.

Federated runs go through the project's own :class:`FlexFair` (server hooks + the shared local
loop ``Algorithm.client_update``); the central run trains on the pooled data with the exact
pooled penalty (:func:`pooled_penalty`) and the same optimiser.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from fedfair_med.algorithms import build_algorithm
from fedfair_med.algorithms.base import float_state, load_state
from fedfair_med.contracts import LocalSettings, Objective, SiteContext
from fedfair_med.fairness.penalty import pooled_penalty

SIZES = {"site-a": 600, "site-b": 200}
FEATURES = 4
LR = {"sgd": 0.5, "adam": 0.05}


def _site(n: int, p_attribute: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Attribute a ~ Bernoulli(p); the label depends on a; one feature is a noisy proxy of a."""
    a = (torch.rand(n, generator=generator) < p_attribute).long()
    x = torch.randn(n, FEATURES, generator=generator)
    x[:, 0] = a.float() + 0.2 * torch.randn(n, generator=generator)
    logit = 4.0 * (a.float() - 0.5) + 1.0 * x[:, 1] - 0.5 * x[:, 2] + 0.5 * torch.randn(n, generator=generator)
    y = (logit > 0).float()
    return {"image": x, "label": y, "group": a}


def make_sites(seed: int = 0, criterion: str = "dp") -> dict[str, dict[str, torch.Tensor]]:
    """The two sites; ``criterion='ea'`` makes the groups the sites themselves."""
    g = torch.Generator().manual_seed(seed)
    sites = {"site-a": _site(SIZES["site-a"], 0.3, g), "site-b": _site(SIZES["site-b"], 0.7, g)}
    if criterion == "ea":
        for k, s in enumerate(sorted(sites)):
            sites[s]["attribute"] = sites[s]["group"]
            sites[s]["group"] = torch.full_like(sites[s]["group"], k)
    return sites


@contextmanager
def one_thread() -> Iterator[None]:
    """Tiny tensors: one thread is several times faster than many on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def pooled(sites: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([sites[s][k] for s in sorted(sites)]) for k in next(iter(sites.values()))}


def objective(criterion: str = "dp") -> Objective:
    """Task loss BCE; the risk is the score P(y=1|x) for DP, the sample's BCE for EA."""
    def sample_risk(logits: torch.Tensor, b: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if criterion == "ea":
            return nn.functional.binary_cross_entropy_with_logits(
                logits.reshape(-1), b["label"], reduction="none")
        return torch.sigmoid(logits.reshape(-1))

    return Objective(
        task_loss=lambda logits, b: nn.functional.binary_cross_entropy_with_logits(
            logits.reshape(-1), b["label"]),
        sample_risk=sample_risk,
    )


def start_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(FEATURES, 1)


@dataclass
class Outcome:
    gap: float  # DP: E[s | a=1] − E[s | a=0]; EA: mean BCE at site-b − at site-a (pooled training data)
    task_loss: float  # pooled BCE


def evaluate(model: nn.Module, data: Mapping[str, torch.Tensor], criterion: str = "dp") -> Outcome:
    with torch.no_grad():
        logits = model(data["image"])
        risk = objective(criterion).sample_risk(logits, data)
        g = data["group"]
        gap = float(risk[g == 1].mean() - risk[g == 0].mean())
        loss = float(objective().task_loss(logits, data))
    return Outcome(gap, loss)


def _optimizer(kind: str, params: Any) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(params, lr=LR["sgd"])
    return torch.optim.Adam(params, lr=LR["adam"])


def central(lam: float, steps: int, optimizer: str = "sgd", weighting: str = "proportional",
            seed: int = 0, criterion: str = "dp") -> Outcome:
    """``steps`` full-batch steps on the pooled data of task loss + λ · P (exact, pooled)."""
    sites = make_sites(seed, criterion)
    data = pooled(sites)
    model = start_model(seed)
    opt = _optimizer(optimizer, model.parameters())
    obj = objective(criterion)
    for _ in range(steps):
        opt.zero_grad()
        logits = model(data["image"])
        loss = obj.task_loss(logits, data) + lam * pooled_penalty(
            obj.sample_risk(logits, data), data["group"], 2, weighting=weighting)
        loss.backward()
        opt.step()
    return evaluate(model, data, criterion)


def federated(method: str, lam: float, steps: int, rounds: int, optimizer: str = "sgd",
              seed: int = 0, criterion: str = "dp", **params: Any) -> Outcome:
    """``rounds`` rounds of ``steps`` full-batch local steps at each site, through the method's
    own server hooks and the shared local loop; FedAvg when ``method == 'fedavg'``."""
    sites = make_sites(seed, criterion)
    algorithm = build_algorithm(method, **({"lam": lam, **params} if method == "flexfair" else params))
    model = start_model(seed)
    global_state = float_state(model)
    server = algorithm.init_server_state(global_state, sorted(sites))
    settings = LocalSettings(epochs=steps, lr=LR[optimizer], optimizer=optimizer)
    site_states: dict[str, dict] = {s: {} for s in sites}
    obj = objective(criterion)
    for r in range(1, rounds + 1):
        contexts = {s: SiteContext(s, k, [sites[s]], obj, settings, round=r, num_groups=2)
                    for k, s in enumerate(sorted(sites))}
        if algorithm.wants_statistics(r, server):
            stats = {}
            for s, ctx in contexts.items():
                load_state(model, global_state)
                with torch.no_grad():
                    stats[s] = algorithm.client_statistics(ctx, model)
            server = algorithm.absorb_statistics(server, stats)
        aggregation = algorithm.start_aggregation(global_state, server)
        for s in sorted(sites):
            update = algorithm.client_update(contexts[s], model, global_state,
                                             algorithm.broadcast(server, s), site_states[s])
            aggregation.add(s, update)
        global_state, server = aggregation.result()
    load_state(model, global_state)
    return evaluate(model, pooled(sites), criterion)
