r"""FlexFair — Xing et al., "Achieving flexible fairness metrics in federated medical imaging",
Nature Communications, 2025.

Penalty P = Σ_k (R_k − Σ_j w_j R_j)² on federation-wide per-group risks (the criterion picks
groups and risk: ``ea`` — sites and Dice loss / CE; ``dp`` — a sensitive attribute and P(y=1);
``eo`` — the same on y = 1). See :mod:`fedfair_med.fairness.penalty` for the maths.

Federated with O(K) numbers per round: sites send per-group risk sums and counts, the server adds
them up and broadcasts the global sums S_k, counts N_k and the sites' total sample count N.

``penalty: live`` (default). During local training site s keeps a *live* estimate of every
global risk,

    R_k^est(θ) = S_k / N_k + (a_k / f) · (m_k^s(θ) − S_k^{s,0} / N_k^s),
    a_k = (N / n_s) · (N_k^s / N_k),  f = max(1, max_k a_k),

where S_k^{s,0} is the site's own contribution to the broadcast sums (kept at the site, exact,
never re-sent) and m_k^s(θ) is the batch mean of group k's risk (with gradient; a detached
running value while the group is absent from the batch), and adds λ · f · P(R^est) to each
batch loss. P is re-evaluated at every step, so the penalty keeps its restoring force over many
local steps. a_k extrapolates the site's own change to the federation: FedAvg averages the
sites' steps with weights n_s / N, so (a) at the round's start point the averaged gradient is
exactly λ∇P, and (b) alike sites do not each close the whole gap and overshoot together. The
split between f and a_k / f keeps (a) while bounding the local curvature by a_k instead of a_k²
— with equal accuracy a site *is* its group (a_k = N / n_s) and the unsplit form diverges.

``penalty: linear`` is the earlier form, kept for comparison: a frozen coefficient per group
c_k = N g_k / N_k from the round's start and the loss λ · mean_i c_{k(i)} r_i — exact gradient at
the start point, no restoring force, so it overshoots or drifts over many local steps.

Statistics are either *fresh* (a forward-only pass of the global model before each round) or
*carried* (accumulated while training the previous round; round 1 trains on the task loss alone).

With ``statistics_privacy`` set (the run's ``privacy`` option), each sample's risk is clipped to
[0, C] and the 2K numbers get Gaussian noise before they leave the site
(:func:`fedfair_med.privacy.privatize_group_statistics`); the server clamps the pooled noisy
counts ≥ 1e-6 and sums to [0, C·count]. The live estimate uses only the site's own exact values
locally, so it adds no privacy cost.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from fedfair_med.algorithms.base import Algorithm, num_examples
from fedfair_med.algorithms.params import check_choice, check_number
from fedfair_med.contracts import ClientUpdate, SiteContext, StateDict
from fedfair_med.fairness.penalty import (
    WEIGHTINGS, GroupStatistics, group_sums, group_weights, penalty, sample_coefficients,
    surrogate_penalty,
)
from fedfair_med.privacy.mechanism import clamp_noisy_statistics, clip_risk, privatize_group_statistics
from fedfair_med.privacy.settings import StatisticsPrivacy

SUMS, COUNTS, COEF, TOTAL = "flexfair.sums", "flexfair.counts", "flexfair.coef", "flexfair.total"
#: Σ of the sites' FedAvg weights n_s (training-set sizes) behind the broadcast statistics
WEIGHT_TOTAL = "flexfair.weight_total"
#: site_state keys: the site's own exact contribution to the statistics it last sent
OWN_SUMS, OWN_COUNTS, OWN_ROUND = "own.sums", "own.counts", "own.round"
#: ctx.state.round keys, the round in progress at the site: the broadcast coefficients (linear),
#: the running group sums and sample count (carried), the live estimate's state, and (fresh)
#: (round, the site's exact statistics from the statistics pass)
ROUND_COEF, ROUND_SUMS, ROUND_SEEN = "flexfair.round.coef", "flexfair.round.sums", "flexfair.round.seen"
ROUND_LIVE, FRESH = "flexfair.round.live", "flexfair.round.fresh"
PENALTIES = ("live", "linear")
#: a group whose pooled (possibly noisy) count is below this is left out of the live penalty
MIN_GROUP_COUNT = 1.0


class FlexFair(Algorithm):
    name = "flexfair"
    #: Clip, σ and seed for DP group statistics; None (default) shares exact statistics.
    statistics_privacy: StatisticsPrivacy | None = None

    @classmethod
    def param_defaults(cls) -> dict[str, Any]:
        return {"lam": 1.0, "weighting": "proportional", "statistics": "carried", "penalty": "live"}

    def validate_params(self) -> None:
        check_number(self.name, "lam", self.params["lam"], low=0.0)
        check_choice(self.name, "weighting", self.params["weighting"], WEIGHTINGS)
        check_choice(self.name, "statistics", self.params["statistics"], ("fresh", "carried"))
        check_choice(self.name, "penalty", self.params["penalty"], PENALTIES)

    # ---- server ---------------------------------------------------------------------------
    def init_server_state(self, global_state: StateDict, sites: list[str]) -> StateDict:
        return {}

    def wants_statistics(self, round_index: int, server_state: StateDict) -> bool:
        return self.params["statistics"] == "fresh"

    def _with_statistics(self, server_state: StateDict, stats: GroupStatistics,
                         total: float, weight_total: float) -> StateDict:
        if self.statistics_privacy is not None:
            stats = GroupStatistics(*clamp_noisy_statistics(stats.sums, stats.counts,
                                                            self.statistics_privacy.clip))
        coef = sample_coefficients(stats, total, self.params["weighting"])
        return {**server_state, COEF: coef, SUMS: stats.sums, COUNTS: stats.counts,
                TOTAL: torch.tensor(total, dtype=torch.float64),
                WEIGHT_TOTAL: torch.tensor(weight_total, dtype=torch.float64)}

    def absorb_statistics(self, server_state: StateDict,
                          statistics: Mapping[str, StateDict]) -> StateDict:
        stats, total = _pool(statistics)
        return self._with_statistics(server_state, stats, total, total)  # a full pass: seen = n_s

    def broadcast(self, server_state: StateDict, site: str) -> StateDict:
        if COEF not in server_state:
            return {}
        if self.params["penalty"] == "linear":
            return {COEF: server_state[COEF]}
        return {k: server_state[k] for k in (SUMS, COUNTS, WEIGHT_TOTAL)}

    def update_server_state(self, server_state: StateDict, updates: Mapping[str, ClientUpdate],
                            weights: Mapping[str, float]) -> StateDict:
        if self.params["statistics"] != "carried":
            return server_state
        stats, total = _pool({s: u.extras for s, u in updates.items()})
        weight_total = float(sum(u.num_samples for u in updates.values()))
        return self._with_statistics(server_state, stats, total, weight_total)

    # ---- client ---------------------------------------------------------------------------
    def client_statistics(self, ctx: SiteContext, model: nn.Module) -> StateDict:
        acc = GroupStatistics.zeros(ctx.num_groups)
        n = 0
        for batch in ctx.loader:
            logits = model(batch["image"])
            acc = acc + self._batch_stats(batch, logits, ctx)
            n += len(batch["group"])
        ctx.state.round[FRESH] = (ctx.round, acc)  # exact, for this round's live estimate
        acc = self._privatize(acc, ctx, passes=1)
        return {SUMS: acc.sums, COUNTS: acc.counts, TOTAL: torch.tensor(float(n))}

    def _privatize(self, stats: GroupStatistics, ctx: SiteContext, passes: int) -> GroupStatistics:
        """The Gaussian mechanism on (sums, counts) when privacy is on; else unchanged."""
        privacy = self.statistics_privacy
        if privacy is None:
            return stats
        sums, counts = privatize_group_statistics(
            stats.sums, stats.counts, clip=privacy.clip, sigma=privacy.sigma,
            generator=privacy.generator(ctx.round, ctx.site), passes=passes)
        return GroupStatistics(sums, counts)

    def _risk(self, logits: torch.Tensor, batch: Mapping[str, Any], ctx: SiteContext) -> torch.Tensor:
        risk = ctx.objective.sample_risk(logits, batch)
        if self.statistics_privacy is not None:
            risk = clip_risk(risk, self.statistics_privacy.clip)
        return risk

    def _batch_stats(self, batch: Mapping[str, Any], logits: torch.Tensor,
                     ctx: SiteContext) -> GroupStatistics:
        risk = self._risk(logits.detach(), batch, ctx)
        return group_sums(risk.cpu(), batch["group"].cpu(), ctx.num_groups,  # K sums on the CPU
                          ctx.objective.risk_mask(batch).cpu())

    def on_round_start(self, ctx: SiteContext, model: nn.Module, broadcast: StateDict,
                       site_state: StateDict) -> None:
        held = ctx.state.round
        held[ROUND_COEF] = broadcast.get(COEF)
        held[ROUND_SUMS] = GroupStatistics.zeros(ctx.num_groups)
        held[ROUND_SEEN] = 0
        held[ROUND_LIVE] = None
        if self.params["penalty"] == "live" and SUMS in broadcast:
            held[ROUND_LIVE] = self._live_state(ctx, broadcast, site_state)

    def _live_state(self, ctx: SiteContext, broadcast: StateDict,
                    site_state: StateDict) -> dict[str, torch.Tensor] | None:
        """What the live estimate needs this round, or None when the site's own contribution to
        the broadcast statistics is unknown (it missed the round they come from)."""
        if self.params["statistics"] == "fresh":
            fresh = ctx.state.round.pop(FRESH, None)
            own = fresh[1] if fresh is not None and fresh[0] == ctx.round else None
        elif OWN_ROUND in site_state and int(site_state[OWN_ROUND]) == ctx.round - 1:
            own = GroupStatistics(site_state[OWN_SUMS], site_state[OWN_COUNTS])
        else:
            own = None
        if own is None:
            return None
        n_site = float(num_examples(ctx.loader))
        counts = broadcast[COUNTS].to(torch.float64)
        # a_k = N/n_s · N_k^s / N_k: how far the site's own change in group k's mean moves R_k
        # once extrapolated to the federation; split as factor · (a_k / factor), factor ≥ max a_k
        extrapolation = (float(broadcast[WEIGHT_TOTAL]) / max(n_site, 1.0)
                         * own.counts.to(torch.float64) / counts.clamp_min(1e-12))
        factor = float(extrapolation.max().clamp_min(1.0))
        return {
            "sums": broadcast[SUMS].to(torch.float64), "counts": counts,
            "weights": group_weights(torch.where(counts >= MIN_GROUP_COUNT, counts, 0.0),
                                     self.params["weighting"]),
            "extrapolation": extrapolation / factor, "factor": factor,
            "own_sums": own.sums, "own_counts": own.counts,
            # the group means last seen at this site; start from its own contribution
            "running": torch.where(own.counts > 0, own.sums / own.counts.clamp_min(1), 0.0),
        }

    @staticmethod
    def live_risks(live: dict[str, Any], risk: torch.Tensor, group: torch.Tensor,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
        """R_k^est for this batch (differentiable through the batch's risks) from the round's
        ``live`` state (:meth:`_live_state`); NaN for groups with no samples in the federation.
        Updates the running means of the groups present."""
        k = live["counts"].numel()
        group = group.reshape(-1).to(torch.long)
        keep = group >= 0
        if mask is not None:
            keep = keep & mask.reshape(-1).to(torch.bool)
        r = risk.reshape(-1)[keep].to(torch.float64)
        g = group[keep]
        n = torch.zeros(k, dtype=torch.float64).index_add_(0, g, torch.ones_like(r.detach()))
        total = torch.zeros(k, dtype=torch.float64).index_add(0, g, r)
        present = n > 0
        batch_mean = total / n.clamp_min(1)
        mean = torch.where(present, batch_mean, live["running"])
        live["running"] = mean.detach()
        counts = live["counts"].clamp_min(1e-12)
        held = live["own_counts"] > 0
        own_then = torch.where(held, live["own_sums"] / live["own_counts"].clamp_min(1), 0.0)
        # R_k^est = S_k / N_k + (a_k / factor) · (mean_k − mean_k at the statistics)
        est = live["sums"] / counts + live["extrapolation"] * (mean - own_then)
        return torch.where(live["counts"] >= MIN_GROUP_COUNT, est, torch.nan)

    def extra_loss(self, model: nn.Module, batch: Mapping[str, Any], logits: torch.Tensor,
                   ctx: SiteContext) -> torch.Tensor | None:
        lam = self.params["lam"]
        if lam == 0:
            return None
        mask = ctx.objective.risk_mask(batch)
        live, coef = ctx.state.round.get(ROUND_LIVE), ctx.state.round.get(ROUND_COEF)
        if live is not None:
            risks = self.live_risks(live, self._risk(logits, batch, ctx), batch["group"], mask)
            return (lam * live["factor"] * penalty(risks, live["weights"])).to(logits.dtype)
        if self.params["penalty"] == "linear" and coef is not None:
            risk = ctx.objective.sample_risk(logits, batch)
            return lam * surrogate_penalty(risk, batch["group"], coef, mask)
        return None

    def observe_batch(self, batch: Mapping[str, Any], logits: torch.Tensor, ctx: SiteContext) -> None:
        if self.params["statistics"] == "carried":
            held = ctx.state.round
            held[ROUND_SUMS] = held[ROUND_SUMS] + self._batch_stats(batch, logits, ctx)
            held[ROUND_SEEN] += len(batch["group"])

    def client_extras(self, ctx: SiteContext, start_state: StateDict, model: nn.Module,
                      steps: int, site_state: StateDict) -> StateDict:
        if self.params["statistics"] != "carried":
            return {}
        acc, seen = ctx.state.round[ROUND_SUMS], ctx.state.round[ROUND_SEEN]
        # the exact contribution stays here: next round's live estimate swaps it for a live one
        site_state.update({OWN_SUMS: acc.sums, OWN_COUNTS: acc.counts,
                           OWN_ROUND: torch.tensor(float(ctx.round))})
        # a sample enters the carried sums once per local epoch
        sent = self._privatize(acc, ctx, passes=max(int(ctx.settings.epochs), 1))
        return {SUMS: sent.sums, COUNTS: sent.counts, TOTAL: torch.tensor(float(seen))}


def _pool(per_site: Mapping[str, StateDict]) -> tuple[GroupStatistics, float]:
    """Σ over sites of group sums and counts, in sorted site order; N = Σ samples seen."""
    sites = sorted(per_site)
    stats = GroupStatistics(
        sum((per_site[s][SUMS].to(torch.float64) for s in sites[1:]), per_site[sites[0]][SUMS].to(torch.float64)),
        sum((per_site[s][COUNTS].to(torch.float64) for s in sites[1:]), per_site[sites[0]][COUNTS].to(torch.float64)),
    )
    total = float(sum(float(per_site[s][TOTAL]) for s in sites))
    return stats, total
