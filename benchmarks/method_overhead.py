"""Cost of each method: its in-process round ÷ FedAvg's round on the same task and data.

Every method runs its own federation (same data, same initial weights) one round at a time, in a
seeded shuffled order per repeat, so all methods share each stretch of machine speed; the
ratio to FedAvg is taken within a repeat. One untimed warm-up round per method first, so FlexFair
(carried statistics) has its coefficients and trains with the penalty, SCAFFOLD has non-zero
control variates and FairFed has its weights. Target: FlexFair ≤ 1.05 (its penalty is a
reduction over group risks already computed by the forward pass, not a second pass over data).
The others are reported with the reason a cost is expected: FairFed's forward-only statistics
pass of the global model, Fair Mixup's second forward/backward on the mixed batch, DynamicFL's
wider network during local training. FedNova and SCAFFOLD require SGD, so a FedAvg-with-SGD
row is given as their like-for-like reference.

    python benchmarks/method_overhead.py           # fundus + skin from ../shared/data
    python benchmarks/method_overhead.py --quick   # synthetic, seconds; checks the script only
"""

from __future__ import annotations

import sys
import time
from typing import Any

import _common as bench

TARGETS = {"flexfair": 1.05}

#: (row name, method, parameters, optimizer override, why a cost is expected)
METHODS: list[tuple[str, str, dict[str, Any], str | None, str]] = [
    ("fedavg", "fedavg", {}, None, "reference"),
    ("fedavg-sgd", "fedavg", {}, "sgd", "reference for the SGD-only methods"),
    ("flexfair", "flexfair", {"lam": 1.0}, None,
     "penalty = weighted sum of per-sample risks already computed; carried statistics"),
    ("flexfair-fresh", "flexfair", {"lam": 1.0, "statistics": "fresh"}, None,
     "by design: forward-only statistics pass of the global model each round"),
    ("fedprox", "fedprox", {"mu": 0.01}, None, "one axpy per parameter per step"),
    ("fednova", "fednova", {}, None, "SGD (compare with fedavg-sgd); server normalisation"),
    ("scaffold", "scaffold", {}, None, "SGD (compare with fedavg-sgd); gradient correction per step"),
    ("fairfed", "fairfed", {}, None, "by design: forward-only statistics pass of the global model"),
    ("fairmixup", "fairmixup", {"attribute": "sex"}, None,
     "by design: second forward + backward on the mixed batch"),
    ("dynamicfl-c1", "dynamicfl", {"capacity": 1}, None,
     "by design: one extra conv branch per convolution while training"),
    ("dynamicfl-c2", "dynamicfl", {"capacity": 2}, None,
     "by design: two extra conv branches per convolution while training"),
]


def measure(task: str, args: Any) -> dict[str, Any]:
    from fedfair_med.tasks import build_task

    data = {"scale": 0.25} if task.startswith("synthetic") else {}
    base = bench.task_config(task, args.limit, args.data, method="fedavg", data=data)
    attributes = build_task(task).load_federation(seed=0, **base.data).attributes
    runners: dict[str, bench.FederatedRounds] = {}
    skipped: dict[str, str] = {}
    rows = {name: (method, params, optimizer, why) for name, method, params, optimizer, why in METHODS
            if args.methods is None or name in args.methods or name == "fedavg"}
    for name, (method, params, optimizer, why) in rows.items():
        if method == "fairmixup" and params["attribute"] not in attributes:
            skipped[name] = f"the {task} manifests carry no {params['attribute']!r} attribute"
            continue
        config = bench.task_config(task, args.limit, args.data, method=method, method_params=params,
                                   optimizer=optimizer, data=data)
        runners[name] = bench.FederatedRounds(config)
    runs = bench.interleave(runners, repeats=args.repeats, warmup=1, seed=1)
    results = []
    for name, runner in runners.items():
        method, _params, _optimizer, why = rows[name]
        ratio = runs.ratio(name, "fedavg")
        cpu_ratio = runs.ratio(name, "fedavg", clock="cpu")
        target = TARGETS.get(name)
        results.append({
            "row": name, "method": method, "params": rows[name][1],
            "optimizer": runner.algorithm.required_optimizer or runner.sites[0].resolved.settings.optimizer,
            "round_s": bench.spread(runs.times[name]), "round_cpu_s": bench.spread(runs.cpu[name]),
            "ratio_to_fedavg": ratio, "cpu_ratio_to_fedavg": cpu_ratio,
            "ratio_to_fedavg_sgd": runs.ratio(name, "fedavg-sgd") if "fedavg-sgd" in runners else None,
            "cpu_ratio_to_fedavg_sgd": (runs.ratio(name, "fedavg-sgd", clock="cpu")
                                        if "fedavg-sgd" in runners else None),
            "target": target, "meets_target": None if target is None else ratio["median"] <= target,
            "meets_target_cpu": None if target is None else cpu_ratio["median"] <= target,
            "expected_cost": why,
        })
    first = next(iter(runners.values()))
    return {
        "task": task, "sites": {s.name: len(s.train_set) for s in first.sites},
        "batch_size": first.sites[0].resolved.batch_size,
        "network": first.config.network or first.task.defaults.network,
        "methods": results, "skipped": skipped, "raw": runs.times, "raw_cpu": runs.cpu,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = bench.parser(__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=None)
    p.add_argument("--methods", nargs="+", default=None, help="row names (fedavg is always kept)")
    args = p.parse_args(argv)
    bench.set_threads(args.threads)
    args.repeats = args.repeats or (1 if args.quick else 5)
    tasks = args.tasks or (["synthetic-cls"] if args.quick else ["fundus", "skin"])
    started = time.perf_counter()
    results = [measure(t, args) for t in tasks]
    payload = {"benchmark": "method_overhead", "quick": args.quick, "machine": bench.machine(argv),
               "target": "flexfair round / fedavg round <= 1.05; the others reported",
               "results": results, "wall_s": round(time.perf_counter() - started, 1)}
    path = bench.write_result("method_overhead", payload, args.out)
    for r in results:
        bench.print_table(
            f"{r['task']}: round ÷ FedAvg round (median [p25–p75] of paired ratios)",
            ["method", "optim.", "round s", "÷ fedavg wall", "÷ fedavg CPU", "÷ fedavg-sgd CPU",
             "target (wall / CPU)"],
            [[m["row"], m["optimizer"], m["round_s"]["median"], bench.ratio_text(m["ratio_to_fedavg"]),
              bench.ratio_text(m["cpu_ratio_to_fedavg"]), bench.ratio_text(m["cpu_ratio_to_fedavg_sgd"] or {}),
              "" if m["target"] is None else f"≤ {m['target']}: "
              + bench.verdict(m["ratio_to_fedavg"]["median"], m["target"]) + " / "
              + bench.verdict(m["cpu_ratio_to_fedavg"]["median"], m["target"])] for m in r["methods"]]
            + [[name, "", "", "skipped", "", "", ""] for name in r["skipped"]])
        for name, why in r["skipped"].items():
            print(f"  {name} skipped: {why}")
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main(sys.argv[1:])
