"""The server's arithmetic: float64 weighted sums of state dicts and one round's aggregation.

:class:`Aggregation` is the one server path every runtime calls (see
:class:`~fedfair_med.algorithms.base.Algorithm`): ``algorithm.start_aggregation(global_state,
server_state)`` returns one, the runtime hands it each site's update with :meth:`Aggregation.add`
(in sorted site order) and takes ``(new_state, server_state)`` from :meth:`Aggregation.result`.
The default is FedAvg's streaming weighted average; a method changes a site's weight
(``site_weight``), subclasses :class:`Aggregation` to fold differently (FedNova, SCAFFOLD), or
subclasses :class:`CollectingAggregation` when its step needs the whole round first (FairFed).
"""

from __future__ import annotations

from typing import Iterator, Mapping, Protocol

import torch

from fedfair_med.contracts import ClientUpdate, StateDict

class ServerHooks(Protocol):
    """What an aggregation asks of its method (an :class:`~fedfair_med.algorithms.base.Algorithm`
    satisfies it); named here so this module needs nothing from the module that imports it."""

    def site_weight(self, site: str, update: ClientUpdate, server_state: StateDict) -> float: ...

    def update_server_state(self, server_state: StateDict, updates: Mapping[str, ClientUpdate],
                            weights: Mapping[str, float]) -> StateDict: ...


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
    with the number of sites. This default is FedAvg's weighted average with the method's
    ``site_weight`` (or ``fixed_weights``); methods with another server step subclass it
    (FedNova, SCAFFOLD: :meth:`fold`, :meth:`kept_extras`, :meth:`new_model`,
    :meth:`next_server_state`) or collect first (:class:`CollectingAggregation`).
    """

    def __init__(self, algorithm: ServerHooks, global_state: StateDict, server_state: StateDict,
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
    """For a server step that needs every update of the round at once (FairFed's weights need
    every site's statistics): :meth:`add` keeps the updates; :meth:`result` calls :meth:`settle`
    with all of them — where a subclass may change the server state and fix the weights — and
    then folds them in sorted site order exactly as the streaming :class:`Aggregation` does.

    The server holds one model per site until the round ends; a method that can stream should.
    """

    def __init__(self, algorithm: ServerHooks, global_state: StateDict, server_state: StateDict) -> None:
        super().__init__(algorithm, global_state, server_state)
        self.updates: dict[str, ClientUpdate] = {}

    def add(self, site: str, update: ClientUpdate) -> None:
        if site in self.updates:
            raise ValueError(f"aggregation: site {site!r} sent two updates in one round")
        self.updates[site] = update

    def settle(self, updates: Mapping[str, ClientUpdate]) -> None:
        """Look at the whole round before folding: set ``self.server_state`` and
        ``self.fixed_weights`` here (default: nothing)."""

    def result(self) -> tuple[StateDict, StateDict]:
        if not self.updates:
            raise ValueError("aggregation: no site update was received this round")
        self.settle(self.updates)
        for site in sorted(self.updates):
            super().add(site, self.updates[site])
        self.updates = {}
        return super().result()
