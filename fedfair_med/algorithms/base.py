"""The two hooks every federated method implements, and the local training loop they share.

A method says *what* a site computes on its own data (the client hook, :meth:`Algorithm.client_update`)
and *how* the server combines what sites send (the server hook, :meth:`Algorithm.aggregate`).
Runtimes (in-process, OpenFL) decide *where* that happens and never reach inside a method.

Everything that crosses the wire is a ``dict[str, torch.Tensor]``: the model's floating-point
state, plus small named tensors a method adds (``extras``) such as FlexFair's per-group sums and
counts, FedNova's normaliser or SCAFFOLD's control-variate delta. Per-sample values never do.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from fedfair_med.contracts import (
    ClientState, ClientUpdate, LocalSettings, Objective, SiteContext, StateDict,
)


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


#: Elements per block when a tensor is widened to float64 and added into an accumulator: one
#: 512 KiB scratch block, small enough to stay in a core's L2 cache. Widening whole tensors
#: instead (``acc += w * θ.double()``) allocates model-sized temporaries and is ~3× slower.
AVERAGE_BLOCK = 1 << 16


class Float64Scratch:
    """One reusable float64 block for widening tensors piece by piece (no model-sized temporaries)."""

    def __init__(self) -> None:
        self._block = torch.empty(0, dtype=torch.float64)

    def blocks(self, n: int, device: torch.device) -> Iterator[tuple[int, int, torch.Tensor]]:
        """``(start, stop, block)`` over ``range(n)`` in cache-sized pieces, one reused buffer."""
        if self._block.numel() < min(n, AVERAGE_BLOCK) or self._block.device != device:
            self._block = torch.empty(min(max(n, 1), AVERAGE_BLOCK), dtype=torch.float64,
                                      device=device)
        for start in range(0, n, AVERAGE_BLOCK):
            stop = min(start + AVERAGE_BLOCK, n)
            yield start, stop, self._block[: stop - start]

    def add_scaled(self, acc: torch.Tensor, term: torch.Tensor, alpha: float,
                   subtract: torch.Tensor | None = None) -> None:
        """``acc += alpha · (term − subtract)`` elementwise in float64 (``acc`` is float64, flat)."""
        flat, base = term.reshape(-1), (None if subtract is None else subtract.reshape(-1))
        for start, stop, block in self.blocks(flat.numel(), acc.device):
            block.copy_(flat[start:stop])
            if base is not None:
                block.sub_(base[start:stop])
            # mul then add, each rounded once: ``add_(block, alpha=...)`` fuses them (FMA) in
            # vectorised loops only, so its bits would depend on how threads split the tensor.
            acc[start:stop].add_(block.mul_(alpha))


class WeightedSum:
    """Σ_s w_s θ_s over state dicts folded in one at a time, then divided by Σ_s w_s.

    Streaming with a small window: up to :attr:`GROUP` states wait, then are added block by block
    (a 512 KiB float64 block stays in cache while every waiting state is added to it) into one
    float64 sum per tensor. Memory is at most ``GROUP`` states plus that sum, whatever the
    number of sites; a round of ≤ ``GROUP`` sites never allocates the model-sized sum at all.
    Each element still sees ``acc += w_s θ_s`` in site order, then one division, so the bits do
    not depend on the window — callers add sites in sorted name order and every runtime agrees.
    Integer buffers (BatchNorm's ``num_batches_tracked``) take the first state's value.
    """

    #: states kept before they are folded into the running sum
    GROUP = 8

    def __init__(self) -> None:
        self.total = 0.0
        self._acc: dict[str, torch.Tensor] = {}  # flat float64 sums, once a window was folded
        self._layout: dict[str, tuple[torch.Size, torch.dtype]] = {}
        self._first: dict[str, torch.Tensor] = {}  # integer buffers: the first state's value
        self._pending: list[tuple[Mapping[str, torch.Tensor], float]] = []
        self._sums = Float64Scratch()  # the block being accumulated
        self._terms = Float64Scratch()  # each term widened into it

    def add(self, state: Mapping[str, torch.Tensor], weight: float) -> None:
        for name, value in state.items():
            if name in self._layout:
                continue
            self._layout[name] = (value.shape, value.dtype)
            if not torch.is_floating_point(value):
                self._first[name] = value.detach().clone()
        self._pending.append((state, float(weight)))
        self.total += float(weight)
        if len(self._pending) >= self.GROUP:
            self._fold(final=False)

    def _fold(self, final: bool) -> StateDict:
        """Add the waiting states into the sums (``final``: and return the averages)."""
        out: StateDict = {}
        for name, (shape, dtype) in self._layout.items():
            if name in self._first:
                out[name] = self._first[name]
                continue
            terms = [(state[name].detach().reshape(-1), w) for state, w in self._pending]
            n = terms[0][0].numel() if terms else self._acc[name].numel()
            device = terms[0][0].device if terms else self._acc[name].device
            acc = self._acc.get(name)
            if acc is None and not final:
                acc = self._acc[name] = torch.zeros(n, dtype=torch.float64, device=device)
            result = torch.empty(n, dtype=dtype, device=device) if final else None
            for start, stop, block in self._sums.blocks(n, device):
                if acc is None:
                    block.zero_()
                else:
                    block.copy_(acc[start:stop])
                for term, w in terms:
                    self._terms.add_scaled(block, term[start:stop], w)
                if final:
                    result[start:stop].copy_(block.div_(self.total))  # type: ignore[index]
                else:
                    acc[start:stop].copy_(block)  # type: ignore[index]
            if final:
                out[name] = result.reshape(shape)  # type: ignore[union-attr]
        self._pending = []
        return out

    def result(self) -> StateDict:
        if self.total <= 0:
            raise ValueError("cannot average: the sites' weights sum to zero")
        return self._fold(final=True)


def weighted_average(states: Mapping[str, StateDict], weights: Mapping[str, float]) -> StateDict:
    """Σ_s w_s θ_s / Σ_s w_s over sites, in sorted site order (see :class:`WeightedSum`)."""
    acc = WeightedSum()
    for site in sorted(states):
        acc.add(states[site], weights[site])
    return acc.result()


class Aggregation:
    """One round's server step, folding each site's update in as it arrives.

    The runtime calls :meth:`add` once per site (sorted by name) and then :meth:`result`. Only
    running sums and each site's small extras are kept, so the server's memory does not grow
    with the number of sites. This default is FedAvg's weighted average; methods with another
    server step subclass it (FedNova, SCAFFOLD) or collect first (FairFed, whose weights need
    every site's statistics).
    """

    def __init__(self, algorithm: "Algorithm", global_state: StateDict, server_state: StateDict,
                 weights: Mapping[str, float] | None = None) -> None:
        self.algorithm = algorithm
        self.global_state = global_state
        self.server_state = server_state
        self.fixed_weights = weights
        self.weights: dict[str, float] = {}
        #: every site's update without its model state (num_samples and the small extras)
        self.received: dict[str, ClientUpdate] = {}
        self.average = WeightedSum()
        self._scratch = Float64Scratch()

    def add(self, site: str, update: ClientUpdate) -> None:
        if site in self.received:
            raise ValueError(f"aggregation: site {site!r} sent two updates in one round")
        if self.fixed_weights is not None:
            weight = float(self.fixed_weights[site])
        else:
            weight = float(self.algorithm.site_weight(site, update, self.server_state))
        self.weights[site] = weight
        self.fold(site, update, weight)
        self.received[site] = ClientUpdate(state={}, num_samples=update.num_samples,
                                           extras=self.kept_extras(update.extras))

    def fold(self, site: str, update: ClientUpdate, weight: float) -> None:
        """Add one site's model into the running sums (FedAvg: Σ w_s θ_s)."""
        self.average.add(update.state, weight)

    def kept_extras(self, extras: StateDict) -> StateDict:
        """The extras kept until :meth:`result` (model-sized ones are folded, not kept)."""
        return dict(extras)

    def new_model(self) -> StateDict:
        return self.average.result()

    def running_sum(self, sums: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        """The flat float64 sum ``sums[name]`` shaped like global tensor ``name`` (zero at first)."""
        if name not in sums:
            sums[name] = torch.zeros(self.global_state[name].numel(), dtype=torch.float64)
        return sums[name]

    def add_to_sum(self, sums: dict[str, torch.Tensor], name: str, term: torch.Tensor,
                   alpha: float, subtract: torch.Tensor | None = None) -> None:
        """``sums[name] += alpha · (term − subtract)``, widened block by block."""
        self._scratch.add_scaled(self.running_sum(sums, name), term, alpha, subtract=subtract)

    def global_plus(self, name: str, total: torch.Tensor, divisor: float, factor: float) -> torch.Tensor:
        """The global tensor ``name`` plus ``(total / divisor) · factor``, rounded to its dtype."""
        x = self.global_state[name]
        step = (total / divisor).mul_(factor).reshape(x.shape)
        return (x.to(torch.float64) + step).to(x.dtype)

    def next_server_state(self) -> StateDict:
        """Server state after this round's own step, before :meth:`Algorithm.update_server_state`."""
        return self.server_state

    def result(self) -> tuple[StateDict, StateDict]:
        """The next global model and server state."""
        if not self.received:
            raise ValueError("aggregation: no site update was received this round")
        new_state = self.new_model()
        return new_state, self.algorithm.update_server_state(self.next_server_state(),
                                                             self.received, self.weights)


class CollectingAggregation(Aggregation):
    """For methods whose server step needs every update at once: keep them, then aggregate."""

    def __init__(self, algorithm: "Algorithm", global_state: StateDict, server_state: StateDict) -> None:
        super().__init__(algorithm, global_state, server_state)
        self.updates: dict[str, ClientUpdate] = {}

    def add(self, site: str, update: ClientUpdate) -> None:
        if site in self.updates:
            raise ValueError(f"aggregation: site {site!r} sent two updates in one round")
        self.updates[site] = update

    def result(self) -> tuple[StateDict, StateDict]:
        if not self.updates:
            raise ValueError("aggregation: no site update was received this round")
        return self.algorithm.aggregate(self.global_state, self.updates, self.server_state)


class Algorithm:
    """Base class: FedAvg's behaviour, with small hooks the other methods override.

    Client side (runs at a site, sees only that site's data):
      * :meth:`on_round_start` — take the broadcast (global statistics, control variates);
      * :meth:`prepare_model` / :meth:`finish_model` — change the local architecture and undo it;
      * :meth:`extra_loss` — add a term to each batch's loss;
      * :meth:`after_backward` — correct gradients before the optimiser step;
      * :meth:`observe_batch` — accumulate fixed-size statistics to report;
      * :meth:`client_extras` — the extras sent with the update.
    Server side: :meth:`init_server_state`, :meth:`broadcast`, :meth:`site_weight`,
    :meth:`update_server_state` and :meth:`streaming_aggregation` (each update folded in as it
    arrives); or override :meth:`aggregate` to see a whole round's updates at once.
    """

    name = "base"
    #: Local optimiser this method requires, or None to use the task's default.
    required_optimizer: str | None = None

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

    def aggregation_weights(
        self, updates: Mapping[str, ClientUpdate], server_state: StateDict
    ) -> dict[str, float]:
        """Every site's weight (:meth:`site_weight`); normalised by the aggregation."""
        return {s: self.site_weight(s, u, server_state) for s, u in updates.items()}

    def start_aggregation(self, global_state: StateDict, server_state: StateDict) -> Aggregation:
        """What a runtime calls each round: an object it hands each site's update as it arrives.

        A method that overrides :meth:`aggregate` (its server step needs every update at once,
        like FairFed's) gets its updates collected and passed to it; every other method folds
        them in as they come (:meth:`streaming_aggregation`), so the server never holds K models.
        """
        if type(self).aggregate is not Algorithm.aggregate:
            return CollectingAggregation(self, global_state, server_state)
        return self.streaming_aggregation(global_state, server_state)

    def streaming_aggregation(self, global_state: StateDict, server_state: StateDict) -> Aggregation:
        """The streaming server step: FedAvg's running weighted sum (FedNova, SCAFFOLD override)."""
        return Aggregation(self, global_state, server_state)

    def aggregate(
        self,
        global_state: StateDict,
        updates: Mapping[str, ClientUpdate],
        server_state: StateDict,
    ) -> tuple[StateDict, StateDict]:
        """Combine all site updates at once: the same arithmetic as folding them in sorted order."""
        aggregation = self.streaming_aggregation(global_state, server_state)
        for site in sorted(updates):
            aggregation.add(site, updates[site])
        return aggregation.result()

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
        """Called at a site before local training with the server's broadcast."""

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
        site_state: StateDict,
        progress: Callable[[int], None] | None = None,
    ) -> ClientUpdate:
        """Train ``model`` (loaded with ``global_state``) on the site's data; return the update.

        ``site_state`` is the site's private memory between rounds (e.g. SCAFFOLD's c_i); it is
        changed in place and never sent.
        """
        load_state(model, global_state)
        to_device(model, ctx.device)
        broadcast = on_device(broadcast, ctx.device)
        self.on_round_start(ctx, model, broadcast, site_state)
        work_model = self.prepare_model(model, ctx)
        work_model.train()
        optimizer = self.make_optimizer(work_model, ctx.settings)
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
        model = self.finish_model(work_model, ctx)
        extras = self.client_extras(ctx, start_state, model, steps, site_state)
        extras.setdefault("steps", torch.tensor(float(steps)))
        extras.setdefault("loss", torch.tensor(loss_sum / max(steps, 1)))
        # what crosses the wire is on the CPU whatever the site's device (a no-op on CPU)
        return ClientUpdate(state=cpu_state(float_state(model)), num_samples=num_examples(ctx.loader),
                            extras=cpu_state(extras))


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
