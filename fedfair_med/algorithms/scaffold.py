"""SCAFFOLD — Karimireddy, Kale, Mohri, Reddi, Stich and Suresh, "SCAFFOLD: Stochastic Controlled
Averaging for Federated Learning", ICML 2020.

Control variates estimate each site's gradient drift and cancel it during local training. The
server keeps c (an estimate of the global gradient), each site i keeps its own c_i privately.
Local step with plain SGD (lr η_l):

    y ← y − η_l (g_i(y) + c − c_i).

After K steps from x, option II of the paper reuses the local progress instead of an extra
gradient pass:

    c_i⁺ = c_i − c + (x − y) / (K η_l),      Δc_i = c_i⁺ − c_i,

and the site sends y and Δc_i (``scaffold.dc.<parameter name>``). The server, with
p_i = n_i / N (FedAvg's weights; with η_g = 1 the model step is FedAvg's average):

    x ← x + η_g Σ_i p_i (y_i − x),      c ← c + (|S| / N_sites) · mean_{i∈S} Δc_i.

When every c starts at zero, c stays the mean of all sites' c_i, dropped sites included.
BatchNorm running statistics are buffers, not gradient steps: they take FedAvg's average.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fedfair_med.algorithms.averaging import Aggregation
from fedfair_med.algorithms.base import Algorithm
from fedfair_med.algorithms.params import check_number
from fedfair_med.contracts import ClientUpdate, LocalSettings, SiteContext, StateDict

SERVER_C = "scaffold.c."  # server state / broadcast: c per state entry
SITE_C = "scaffold.ci."  # site_state: the site's own c_i, never sent
DELTA_C = "scaffold.dc."  # extras: Δc_i per trainable parameter
NUM_SITES = "scaffold.num_sites"
#: ctx.state.round key: (c, c_i, c − c_i) per trainable parameter for the round in progress
ROUND_C = "scaffold.round"


class Scaffold(Algorithm):
    name = "scaffold"
    required_optimizer = "sgd"

    @classmethod
    def param_defaults(cls) -> dict[str, Any]:
        return {"server_lr": 1.0}

    def validate_params(self) -> None:
        check_number(self.name, "server_lr", self.params["server_lr"], low=0.0, low_open=True)

    @property
    def server_lr(self) -> float:
        return float(self.params["server_lr"])

    def local_momentum(self, settings: LocalSettings) -> float:
        return 0.0  # the control-variate algebra assumes plain SGD steps

    # ---- server ---------------------------------------------------------------------------
    def init_server_state(self, global_state: StateDict, sites: list[str]) -> StateDict:
        """c = 0 for every float entry (the server cannot tell parameters from float buffers;
        entries that no site reports a Δc for, i.e. buffers, simply stay zero and unused)."""
        state: StateDict = {
            SERVER_C + name: torch.zeros_like(value)
            for name, value in global_state.items() if torch.is_floating_point(value)
        }
        state[NUM_SITES] = torch.tensor(float(len(sites)))
        return state

    def broadcast(self, server_state: StateDict, site: str) -> StateDict:
        return {k: v for k, v in server_state.items() if k.startswith(SERVER_C)}

    def start_aggregation(self, global_state: StateDict, server_state: StateDict) -> Aggregation:
        return ScaffoldAggregation(self, global_state, server_state)

    # ---- site -----------------------------------------------------------------------------
    def on_round_start(
        self, ctx: SiteContext, model: nn.Module, broadcast: StateDict, site_state: StateDict
    ) -> None:
        """Read c from the broadcast and c_i from private memory (both zero when absent)."""
        server_c, site_c, corrections = {}, {}, {}
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            c = broadcast.get(SERVER_C + name)
            c = torch.zeros_like(p) if c is None else c.detach().to(p.device, p.dtype)
            c_i = site_state.get(SITE_C + name)
            c_i = torch.zeros_like(p) if c_i is None else c_i.detach().to(p.device, p.dtype)
            server_c[name] = c
            site_c[name] = c_i
            corrections[name] = c - c_i
        ctx.state.round[ROUND_C] = (server_c, site_c, corrections)

    def after_backward(self, model: nn.Module, ctx: SiteContext) -> None:
        """g ← g + (c − c_i): the drift correction."""
        _, _, corrections = ctx.state.round[ROUND_C]
        with torch.no_grad():
            for name, p in model.named_parameters():
                correction = corrections.get(name)
                if correction is None:
                    continue
                if p.grad is None:
                    if torch.count_nonzero(correction) > 0:  # unused in forward: correction only
                        p.grad = correction.clone()
                else:
                    p.grad.add_(correction)

    def client_extras(
        self, ctx: SiteContext, start_state: StateDict, model: nn.Module, steps: int,
        site_state: StateDict,
    ) -> StateDict:
        """Option II: c_i⁺ = c_i − c + (x − y)/(K η_l); send Δc_i, keep c_i⁺ in site_state."""
        server_c, site_c, _ = ctx.state.round[ROUND_C]
        extras: StateDict = {}
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name not in site_c:
                    continue
                if steps > 0:  # Δc_i = −c + (x − y)/(K η_l)
                    moved = start_state[name].to(p.device, p.dtype) - p.detach()
                    delta = moved / (steps * ctx.settings.lr) - server_c[name]
                else:  # no local step: nothing learnt about the drift
                    delta = torch.zeros_like(p)
                extras[DELTA_C + name] = delta.cpu()
                site_state[SITE_C + name] = (site_c[name] + delta).cpu()
        return extras


class ScaffoldAggregation(Aggregation):
    """Streams SCAFFOLD's server step: Σ_i n_i (y_i − x) and Σ_i Δc_i per parameter.

    Each site's y_i and Δc_i are folded in and dropped on arrival, so the server holds two
    float64 sums per parameter, not two tensors per site. Buffers take FedAvg's average.
    """

    algorithm: "Scaffold"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.moved: dict[str, torch.Tensor] = {}  # Σ n_i (y_i − x), flat float64
        self.delta_c: dict[str, torch.Tensor] = {}  # Σ Δc_i, flat float64

    def fold(self, site: str, update: ClientUpdate, weight: float) -> None:
        parameters = {key[len(DELTA_C):] for key in update.extras if key.startswith(DELTA_C)}
        self.average.add({k: v for k, v in update.state.items() if k not in parameters}, weight)
        for name in sorted(parameters):
            self.add_to_sum(self.moved, name, update.state[name], weight,
                            subtract=self.global_state[name])
            self.add_to_sum(self.delta_c, name, update.extras[DELTA_C + name], 1.0)

    def kept_extras(self, extras: StateDict) -> StateDict:
        return {k: v for k, v in extras.items() if not k.startswith(DELTA_C)}

    def new_model(self) -> StateDict:
        new_state = self.average.result()
        total, server_lr = self.average.total, self.algorithm.server_lr
        for name, moved in self.moved.items():
            new_state[name] = self.global_plus(name, moved, total, server_lr)
        return new_state

    def next_server_state(self) -> StateDict:
        server_state = self.server_state
        num_sites = float(server_state[NUM_SITES]) if NUM_SITES in server_state else float(len(self.received))
        new_server = dict(server_state)
        for name, total_dc in self.delta_c.items():
            key = SERVER_C + name
            c = server_state.get(key, torch.zeros_like(self.global_state[name]))
            # (|S| / N) · mean_{i∈S} Δc_i  =  Σ_{i∈S} Δc_i / N
            step = (total_dc / num_sites).reshape(c.shape)
            new_server[key] = (c.to(torch.float64) + step).to(c.dtype)
        return new_server
