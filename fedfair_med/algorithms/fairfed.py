r"""FairFed — Ezzeldin et al., "FairFed: Enabling Group Fairness in Federated Learning",
AAAI 2023.

The server keeps aggregation weights ω_k (initially n_k / N) and, each round, moves weight away
from sites whose local fairness disagrees most with the global one:

.. math::

    \Delta_k = |F_k - F|, \qquad
    \omega_k \leftarrow \omega_k - \beta\Big(\Delta_k - \frac{1}{K}\sum_j \Delta_j\Big), \qquad
    \omega_k \leftarrow \frac{\max(\omega_k, 0)}{\sum_j \max(\omega_j, 0)}

and aggregates the local models with ω instead of n_k / N (β = 0 is FedAvg).

F and F_k come from a forward-only pass of the *global* model on each site's training data at
the start of its round (as in the paper, before local training); they travel with the update,
so FairFed needs no extra exchange and the server re-weights in the same round. A site reports
only fixed-size sums: per-group sums of the criterion's per-sample risk and
per-group counts (shape (G,)), the summed task loss and its sample count (scalars).

* ``dp`` / ``eo`` (groups = values of a sensitive attribute): with R_g the pooled group risks
  (P(y=1|x), over y = 1 samples for eo), let a = argmax_g R_g and b = argmin_g R_g; the global
  gap is F = R_a − R_b and the local one F_k = R_{k,a} − R_{k,b} with the same orientation (for
  two groups this is the paper's signed SPD / EOD). When site k lacks group a or b its local
  fairness is undefined and, as in the paper, it is compared on accuracy instead: F_k is its mean
  task loss, F the pooled mean task loss.
* ``ea`` (groups = sites, so one site has no local gap): F_k is the site's mean per-sample risk
  (Dice loss or cross-entropy) and F the pooled mean over all sites.

The server cannot see the criterion through the statistics, so it is a constructor parameter,
``criterion`` (default ``"ea"``): runtimes pass the run's criterion name when they build FairFed.

With ``statistics_privacy`` set (the run's ``privacy`` option), each sample's risk and task loss
are clipped to [0, C] and the group sums, group counts and loss sum get Gaussian noise in one
release before they leave the site (:func:`fedfair_med.privacy.privatize_group_statistics`, with
one extra whole-site sum); the server clamps noisy counts ≥ 1e-6 and sums to [0, C·count] before
dividing. ``num_samples`` (the site's size, also the FedAvg weight) is not noised.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import nn

from fedfair_med.algorithms.averaging import Aggregation, CollectingAggregation
from fedfair_med.algorithms.base import Algorithm, move_batch, num_examples
from fedfair_med.algorithms.params import check_choice, check_number
from fedfair_med.contracts import ClientUpdate, SiteContext, StateDict
from fedfair_med.fairness.criteria import CRITERIA
from fedfair_med.fairness.gap import group_deviations
from fedfair_med.fairness.penalty import GroupStatistics, group_sums
from fedfair_med.privacy.mechanism import clamp_noisy_statistics, clip_risk, privatize_group_statistics
from fedfair_med.privacy.settings import StatisticsPrivacy

WEIGHT_KEY = "fairfed/weight/"
DELTA_KEY = "fairfed/delta/"
GLOBAL_KEY = "fairfed/global_value"
STATS_KEY = "fairfed.stats."
#: ctx.state.round key: the global model's statistics, from the round's start to the update
STATISTICS = "fairfed.statistics"


class FairFed(Algorithm):
    """FedAvg with fairness-aware aggregation weights (see module docstring)."""

    name = "fairfed"
    #: Clip, σ and seed for DP statistics; None (default) shares exact statistics.
    statistics_privacy: StatisticsPrivacy | None = None

    @classmethod
    def param_defaults(cls) -> dict[str, Any]:
        return {"beta": 1.0, "criterion": "ea"}

    def validate_params(self) -> None:
        check_number(self.name, "beta", self.params["beta"], low=0.0)
        check_choice(self.name, "criterion", self.params["criterion"], CRITERIA)

    # ---- statistics of the global model, sent with the update ---------------------------------
    def on_round_start(self, ctx: SiteContext, model: nn.Module, broadcast: StateDict,
                       site_state: StateDict) -> None:
        ctx.state.round[STATISTICS] = self.client_statistics(ctx, model)

    def client_extras(self, ctx: SiteContext, start_state: StateDict, model: nn.Module,
                      steps: int, site_state: StateDict) -> StateDict:
        return {STATS_KEY + k: v for k, v in ctx.state.round.pop(STATISTICS).items()}

    def start_aggregation(self, global_state: StateDict, server_state: StateDict) -> Aggregation:
        """ω needs every site's statistics, so the round's updates are collected first
        (:class:`FairFedAggregation`) instead of folded in as they come."""
        return FairFedAggregation(self, global_state, server_state)

    @torch.no_grad()
    def client_statistics(self, ctx: SiteContext, model: nn.Module) -> StateDict:
        """Per-group risk sums and counts (G,), summed task loss and sample count of the global model."""
        privacy = self.statistics_privacy
        was_training = model.training
        model.eval()
        stats = GroupStatistics.zeros(ctx.num_groups)
        loss_sum = torch.zeros((), dtype=torch.float64)
        try:
            for batch in ctx.loader:
                batch = move_batch(batch, ctx.device)
                logits = model(batch["image"])
                risk = ctx.objective.sample_risk(logits, batch)
                mask = ctx.objective.risk_mask(batch)
                if privacy is not None:
                    risk = clip_risk(risk, privacy.clip)
                stats = stats + group_sums(risk.cpu(), batch["group"].cpu(), ctx.num_groups, mask.cpu())
                size = int(batch["image"].shape[0])
                if privacy is not None:  # per-sample losses, each clipped to [0, C]
                    loss_sum += float(sum(
                        min(max(float(ctx.objective.task_loss(logits[i:i + 1], _sample(batch, i))), 0.0),
                            privacy.clip)
                        for i in range(size)))
                    continue
                # task_loss is a batch mean over equally sized samples, so × size is the batch sum
                loss_sum += float(ctx.objective.task_loss(logits, batch)) * size
        finally:
            model.train(was_training)
        if privacy is not None:
            sums, counts, loss = privatize_group_statistics(
                stats.sums, stats.counts, clip=privacy.clip, sigma=privacy.sigma,
                generator=privacy.generator(ctx.round, ctx.site), extra_sums=loss_sum.reshape(1))
            stats, loss_sum = GroupStatistics(sums, counts), loss.reshape(())
        return {
            "group_sums": stats.sums,
            "group_counts": stats.counts,
            "loss_sum": loss_sum,
            "num_samples": torch.tensor(float(num_examples(ctx.loader)), dtype=torch.float64),
        }

    def _clamp_noisy(self, statistics: StateDict) -> StateDict:
        """Server post-processing of one site's noisy statistics: counts ≥ 1e-6, sums in range."""
        clip = self.statistics_privacy.clip  # type: ignore[union-attr]
        sums, counts = clamp_noisy_statistics(statistics["group_sums"], statistics["group_counts"], clip)
        n = statistics["num_samples"].to(torch.float64)
        loss = statistics["loss_sum"].to(torch.float64).clamp(min=0.0).minimum(clip * n)
        return {**statistics, "group_sums": sums, "group_counts": counts, "loss_sum": loss}

    def absorb_statistics(
        self, server_state: StateDict, statistics: Mapping[str, StateDict]
    ) -> StateDict:
        """Compute Δ_k from the sites' sums and take one FairFed step on the weights ω."""
        if not statistics:
            return server_state
        sites = sorted(statistics)
        deltas, global_value = self.fairness_deltas({s: statistics[s] for s in sites})
        sizes = torch.stack([statistics[s]["num_samples"].to(torch.float64) for s in sites])
        if all(WEIGHT_KEY + s in server_state for s in sites):
            weights = torch.stack([server_state[WEIGHT_KEY + s].to(torch.float64) for s in sites])
            weights = weights / weights.sum() if weights.sum() > 0 else sizes / sizes.sum()
        else:
            weights = sizes / sizes.sum()
        weights = (weights - float(self.params["beta"]) * (deltas - deltas.mean())).clamp_min(0.0)
        weights = weights / weights.sum() if weights.sum() > 0 else sizes / sizes.sum()
        state = dict(server_state)
        for s, w, d in zip(sites, weights, deltas):
            state[WEIGHT_KEY + s] = w.clone()
            state[DELTA_KEY + s] = d.clone()
        state[GLOBAL_KEY] = global_value
        return state

    def fairness_deltas(self, statistics: Mapping[str, StateDict]) -> tuple[torch.Tensor, torch.Tensor]:
        """Δ_k = |F_k − F| for each site (in the mapping's order) and the global value F."""
        sites = list(statistics)
        local = {
            s: GroupStatistics(statistics[s]["group_sums"].to(torch.float64),
                               statistics[s]["group_counts"].to(torch.float64))
            for s in sites
        }
        pooled = local[sites[0]]
        for s in sites[1:]:
            pooled = pooled + local[s]
        loss = {s: statistics[s]["loss_sum"].to(torch.float64) for s in sites}
        n = {s: statistics[s]["num_samples"].to(torch.float64) for s in sites}
        global_loss = sum(loss.values()) / sum(n.values()).clamp_min(1)

        def mean_loss(s: str) -> torch.Tensor:
            return loss[s] / n[s].clamp_min(1)

        deltas = []
        if self.params["criterion"] == "ea":  # groups are sites: each site's distance from the pool
            global_value = pooled.sums.sum() / pooled.counts.sum().clamp_min(1)
            distances, _ = group_deviations([float(local[s].sums.sum()) for s in sites],
                                            [float(local[s].counts.sum()) for s in sites],
                                            pooled=float(global_value))
            for s, distance in zip(sites, distances):
                if math.isnan(distance):  # no risk sample at this site: accuracy instead
                    deltas.append((mean_loss(s) - global_loss).abs())
                else:
                    deltas.append(torch.tensor(distance, dtype=torch.float64))
            return torch.stack(deltas), global_value

        risks = pooled.risks
        present = torch.isfinite(risks)
        if int(present.sum()) < 2:  # no global gap to compare with: accuracy for everyone
            return torch.stack([(mean_loss(s) - global_loss).abs() for s in sites]), global_loss
        masked = torch.where(present, risks, torch.nan)
        high = int(torch.argmax(torch.nan_to_num(masked, nan=-torch.inf)))
        low = int(torch.argmin(torch.nan_to_num(masked, nan=torch.inf)))
        global_value = risks[high] - risks[low]
        for s in sites:
            counts = local[s].counts
            if counts[high] > 0 and counts[low] > 0:
                local_risks = local[s].risks
                deltas.append((local_risks[high] - local_risks[low] - global_value).abs())
            else:  # local fairness undefined at this site (FairFed's accuracy fallback)
                deltas.append((mean_loss(s) - global_loss).abs())
        return torch.stack(deltas), global_value

    # ---- aggregation -------------------------------------------------------------------------
    def aggregation_weights(
        self, updates: Mapping[str, ClientUpdate], server_state: StateDict
    ) -> dict[str, float]:
        """ω_k for each site; FedAvg's n_k when a site has no weight yet (no statistics pass)."""
        if all(WEIGHT_KEY + s in server_state for s in updates):
            weights = {s: float(server_state[WEIGHT_KEY + s]) for s in updates}
            if sum(weights.values()) > 0:
                return weights
        return {s: self.site_weight(s, u, server_state) for s, u in updates.items()}


class FairFedAggregation(CollectingAggregation):
    """Once the round is in: this round's FairFed step on ω from the updates' statistics, then
    the weighted average with ω."""

    algorithm: FairFed

    def settle(self, updates: Mapping[str, ClientUpdate]) -> None:
        fairfed = self.algorithm
        statistics = {
            s: {k[len(STATS_KEY):]: v for k, v in u.extras.items() if k.startswith(STATS_KEY)}
            for s, u in updates.items()
        }
        if all(statistics.values()):
            if fairfed.statistics_privacy is not None:
                statistics = {s: fairfed._clamp_noisy(v) for s, v in statistics.items()}
            self.server_state = fairfed.absorb_statistics(self.server_state, statistics)
        self.fixed_weights = fairfed.aggregation_weights(updates, self.server_state)


def _sample(batch: Mapping[str, Any], i: int) -> dict[str, Any]:
    """The i-th sample of a collated batch, still batched (size 1)."""
    return {k: (v[i:i + 1] if isinstance(v, (torch.Tensor, list, tuple)) else v) for k, v in batch.items()}
