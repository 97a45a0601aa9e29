r"""FlexFair — Xing et al., "Achieving flexible fairness metrics in federated medical imaging",
Nature Communications, 2025.

Local objective at site s: task loss + λ · (site's share of P), where
P = Σ_k (R_k − Σ_j w_j R_j)² is the weighted variance of per-group risks (see
:mod:`fedfair_med.fairness.penalty` for the derivation). The criterion picks groups and risk:
``ea`` — sites and Dice loss / CE; ``dp`` — a sensitive attribute and P(y=1); ``eo`` — the same
on y = 1.

Federated without coupling sites: the server holds only per-group *sums and counts*. From them
it forms R_k, R̄ and one coefficient per group c_k = N g_k / N_k, and broadcasts c. A site adds
λ · mean_i c_{k(i)} r_i to each batch loss; FedAvg's n_s/N weighting then sums the sites'
expected gradients to exactly λ∇P. Statistics are either *fresh* (a forward-only pass of the
global model over the training data before each round — the exact gradient, at the cost of one
extra forward pass) or *carried* (accumulated during the previous round's training, no extra
pass; the first round trains on the task loss alone, as there are no statistics yet).
Carried statistics need no extra exchange, so they run unchanged over OpenFL. Sites send 2K
numbers per round.

With ``statistics_privacy`` set (the run's ``privacy`` option), each sample's risk is clipped to
[0, C] and the 2K numbers get Gaussian noise before they leave the site
(:func:`fedfair_med.privacy.privatize_group_statistics`); the server clamps the pooled noisy
counts ≥ 1e-6 and sums to [0, C·count] before dividing.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from fedfair_med.algorithms.base import Algorithm, ClientUpdate, SiteContext, StateDict
from fedfair_med.fairness.penalty import (
    WEIGHTINGS, GroupStatistics, group_sums, sample_coefficients, surrogate_penalty,
)
from fedfair_med.privacy.mechanism import clamp_noisy_statistics, clip_risk, privatize_group_statistics
from fedfair_med.privacy.settings import StatisticsPrivacy

SUMS, COUNTS, COEF, TOTAL = "flexfair.sums", "flexfair.counts", "flexfair.coef", "flexfair.total"


class FlexFair(Algorithm):
    name = "flexfair"
    #: Clip, σ and seed for DP group statistics; None (default) shares exact statistics.
    statistics_privacy: StatisticsPrivacy | None = None

    @classmethod
    def param_defaults(cls) -> dict[str, Any]:
        return {"lam": 1.0, "weighting": "uniform", "statistics": "carried"}

    def validate_params(self) -> None:
        lam = self.params["lam"]
        if not isinstance(lam, (int, float)) or isinstance(lam, bool) or lam < 0:
            raise ValueError(f"flexfair: lam (λ) must be a number ≥ 0, got {lam!r}")
        if self.params["weighting"] not in WEIGHTINGS:
            raise ValueError(f"flexfair: weighting must be one of {WEIGHTINGS}")
        if self.params["statistics"] not in ("fresh", "carried"):
            raise ValueError("flexfair: statistics must be 'fresh' or 'carried'")

    # ---- server ---------------------------------------------------------------------------
    def init_server_state(self, global_state: StateDict, sites: list[str]) -> StateDict:
        return {}

    def wants_statistics(self, round_index: int, server_state: StateDict) -> bool:
        return self.params["statistics"] == "fresh"

    def _with_coefficients(self, server_state: StateDict, stats: GroupStatistics,
                           total: float) -> StateDict:
        if self.statistics_privacy is not None:
            stats = GroupStatistics(*clamp_noisy_statistics(stats.sums, stats.counts,
                                                            self.statistics_privacy.clip))
        coef = sample_coefficients(stats, total, self.params["weighting"])
        return {**server_state, COEF: coef, SUMS: stats.sums, COUNTS: stats.counts,
                TOTAL: torch.tensor(total, dtype=torch.float64)}

    def absorb_statistics(self, server_state: StateDict,
                          statistics: Mapping[str, StateDict]) -> StateDict:
        stats, total = _pool(statistics)
        return self._with_coefficients(server_state, stats, total)

    def broadcast(self, server_state: StateDict, site: str) -> StateDict:
        return {COEF: server_state[COEF]} if COEF in server_state else {}

    def update_server_state(self, server_state: StateDict, updates: Mapping[str, ClientUpdate],
                            weights: Mapping[str, float]) -> StateDict:
        if self.params["statistics"] != "carried":
            return server_state
        stats, total = _pool({s: u.extras for s, u in updates.items()})
        return self._with_coefficients(server_state, stats, total)

    # ---- client ---------------------------------------------------------------------------
    def client_statistics(self, ctx: SiteContext, model: nn.Module) -> StateDict:
        acc = GroupStatistics.zeros(ctx.num_groups)
        n = 0
        for batch in ctx.loader:
            logits = model(batch["image"])
            acc = acc + self._batch_stats(batch, logits, ctx)
            n += len(batch["group"])
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

    def _batch_stats(self, batch: Mapping[str, Any], logits: torch.Tensor,
                     ctx: SiteContext) -> GroupStatistics:
        risk = ctx.objective.sample_risk(logits, batch)
        if self.statistics_privacy is not None:
            risk = clip_risk(risk.detach(), self.statistics_privacy.clip)
        return group_sums(risk, batch["group"], ctx.num_groups, ctx.objective.risk_mask(batch))

    def on_round_start(self, ctx: SiteContext, model: nn.Module, broadcast: StateDict,
                       site_state: StateDict) -> None:
        self._coef = broadcast.get(COEF)
        self._acc = GroupStatistics.zeros(ctx.num_groups)
        self._seen = 0

    def extra_loss(self, model: nn.Module, batch: Mapping[str, Any], logits: torch.Tensor,
                   ctx: SiteContext) -> torch.Tensor | None:
        if self._coef is None or self.params["lam"] == 0:
            return None
        risk = ctx.objective.sample_risk(logits, batch)
        mask = ctx.objective.risk_mask(batch)
        return self.params["lam"] * surrogate_penalty(risk, batch["group"], self._coef, mask)

    def observe_batch(self, batch: Mapping[str, Any], logits: torch.Tensor, ctx: SiteContext) -> None:
        if self.params["statistics"] == "carried":
            self._acc = self._acc + self._batch_stats(batch, logits, ctx)
            self._seen += len(batch["group"])

    def client_extras(self, ctx: SiteContext, start_state: StateDict, model: nn.Module,
                      steps: int, site_state: StateDict) -> StateDict:
        if self.params["statistics"] != "carried":
            return {}
        # a sample enters the carried sums once per local epoch
        self._acc = self._privatize(self._acc, ctx, passes=max(int(ctx.settings.epochs), 1))
        return {SUMS: self._acc.sums, COUNTS: self._acc.counts,
                TOTAL: torch.tensor(float(self._seen))}


def _pool(per_site: Mapping[str, StateDict]) -> tuple[GroupStatistics, float]:
    """Σ over sites of group sums and counts, in sorted site order; N = Σ samples seen."""
    sites = sorted(per_site)
    stats = GroupStatistics(
        sum((per_site[s][SUMS].to(torch.float64) for s in sites[1:]), per_site[sites[0]][SUMS].to(torch.float64)),
        sum((per_site[s][COUNTS].to(torch.float64) for s in sites[1:]), per_site[sites[0]][COUNTS].to(torch.float64)),
    )
    total = float(sum(float(per_site[s][TOTAL]) for s in sites))
    return stats, total
