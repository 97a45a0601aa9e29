"""FairFed, FairMixup and DynamicFL: the properties each method promises, on tiny real models."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

from fedfair_med.algorithms import build_algorithm
from fedfair_med.algorithms.averaging import weighted_average
from fedfair_med.algorithms.base import aggregate_round, float_state
from fedfair_med.algorithms.dynamicfl import DynamicFL
from fedfair_med.algorithms.fairfed import WEIGHT_KEY, FairFed
from fedfair_med.algorithms.fairmixup import FairMixup, mixing_generator
from fedfair_med.algorithms.fedavg import FedAvg
from fedfair_med.contracts import ClientUpdate, LocalSettings, Objective, SiteContext
from fedfair_med.data.federation import GroupedDataset, make_loader
from fedfair_med.fairness.criteria import Criterion
from fedfair_med.models import build_network
from fedfair_med.models.reparam import ConvBranch, RepConv, expand_convolutions, merge_convolutions
from fedfair_med.tasks.synthetic import SyntheticClassification, SyntheticSegmentation

torch.set_num_threads(1)


# ---- helpers ------------------------------------------------------------------------------------
def site_contexts(task, criterion: Criterion, *, batch_size=8, max_steps=2, lr=1e-2, round_index=0):
    """One SiteContext per synthetic site (scale 0.25), unshuffled so reruns see the same batches."""
    fed = task.load_federation(seed=0, scale=0.25)
    vocab = fed.group_vocabulary(criterion.attribute)
    contexts = []
    for index, site in enumerate(fed.sites):
        dataset = GroupedDataset(site.train, criterion.attribute, vocab)
        contexts.append(SiteContext(
            site=site.name, site_index=index,
            loader=make_loader(dataset, batch_size, shuffle=False, seed=0),
            objective=task.objective(criterion),
            settings=LocalSettings(lr=lr, max_steps=max_steps), round=round_index,
            num_groups=len(vocab),
        ))
    return contexts


def small_cnn(seed=0, in_channels=3):
    torch.manual_seed(seed)
    return build_network("small_cnn", in_channels=in_channels, out_channels=2, width=4)


def tiny_unet(seed=0):
    torch.manual_seed(seed)
    return build_network("unet", in_channels=1, out_channels=1, channels=(4, 8))


def assert_states_equal(a, b, **tol):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], **tol, msg=key)


# ---- DynamicFL ----------------------------------------------------------------------------------
class CapturingDynamicFL(DynamicFL):
    """Keeps a copy of the trained, still-expanded model so the test can compare it with the merge."""

    def finish_model(self, model, ctx):
        self.expanded = copy.deepcopy(model)
        return super().finish_model(model, ctx)


class Tiny3d(nn.Module):
    """Conv3d stack covering a bias-free conv, stride, dilation and reflect padding."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv3d(1, 4, 3, padding=1, bias=False), nn.BatchNorm3d(4), nn.ReLU(),
            nn.Conv3d(4, 4, 3, stride=2, padding=2, dilation=2, padding_mode="reflect"), nn.ReLU(),
            nn.Conv3d(4, 1, 1),
        )

    def forward(self, x):
        return self.body(x)


def volume_context():
    generator = torch.Generator().manual_seed(3)
    batches = []
    for _ in range(3):
        image = torch.randn(4, 1, 8, 8, 8, generator=generator)
        batches.append({"image": image, "label": (image[:, :, ::2, ::2, ::2] > 0).float(),
                        "group": torch.zeros(4, dtype=torch.long)})
    objective = Objective(
        task_loss=lambda logits, b: nn.functional.binary_cross_entropy_with_logits(logits, b["label"]),
        sample_risk=lambda logits, b: torch.sigmoid(logits).flatten(1).mean(1),
    )
    return SiteContext(site="site-v", site_index=0, loader=batches, objective=objective,
                       settings=LocalSettings(lr=5e-2, max_steps=3), round=0, num_groups=1)


