"""The GPU measurements of docs/performance.md ("GPU and mixed precision"), as one command.

1. **Parity**: the synthetic demo (FlexFair, 3 sites) and, with the shared data, a short fundus
   run on ``cpu`` and on ``cuda`` (float32, and bf16 on the GPU); final metric and per-site
   metrics side by side, with the largest difference against the stated tolerance.
2. **Throughput**: training images per second (forward, backward, optimiser step; random inputs
   already on the GPU, so the loader is not measured) for the fundus UNet at the task's image
   size, SANet at 352 × 352 and ResNet-50 at 224 × 224, in float32 and bf16; GPU utilisation is
   sampled while each runs.

    python benchmarks/gpu.py            # a few minutes on a GPU; writes results/gpu.json
    python benchmarks/gpu.py --quick    # seconds: tiny settings, checks the script only

Without CUDA it prints one line saying so and exits 0, writing nothing.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import _common as bench

#: largest |metric(cuda) − metric(cpu)| accepted on the parity runs (Dice or accuracy)
PARITY_TOLERANCE = 0.02
#: (row, network, builder kwargs, image side, batch size, output channels)
MODELS = (
    ("fundus unet", "unet", {"channels": (16, 32, 64, 128)}, None, 16, 1),
    ("sanet 352", "sanet", {}, 352, 16, 1),
    ("resnet50 224", "resnet50", {}, 224, 64, 2),
)


def skip_reason() -> str | None:
    import torch

    if not torch.cuda.is_available():
        cuda = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA build"
        return f"gpu benchmark skipped: CUDA is not available here (torch {torch.__version__}, {cuda})"
    return None


class Utilisation:
    """GPU utilisation (%) sampled every 0.2 s in a thread: torch (pynvml) or nvidia-smi."""

    def __init__(self, index: int = 0) -> None:
        self.index, self.samples = index, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> float | None:
        import torch

        try:
            return float(torch.cuda.utilization(self.index))
        except Exception:  # no pynvml: ask nvidia-smi
            try:
                out = subprocess.run(
                    ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                     f"--id={self.index}"], capture_output=True, text=True, timeout=5).stdout
                return float(out.strip().splitlines()[0])
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                return None

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            value = self._sample()
            if value is not None:
                self.samples.append(value)

    def __enter__(self) -> "Utilisation":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict[str, Any]:
        return bench.spread(self.samples) if self.samples else {"n": 0}


def throughput(network: str, kwargs: dict[str, Any], side: int, batch: int, out: int,
               precision: str, seconds: float, device: str = "cuda") -> dict[str, Any]:
    """Training images/s of one network at one precision (the shared loop's autocast).

    ``device`` is ``cuda`` here; the tests pass ``cpu`` to check the code without a GPU."""
    import torch

    from fedfair_med.algorithms.base import local_precision
    from fedfair_med.contracts import SiteContext
    from fedfair_med.models import build_network

    device = torch.device(device)
    gpu = device.type == "cuda"

    def sync() -> None:
        if gpu:
            torch.cuda.synchronize(device)

    torch.manual_seed(0)
    model = build_network(network, in_channels=3, out_channels=out, **kwargs).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    images = torch.rand(batch, 3, side, side, device=device)
    ctx = SiteContext("bench", 0, [], None, None, 1, 1, device=device, precision=precision)  # type: ignore[arg-type]
    autocast, _ = local_precision(ctx)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            logits = model(images)
        loss = logits.float().square().mean()
        loss.backward()
        optimizer.step()

    for _ in range(3):  # warm-up: cuDNN picks its kernels, the allocator fills
        step()
    sync()
    if gpu:
        torch.cuda.reset_peak_memory_stats(device)
    steps, started = 0, time.perf_counter()
    util = Utilisation(device.index or 0) if gpu else None
    if util is not None:
        util.__enter__()
    try:
        while time.perf_counter() - started < seconds or steps < 3:
            step()
            steps += 1
            if steps % 5 == 0:
                sync()
        sync()
    finally:
        if util is not None:
            util.__exit__()
    elapsed = time.perf_counter() - started
    return {"precision": precision, "batch": batch, "side": side, "steps": steps,
            "seconds": round(elapsed, 3), "images_per_s": steps * batch / elapsed,
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if gpu else None,
            "gpu_utilisation_pct": util.summary() if util is not None else {"n": 0}}


def parity(label: str, make_config: Callable[..., Any], out: Path, gpu: str = "cuda") -> dict[str, Any]:
    """The same run on cpu, on cuda and on cuda with bf16: metrics and the largest differences.

    (``gpu="cpu"`` lets the tests run this without a GPU: then every row is the CPU's.)"""
    from fedfair_med.runtime.local import run_simulation

    runs: dict[str, Any] = {}
    for name, fields in (("cpu", {"device": "cpu"}), ("cuda", {"device": gpu}),
                         ("cuda-bf16", {"device": gpu, "precision": "bf16"})):
        started = time.perf_counter()
        out.mkdir(parents=True, exist_ok=True)
        target = Path(tempfile.mkdtemp(prefix=f"{label}-{name}-", dir=out)) / "run"  # always new
        result = run_simulation(make_config(**fields), target)
        runs[name] = {"seconds": round(time.perf_counter() - started, 2),
                      "metric": result.final["metric"],
                      "sites": {s: v["metric"] for s, v in result.final["sites"].items()}}
    reference = runs["cpu"]
    for name in ("cuda", "cuda-bf16"):
        diffs = [abs(runs[name]["metric"] - reference["metric"])]
        diffs += [abs(runs[name]["sites"][s] - m) for s, m in reference["sites"].items()]
        runs[name]["max_abs_diff_to_cpu"] = max(diffs)
        runs[name]["within_tolerance"] = max(diffs) <= PARITY_TOLERANCE
    return {"run": label, "tolerance": PARITY_TOLERANCE, **runs}


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    p = bench.parser(__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=None, help="timed seconds per model and precision")
    args = p.parse_args(argv)
    reason = skip_reason()
    if reason:
        print(reason)
        return None
    import torch

    from fedfair_med.config import load_config

    bench.set_threads(args.threads)
    seconds = args.seconds or (1.0 if args.quick else 20.0)
    rounds = 1 if args.quick else 3
    scratch = Path("/tmp/fedfair-bench/gpu-runs")
    parities = [parity("synthetic", lambda **f: load_config(
        {"task": "synthetic-seg", "method": "flexfair", "method_params": {"lam": 3.0},
         "rounds": rounds, **({"data": {"scale": 0.25}} if args.quick else {}), **f}), scratch)]
    if not args.quick:
        try:
            fundus = bench.task_config("fundus", args.limit, args.data, rounds=2)
            parities.append(parity("fundus", lambda **f: load_config({**fundus.to_dict(), **f}), scratch))
        except FileNotFoundError as err:
            parities.append({"run": "fundus", "skipped": str(err)})
    from fedfair_med.tasks import build_task

    fundus_side = build_task("fundus").defaults.image_size[0]
    rates = []
    for row, network, kwargs, side, batch, out in MODELS:
        side = side or fundus_side
        if args.quick:
            side, batch = min(side, 64), 2
        for precision in ("32", "bf16"):
            rates.append({"model": row, "network": network,
                          **throughput(network, kwargs, side, batch, out, precision, seconds)})
    payload = {"benchmark": "gpu", "quick": args.quick, "machine": bench.machine(argv),
               "gpu": torch.cuda.get_device_name(0), "cuda": torch.version.cuda,
               "cudnn": torch.backends.cudnn.version(), "parity": parities, "throughput": rates}
    path = bench.write_result("gpu", payload, args.out)
    bench.print_table("training throughput on " + payload["gpu"],
                      ["model", "precision", "batch", "images/s", "GPU util % (median)", "peak GiB"],
                      [[r["model"], r["precision"], r["batch"], f"{r['images_per_s']:.1f}",
                        r["gpu_utilisation_pct"].get("median", "n/a"), f"{r['peak_memory_gib']:.2f}"]
                       for r in rates])
    for entry in parities:
        if "skipped" in entry:
            print(f"{entry['run']}: skipped ({entry['skipped']})")
            continue
        print(f"{entry['run']}: metric cpu {entry['cpu']['metric']:.4f}, cuda {entry['cuda']['metric']:.4f} "
              f"(max |Δ| {entry['cuda']['max_abs_diff_to_cpu']:.4f}), cuda bf16 "
              f"{entry['cuda-bf16']['metric']:.4f} (max |Δ| {entry['cuda-bf16']['max_abs_diff_to_cpu']:.4f}); "
              f"tolerance {entry['tolerance']}")
    print(f"written: {path}")
    return payload


if __name__ == "__main__":
    main()
    sys.exit(0)
