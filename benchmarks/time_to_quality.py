"""Time to quality: how much longer does a federation take to reach a pooled model's quality?

One run, one machine, three trainings in turn from the same initial weights:

1. **pooled** — a plain PyTorch loop over every site's training data in one shuffled loader
   (the task's network, loss, image size, batch size and optimiser settings, one optimiser for
   the whole run), evaluated on the pooled validation split every ``--eval-every-steps`` steps
   (default: the steps of one federated round) for ``--pooled-budget-s`` seconds of training;
2. **FedAvg** — the in-process runtime (:func:`run_simulation`), evaluated every round, for at
   most ``--rounds`` rounds or ``--federated-budget-s`` seconds of training;
3. **FlexFair** — the same with ``--method-params`` (default: FlexFair's defaults).

The target is relative: ``--fraction`` (0.95) × the best validation Dice the pooled loop reached
within its budget. Each side's time to quality is its cumulative **training** time (evaluation
excluded on both sides, so the federation is not charged for evaluating test and validation
every round) at the first evaluation at or above the target, read from the per-round (per
evaluation) timestamps. Reported: FedAvg ÷ pooled (goal ≤ 1.5) and FlexFair ÷ FedAvg (goal
≤ 1.1), with the whole curves, the wall clock including evaluation, and the machine's load
before and after. A side that never reaches the target within its budget gives no ratio.

    python benchmarks/time_to_quality.py                       # fundus from ../shared/data
    python benchmarks/time_to_quality.py --config configs/study/fundus.yaml  # its base recipe
    python benchmarks/time_to_quality.py --quick               # synthetic, seconds; checks the script
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import _common as bench

TARGET_FEDERATED = 1.5  # FedAvg time ÷ pooled time
TARGET_FLEXFAIR = 1.1  # FlexFair time ÷ FedAvg time


# ---- the measurement read from a curve (pure) -------------------------------------------------
def time_to_threshold(times: Sequence[float], values: Sequence[float],
                      threshold: float) -> float | None:
    """The time of the first evaluation whose value is at or above ``threshold``; None if none.

    ``times`` are cumulative (training) seconds at each evaluation, in order; NaN values never
    count. No interpolation: quality is only known where it was measured.
    """
    if len(times) != len(values):
        raise ValueError(f"{len(times)} times but {len(values)} values")
    for t, v in zip(times, values):
        if v is not None and math.isfinite(v) and v >= threshold:
            return float(t)
    return None


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator ÷ denominator, None when either side never reached the target."""
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


# ---- the three sides ----------------------------------------------------------------------------
def pooled_val_metric(sites: Sequence[Any], model: Any, split: str) -> float:
    """Mean per-sample metric over every site's ``split`` (the runtime's pooled metric), scored
    by each site's own evaluation loop."""
    import pandas as pd

    frames = [site.predict(model, None, split=split) for site in sites]
    return float(pd.concat(frames, ignore_index=True)["metric"].mean())


class PooledLoop:
    """All sites' training data in one loader, one model, one optimiser: no federation."""

    def __init__(self, rounds: bench.FederatedRounds) -> None:
        import copy

        import torch
        from torch.utils.data import ConcatDataset, DataLoader

        runner = rounds.sites[0]
        settings, batch_size = runner.resolved.settings, runner.resolved.batch_size
        self.sites = rounds.sites
        self.model = copy.deepcopy(rounds.model)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if settings.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum,
                                             weight_decay=settings.weight_decay)
        else:
            self.optimizer = torch.optim.Adam(params, lr=settings.lr,
                                              weight_decay=settings.weight_decay)
        data = ConcatDataset([s.site.train for s in rounds.sites])
        self.loader = DataLoader(data, batch_size=batch_size, shuffle=True,
                                 generator=torch.Generator().manual_seed(rounds.config.seed))
        self.loss = rounds.task.task_loss
        self.samples = len(data)
        self.optimizer_name = settings.optimizer

    def run(self, budget_s: float, eval_every: int, split: str) -> dict[str, Any]:
        """Train for ``budget_s`` seconds of training time; evaluate every ``eval_every`` steps."""
        curve: dict[str, list[float]] = {"step": [], "train_s": [], "wall_s": [], "metric": []}
        trained, steps, started = 0.0, 0, time.perf_counter()
        while trained < budget_s:
            for batch in self.loader:
                self.model.train()
                tick = time.perf_counter()
                self.optimizer.zero_grad(set_to_none=True)
                loss = self.loss(self.model(batch["image"]), batch)
                loss.backward()
                self.optimizer.step()
                trained += time.perf_counter() - tick
                steps += 1
                if steps % eval_every == 0 or trained >= budget_s:
                    curve["step"].append(steps)
                    curve["train_s"].append(round(trained, 3))
                    curve["metric"].append(pooled_val_metric(self.sites, self.model, split))
                    curve["wall_s"].append(round(time.perf_counter() - started, 3))
                if trained >= budget_s:
                    break
        return curve


