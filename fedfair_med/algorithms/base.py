"""The two hooks every federated method implements, and the local training loop they share.

A method says *what* a site computes on its own data (the client hook, :meth:`Algorithm.client_update`)
and *how* the server combines what sites send (the server path, :meth:`Algorithm.start_aggregation`).
Runtimes (in-process, OpenFL) decide *where* that happens and never reach inside a method.

Everything that crosses the wire is a ``dict[str, torch.Tensor]``: the model's floating-point
state, plus small named tensors a method adds (``extras``) such as FlexFair's per-group sums and
counts, FedNova's normaliser or SCAFFOLD's control-variate delta. Per-sample values never do.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from fedfair_med.algorithms.averaging import Aggregation
from fedfair_med.contracts import ClientState, ClientUpdate, LocalSettings, SiteContext, StateDict


def load_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """``model.load_state_dict(state)`` (strict), copying straight into the model's own tensors.

    ``load_state_dict`` walks every module in Python; on a 87-module UNet that is ~3 ms against
    ~0.3 ms for the copies themselves, paid by every site in every round (twice with evaluation).
    Any mismatch in names or shapes falls back to ``load_state_dict`` for its usual error.
    """
    own = model.state_dict(keep_vars=True)
    if own.keys() != state.keys() or any(own[k].shape != state[k].shape for k in own):
        model.load_state_dict(state)  # raises, naming what differs
        return
    with torch.no_grad():
        for name, tensor in own.items():
            tensor.copy_(state[name])


def to_device(model: nn.Module, device: torch.device) -> None:
    """``model.to(device)`` only when needed: ``to`` walks every module even when nothing moves.

    A model lives on one device here, so its first tensor says where all of them are.
    """
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    if first is None or first.device != torch.device(device):
        model.to(device)


def float_state(model: nn.Module) -> StateDict:
    """Detached copy of a model's state (all buffers, so BatchNorm statistics travel too)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class Algorithm:
    """Base class: FedAvg's behaviour, with small hooks the other methods override.

    Client side (runs at a site, sees only that site's data):
      * :meth:`on_round_start` — take the broadcast (global statistics, control variates);
      * :meth:`prepare_model` / :meth:`finish_model` — change the local architecture and undo it;
      * :meth:`extra_loss` — add a term to each batch's loss;
      * :meth:`after_backward` — correct gradients before the optimiser step;
      * :meth:`observe_batch` — accumulate fixed-size statistics to report;
      * :meth:`client_extras` — the extras sent with the update;
      * :meth:`client_statistics` — the optional forward-only statistics pass.
    A site's memory is not kept on the instance: the runtime holds one
    :class:`~fedfair_med.contracts.ClientState` per site and passes it in as ``ctx.state``
    (``ctx.state.kept`` across rounds, also given to the hooks as ``site_state``;
    ``ctx.state.round`` for the round in progress). So one instance serves any number of sites,
    in any order, and holds only its parameters.

    Server side — the one path both runtimes call, each round::

        aggregation = algorithm.start_aggregation(global_state, server_state)
        for site in sorted(sites):               # the secure path: one pseudo-site, the sum
            aggregation.add(site, update[site])  # folded in and dropped as it arrives
        new_state, server_state = aggregation.result()

    The default (:class:`~fedfair_med.algorithms.averaging.Aggregation`) is FedAvg's weighted
    average with weights :meth:`site_weight`, then :meth:`update_server_state`. A method changes
    only what it needs: :meth:`site_weight`, :meth:`update_server_state`, or
    :meth:`start_aggregation` returning its own ``Aggregation`` subclass (FedNova, SCAFFOLD fold
    differently; FairFed returns a ``CollectingAggregation``, which sees the whole round before
    it averages). Around it: :meth:`init_server_state`, :meth:`broadcast`, and the optional
    statistics pass (:meth:`wants_statistics`, :meth:`absorb_statistics`).
    """

    name = "base"
    #: Local optimiser this method requires, or None to use the task's default.
    required_optimizer: str | None = None
    #: False where the method's algebra assumes each round's optimiser starts from zero state.
    allows_kept_optimizer_state: bool = True

    def __init__(self, **params: Any) -> None:
        unknown = set(params) - set(self.param_defaults())
        if unknown:
            raise ValueError(
                f"{self.name}: unknown parameter(s) {sorted(unknown)}; "
                f"known: {sorted(self.param_defaults())}"
            )
        self.params = {**self.param_defaults(), **params}
        self.validate_params()

    # ---- parameters -------------------------------------------------------------------------
    @classmethod
    def param_defaults(cls) -> dict[str, Any]:
        return {}

    def validate_params(self) -> None:
        """Raise ValueError with a clear message for out-of-range hyper-parameters."""

    # ---- server hooks -----------------------------------------------------------------------
    def init_server_state(self, global_state: StateDict, sites: list[str]) -> StateDict:
        """State the server keeps between rounds (tensors only, so OpenFL can store it)."""
        return {}

    def broadcast(self, server_state: StateDict, site: str) -> StateDict:
        """Small tensors sent to ``site`` with the global model at the start of a round."""
        return {}

    def site_weight(self, site: str, update: ClientUpdate, server_state: StateDict) -> float:
        """A site's unnormalised aggregation weight: FedAvg's n_s."""
        return float(update.num_samples)

    def start_aggregation(self, global_state: StateDict, server_state: StateDict) -> Aggregation:
        """The round's server step, which the runtime hands each site's update as it arrives
        (see the class docstring): FedAvg's streaming weighted average by default, so the server
        never holds K models. Override to return another
        :class:`~fedfair_med.algorithms.averaging.Aggregation`."""
        return Aggregation(self, global_state, server_state)

    def update_server_state(
        self,
        server_state: StateDict,
        updates: Mapping[str, ClientUpdate],
        weights: Mapping[str, float],
    ) -> StateDict:
        return server_state

    # ---- optional statistics pass (forward only, before local training) ----------------------
    def wants_statistics(self, round_index: int, server_state: StateDict) -> bool:
        """True when sites must first report aggregate statistics of the *global* model.

        The runtime then calls :meth:`client_statistics` at every site and
        :meth:`absorb_statistics` at the server before the training round starts.
        """
        return False

    def client_statistics(self, ctx: SiteContext, model: nn.Module) -> StateDict:
        """Fixed-size statistics of the global ``model`` on the site's training data."""
        return {}

    def absorb_statistics(
        self, server_state: StateDict, statistics: Mapping[str, StateDict]
    ) -> StateDict:
        """Fold every site's statistics into the server state (e.g. FlexFair's coefficients)."""
        return server_state

    # ---- client hooks -----------------------------------------------------------------------
    def on_round_start(
        self, ctx: SiteContext, model: nn.Module, broadcast: StateDict, site_state: StateDict
    ) -> None:
        """Called at a site before local training with the server's broadcast; ``site_state`` is
        ``ctx.state.kept``, and what the other hooks need this round goes in ``ctx.state.round``."""

    def prepare_model(self, model: nn.Module, ctx: SiteContext) -> nn.Module:
        return model

    def finish_model(self, model: nn.Module, ctx: SiteContext) -> nn.Module:
        return model

    def extra_loss(
        self, model: nn.Module, batch: Mapping[str, Any], logits: torch.Tensor, ctx: SiteContext
    ) -> torch.Tensor | None:
        return None

    def after_backward(self, model: nn.Module, ctx: SiteContext) -> None:
        pass

    def observe_batch(
        self, batch: Mapping[str, Any], logits: torch.Tensor, ctx: SiteContext
    ) -> None:
        pass

    def client_extras(
        self, ctx: SiteContext, start_state: StateDict, model: nn.Module, steps: int, site_state: StateDict
    ) -> StateDict:
        """Fixed-size tensors sent with the update; may also update ``site_state`` in place."""
        return {}

    # ---- the local loop (shared, not overridden) --------------------------------------------
    def make_optimizer(self, model: nn.Module, settings: LocalSettings) -> torch.optim.Optimizer:
        kind = self.required_optimizer or settings.optimizer
        params = [p for p in model.parameters() if p.requires_grad]
        if kind == "sgd":
            return torch.optim.SGD(
                params, lr=settings.lr, momentum=self.local_momentum(settings),
                weight_decay=settings.weight_decay,
            )
        if kind == "adam":
            return torch.optim.Adam(params, lr=settings.lr, weight_decay=settings.weight_decay)
        raise ValueError(f"unknown optimizer {kind!r}: use 'adam' or 'sgd'")

    def local_momentum(self, settings: LocalSettings) -> float:
        return settings.momentum

    def client_update(
        self,
        ctx: SiteContext,
        model: nn.Module,
        global_state: StateDict,
        broadcast: StateDict,
        site_state: StateDict | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> ClientUpdate:
        """Train ``model`` (loaded with ``global_state``) on the site's data; return the update.

        The site's memory is ``ctx.state``, which the runtime keeps per site: ``kept`` (e.g.
        SCAFFOLD's c_i) is changed in place and never sent; ``round`` (what the hooks need during
        this round, and the statistics pass's results) is emptied when the update is done.
        ``site_state``, when given, stands in for ``ctx.state.kept`` (a caller holding a bare dict).
        """
        if site_state is not None and site_state is not ctx.state.kept:
            ctx = dataclasses.replace(ctx, state=ClientState(kept=site_state, round=ctx.state.round))
        try:
            return self._train(ctx, model, global_state, broadcast, progress)
        finally:
            ctx.state.round.clear()

    def _train(self, ctx: SiteContext, model: nn.Module, global_state: StateDict,
               broadcast: StateDict, progress: Callable[[int], None] | None) -> ClientUpdate:
        """The shared local loop of :meth:`client_update`."""
        site_state = ctx.state.kept
        load_state(model, global_state)
        to_device(model, ctx.device)
        broadcast = on_device(broadcast, ctx.device)
        self.on_round_start(ctx, model, broadcast, site_state)
        work_model = self.prepare_model(model, ctx)
        work_model.train()
        optimizer = self.make_optimizer(work_model, ctx.settings)
        own_optimizer = optimizer  # the one whose state a site keeps (DP-SGD wraps it below)
        if ctx.settings.optimizer_state == "keep":
            restore_optimizer_state(own_optimizer, site_state)
        loader = ctx.loader
        if ctx.private_training is not None:
            work_model, optimizer, loader = ctx.private_training.attach(work_model, optimizer, loader)
        # load_state_dict copied global_state into the model, so global_state itself still holds
        # the round's start after training; only tensors that *are* the model's storage (a caller
        # passing model.state_dict()) need a copy. Saves one model-sized clone per site and round.
        live = {t.data_ptr() for m in {id(model): model, id(work_model): work_model}.values()
                for t in m.state_dict().values()}
        start_state = {k: (v.detach().clone() if v.data_ptr() in live else v.detach())
                       for k, v in global_state.items()}
        autocast, scaler = local_precision(ctx)
        steps, loss_sum = 0, 0.0
        done = False
        for _epoch in range(ctx.settings.epochs):
            for batch in loader:
                batch = move_batch(batch, ctx.device)
                optimizer.zero_grad(set_to_none=True)
                with autocast():
                    logits = work_model(batch["image"])
                logits = logits.float()  # losses, risks and statistics in float32 (no-op at 32)
                loss = ctx.objective.task_loss(logits, batch)
                extra = self.extra_loss(work_model, batch, logits, ctx)
                if extra is not None:
                    loss = loss + extra
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"site {ctx.site}: loss became {loss.item()} at round {ctx.round}, "
                        f"step {steps}; lower the learning rate or the penalty weight"
                    )
                if scaler is None:
                    loss.backward()
                    self.after_backward(work_model, ctx)
                    optimizer.step()
                else:  # fp16: scaled loss, true gradients for the method's corrections
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)
                    self.after_backward(work_model, ctx)
                    scaler.step(optimizer)  # skipped when a gradient overflowed
                    scaler.update()
                self.observe_batch(batch, logits.detach(), ctx)
                steps += 1
                loss_sum += float(loss.detach())
                if progress is not None:
                    progress(1)
                if ctx.settings.max_steps is not None and steps >= ctx.settings.max_steps:
                    done = True
                    break
            if done:
                break
        if ctx.private_training is not None:
            work_model = ctx.private_training.detach(work_model)
        if ctx.settings.optimizer_state == "keep":
            keep_optimizer_state(own_optimizer, site_state)
        model = self.finish_model(work_model, ctx)
        extras = self.client_extras(ctx, start_state, model, steps, site_state)
        extras.setdefault("steps", torch.tensor(float(steps)))
        extras.setdefault("loss", torch.tensor(loss_sum / max(steps, 1)))
        # what crosses the wire is on the CPU whatever the site's device (a no-op on CPU)
        return ClientUpdate(state=cpu_state(float_state(model)), num_samples=num_examples(ctx.loader),
                            extras=cpu_state(extras))