def dynamic_cases():
    seg = site_contexts(SyntheticSegmentation(), Criterion("ea", "site"), lr=5e-2, max_steps=3)[0]
    cls = site_contexts(SyntheticClassification(), Criterion("dp", "sex"), lr=0.2, max_steps=3)[0]
    return {
        "unet2d-same": (tiny_unet, seg, "same"),
        "unet2d-1x1": (tiny_unet, seg, "1x1"),
        "small_cnn-1x1": (small_cnn, cls, "1x1"),
        "conv3d-same": (lambda: (torch.manual_seed(0), Tiny3d())[1], volume_context(), "same"),
        "conv3d-1x1": (lambda: (torch.manual_seed(0), Tiny3d())[1], volume_context(), "1x1"),
    }


@pytest.mark.parametrize("case", ["unet2d-same", "unet2d-1x1", "small_cnn-1x1", "conv3d-same", "conv3d-1x1"])
def test_dynamicfl_merge_is_lossless_after_training(case):
    build, ctx, kernel = dynamic_cases()[case]
    base = build()
    global_state = float_state(base)
    algorithm = CapturingDynamicFL(capacity={ctx.site: 2}, kernel=kernel)
    update = algorithm.client_update(ctx, base, global_state, {}, {})

    # the branches really trained: their norms moved away from γ = 0 and from their initial stats
    branches = [m for m in algorithm.expanded.modules() if isinstance(m, ConvBranch)]
    assert branches
    assert all(b.norm.weight.abs().max() > 0 for b in branches)
    running = [getattr(b.norm, "running_var", getattr(b.norm, "running_sq", None)) for b in branches]
    assert all(not torch.allclose(r, torch.ones_like(r)) for r in running)

    # upload = base architecture: same keys, order and shapes
    assert list(update.state) == list(global_state)
    assert all(update.state[k].shape == global_state[k].shape for k in global_state)

    merged = build()
    merged.load_state_dict(update.state)
    assert type(merged) is type(base)
    batch = next(iter(ctx.loader))
    algorithm.expanded.eval()
    merged.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(batch["image"]), algorithm.expanded(batch["image"]),
                                   atol=1e-5, rtol=1e-5)
    # the trained branches matter: without them the expanded model's output moves by far more
    # than the tolerance, so the equality above is not base == base
    without = copy.deepcopy(algorithm.expanded)
    for module in without.modules():
        if isinstance(module, RepConv):
            module.branches = nn.ModuleList()
    with torch.no_grad():
        assert (without(batch["image"]) - merged(batch["image"])).abs().max() > 1e-2


@pytest.mark.parametrize("build, shape", [(tiny_unet, (2, 1, 16, 16)),
                                          (lambda: (torch.manual_seed(0), Tiny3d())[1], (2, 1, 8, 8, 8))])
