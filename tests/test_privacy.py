"""Differential privacy: the Gaussian mechanism, its accountant, DP statistics in runs, DP-SGD."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar
from scipy.stats import chi2
from torch import nn

from fedfair_med.algorithms.fairfed import FairFed
from fedfair_med.algorithms.flexfair import COUNTS, SUMS, FlexFair
from fedfair_med.config import ConfigError, RunConfig, load_config
from fedfair_med.contracts import LocalSettings, Objective, SiteContext
from fedfair_med.privacy import (
    calibrate_sigma, clamp_noisy_statistics, clip_risk, gaussian_epsilon, privatize_group_statistics,
)
from fedfair_med.privacy.dpsgd import PoissonBatches, SiteDPSGD, make_dp_compatible
from fedfair_med.privacy.settings import DPSGDSettings, StatisticsPrivacy
from fedfair_med.runtime.local import run_simulation
from fedfair_med.runtime.rundir import read_metrics
from fedfair_med.runtime.setup import RunSetup, build_global_model
from fedfair_med.tasks import build_task

FAST = dict(rounds=2, max_steps=2, data={"scale": 0.25})
STATS_PRIVACY = {"statistics_epsilon": 8.0, "statistics_delta": 1e-5, "clip": 1.0}


# ---- the mechanism -----------------------------------------------------------------------------
@pytest.mark.parametrize("clip, passes, with_extra", [(1.0, 1, False), (2.5, 3, True)])
def test_noise_has_the_calibrated_scale_and_no_bias(clip, passes, with_extra) -> None:
    """20k noisy coordinates: std = σ·p·√((1+m)C² + 1) within a χ² interval, mean = true value."""
    sigma, k = 0.7, 10_000
    sums = torch.linspace(0.0, 50.0, k, dtype=torch.float64)
    counts = torch.arange(k, dtype=torch.float64) % 17
    extra = torch.tensor([4.0], dtype=torch.float64) if with_extra else None
    gen = torch.Generator().manual_seed(123)
    out = privatize_group_statistics(sums, counts, clip=clip, sigma=sigma, generator=gen,
                                     passes=passes, extra_sums=extra)
    noise = torch.cat([out[0] - sums, out[1] - counts]).numpy()
    expected_std = sigma * passes * math.sqrt((1 + (1 if with_extra else 0)) * clip**2 + 1)
    n = noise.size
    statistic = (n - 1) * noise.var(ddof=1) / expected_std**2
    assert chi2.ppf(1e-4, n - 1) < statistic < chi2.ppf(1 - 1e-4, n - 1)
    assert abs(noise.std(ddof=1) / expected_std - 1) < 0.03
    assert abs(noise.mean()) < 4 * expected_std / math.sqrt(n)
    assert out[0].shape == sums.shape and out[1].shape == counts.shape
    if with_extra:
        assert out[2].shape == extra.shape


def test_a_risk_above_the_clip_contributes_exactly_the_clip() -> None:
    assert clip_risk(torch.tensor([-0.5, 0.25, 1.0, 7.5]), 1.0).tolist() == [0.0, 0.25, 1.0, 1.0]

    class Echo(nn.Module):  # logits are the image itself, so sample_risk can read them back
        def forward(self, x):
            return x

    risks = torch.tensor([0.2, 3.0, 7.5, 0.4], dtype=torch.float64)
    batch = {"image": risks.clone(), "group": torch.tensor([0, 0, 1, 1]), "label": torch.zeros(4)}
    objective = Objective(task_loss=lambda logits, b: logits.mean(),
                          sample_risk=lambda logits, b: logits)
    ctx = SiteContext(site="site-a", site_index=0, loader=[batch], objective=objective,
                      settings=LocalSettings(), round=1, num_groups=2)
    algorithm = FlexFair(statistics="fresh")
    # σ so small that the noise is far below the rounding of the sums: only clipping shows
    algorithm.statistics_privacy = StatisticsPrivacy(clip=1.0, sigma=1e-12, run_seed=0)
    stats = algorithm.client_statistics(ctx, Echo())
    assert stats[SUMS].tolist() == pytest.approx([1.2, 1.4], abs=1e-9)
    assert stats[COUNTS].tolist() == pytest.approx([2.0, 2.0], abs=1e-9)

    fairfed = FairFed(criterion="ea")
    fairfed.statistics_privacy = StatisticsPrivacy(clip=1.0, sigma=1e-12, run_seed=0)
    fed = fairfed.client_statistics(ctx, Echo())  # task loss per sample = its risk, clipped too
    assert fed["group_sums"].tolist() == pytest.approx([1.2, 1.4], abs=1e-9)
    assert float(fed["loss_sum"]) == pytest.approx(0.2 + 1.0 + 1.0 + 0.4, abs=1e-9)


def test_server_clamps_noisy_counts_before_dividing() -> None:
    sums, counts = clamp_noisy_statistics(torch.tensor([-3.0, 9.0, 2.0]),
                                          torch.tensor([-1.0, 4.0, 5.0]), clip=1.0)
    assert counts.tolist() == [1e-6, 4.0, 5.0]
    assert sums.tolist() == [0.0, 4.0, 2.0]  # risks stay in [0, C]
    assert torch.isfinite(sums / counts).all()


# ---- the accountant -----------------------------------------------------------------------------
@pytest.mark.parametrize("sigma, releases, delta", [(0.8, 1, 1e-5), (3.0, 20, 1e-6), (12.0, 100, 1e-3)])
def test_classic_conversion_matches_closed_form_and_numerical_minimum(sigma, releases, delta) -> None:
    rho = releases / (2 * sigma**2)
    closed = rho + 2 * math.sqrt(rho * math.log(1 / delta))
    numeric = minimize_scalar(lambda a: rho * a + math.log(1 / delta) / (a - 1),
                              bounds=(1 + 1e-9, 1e8), method="bounded", options={"xatol": 1e-12}).fun
    ours = gaussian_epsilon(sigma, releases, delta, conversion="classic")
    assert ours == pytest.approx(closed, rel=1e-6)
    assert ours == pytest.approx(numeric, rel=1e-6)


@pytest.mark.parametrize("sigma, releases, delta", [(0.8, 1, 1e-5), (2.0, 5, 1e-5), (10.0, 50, 1e-6)])
def test_improved_conversion_matches_opacus_and_numerical_minimum(sigma, releases, delta) -> None:
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = compute_rdp(q=1.0, noise_multiplier=sigma, steps=releases, orders=orders)
    opacus_eps, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    assert gaussian_epsilon(sigma, releases, delta, conversion="improved", orders=orders) == \
        pytest.approx(float(opacus_eps), rel=1e-6)

    rho = releases / (2 * sigma**2)

    def improved(log_excess):
        a = 1 + math.exp(log_excess)
        return rho * a + math.log((a - 1) / a) - (math.log(delta) + math.log(a)) / (a - 1)

    grid = np.linspace(-12, 16, 3000)
    start = grid[int(np.argmin([improved(x) for x in grid]))]
    numeric = minimize_scalar(improved, bounds=(start - 0.02, start + 0.02), method="bounded",
                              options={"xatol": 1e-13}).fun
    continuous = gaussian_epsilon(sigma, releases, delta, conversion="improved")
    assert continuous == pytest.approx(numeric, rel=1e-6)
    assert continuous <= float(opacus_eps) + 1e-12  # real α can only do better than a grid
    assert continuous <= gaussian_epsilon(sigma, releases, delta, conversion="classic")


@pytest.mark.parametrize("conversion", ["improved", "classic"])
def test_calibrated_sigma_meets_the_budget_tightly_and_grows_with_rounds(conversion) -> None:
    target, delta = 2.0, 1e-5
    sigmas = []
    for rounds in (1, 10, 50):
        sigma = calibrate_sigma(target, delta, rounds, conversion)
        spent = gaussian_epsilon(sigma, rounds, delta, conversion)
        assert spent <= target and spent >= 0.99 * target
        assert gaussian_epsilon(sigma * 0.99, rounds, delta, conversion) > target  # not loose
        sigmas.append(sigma)
    assert sigmas[0] < sigmas[1] < sigmas[2]
    assert calibrate_sigma(1.0, delta, 10, conversion) > calibrate_sigma(4.0, delta, 10, conversion)


# ---- configuration --------------------------------------------------------------------------------
@pytest.mark.parametrize("privacy, message", [
    ({"statistics_epsilon": 0, "statistics_delta": 1e-5}, "statistics_epsilon"),
    ({"statistics_epsilon": 1.0, "statistics_delta": 1.0}, "statistics_delta"),
    ({"statistics_epsilon": 1.0, "statistics_delta": 1e-5, "clip": -1}, "clip"),
    ({"statistics_epsilon": 1.0}, "together"),
    ({"epsilon": 1.0}, "unknown key"),
    ({"dp_sgd": {"noise_multiplier": 1.0}}, "max_grad_norm"),
])
def test_bad_privacy_options_are_clear_config_errors(privacy, message) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config({"task": "synthetic-seg", "method": "flexfair", "privacy": privacy})


def test_privacy_refuses_settings_that_would_protect_nothing_or_break_the_proof() -> None:
    with pytest.raises(ConfigError, match="shares no group statistics"):
        load_config({"method": "fedavg", "privacy": STATS_PRIVACY})
    # the live penalty couples the samples of a batch: per-sample clipping would bound nothing
    with pytest.raises(ConfigError, match="penalty: linear"):
        load_config({"task": "synthetic-cls", "method": "flexfair", "criterion": "dp",
                     "attribute": "sex", "privacy": {"dp_sgd": DP_SGD}})
    load_config({"task": "synthetic-cls", "method": "flexfair", "criterion": "dp", "attribute": "sex",
                 "method_params": {"penalty": "linear"}, "privacy": {"dp_sgd": DP_SGD}})
    with pytest.raises(ConfigError, match="dp_sgd: not supported"):
        load_config({"method": "scaffold", "privacy": {"dp_sgd": {"noise_multiplier": 1.0,
                                                                  "max_grad_norm": 1.0}}})


# ---- end to end: DP statistics ------------------------------------------------------------------
def _numbers(path):
    return [{k: v for k, v in r.items() if k not in ("elapsed_s", "privacy")} for r in read_metrics(path)]


def test_flexfair_with_private_statistics_end_to_end(tmp_path) -> None:
    base = dict(task="synthetic-seg", method="flexfair", method_params={"lam": 1.0}, seed=3, **FAST)
    private = RunConfig(**base, privacy=STATS_PRIVACY)
    a = run_simulation(private, tmp_path / "a")
    b = run_simulation(private, tmp_path / "b")
    rows = read_metrics(a.path)
    assert rows == [{**r, "elapsed_s": x["elapsed_s"]} for r, x in zip(read_metrics(b.path), rows)]
    assert math.isfinite(rows[-1]["metric"])
    spent = [r["privacy"]["epsilon"] for r in rows]
    assert 0 < spent[0] < spent[1] <= STATS_PRIVACY["statistics_epsilon"]
    assert spent[1] == pytest.approx(STATS_PRIVACY["statistics_epsilon"], rel=0.01)
    sigma = rows[0]["privacy"]["sigma"]
    assert sigma == pytest.approx(calibrate_sigma(8.0, 1e-5, 2))
    assert all(r["privacy"]["delta"] == 1e-5 for r in rows)
    summary = json.loads((a.path / "privacy.json").read_text())
    assert summary["statistics"]["epsilon"] == pytest.approx(spent[-1])
    assert load_config(a.path / "run.yaml").privacy == STATS_PRIVACY  # reproducible

    plain = run_simulation(RunConfig(**base), tmp_path / "plain")
    assert _numbers(plain.path) != _numbers(a.path)  # the round-2 penalty used noisy statistics
    explicit_off = run_simulation(load_config({**base, "privacy": {}}), tmp_path / "off")
    assert _numbers(explicit_off.path) == _numbers(plain.path)
    assert all("privacy" not in r for r in read_metrics(plain.path))
    assert not (plain.path / "privacy.json").exists()


def test_fairfed_with_private_statistics_reweights_from_noisy_sums(tmp_path) -> None:
    base = dict(task="synthetic-cls", method="fairfed", criterion="dp", attribute="sex",
                method_params={"beta": 1.0}, rounds=1, max_steps=1, data={"scale": 0.25})
    private = run_simulation(RunConfig(**base, privacy={**STATS_PRIVACY, "clip": 3.0}), tmp_path / "p")
    plain = run_simulation(RunConfig(**base), tmp_path / "n")
    assert math.isfinite(private.final["metric"])
    assert private.final["privacy"]["epsilon"] == pytest.approx(8.0, rel=0.01)
    models = [torch.load(r.path / "model.pt") for r in (private, plain)]
    assert any(not torch.equal(models[0][k], models[1][k]) for k in models[0])  # other weights ω


# ---- DP-SGD -----------------------------------------------------------------------------------------
DP_SGD = {"noise_multiplier": 1.1, "max_grad_norm": 1.0, "delta": 1e-5}


def test_dp_sgd_converts_batchnorm_at_model_build_for_every_site() -> None:
    cfg = RunConfig(task="synthetic-cls", network="small_cnn", privacy={"dp_sgd": DP_SGD})
    task = build_task(cfg.task)
    plain = build_global_model(RunConfig(task="synthetic-cls", network="small_cnn"), task)
    assert any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in plain.modules())
    model = build_global_model(cfg, task)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in model.modules())
    again = build_global_model(cfg, task)  # every site builds the same architecture and weights
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())


def test_dp_sgd_refuses_a_network_it_cannot_fix() -> None:
    class RunningScale(nn.Module):  # a trainable layer that keeps a buffer: no per-sample grads
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(3))
            self.register_buffer("running", torch.zeros(3))

        def forward(self, x):
            return x * self.weight + self.running

    with pytest.raises(ValueError, match="DP-SGD: this network cannot be trained"):
        make_dp_compatible(nn.Sequential(nn.Linear(3, 3), RunningScale()))


def test_dp_sgd_one_round_records_epsilon_per_site(tmp_path) -> None:
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
    from opacus.accountants import RDPAccountant

    cfg = RunConfig(task="synthetic-cls", method="flexfair", criterion="dp", attribute="sex",
                    method_params={"lam": 1.0, "penalty": "linear"}, rounds=1, max_steps=3,
                    data={"scale": 0.25}, privacy={"dp_sgd": DP_SGD})
    result = run_simulation(cfg, tmp_path / "dp")
    record = read_metrics(result.path)[0]
    assert math.isfinite(record["metric"])
    per_site = record["privacy"]["dp_sgd"]["epsilon"]
    assert set(per_site) == {"site-a", "site-b", "site-c"}
    model = torch.load(result.path / "model.pt")
    assert not any("running_mean" in k for k in model)  # GroupNorm travelled, not BatchNorm
    from fedfair_med.runtime.local import build_sites

    for site in build_sites(RunSetup.create(cfg)):
        batches_per_epoch = -(-len(site.train_set) // site.resolved.batch_size)
        q, steps = 1.0 / batches_per_epoch, min(3, batches_per_epoch)  # Poisson rate, DP steps
        orders = RDPAccountant.DEFAULT_ALPHAS
        expected, _ = get_privacy_spent(
            orders=orders, rdp=compute_rdp(q=q, noise_multiplier=1.1, steps=steps, orders=orders),
            delta=1e-5)
        assert per_site[site.name] == pytest.approx(float(expected), rel=1e-9)
    assert json.loads((result.path / "privacy.json").read_text())["dp_sgd"]["epsilon"] == per_site


def test_dp_sgd_under_fedavgm_spends_fedavgs_budget_and_beta_zero_is_fedavg(tmp_path) -> None:
    """FedAvgM's sites train exactly as FedAvg's (same noise, same ε); the server momentum only
    post-processes the noisy average, and at β = 0 leaves it as FedAvg's, bit for bit."""
    base = dict(task="synthetic-cls", rounds=2, max_steps=3, data={"scale": 0.25},
                privacy={"dp_sgd": DP_SGD})
    fedavg = run_simulation(RunConfig(method="fedavg", **base), tmp_path / "fedavg")
    still = run_simulation(RunConfig(method="fedavgm", method_params={"beta": 0.0}, **base),
                           tmp_path / "beta0")
    moving = run_simulation(RunConfig(method="fedavgm", method_params={"beta": 0.9}, **base),
                            tmp_path / "beta09")
    for name, tensor in fedavg.state.items():
        assert torch.equal(tensor, still.state[name]), name
    assert any(not torch.equal(t, moving.state[k]) for k, t in fedavg.state.items())
    for result in (still, moving):
        for r in (0, 1):
            assert read_metrics(result.path)[r]["privacy"]["dp_sgd"]["epsilon"] == \
                read_metrics(fedavg.path)[r]["privacy"]["dp_sgd"]["epsilon"]


def test_an_empty_poisson_draw_still_takes_a_noisy_step() -> None:
    """Skipping empty batches would reveal that nobody was drawn; every draw is a noisy step."""
    torch.manual_seed(0)
    dataset = [{"image": torch.randn(4), "label": torch.tensor(1.0)} for _ in range(40)]
    loader = torch.utils.data.DataLoader(dataset, batch_size=1)
    model = nn.Linear(4, 1)
    site = SiteDPSGD(DPSGDSettings(noise_multiplier=1.0, max_grad_norm=1.0))
    session = site.session(noise_seed=1, sampling_seed=2)
    wrapped, optimizer, batches = session.attach(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                                 loader)
    assert isinstance(batches, PoissonBatches) and len(batches) == 40
    seen = 0
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        nn.functional.mse_loss(wrapped(batch["image"]).squeeze(1), batch["label"]).backward()
        optimizer.step()
        seen += 1
    assert 0 < seen < 40  # q = 1/40: some draws were empty
    assert site.steps == 40 and site.epsilon() > 0
    assert session.detach(wrapped) is model
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())