def aggregate_round(algorithm: Algorithm, global_state: StateDict,
                    updates: Mapping[str, ClientUpdate], server_state: StateDict) -> tuple[StateDict, StateDict]:
    """The server path for a round whose updates are all at hand: start, add in sorted site
    order, result — exactly what the runtimes do one update at a time."""
    aggregation = algorithm.start_aggregation(global_state, server_state)
    for site in sorted(updates):
        aggregation.add(site, updates[site])
    return aggregation.result()


#: Where a site keeps its optimiser's state between rounds (``ClientState.kept``, never sent).
OPTIMIZER_STATE = "optimizer_state/"


def keep_optimizer_state(optimizer: torch.optim.Optimizer, kept: StateDict) -> None:
    """Store ``optimizer``'s per-parameter state (Adam's moments and step count, SGD's momentum
    buffer) in the site's kept memory, replacing the previous round's."""
    for key in [k for k in kept if k.startswith(OPTIMIZER_STATE)]:
        del kept[key]
    for index, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            if value is None:  # SGD without momentum keeps no buffer
                continue
            tensor = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            kept[f"{OPTIMIZER_STATE}{index}/{name}"] = tensor.detach().clone()


def restore_optimizer_state(optimizer: torch.optim.Optimizer, kept: StateDict) -> None:
    """Load the state :func:`keep_optimizer_state` stored, into a fresh optimiser over the same
    parameters; its learning rate stays this round's. A first round (nothing kept) starts fresh."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in kept.items():
        if key.startswith(OPTIMIZER_STATE):
            index, name = key[len(OPTIMIZER_STATE):].split("/", 1)
            state.setdefault(int(index), {})[name] = tensor.clone()
    if not state:
        return
    saved = optimizer.state_dict()
    known = {i for group in saved["param_groups"] for i in group["params"]}
    if not set(state) <= known:
        raise ValueError(
            f"the kept optimiser state covers parameters {sorted(set(state) - known)} this "
            "model does not have; optimizer_state: keep needs the same model every round"
        )
    optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})


def num_examples(loader: Iterable[Mapping[str, Any]]) -> int:
    """Number of training examples behind a loader (the FedAvg weight n_s)."""
    dataset = getattr(loader, "dataset", None)
    if dataset is not None:
        return len(dataset)
    return sum(int(b["image"].shape[0]) for b in loader)


def move_batch(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch's tensors on ``device``; from pinned memory the copy runs asynchronously."""
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
            for k, v in batch.items()}



