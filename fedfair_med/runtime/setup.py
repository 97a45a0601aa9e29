"""One run set-up for every runtime: the configuration resolved once, and what is built from it.

The in-process runtime, the OpenFL aggregator (its aggregation function and its run directory)
and every OpenFL collaborator start from :meth:`RunSetup.create`: the task, the configuration
with the task's defaults filled in (:class:`Resolved`), the method with its privacy wired in, the
privacy ledger, and the seeded round-0 model. Because they share this code, a site in a
federation trains with exactly the settings, method parameters and noise the simulation uses,
and both runtimes write the same resolved run facts (:meth:`RunSetup.facts`) into ``run.yaml``.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from fedfair_med.algorithms import REGISTRY, build_algorithm
from fedfair_med.algorithms.base import Algorithm
from fedfair_med.config import RunConfig, normalise_precision
from fedfair_med.contracts import LocalSettings
from fedfair_med.privacy.settings import PrivacyLedger
from fedfair_med.runtime.rundir import RunDirectory
from fedfair_med.tasks import build_task
from fedfair_med.tasks.base import Task


def derive_seed(*parts: Any) -> int:
    """A stable 63-bit seed from any parts (Python's hash() is salted per process)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class Resolved:
    """A configuration with the task's defaults filled in."""

    rounds: int
    batch_size: int
    settings: LocalSettings


def resolve(config: RunConfig, task: Task) -> Resolved:
    d = task.defaults
    settings = LocalSettings(
        epochs=config.epochs or d.epochs,
        lr=float(config.lr or d.lr),
        optimizer=config.optimizer or d.optimizer,
        momentum=d.momentum if config.momentum is None else config.momentum,
        max_steps=config.max_steps,
        lr_final=None if config.lr_final is None else float(config.lr_final),
        optimizer_state=config.optimizer_state,
    )
    return Resolved(rounds=config.rounds or d.rounds, batch_size=config.batch_size or d.batch_size,
                    settings=settings)


def method_params(config: RunConfig, algorithm_cls: type[Algorithm]) -> dict[str, Any]:
    """The method's parameters, with the run's criterion filled in where the method takes it."""
    params = dict(config.method_params)
    defaults = algorithm_cls.param_defaults()
    if "criterion" in defaults and "criterion" not in params:
        params["criterion"] = config.criterion
    return params


def build_run_algorithm(config: RunConfig, rounds: int) -> tuple[Algorithm, PrivacyLedger]:
    """The run's method with its privacy wired in, as every runtime needs it.

    A site noises its shared statistics with exactly the σ and seeded stream that the simulation
    uses, and the server clamps the pooled noisy statistics the same way.
    """
    algorithm = build_algorithm(config.method, **method_params(config, REGISTRY[config.method]))
    ledger = PrivacyLedger.from_option(config.privacy, rounds=rounds, seed=config.seed)
    if ledger.statistics is not None:  # noise the group statistics before they leave each site
        algorithm.statistics_privacy = ledger.statistics  # type: ignore[attr-defined]
    return algorithm, ledger


def build_global_model(config: RunConfig, task: Task) -> nn.Module:
    """The round-0 model: seeded so every runtime starts from the same weights.

    With DP-SGD on, BatchNorm becomes GroupNorm here (or the network is refused), so every site
    and the server share the architecture Opacus can train.
    """
    task.apply_model_options(config.data)  # e.g. extra input planes, also where no data is loaded
    torch.manual_seed(derive_seed(config.seed, "init"))
    model = task.build_model(config.network, **config.network_kwargs)
    if config.privacy.get("dp_sgd"):
        from fedfair_med.privacy.dpsgd import make_dp_compatible

        model = make_dp_compatible(model)
    return model


@dataclass
class RunSetup:
    """A run's configuration resolved once, with the task, method and privacy ledger built from it.

    Each process builds one (the simulation; in a federation the aggregator and each
    collaborator) and hands it to what needs it — :class:`~fedfair_med.runtime.site.SiteRunner`
    takes it instead of resolving the configuration again.
    """

    config: RunConfig
    task: Task
    resolved: Resolved
    algorithm: Algorithm
    ledger: PrivacyLedger

    @classmethod
    def create(cls, config: RunConfig, task: Task | None = None) -> "RunSetup":
        """``task``: an already configured task of ``config.task`` (a model audit's), else built."""
        task = build_task(config.task) if task is None else task
        resolved = resolve(config, task)
        algorithm, ledger = build_run_algorithm(config, resolved.rounds)
        return cls(config=config, task=task, resolved=resolved, algorithm=algorithm, ledger=ledger)

    @property
    def rounds(self) -> int:
        return self.resolved.rounds

    def build_model(self) -> nn.Module:
        """A fresh round-0 model (seeded: the same weights every call, in every process)."""
        return build_global_model(self.config, self.task)

    def run_directory(self, path: Path, *, sites: Sequence[str], attributes: Sequence[str],
                      device: str, precision: str | None = None, force: bool = False) -> RunDirectory:
        """The run's (staging) directory, its ``run.yaml`` holding this set-up's resolved facts."""
        return RunDirectory(path, self.config, force=force, **self.facts(
            sites=sites, attributes=attributes, device=device, precision=precision))

    def facts(self, *, sites: Sequence[str], attributes: Sequence[str], device: str,
              precision: str | None = None) -> dict[str, Any]:
        """The ``resolved`` section of ``run.yaml``: what the configuration left to the task.

        ``device`` is where the run computed (a federation's aggregator writes the plan's
        setting; each site records its own device in its ``device.json``).
        """
        return {
            "kind": self.task.kind, "primary_metric": self.task.primary_metric,
            "attributes": list(attributes), "sites": list(sites),
            "rounds": self.resolved.rounds, "batch_size": self.resolved.batch_size,
            "local": asdict(self.resolved.settings),
            "device": str(device),
            "precision": normalise_precision(self.config.precision) if precision is None else precision,
        }
