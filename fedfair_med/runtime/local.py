"""In-process federation: every site in one process, for fast research sweeps.

It holds one model and, per site, only that site's private state (e.g. SCAFFOLD's c_i) — not K
models with optimisers. Each round follows the same protocol as the OpenFL runtime: optional
statistics pass, local training at each site from the broadcast, server aggregation, evaluation
at each site from which only summaries are combined. Same configuration and seed ⇒ bit-identical
metrics on the same machine.

When every site has a validation split, each round record also carries ``val``: the same
summary (metric, sites, groups, gaps) on the val splits, for model selection without the test
set. The test keys are unchanged by it.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pandas as pd
import torch

from fedfair_med.algorithms.base import StateDict, float_state, load_state
from fedfair_med.config import RunConfig
from fedfair_med.contracts import CLASSIFICATION
from fedfair_med.runtime.interrupts import interrupts_recorded, raise_if_interrupted
from fedfair_med.runtime.malloc_tuning import keep_freed_memory
from fedfair_med.runtime.rundir import RunDirectory, round_record, write_reports
from fedfair_med.runtime.setup import RunSetup, derive_seed
from fedfair_med.runtime.site import SiteRunner


class Progress(Protocol):
    """Callbacks of a run; ``evaluation_started``/``evaluated`` are optional (evaluation of the
    test and val splits can take longer than training, so it must show progress too)."""

    def round_started(self, round_index: int, total_rounds: int, total_steps: int) -> None: ...
    def advance(self, steps: int) -> None: ...
    def round_finished(self, round_index: int, record: dict[str, Any]) -> None: ...


class _Silent:
    def round_started(self, round_index: int, total_rounds: int, total_steps: int) -> None:
        pass

    def advance(self, steps: int) -> None:
        pass

    def round_finished(self, round_index: int, record: dict[str, Any]) -> None:
        pass


def evaluates(round_index: int, rounds: int, eval_every: int) -> bool:
    """Evaluate every ``eval_every`` rounds and always in the last (reports read the last)."""
    return round_index == rounds or round_index % eval_every == 0


@dataclass
class RunResult:
    """What a finished run hands back to the caller (also written to the run directory)."""

    path: Path
    final: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    predictions: pd.DataFrame | None = None
    state: StateDict | None = None


def warn_if_penalty_is_normalised_away(config: RunConfig, optimizer: str) -> None:
    """FlexFair-EA rescales each site's own loss; a local Adam step largely undoes that.

    Measured on the synthetic and MRI tasks (docs/methods.md, docs/results.md): with Adam the
    per-site Dice barely moves with λ, with SGD the EA gap narrows. Warn rather than refuse, since
    Adam may still be the better optimiser for a task.
    """
    if config.method == "flexfair" and config.criterion == "ea" and optimizer == "adam":
        warnings.warn(
            "flexfair with criterion 'ea' and the local 'adam' optimiser: Adam normalises each "
            "site's step, which largely cancels the per-site penalty weights; consider "
            "optimizer: sgd (see docs/methods.md)", UserWarning, stacklevel=3)


def warn_if_optimizer_is_replaced(config: RunConfig, required: str | None, optimizer: str) -> None:
    """FedNova and SCAFFOLD train with SGD whatever the run says, at the run's learning rate.

    A rate chosen for Adam (1e-3) then barely moves SGD, and the method looks useless. Sweeps
    refuse such an arm (experiments/plan.py); a single run warns, naming the fix.
    """
    if required and required != optimizer:
        warnings.warn(
            f"{config.method} trains with local {required}, not the configured {optimizer!r}, at lr "
            f"{config.lr if config.lr is not None else 'the task default'}; set optimizer: {required} "
            f"and a learning rate chosen for {required}", UserWarning, stacklevel=3)


def build_sites(setup: RunSetup) -> list[SiteRunner]:
    """One SiteRunner per site; the fairness attribute must exist in the sites' data."""
    config = setup.config
    options = {**config.data, "age_edges": config.data.get("age_edges", config.age_edges)}
    federation = setup.task.load_federation(seed=config.seed, **options)
    vocabulary = federation.group_vocabulary(config.attribute)
    if not vocabulary:
        raise ValueError(
            f"attribute {config.attribute!r} has no value in any site's data, so no sample would "
            f"belong to a fairness group; available attributes: {list(federation.attributes)}")
    attributes = tuple(config.attributes) if config.attributes is not None else federation.attributes
    return [SiteRunner(setup, site, k, vocabulary, attributes)
            for k, site in enumerate(federation.sites)]