class _BudgetReached(Exception):
    """Stops a federated run once it has trained for its time budget."""


class RoundClock:
    """Progress hooks of the in-process runtime: training time per round, evaluation excluded.

    A round's training ends where its first evaluation starts (or where the round is recorded,
    on a round without evaluation).
    """

    def __init__(self, budget_s: float, split: str) -> None:
        self.budget_s, self.split = budget_s, split
        self.curve: dict[str, list[float]] = {"round": [], "train_s": [], "wall_s": [], "metric": []}
        self.trained = 0.0
        self._round_start = self._train_end = None
        self._started = time.perf_counter()

    def round_started(self, round_index: int, total_rounds: int, total_steps: int) -> None:
        self._round_start, self._train_end = time.perf_counter(), None

    def advance(self, steps: int) -> None:
        pass

    def evaluation_started(self, round_index: int, split: str, samples: int) -> None:
        if self._train_end is None:
            self._train_end = time.perf_counter()

    def evaluated(self, samples: int) -> None:
        pass

    def round_finished(self, round_index: int, record: dict[str, Any]) -> None:
        end = self._train_end if self._train_end is not None else time.perf_counter()
        self.trained += end - self._round_start
        evaluation = record.get("val") if self.split == "val" else record
        metric = (evaluation or {}).get("metric")
        if metric is not None:
            self.curve["round"].append(round_index)
            self.curve["train_s"].append(round(self.trained, 3))
            self.curve["wall_s"].append(round(time.perf_counter() - self._started, 3))
            self.curve["metric"].append(float(metric))
        if self.trained >= self.budget_s:
            raise _BudgetReached


def federated_curve(config: Any, budget_s: float, split: str) -> dict[str, Any]:
    from fedfair_med.runtime.local import run_simulation

    clock = RoundClock(budget_s, split)
    with tempfile.TemporaryDirectory(prefix="ttq-") as tmp:
        try:
            run_simulation(config, Path(tmp) / "run", progress=clock)
        except _BudgetReached:
            pass
    return clock.curve


# ---- the benchmark --------------------------------------------------------------------------------
def _base_config(args: Any) -> dict[str, Any]:
    """The run configuration both federated sides share (before method and rounds)."""
    import yaml

    if args.config is not None:
        raw = yaml.safe_load(Path(args.config).read_text()) or {}
        base = dict(raw.get("base", raw))  # a sweep file's base, or a run configuration
        for key in ("name", "method", "method_params", "seed", "rounds", "eval_every"):
            base.pop(key, None)
        return base
    if args.quick:
        return {"task": "synthetic-seg", "data": {"scale": 0.25}}
    return {"task": args.task, "data": {"manifests": bench.manifests(args.task, args.limit, args.data)}}


def measure(args: Any) -> dict[str, Any]:
    from fedfair_med.config import load_config

    base = _base_config(args)
    fedavg_config = load_config({**base, "method": "fedavg", "rounds": args.rounds,
                                 "eval_every": 1, "seed": args.seed, "name": "ttq-fedavg"})
    flexfair_config = load_config({**base, "method": "flexfair", "method_params": args.method_params,
                                   "rounds": args.rounds, "eval_every": 1, "seed": args.seed,
                                   "name": "ttq-flexfair"})
    rounds = bench.FederatedRounds(fedavg_config)  # the sites, the task and the initial weights
    split = "val" if all(s.val_set is not None for s in rounds.sites) else "test"
    steps_per_round = sum(s.steps_per_round() for s in rounds.sites)
    eval_every = args.eval_every_steps or steps_per_round
    pooled = PooledLoop(rounds)
    pooled_curve = pooled.run(args.pooled_budget_s, eval_every, split)
    best = max(pooled_curve["metric"])
    threshold = args.fraction * best
    sides = {"pooled": pooled_curve,
             "fedavg": federated_curve(fedavg_config, args.federated_budget_s, split),
             "flexfair": federated_curve(flexfair_config, args.federated_budget_s, split)}
    reached = {name: time_to_threshold(curve["train_s"], curve["metric"], threshold)
               for name, curve in sides.items()}
    federated_ratio = ratio(reached["fedavg"], reached["pooled"])
    flexfair_ratio = ratio(reached["flexfair"], reached["fedavg"])
    runner = rounds.sites[0]
    return {
        "task": fedavg_config.task,
        "sites": {s.name: len(s.train_set) for s in rounds.sites},
        "samples": pooled.samples,
        "network": fedavg_config.network or rounds.task.defaults.network,
        "network_kwargs": dict(fedavg_config.network_kwargs or {}),
        "image_size": list(getattr(rounds.task, "image_size", rounds.task.defaults.image_size)),
        "batch_size": runner.resolved.batch_size,
        "optimizer": pooled.optimizer_name,
        "lr": runner.resolved.settings.lr,
        "local_epochs": runner.resolved.settings.epochs,
        "steps_per_round": steps_per_round,
        "pooled_eval_every_steps": eval_every,
        "split": split,
        "metric": rounds.task.primary_metric,
        "flexfair_params": dict(args.method_params),
        "budgets": {"pooled_train_s": args.pooled_budget_s, "federated_rounds": args.rounds,
                    "federated_train_s": args.federated_budget_s},
        "pooled_best": best,
        "fraction": args.fraction,
        "threshold": threshold,
        "time_to_threshold_s": reached,  # cumulative training seconds; None = not reached
        "best": {name: max(curve["metric"]) if curve["metric"] else None
                 for name, curve in sides.items()},
        "federated_over_pooled": federated_ratio,
        "flexfair_over_fedavg": flexfair_ratio,
        "targets": {"federated_over_pooled": TARGET_FEDERATED,
                    "flexfair_over_fedavg": TARGET_FLEXFAIR},
        "meets_target": {
            "federated_over_pooled": None if federated_ratio is None else federated_ratio <= TARGET_FEDERATED,
            "flexfair_over_fedavg": None if flexfair_ratio is None else flexfair_ratio <= TARGET_FLEXFAIR},
        "curves": sides,
    }


