"""FlexFair: the penalty maths, and the proof that the federated form equals the pooled one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedfair_med.algorithms import build_algorithm
from fedfair_med.algorithms.base import aggregate_round, float_state
from fedfair_med.algorithms.flexfair import COEF, COUNTS, SUMS
from fedfair_med.config import RunConfig
from fedfair_med.contracts import LocalSettings, SiteContext
from fedfair_med.data.federation import GroupedDataset, make_loader
from fedfair_med.data.synthetic import synthetic_classification, synthetic_segmentation
from fedfair_med.fairness.criteria import Criterion
from fedfair_med.fairness.penalty import (
    GroupStatistics, group_sums, group_weights, penalty, penalty_gradient_coefficients,
    pooled_penalty, sample_coefficients, surrogate_penalty,
)
from fedfair_med.models import build_network
from fedfair_med.tasks.synthetic import SyntheticClassification, SyntheticSegmentation


@pytest.mark.parametrize("weighting", ["uniform", "proportional"])
def test_coefficients_are_the_derivative_of_the_penalty(weighting: str) -> None:
    torch.manual_seed(0)
    risks = torch.rand(5, dtype=torch.float64, requires_grad=True)
    counts = torch.tensor([3.0, 10.0, 1.0, 7.0, 4.0], dtype=torch.float64)
    weights = group_weights(counts, weighting)
    (grad,) = torch.autograd.grad(penalty(risks, weights), risks)
    assert torch.allclose(penalty_gradient_coefficients(risks.detach(), weights), grad, atol=1e-12)


def test_penalty_is_zero_for_equal_risks_and_ignores_empty_groups() -> None:
    stats = GroupStatistics(torch.tensor([2.0, 4.0, 0.0], dtype=torch.float64),
                            torch.tensor([4.0, 8.0, 0.0], dtype=torch.float64))
    w = group_weights(stats.counts)
    assert torch.allclose(w, torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64))
    assert penalty(stats.risks, w).item() == pytest.approx(0.0)
    assert torch.equal(sample_coefficients(stats, 12.0), torch.zeros(3, dtype=torch.float64))


def test_group_sums_skip_missing_groups_and_masked_samples() -> None:
    risk = torch.tensor([1.0, 2.0, 3.0, 4.0])
    group = torch.tensor([0, 1, -1, 1])
    stats = group_sums(risk, group, 2, mask=torch.tensor([True, True, True, False]))
    assert stats.sums.tolist() == [1.0, 2.0]
    assert stats.counts.tolist() == [1.0, 1.0]


def _federated_gradient(model, sites, risk_fn, mask_fn, num_groups, weighting="uniform"):
    """Σ_s (n_s/N) ∇(site s's surrogate penalty), from global sums/counts only."""
    stats = GroupStatistics.zeros(num_groups)
    with torch.no_grad():
        for batch in sites:
            stats = stats + group_sums(risk_fn(model(batch["image"]), batch), batch["group"],
                                       num_groups, mask_fn(batch))
    total = float(sum(len(b["group"]) for b in sites))
    coef = sample_coefficients(stats, total, weighting)
    grads = [torch.zeros_like(p) for p in model.parameters()]
    for batch in sites:
        model.zero_grad()
        out = model(batch["image"])
        surrogate_penalty(risk_fn(out, batch), batch["group"], coef, mask_fn(batch)).backward()
        share = len(batch["group"]) / total
        for g, p in zip(grads, model.parameters()):
            g += share * p.grad
    return grads


def _pooled_gradient(model, sites, risk_fn, mask_fn, num_groups, weighting="uniform"):
    model.zero_grad()
    risks = torch.cat([risk_fn(model(b["image"]), b) for b in sites])
    groups = torch.cat([b["group"] for b in sites])
    masks = torch.cat([mask_fn(b) for b in sites])
    pooled_penalty(risks, groups, num_groups, masks, weighting).backward()
    return [p.grad.clone() for p in model.parameters()]


def _site_batches(federation, attribute):
    vocabulary = federation.group_vocabulary(attribute)
    batches = []
    for site in federation.sites:
        ds = GroupedDataset(site.train, attribute, vocabulary)
        batch = next(iter(make_loader(ds, len(ds), shuffle=False, seed=0)))
        batch["image"] = batch["image"].double()  # float64: agreement is then limited by maths, not rounding
        batches.append(batch)
    return batches, len(vocabulary)


@pytest.mark.parametrize("weighting", ["uniform", "proportional"])
def test_federated_penalty_gradient_equals_pooled_gradient_equal_accuracy(weighting: str) -> None:
    task = SyntheticSegmentation()
    sites, k = _site_batches(synthetic_segmentation(seed=3, scale=0.25), "site")
    torch.manual_seed(0)
    model = build_network("unet", in_channels=1, out_channels=1, channels=(4, 8), norm="instance").double()
    obj = task.objective(Criterion("ea"))
    fed = _federated_gradient(model, sites, obj.sample_risk, obj.risk_mask, k, weighting)
    pooled = _pooled_gradient(model, sites, obj.sample_risk, obj.risk_mask, k, weighting)
    scale = max(p.abs().max().item() for p in pooled)
    assert scale > 1e-4  # a real, non-zero gradient
    for f, p in zip(fed, pooled):
        assert torch.allclose(f, p, atol=1e-9 * scale, rtol=1e-7)


@pytest.mark.parametrize("criterion", ["dp", "eo"])
def test_federated_penalty_gradient_equals_pooled_gradient_parity(criterion: str) -> None:
    task = SyntheticClassification()
    sites, k = _site_batches(synthetic_classification(seed=1, scale=0.25), "age_band")
    torch.manual_seed(0)
    model = _NoNormClassifier().double()
    obj = task.objective(Criterion(criterion, "age_band"))
    fed = _federated_gradient(model, sites, obj.sample_risk, obj.risk_mask, k)
    pooled = _pooled_gradient(model, sites, obj.sample_risk, obj.risk_mask, k)
    scale = max(p.abs().max().item() for p in pooled)
    assert scale > 1e-4
    for f, p in zip(fed, pooled):
        assert torch.allclose(f, p, atol=1e-9 * scale, rtol=1e-7)


class _NoNormClassifier(nn.Module):
    """Batch-statistics-free classifier whose outputs differ visibly between inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool2d(4),
                                  nn.Flatten(), nn.Linear(64, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 5.0 * self.body(x)


class _NoNormNet(nn.Module):
    """A small conv net without batch statistics, so one full-batch step is exactly comparable."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 1, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@pytest.mark.parametrize("mode", ["live", "linear"])
def test_one_fresh_round_of_flexfair_equals_one_centralised_step(mode: str) -> None:
    """Fresh statistics + one full-batch SGD step per site + FedAvg = one pooled step of task + λP."""
    task = SyntheticSegmentation()
    federation = synthetic_segmentation(seed=5, scale=0.25)
    vocabulary = federation.group_vocabulary("site")
    obj = task.objective(Criterion("ea"))
    lam, lr = 2.0, 0.5
    algorithm = build_algorithm("flexfair", lam=lam, statistics="fresh", penalty=mode)
    torch.manual_seed(0)
    model = _NoNormNet()
    start = float_state(model)
    settings = LocalSettings(epochs=1, lr=lr, optimizer="sgd", max_steps=1)
    contexts = []
    for k, site in enumerate(federation.sites):
        ds = GroupedDataset(site.train, "site", vocabulary)
        contexts.append(SiteContext(site.name, k, make_loader(ds, len(ds), shuffle=False, seed=0),
                                    obj, settings, round=1, num_groups=len(vocabulary)))
    server = algorithm.init_server_state(start, [c.site for c in contexts])
    assert algorithm.wants_statistics(1, server)
    stats = {}
    for ctx in contexts:
        model.load_state_dict(start)
        with torch.no_grad():
            stats[ctx.site] = algorithm.client_statistics(ctx, model)
    server = algorithm.absorb_statistics(server, stats)
    updates = {ctx.site: algorithm.client_update(ctx, model, start, algorithm.broadcast(server, ctx.site), {})
               for ctx in contexts}
    for u in updates.values():  # only fixed-size extras travel
        assert all(v.numel() <= len(vocabulary) for v in u.extras.values())
    federated, _ = aggregate_round(algorithm, start, updates, server)

    model.load_state_dict(start)
    batches = [next(iter(c.loader)) for c in contexts]
    images = torch.cat([b["image"] for b in batches])
    pooled = {"image": images, "label": torch.cat([b["label"] for b in batches]),
              "group": torch.cat([b["group"] for b in batches])}
    logits = model(pooled["image"])
    loss = obj.task_loss(logits, pooled) + lam * pooled_penalty(
        obj.sample_risk(logits, pooled), pooled["group"], len(vocabulary),
        weighting=algorithm.params["weighting"])
    model.zero_grad()
    loss.backward()
    with torch.no_grad():
        central = {n: p - lr * p.grad for n, p in model.named_parameters()}
    for name, value in central.items():
        assert torch.allclose(federated[name], value, atol=1e-5), name
    assert any(not torch.allclose(federated[n], start[n]) for n in central)


def test_lambda_zero_is_fedavg_exactly(tmp_path) -> None:
    from fedfair_med.runtime.local import run_simulation

    common = dict(task="synthetic-seg", rounds=2, max_steps=2, data={"scale": 0.25})
    a = run_simulation(RunConfig(method="fedavg", **common), tmp_path / "a")
    b = run_simulation(RunConfig(method="flexfair", method_params={"lam": 0.0}, **common), tmp_path / "b")
    for name in a.state:
        assert torch.equal(a.state[name], b.state[name]), name


def test_carried_statistics_broadcast_one_coefficient_per_group(tmp_path) -> None:
    from fedfair_med.runtime.local import run_simulation

    cfg = RunConfig(task="synthetic-cls", method="flexfair", criterion="dp", attribute="age_band",
                    method_params={"lam": 1.0}, rounds=2, max_steps=2, data={"scale": 0.25})
    algorithm = build_algorithm("flexfair", lam=1.0)
    assert not algorithm.wants_statistics(1, {})
    result = run_simulation(cfg, tmp_path / "run")
    assert result.final["gaps"]["dp:age_band"] >= 0.0
    server_keys = {SUMS, COUNTS, COEF}
    assert server_keys.isdisjoint(result.state)  # server statistics never enter the model