def run_simulation(config: RunConfig, out_dir: str | Path, progress: Progress | None = None,
                   force: bool = False) -> RunResult:
    """Run ``config`` in one process and write its run directory to ``out_dir``.

    The directory appears only once the run is complete (see :mod:`~fedfair_med.runtime.rundir`);
    a run already there is replaced only with ``force`` (else ``RunExistsError`` before any work).
    """
    from fedfair_med.runtime.rundir import check_target, discard_staging

    config.validate()
    check_target(Path(out_dir), force)
    made: list[RunDirectory] = []
    try:
        with interrupts_recorded():
            result = _simulate(config, Path(out_dir), progress or _Silent(), force, made.append)
            raise_if_interrupted()  # a Ctrl-C swallowed by a side callback still stops the commit
    except Exception as err:  # failed: the rounds done so far are kept aside, visibly failed
        kept = made[0].keep_failed(err) if made else None
        discard_staging(Path(out_dir))
        err.kept_run = kept  # type: ignore[attr-defined]  # for the CLI's one-line message
        raise
    except BaseException:  # interrupted (Ctrl-C, kill): the staging directory goes, out_dir stays
        discard_staging(Path(out_dir))
        raise
    result.path = made[0].commit()
    return result


def _simulate(config: RunConfig, out_dir: Path, progress: Progress, force: bool,
              made: Any) -> RunResult:
    """The rounds, written into a staging RunDirectory handed to ``made`` as soon as it exists."""
    keep_freed_memory()  # model-sized copies every round reuse heap pages (runtime/malloc_tuning.py)
    setup = RunSetup.create(config)
    task, algorithm, ledger, rounds = setup.task, setup.algorithm, setup.ledger, setup.rounds
    sites = build_sites(setup)
    rundir = setup.run_directory(
        out_dir, sites=[s.name for s in sites], attributes=sites[0].attributes,
        device=str(sites[0].placement.device), precision=sites[0].placement.precision, force=force)
    made(rundir)
    warn_if_penalty_is_normalised_away(config, setup.resolved.settings.optimizer)
    warn_if_optimizer_is_replaced(config, algorithm.required_optimizer, setup.resolved.settings.optimizer)
    model = setup.build_model()
    global_state = float_state(model)
    server_state = algorithm.init_server_state(global_state, [s.name for s in sites])
    eval_every = int(getattr(config, "eval_every", 1) or 1)
    classification = task.kind == CLASSIFICATION
    history: list[dict[str, Any]] = []
    started = time.perf_counter()

    for r in range(1, rounds + 1):
        raise_if_interrupted()
        progress.round_started(r, rounds, sum(s.steps_per_round() for s in sites))
        if algorithm.wants_statistics(r, server_state):
            stats = {s.name: s.statistics(algorithm, model, global_state, r) for s in sites}
            server_state = algorithm.absorb_statistics(server_state, stats)
        # Streaming aggregation: each update is folded in (sorted by site name, as the OpenFL
        # aggregator does) and dropped, so memory does not grow with one model per site.
        aggregation = algorithm.start_aggregation(global_state, server_state)
        train_loss: dict[str, float] = {}
        for site in sorted(sites, key=lambda s: s.name):
            broadcast = algorithm.broadcast(server_state, site.name)
            update = site.train(algorithm, model, global_state, broadcast, r, progress=progress.advance)
            train_loss[site.name] = float(update.extras["loss"])
            aggregation.add(site.name, update)
            del update
            raise_if_interrupted()
        torch.manual_seed(derive_seed(config.seed, r, "server"))
        global_state, server_state = aggregation.result()
        del aggregation
        load_state(model, global_state)  # once: evaluation leaves the weights unchanged
        test = val = None
        if evaluates(r, rounds, eval_every):
            evaluations = _evaluate(sites, model, "test", progress, r)
            test = {k: v[1] for k, v in evaluations.items()}
            if all(s.val_set is not None for s in sites):
                val = {k: v[1] for k, v in _evaluate(sites, model, "val", progress, r).items()}
        record = round_record(
            r, elapsed_s=time.perf_counter() - started,
            train_loss={s.name: train_loss[s.name] for s in sites}, test=test, val=val,
            classification=classification,
            privacy=ledger.round_record(r, _dp_sgd_epsilon(sites)) if ledger.active else None)
        rundir.log_round(record)
        history.append(record)
        progress.round_finished(r, record)

    predictions = pd.concat([v[0] for v in evaluations.values()], ignore_index=True)
    rundir.save_predictions(predictions)
    rundir.save_model(global_state)
    if ledger.active:
        rundir.write_json("privacy.json", ledger.summary(rounds, _dp_sgd_epsilon(sites)))
    write_reports(rundir.staging, age_edges=tuple(config.age_edges))
    return RunResult(path=rundir.path, final=history[-1], history=history,
                     predictions=predictions, state=global_state)


def _evaluate(sites: list[SiteRunner], model: Any, split: str, progress: Progress,
              round_index: int) -> dict[str, Any]:
    """Each site's (predictions, summary) on ``split``, reporting progress site by site."""
    sizes = {s.name: len(s.test_set if split == "test" else s.val_set) for s in sites}
    started = getattr(progress, "evaluation_started", None)
    done = getattr(progress, "evaluated", None)
    if started is not None:
        started(round_index, split, sum(sizes.values()))
    out = {}
    for site in sites:
        out[site.name] = site.evaluate(model, None, split=split)
        if done is not None:
            done(sizes[site.name])
    return out


def _dp_sgd_epsilon(sites: list[SiteRunner]) -> dict[str, float]:
    """Each site's DP-SGD ε so far (empty when DP-SGD is off)."""
    return {s.name: s.dp_sgd.epsilon() for s in sites if s.dp_sgd is not None}
