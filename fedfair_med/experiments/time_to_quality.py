"""The time-to-quality benchmark's committed result, as a section of the results page.

``benchmarks/time_to_quality.py --out results/benchmarks`` writes ``time_to_quality.json`` (issue
16, item 7): how long federated FedAvg takes to reach a fraction of the pooled loop's best
validation metric, against the pooled loop, and FlexFair against FedAvg, on one machine in one
run. That run takes about 20 minutes, so its JSON is committed and the page's table is made
from it by ``fedfair-med results render`` (:func:`time_to_quality_markdown`), never by hand.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

#: Where, under a results root, the benchmark's JSON is committed.
BENCHMARKS_FOLDER = "benchmarks"
RESULT_FILE = "time_to_quality.json"

SIDES = (("pooled", "pooled plain loop"), ("fedavg", "FedAvg"), ("flexfair", "FlexFair"))


def result_path(root: Path) -> Path:
    return Path(root) / BENCHMARKS_FOLDER / RESULT_FILE


def _seconds(value: Any) -> str:
    return "not reached" if value is None else f"{float(value):.0f}"


def _ratio_cell(result: Mapping[str, Any], key: str, reference: str) -> tuple[str, str]:
    """The ratio with what it is relative to, and the goal with whether it was met."""
    ratio = result.get(key)
    goal = (result.get("targets") or {}).get(key)
    met = (result.get("meets_target") or {}).get(key)
    ratio_text = "" if ratio is None else f"{float(ratio):.2f} × {reference}"
    if goal is None:
        return ratio_text, ""
    verdict = "met" if met else "**not met**"
    return ratio_text, f"≤ {float(goal):g}: {verdict}"


def _recipe_line(result: Mapping[str, Any]) -> str:
    sites = result.get("sites") or {}
    size = result.get("image_size")
    kwargs = result.get("network_kwargs") or {}
    flexfair = result.get("flexfair_params") or {}
    budgets = result.get("budgets") or {}
    parts = [
        f"task `{result.get('task')}`",
        "training images " + " + ".join(f"{name} {n}" for name, n in sites.items()),
        f"network `{result.get('network')}`" + (f" {json.dumps(kwargs, sort_keys=True)}" if kwargs else ""),
        "image " + ("×".join(str(v) for v in size) if isinstance(size, (list, tuple)) else str(size)),
        f"{result.get('optimizer')} lr {result.get('lr')}, batch {result.get('batch_size')}",
        f"{result.get('local_epochs')} local epochs a round ({result.get('steps_per_round')} steps)",
        f"pooled loop evaluated every {result.get('pooled_eval_every_steps')} steps",
        "FlexFair " + (", ".join(f"{k} {v}" for k, v in sorted(flexfair.items())) or "at its defaults"),
        f"budgets {budgets.get('pooled_train_s')} s pooled, {budgets.get('federated_train_s')} s "
        f"per federated run (at most {budgets.get('federated_rounds')} rounds)",
    ]
    return "; ".join(parts)


def time_to_quality_markdown(path: Path, where: str) -> str:
    """The measured table: each side's best validation metric and training seconds to the
    target, the two ratios against their goals, and the machine, commit and command."""
    payload = json.loads(Path(path).read_text())
    machine = payload.get("machine") or {}
    lines = ["### Time to quality (issue 16, item 7)", "",
             f"Generated from `{where}` (one run; curves in that file). Each side's time is its "
             f"cumulative training time, evaluation excluded, at its first evaluation reaching "
             f"the target.", ""]
    if payload.get("quick"):
        lines += ["**A `--quick` run (tiny budgets): not a measurement of the goals.**", ""]
    for result in payload.get("results") or []:
        metric = str(result.get("metric", "metric"))
        label = "Dice" if metric == "dice" else metric
        target = (f"{float(result['fraction']):g} × {float(result['pooled_best']):.3f} = "
                  f"{float(result['threshold']):.3f}")
        lines += [f"Measured {machine.get('date_utc', '?')} on {machine.get('nproc', '?')} cores "
                  f"({machine.get('cpu_model', '?')}, {machine.get('torch_threads', '?')} torch "
                  f"threads), commit {machine.get('git_commit', '?')}; load average "
                  f"{machine.get('load_average_at_start', '?')} at the start, "
                  f"{payload.get('load_average_at_end', '?')} at the end; "
                  f"`{machine.get('command', '?')}`.", "",
                  f"Recipe: {_recipe_line(result)}.", "",
                  f"| side | best val {label} | training s to {target} | ratio | goal |",
                  "|---|---:|---:|---:|---|"]
        best = result.get("best") or {}
        times = result.get("time_to_threshold_s") or {}
        cells = {"pooled": ("", ""),
                 "fedavg": _ratio_cell(result, "federated_over_pooled", "pooled"),
                 "flexfair": _ratio_cell(result, "flexfair_over_fedavg", "FedAvg")}
        for side, name in SIDES:
            if side not in best:
                continue
            ratio, goal = cells[side]
            lines.append(f"| {name} | {float(best[side]):.3f} | {_seconds(times.get(side))} "
                         f"| {ratio} | {goal} |")
        lines.append("")
    return "\n".join(lines) + "\n"