def on_device(tensors: Mapping[str, torch.Tensor], device: torch.device) -> StateDict:
    """``tensors`` moved to ``device`` (the same dict when nothing has to move)."""
    if all(v.device == torch.device(device) for v in tensors.values()):
        return dict(tensors)
    return {k: v.to(device) for k, v in tensors.items()}


def cpu_state(tensors: Mapping[str, torch.Tensor]) -> StateDict:
    """``tensors`` on the CPU for the wire; CPU tensors are passed through untouched."""
    return {k: (v if v.device.type == "cpu" else v.detach().cpu()) for k, v in tensors.items()}


#: precision setting -> autocast dtype; "32" (absent) runs in full precision
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def precision_autocast(device_type: str, precision: str) -> Any:
    """Mixed precision for forward passes on ``device_type``; a no-op context at precision 32,
    so CPU runs keep their bits."""
    dtype = AUTOCAST_DTYPES.get(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


def local_precision(ctx: SiteContext) -> tuple[Callable[[], Any], Any]:
    """(autocast context factory, GradScaler or None) for the round's precision.

    fp16 needs a gradient scaler (small gradients underflow in float16); bf16 has float32's
    range and does not.
    """
    kind = torch.device(ctx.device).type
    scaler = torch.amp.GradScaler(kind) if ctx.precision == "fp16" else None
    return (lambda: precision_autocast(kind, ctx.precision)), scaler
