"""Cost of federation: one in-process FedAvg epoch over all sites ÷ a plain PyTorch loop.

Both sides see the same samples (each site's MONAI training dataset, same transforms), the same
model architecture and initial weights, the same batch size, optimiser and loss. The federated
side is a real FedAvg round of the in-process runtime (broadcast, each site loads the global
weights and builds its optimiser, trains one epoch, returns a copy of its weights; the server
averages them). The plain side is the loop a researcher writes by hand: one model, one optimiser,
the same per-site loaders one after the other. Target: ratio ≤ 1.05.

    python benchmarks/epoch_overhead.py            # fundus + skin from ../shared/data
    python benchmarks/epoch_overhead.py --quick    # synthetic, seconds; checks the script only
"""

from __future__ import annotations

import copy
import sys
import time
from typing import Any

import _common as bench

TARGET = 1.05


class PlainLoop:
    """A hand-written PyTorch loop over the same per-site datasets (no federation)."""

    def __init__(self, rounds: bench.FederatedRounds) -> None:
        import torch
        from torch.utils.data import DataLoader

        runner = rounds.sites[0]
        settings, batch_size = runner.resolved.settings, runner.resolved.batch_size
        self.model = copy.deepcopy(rounds.model)
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        if settings.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum)
        else:
            self.optimizer = torch.optim.Adam(params, lr=settings.lr)
        generator = torch.Generator().manual_seed(0)
        self.loaders = [DataLoader(s.site.train, batch_size=batch_size, shuffle=True, generator=generator)
                        for s in rounds.sites]
        self.loss = rounds.task.task_loss
        self.samples = sum(len(s.site.train) for s in rounds.sites)

    def __call__(self) -> float:
        total = 0.0
        for loader in self.loaders:
            for batch in loader:
                self.optimizer.zero_grad(set_to_none=True)
                loss = self.loss(self.model(batch["image"]), batch)
                loss.backward()
                self.optimizer.step()
                total += loss.item()
        return total


def measure(task: str, args: Any) -> dict[str, Any]:
    data = {"scale": 0.25} if task.startswith("synthetic") else {}
    config = bench.task_config(task, args.limit, args.data, method="fedavg", data=data)
    federated = bench.FederatedRounds(config)
    plain = PlainLoop(federated)
    runs = bench.interleave({"federated": federated, "plain": plain}, repeats=args.repeats, warmup=1)
    ratio = runs.ratio("federated", "plain")
    cpu_ratio = runs.ratio("federated", "plain", clock="cpu")
    runner = federated.sites[0]
    return {
        "task": task,
        "sites": {s.name: len(s.train_set) for s in federated.sites},
        "samples": plain.samples,
        "network": config.network or federated.task.defaults.network,
        "image_size": list(getattr(federated.task, "image_size", federated.task.defaults.image_size)),
        "batch_size": runner.resolved.batch_size,
        "optimizer": runner.resolved.settings.optimizer,
        "model_bytes": bench.state_bytes(federated.global_state),
        "federated_s": bench.spread(runs.times["federated"]),
        "plain_s": bench.spread(runs.times["plain"]),
        "ratio": ratio,
        "cpu_ratio": cpu_ratio,
        "target": TARGET,
        "meets_target": ratio["median"] <= TARGET,
        "meets_target_cpu": cpu_ratio["median"] <= TARGET,
        "raw": runs.times,
        "raw_cpu": runs.cpu,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = bench.parser(__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=None)
    args = p.parse_args(argv)
    bench.set_threads(args.threads)
    args.repeats = args.repeats or (1 if args.quick else 9)
    tasks = args.tasks or (["synthetic-seg"] if args.quick else ["fundus", "skin"])
    started = time.perf_counter()
    results = [measure(t, args) for t in tasks]
    payload = {"benchmark": "epoch_overhead", "quick": args.quick, "machine": bench.machine(argv),
               "target": f"federated epoch / plain epoch <= {TARGET}", "results": results,
               "wall_s": round(time.perf_counter() - started, 1)}
    path = bench.write_result("epoch_overhead", payload, args.out)
    bench.print_table(
        "FedAvg epoch ÷ plain PyTorch epoch (median [p25–p75] of paired ratios)",
        ["task", "samples", "batch", "plain s", "federated s", "wall ratio", "CPU-time ratio",
         f"≤ {TARGET} (wall / CPU)"],
        [[r["task"], r["samples"], r["batch_size"], r["plain_s"]["median"], r["federated_s"]["median"],
          bench.ratio_text(r["ratio"]), bench.ratio_text(r["cpu_ratio"]),
          f'{bench.verdict(r["ratio"]["median"], TARGET)} / {bench.verdict(r["cpu_ratio"]["median"], TARGET)}']
         for r in results])
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main(sys.argv[1:])