@pytest.mark.parametrize("kernel", ["same", "1x1"])
def test_dynamicfl_merge_is_lossless_for_arbitrary_branch_norms(build, shape, kernel):
    """Random γ, β, running mean and small variances: every term of the fold, ε included, matters.

    Run in float64 so the check is about the algebra; float32 is covered by the training test.
    """
    generator = torch.Generator().manual_seed(7)
    expanded = expand_convolutions(build().double(), 2, kernel)

    def draw(shape, positive=False):
        if positive:
            return 0.01 * torch.rand(shape, generator=generator, dtype=torch.float64) + 1e-3
        return torch.randn(shape, generator=generator, dtype=torch.float64)

    with torch.no_grad():
        for module in expanded.modules():
            if isinstance(module, ConvBranch):
                for tensor in module.norm.parameters():
                    tensor.copy_(draw(tensor.shape))
                for name, tensor in module.norm.named_buffers():
                    if name == "running_mean":
                        tensor.copy_(draw(tensor.shape))
                    elif name in ("running_var", "running_sq"):
                        tensor.copy_(draw(tensor.shape, positive=True))
    expanded.eval()
    x = draw(shape)
    with torch.no_grad():
        expected = expanded(x)
        merged = merge_convolutions(copy.deepcopy(expanded)).eval()
        assert not any(isinstance(m, RepConv) for m in merged.modules())
        torch.testing.assert_close(merged(x), expected, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("kernel", ["same", "1x1"])
def test_dynamicfl_expanded_model_starts_as_the_base_model(kernel):
    base = tiny_unet()
    expanded = expand_convolutions(base, 3, kernel)
    assert sum(isinstance(m, RepConv) for m in expanded.modules()) == sum(
        isinstance(m, nn.Conv2d) for m in base.modules())
    x = torch.randn(2, 1, 16, 16)
    for mode in (True, False):
        base.train(mode)
        expanded.train(mode)
        with torch.no_grad():
            torch.testing.assert_close(expanded(x), base(x), atol=0.0, rtol=0.0)


def test_dynamicfl_merge_of_untrained_expansion_restores_base_state():
    base = small_cnn()
    merged = merge_convolutions(expand_convolutions(base, 2, "same"))
    assert_states_equal(float_state(merged), float_state(base), atol=0.0, rtol=0.0)


def test_dynamicfl_site_without_capacity_sends_fedavg_update():
    contexts = site_contexts(SyntheticClassification(), Criterion("dp", "sex"), max_steps=2)
    global_state = float_state(small_cnn())
    dynamic = DynamicFL(capacity={contexts[1].site: 2})

    plain = dynamic.client_update(contexts[0], small_cnn(1), global_state, {}, {})
    fedavg = FedAvg().client_update(contexts[0], small_cnn(1), global_state, {}, {})
    assert_states_equal(plain.state, fedavg.state, atol=0.0, rtol=0.0)
    assert plain.num_samples == fedavg.num_samples

    rich = dynamic.client_update(contexts[1], small_cnn(1), global_state, {}, {})
    rich_fedavg = FedAvg().client_update(contexts[1], small_cnn(1), global_state, {}, {})
    assert rich.state.keys() == rich_fedavg.state.keys()
    assert any(not torch.allclose(rich.state[k], rich_fedavg.state[k]) for k in rich.state
               if torch.is_floating_point(rich.state[k]))


# ---- FairFed ------------------------------------------------------------------------------------
def test_fairfed_statistics_are_fixed_size_and_match_pooled_sums():
    task = SyntheticClassification()
    ctx = site_contexts(task, Criterion("dp", "sex"))[0]
    model = small_cnn()
    algorithm = FairFed(beta=1.0, criterion="dp")
    full = algorithm.client_statistics(ctx, model)

    dataset = ctx.loader.dataset
    small_ctx = copy.copy(ctx)
    small_ctx.loader = make_loader(torch.utils.data.Subset(dataset, range(5)), 4, shuffle=False, seed=0)
    small = algorithm.client_statistics(small_ctx, model)
    assert full.keys() == small.keys()
    assert all(full[k].shape == small[k].shape for k in full)
    assert full["group_sums"].shape == (ctx.num_groups,)
    assert model.training  # the pass restores the model's mode

    # the sums are the per-group sums of P(y=1|x) of the global model in eval mode
    model.eval()
    items = [dataset[i] for i in range(len(dataset))]
    with torch.no_grad():
        prob = torch.softmax(model(torch.stack([it["image"] for it in items])), 1)[:, 1].double()
    group = torch.tensor([it["group"] for it in items])
    for g in range(ctx.num_groups):
        torch.testing.assert_close(full["group_sums"][g], prob[group == g].sum())
        assert float(full["group_counts"][g]) == float((group == g).sum())
    assert float(full["num_samples"]) == len(dataset) == float(small["num_samples"]) + len(dataset) - 5


def hand_statistics(sums, counts, loss=1.0):
    n = float(sum(counts))
    return {"group_sums": torch.tensor(sums, dtype=torch.float64),
            "group_counts": torch.tensor(counts, dtype=torch.float64),
            "loss_sum": torch.tensor(loss * n, dtype=torch.float64),
            "num_samples": torch.tensor(n, dtype=torch.float64)}


def test_fairfed_server_step_penalises_sites_far_from_global_fairness():
    # group risks: a (0.2, 0.3), b (0.1, 0.6), c (0.3, 0.3); pooled (0.2, 0.4) → F = 0.2
    # F_k = 0.1, 0.5, 0.0 → Δ = 0.1, 0.3, 0.2, mean 0.2; ω = 1/3 − β(Δ − 0.2)
    statistics = {"a": hand_statistics([2, 3], [10, 10]),
                  "b": hand_statistics([1, 6], [10, 10]),
                  "c": hand_statistics([3, 3], [10, 10])}
    algorithm = FairFed(beta=0.5, criterion="dp")
    state = algorithm.absorb_statistics({}, statistics)
    weights = algorithm.aggregation_weights(
        {s: ClientUpdate({}, 20) for s in statistics}, state)
    assert weights["b"] < weights["c"] < weights["a"]
    expected = {"a": 1 / 3 + 0.05, "b": 1 / 3 - 0.05, "c": 1 / 3}
    for s in statistics:
        assert weights[s] == pytest.approx(expected[s], abs=1e-12)


def test_fairfed_equal_accuracy_uses_site_risk_and_clips_weights():
    # groups = sites: local mean risks 0.4, 0.2, 0.6; global 0.4 → Δ = 0, 0.2, 0.2
    statistics = {"a": hand_statistics([4, 0, 0], [10, 0, 0]),
                  "b": hand_statistics([0, 2, 0], [0, 10, 0]),
                  "c": hand_statistics([0, 0, 6], [0, 0, 10])}
    state = FairFed(beta=10.0, criterion="ea").absorb_statistics({}, statistics)
    assert float(state[WEIGHT_KEY + "a"]) == pytest.approx(1.0)
    assert float(state[WEIGHT_KEY + "b"]) == 0.0 and float(state[WEIGHT_KEY + "c"]) == 0.0


def test_fairfed_site_missing_a_group_falls_back_to_accuracy():
    # site c has no group-1 samples: its Δ is |its mean loss − pooled mean loss|, not a gap
    statistics = {"a": hand_statistics([2, 4], [10, 10], loss=0.5),
                  "b": hand_statistics([2, 4], [10, 10], loss=0.5),
                  "c": hand_statistics([3, 0], [20, 0], loss=2.0)}
    algorithm = FairFed(beta=0.1, criterion="dp")
    deltas, _ = algorithm.fairness_deltas(statistics)
    pooled_loss = (0.5 * 20 + 0.5 * 20 + 2.0 * 20) / 60
    assert float(deltas[2]) == pytest.approx(abs(2.0 - pooled_loss))


def random_updates(sizes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    template = float_state(small_cnn())
    return {s: ClientUpdate({k: (torch.randn(v.shape, generator=generator) if torch.is_floating_point(v)
                                 else v.clone()) for k, v in template.items()}, n)
            for s, n in sizes.items()}


def test_fairfed_with_zero_beta_is_fedavg():
    statistics = {"a": hand_statistics([2, 3], [10, 10]),
                  "b": hand_statistics([1, 6], [5, 5]),
                  "c": hand_statistics([3, 3], [20, 10])}
    state = {}
    algorithm = FairFed(beta=0.0, criterion="dp")
    for _round in range(3):
        state = algorithm.absorb_statistics(state, statistics)
    for s, n in (("a", 20), ("b", 10), ("c", 30)):
        assert float(state[WEIGHT_KEY + s]) == pytest.approx(n / 60, abs=1e-12)
    updates = random_updates({"a": 20, "b": 10, "c": 30})
    ours, _ = aggregate_round(algorithm, {}, updates, state)
    fedavg, _ = aggregate_round(FedAvg(), {}, updates, {})
    assert_states_equal(ours, fedavg)


def test_fairfed_one_real_round_reweights_by_fairness():
    task = SyntheticClassification()
    contexts = site_contexts(task, Criterion("dp", "sex"), max_steps=2)
    algorithm = build_algorithm("fairfed", beta=1.0, criterion="dp")
    model = small_cnn()
    global_state = float_state(model)
    server_state = algorithm.init_server_state(global_state, [c.site for c in contexts])
    assert not algorithm.wants_statistics(1, server_state)  # statistics ride with the update
    updates = {ctx.site: algorithm.client_update(ctx, small_cnn(), global_state, {}, {})
               for ctx in contexts}
    for ctx in contexts:  # the extras are the global model's statistics, fixed-size
        model.load_state_dict(global_state)
        expected = algorithm.client_statistics(ctx, model)
        sent = {k.split(".")[-1]: v for k, v in updates[ctx.site].extras.items() if k.startswith("fairfed.stats.")}
        assert set(sent) == set(expected)
        assert all(torch.allclose(sent[k], expected[k]) for k in expected)
    new_state, server_state = aggregate_round(algorithm, global_state, updates, server_state)

    sizes = {s: u.num_samples for s, u in updates.items()}
    total = sum(sizes.values())
    weights = {s: float(server_state[WEIGHT_KEY + s]) for s in updates}
    deltas = {s: float(server_state["fairfed/delta/" + s]) for s in updates}
    assert sum(weights.values()) == pytest.approx(1.0)
    farthest = max(deltas, key=deltas.get)
    closest = min(deltas, key=deltas.get)
    assert weights[farthest] < sizes[farthest] / total
    assert weights[closest] > sizes[closest] / total
    assert_states_equal(new_state, weighted_average({s: u.state for s, u in updates.items()}, weights))
    fedavg, _ = aggregate_round(FedAvg(), global_state, updates, {})
    assert any(not torch.allclose(new_state[k], fedavg[k]) for k in new_state
               if torch.is_floating_point(new_state[k]))


# ---- FairMixup ----------------------------------------------------------------------------------
def attribute_batch(sexes, seed=0, dtype=torch.float32, site="site-a", labels=None):
    """3-channel images whose brightness depends on sex (an attribute-correlated input)."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.rand(len(sexes), 3, 16, 16, generator=generator, dtype=dtype)
    image = image + torch.tensor([1.0 if s == "male" else 0.0 for s in sexes], dtype=dtype).view(-1, 1, 1, 1)
    labels = labels if labels is not None else [i % 2 for i in range(len(sexes))]
    return {"image": image, "label": torch.tensor(labels), "sex": list(sexes),
            "site": [site] * len(sexes), "group": torch.zeros(len(sexes), dtype=torch.long)}


def mixup_context(criterion=Criterion("dp", "sex"), site="site-a"):
    return SiteContext(site=site, site_index=1, loader=[], objective=SyntheticClassification().objective(criterion),
                       settings=LocalSettings(), round=4, num_groups=2)


def test_fairmixup_penalty_is_zero_with_one_group():
    batch = attribute_batch(["female"] * 6)
    model = small_cnn()
    penalty = FairMixup(weight=1.0).extra_loss(model, batch, model(batch["image"]), mixup_context())
    assert float(penalty) == 0.0


def test_fairmixup_equal_opportunity_pairs_only_positive_samples():
    # every male sample is negative, so among y = 1 samples only one group is present
    batch = attribute_batch(["female", "male"] * 4, labels=[1, 0] * 4)
    model = small_cnn()
    ctx = mixup_context(Criterion("eo", "sex"))
    assert float(FairMixup(weight=1.0).extra_loss(model, batch, model(batch["image"]), ctx)) == 0.0


def test_fairmixup_penalty_is_the_path_slope_and_trains_the_model():
    batch = attribute_batch(["female", "male", "male", "female", "male", "female", "female"],
                            dtype=torch.float64)
    model = small_cnn().double()
    ctx = mixup_context()
    algorithm = FairMixup(weight=0.7)
    penalty = algorithm.extra_loss(model, batch, model(batch["image"]), ctx)
    assert penalty.requires_grad and float(penalty.detach()) > 0
    penalty.backward()
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in model.parameters())

    # finite difference of M(t) = mean P(y=1 | x_t) over the same pairs at the same t
    x_t, t, idx_a, idx_b = algorithm.mix(batch, ctx, step=0)
    assert len(idx_a) == 3  # the smaller group (male) is fully used, the other truncated
    t0, h = float(t.detach()), 1e-5

    def path(s):
        with torch.no_grad():
            mixed = s * batch["image"][idx_a] + (1 - s) * batch["image"][idx_b]
            return torch.softmax(model(mixed), 1)[:, 1].mean()

    slope = (path(t0 + h) - path(t0 - h)) / (2 * h)
    assert float(penalty.detach()) == pytest.approx(0.7 * abs(float(slope)), rel=1e-4)
    # reproducible: the same (round, site, step) draws the same t, another step another one
    t_again = torch.rand((), generator=mixing_generator(ctx.round, ctx.site_index, 0))
    t_next = torch.rand((), generator=mixing_generator(ctx.round, ctx.site_index, 1))
    assert float(t_again) == pytest.approx(t0) and float(t_next) != pytest.approx(t0)


class Recorder(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.inputs = inner, []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return self.inner(x)


def test_fairmixup_mixes_only_the_batch_own_images_across_groups():
    sexes = ["female", "male", "male", "female", "male", "female"]
    batch = attribute_batch(sexes, seed=5)
    model = Recorder(small_cnn())
    FairMixup(weight=1.0).extra_loss(model, batch, model(batch["image"]), mixup_context())
    (mixed,) = model.inputs[1:]
    images = batch["image"].flatten(1).double()
    ts = []
    for row in mixed.flatten(1).double():
        found = None
        for i, j in itertools.permutations(range(len(sexes)), 2):
            diff = images[i] - images[j]
            t = float((row - images[j]) @ diff / (diff @ diff))
            if 0 <= t <= 1 and torch.allclose(row, t * images[i] + (1 - t) * images[j], atol=1e-5):
                found = (i, j, t)
                break
        assert found is not None, "a mixed input is not a convex combination of two batch images"
        i, j, t = found
        assert sexes[i] != sexes[j]
        ts.append(t if sexes[i] == "female" else 1 - t)  # orient every pair female → male
    assert max(ts) - min(ts) < 1e-5  # one t per batch, the same direction for every pair

    with pytest.raises(ValueError, match="another site"):
        foreign = dict(batch, site=["site-a"] * 5 + ["site-b"])
        FairMixup(weight=1.0).extra_loss(model, foreign, model(batch["image"]), mixup_context())


def test_fairmixup_in_local_training():
    contexts = site_contexts(SyntheticClassification(), Criterion("dp", "sex"), max_steps=2)
    global_state = float_state(small_cnn())
    fedavg = FedAvg().client_update(contexts[0], small_cnn(1), global_state, {}, {})
    off = FairMixup(weight=0.0).client_update(contexts[0], small_cnn(1), global_state, {}, {})
    on = FairMixup(weight=1.0).client_update(contexts[0], small_cnn(1), global_state, {}, {})
    assert_states_equal(off.state, fedavg.state, atol=0.0, rtol=0.0)
    assert any(not torch.allclose(on.state[k], fedavg.state[k]) for k in on.state
               if torch.is_floating_point(on.state[k]))


# ---- parameters ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name, params, word", [
    ("fairfed", {"beta": -0.1}, "beta"),
    ("fairfed", {"criterion": "parity"}, "criterion"),
    ("fairmixup", {"weight": -1.0}, "weight"),
    ("fairmixup", {"attribute": "site"}, "attribute"),
    ("dynamicfl", {"capacity": {"site-a": -1}}, "capacity"),
    ("dynamicfl", {"capacity": {"site-a": 1.5}}, "capacity"),
    ("dynamicfl", {"kernel": "3x3"}, "kernel"),
])
def test_bad_parameters_raise_value_error_naming_the_parameter(name, params, word):
    with pytest.raises(ValueError, match=word):
        build_algorithm(name, **params)