def _params(text: str) -> dict[str, Any]:
    """'lam=1.0,weighting=uniform' → {'lam': 1.0, 'weighting': 'uniform'} (YAML scalars)."""
    import yaml

    out: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"--method-params: expected key=value, got {part!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


#: Where a full run's JSON goes by default: ``fedfair-med results render`` reads it from there.
COMMITTED_RESULTS = Path(__file__).resolve().parent.parent / "results" / "benchmarks"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = bench.parser(__doc__.splitlines()[0])
    p.add_argument("--task", default="fundus", help="real task whose shared data is imported")
    p.add_argument("--config", type=Path, default=None,
                   help="run configuration or sweep file whose base sets the recipe (task, "
                        "network, image size, optimiser, data); method, rounds and seed are set here")
    p.add_argument("--rounds", type=int, default=None, help="federated rounds at most")
    p.add_argument("--pooled-budget-s", type=float, default=None,
                   help="training seconds of the pooled loop")
    p.add_argument("--federated-budget-s", type=float, default=None,
                   help="training seconds of each federated run at most")
    p.add_argument("--eval-every-steps", type=int, default=None,
                   help="pooled loop: evaluate every N steps (default: one federated round's steps)")
    p.add_argument("--fraction", type=float, default=0.95,
                   help="target = FRACTION × the pooled loop's best validation metric")
    p.add_argument("--method-params", type=_params, default={},
                   help="FlexFair's parameters, e.g. lam=1.0,weighting=uniform")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(out=None)
    args = p.parse_args(argv)
    # a full result is committed with the studies' summaries (the results page is generated
    # from it); a --quick check measures nothing and stays with the other benchmarks' files
    args.out = args.out or (bench.RESULTS if args.quick else COMMITTED_RESULTS)
    bench.set_threads(args.threads)
    args.rounds = args.rounds or (30 if args.quick else 60)
    args.pooled_budget_s = args.pooled_budget_s or (2.0 if args.quick else 600.0)
    args.federated_budget_s = args.federated_budget_s or (2.0 if args.quick else 900.0)
    started, machine = time.perf_counter(), bench.machine(argv)  # load average before the runs
    result = measure(args)
    load_end = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    payload = {"benchmark": "time_to_quality", "quick": args.quick, "machine": machine,
               "load_average_at_end": load_end,
               "target": (f"FedAvg time / pooled time <= {TARGET_FEDERATED}; "
                          f"FlexFair time / FedAvg time <= {TARGET_FLEXFAIR}, to "
                          f"{args.fraction:g} x the pooled loop's best validation metric"),
               "results": [result], "wall_s": round(time.perf_counter() - started, 1)}
    path = bench.write_result("time_to_quality", payload, args.out)
    reached = result["time_to_threshold_s"]
    bench.print_table(
        f"Time to {args.fraction:g} × pooled best {result['metric']} "
        f"({result['pooled_best']:.3f} → target {result['threshold']:.3f}), training seconds",
        ["side", "best", "time to target s", "ratio", "goal"],
        [["pooled", result["best"]["pooled"], reached["pooled"] or "not reached", "", ""],
         ["fedavg", result["best"]["fedavg"], reached["fedavg"] or "not reached",
          result["federated_over_pooled"] or "n/a", f"≤ {TARGET_FEDERATED} × pooled"],
         ["flexfair", result["best"]["flexfair"], reached["flexfair"] or "not reached",
          result["flexfair_over_fedavg"] or "n/a", f"≤ {TARGET_FLEXFAIR} × FedAvg"]])
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main(sys.argv[1:])
