"""What one hospital does in a round, identical in every runtime.

:class:`SiteRunner` owns one site's data and private state. The in-process runtime holds one per
site; an OpenFL collaborator holds exactly one. Both seed the same way (:func:`derive_seed`), so
the same configuration gives the same numbers wherever it runs.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import pandas as pd
import torch
from torch import nn

from fedfair_med.algorithms.base import Algorithm, load_state, move_batch, to_device
from fedfair_med.contracts import ClientState, ClientUpdate, SiteContext, StateDict
from fedfair_med.data.federation import GroupedDataset, SiteData, make_loader
from fedfair_med.data.prefetch import BackgroundBatches, prefetch_enabled
from fedfair_med.fairness.site_summaries import site_summary
from fedfair_med.fairness.criteria import Criterion
from fedfair_med.runtime.device import Placement, apply_determinism, placement
from fedfair_med.runtime.setup import RunSetup, derive_seed


class SiteRunner:
    """One site's training, statistics and evaluation; its data never leaves this object."""

    def __init__(self, setup: RunSetup, site: SiteData, site_index: int,
                 vocabulary: list[str], attributes: tuple[str, ...],
                 device: str | None = None) -> None:
        """``setup`` is the run's, resolved once per process (:mod:`~fedfair_med.runtime.setup`);
        ``device`` overrides the configuration's for this site (``collaborator start --device``)."""
        config = setup.config
        self.task, self.site, self.site_index, self.config = setup.task, site, site_index, config
        #: where this site computes; DeviceUnavailable (one line) when it cannot
        self.placement: Placement = placement(device or config.device, config.precision)
        apply_determinism(config.deterministic)
        self.criterion = Criterion(config.criterion, config.attribute)
        self.objective = self.task.objective(self.criterion, site=site.name)
        self.resolved = setup.resolved
        self.num_groups = len(vocabulary)
        self.attributes = attributes
        self.train_set = GroupedDataset(site.train, config.attribute, vocabulary)
        self.test_set = GroupedDataset(site.test, config.attribute, vocabulary)
        # Held-out split for model selection (sweeps); None when the site has none.
        self.val_set = (GroupedDataset(site.val, config.attribute, vocabulary)
                        if site.val is not None and len(site.val) > 0 else None)  # type: ignore[arg-type]
        #: this site's client-side memory (SCAFFOLD's c_i, FlexFair's own statistics, the round in
        #: progress), handed to the method in every SiteContext; the method instance holds none
        self.client_state = ClientState()
        # the kept memory as the latest round found it: an OpenFL round the aggregator asks for
        # again (it restarted after this site reported) must start from it, not from its result
        self._kept_at_start: tuple[int, StateDict] | None = None
        # DP-SGD's accountant stays at the site across rounds; None when DP-SGD is off.
        self.dp_sgd = None
        if config.privacy.get("dp_sgd"):
            from fedfair_med.privacy.dpsgd import SiteDPSGD
            from fedfair_med.privacy.settings import parse_privacy

            self.dp_sgd = SiteDPSGD(parse_privacy(config.privacy).dp_sgd)

    @property
    def name(self) -> str:
        return self.site.name

    def steps_per_round(self) -> int:
        per_epoch = -(-len(self.train_set) // self.resolved.batch_size)
        steps = per_epoch * self.resolved.settings.epochs
        cap = self.resolved.settings.max_steps
        return min(steps, cap) if cap else steps

    def _context(self, round_index: int, shuffle: bool) -> SiteContext:
        seed = derive_seed(self.config.seed, round_index, self.site_index)
        torch.manual_seed(seed)
        loader: Any = make_loader(self.train_set, self.resolved.batch_size, shuffle=shuffle, seed=seed,
                                  pin_memory=self.placement.is_cuda)
        if shuffle and self.dp_sgd is None and prefetch_enabled():  # Opacus needs the DataLoader
            loader = BackgroundBatches(loader)  # same batches, prepared on a spare core
        return SiteContext(site=self.name, site_index=self.site_index, loader=loader,
                           objective=self.objective,
                           settings=self.resolved.settings.for_round(round_index, self.resolved.rounds),
                           round=round_index, num_groups=self.num_groups,
                           device=self.placement.device, precision=self.placement.precision,
                           state=self.client_state)

    def statistics(self, algorithm: Algorithm, model: nn.Module, global_state: StateDict,
                   round_index: int) -> StateDict:
        """Forward-only aggregate statistics of the global model (fixed-size tensors)."""
        load_state(model, global_state)
        to_device(model, self.placement.device)
        model.eval()
        ctx = self._context(round_index, shuffle=False)
        if self.placement.is_cuda:  # methods' statistics loops read batches as they come
            ctx.loader = OnDevice(ctx.loader, self.placement.device)
        with torch.no_grad():  # full precision: a forward-only pass, and the statistics are shared
            stats = algorithm.client_statistics(ctx, model)
        return {k: v.cpu() for k, v in stats.items()}

    def train(self, algorithm: Algorithm, model: nn.Module, global_state: StateDict,
              broadcast: StateDict, round_index: int,
              progress: Callable[[int], None] | None = None) -> ClientUpdate:
        self._start_round_memory(round_index)
        ctx = self._context(round_index, shuffle=True)
        if self.dp_sgd is not None:
            ctx.private_training = self.dp_sgd.session(
                noise_seed=derive_seed(self.config.seed, round_index, self.site_index, "dp-sgd-noise"),
                sampling_seed=derive_seed(self.config.seed, round_index, self.site_index, "dp-sgd-batches"))
        return algorithm.client_update(ctx, model, global_state, broadcast, progress=progress)

    def _start_round_memory(self, round_index: int) -> None:
        """Snapshot the kept memory at a round's first training; on a repeat of that round, put
        the snapshot back, so SCAFFOLD's c_i, FlexFair's statistics or a kept optimiser state are
        not advanced twice and the redone round gives the same numbers."""
        kept = self.client_state.kept
        if self._kept_at_start is not None and self._kept_at_start[0] == round_index:
            kept.clear()
            kept.update(_copied(self._kept_at_start[1]))
        else:
            self._kept_at_start = (round_index, _copied(kept))

    def _split(self, split: str) -> GroupedDataset:
        if split == "test":
            return self.test_set
        if split == "val" and self.val_set is not None:
            return self.val_set
        raise ValueError(f"site {self.name!r} has no {split!r} split")

    def predict(self, model: nn.Module, global_state: StateDict | None,
                split: str = "test") -> pd.DataFrame:
        """Per-sample predictions on ``split`` — they stay at the site (only summaries travel).

        ``global_state=None`` means ``model`` already holds the weights to evaluate (a runtime
        evaluating many sites with one model loads it once per round).
        """
        if global_state is not None:
            load_state(model, global_state)
        device = self.placement.device
        to_device(model, device)
        model.eval()
        loader = make_loader(self._split(split), self.resolved.batch_size, shuffle=False, seed=0,
                             pin_memory=self.placement.is_cuda)
        rows: list[dict[str, Any]] = []
        with torch.no_grad():
            for batch in loader:
                batch = move_batch(batch, device)
                with self.placement.autocast():
                    logits = model(batch["image"])
                logits = self.task.site_logits(self.name, logits.float())  # float32 metrics
                metric = self.task.sample_metric(logits, batch).cpu()
                score = self.task.positive_probability(logits).to(torch.float64).cpu()
                y_true = self.task.positive_label(batch).to(torch.int64).cpu()
                for i in range(len(batch["id"])):
                    row = {"id": batch["id"][i], "site": self.name}
                    for a in self.attributes:
                        value = batch.get(a)
                        row[a] = _item(value[i]) if value is not None else ""
                    row.update(y_true=int(y_true[i]), score=float(score[i]),
                               y_pred=int(score[i] >= 0.5), metric=float(metric[i]))
                    rows.append(row)
        return pd.DataFrame(rows)

    def evaluate(self, model: nn.Module, global_state: StateDict | None,
                 split: str = "test") -> tuple[pd.DataFrame, dict[str, Any]]:
        """Predictions (kept here) and their aggregate summary (the part that may travel)."""
        predictions = self.predict(model, global_state, split)
        return predictions, site_summary(predictions, self.summary_attributes)

    @property
    def summary_attributes(self) -> tuple[str, ...]:
        """Categorical attributes only: a group per raw age would be nearly a group per patient."""
        return ("site", *(a for a in self.attributes if a != "age"))


class OnDevice:
    """A loader whose batches arrive on ``device`` (pinned host memory copies asynchronously)."""

    def __init__(self, loader: Any, device: torch.device) -> None:
        self.loader, self.device = loader, device
        self.dataset = getattr(loader, "dataset", None)  # num_examples() reads it

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Any:
        for batch in self.loader:
            yield move_batch(batch, self.device)


def _item(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item()
    return value


def _copied(memory: StateDict) -> StateDict:
    """A copy of a site's kept memory that later in-place changes cannot reach."""
    return {k: (v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)) for k, v in memory.items()}
