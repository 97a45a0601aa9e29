"""Data pipelines: images/s of the tasks' MONAI transforms with ``cache: true`` vs without, and
whether local training waits on data after the first epoch.

Part 1 — throughput. Each task's training split goes through its loader (the task's own
transforms, its batch size, ``make_loader`` as the runtimes use it) for several epochs, the
cached and uncached federations alternating epoch by epoch. ``cache: true`` wraps each split in
MONAI's ``CacheDataset``: the deterministic prefix of the chain (decode, channel fix, mask
binarisation, intensity scaling, resize) runs once when the federation is built, and only the
random augmentations run per epoch. Building time is reported separately — it is where the
cached pipeline pays its first epoch.

Part 2 — waiting on data. A real FedAvg local update (:meth:`Algorithm.client_update`) runs at
each site, with the loader wrapped so the time spent inside ``next(loader)`` is measured apart
from everything else (forward, loss, backward, optimiser step). Reported per epoch: the share of
the step time spent waiting on data. The target is a share ≤ 5 % after the first epoch.

    python benchmarks/data_loading.py            # fundus + skin from ../shared/data
    python benchmarks/data_loading.py --quick    # generated PNGs, seconds; checks the script
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import _common as bench

WAIT_TARGET = 0.05
#: uncached; cached; cached with batches prepared in a background thread (the runtime's default
#: when a core is spare: fedfair_med/data/prefetch.py). For the last, the "CPU" share is the
#: training thread's wall-clock wait (process CPU time counts both threads).
MODES = ("uncached", "cached", "cached_prefetch")


class TimedLoader:
    """Wraps a loader; ``data_s`` / ``data_cpu_s`` accumulate the wall / CPU time spent producing
    batches (with ``num_workers=0`` that is all on this thread, so CPU time is the work done,
    not counting moments another job held the core)."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self.dataset = getattr(loader, "dataset", None)  # num_examples() reads it
        self.data_s = self.data_cpu_s = 0.0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        iterator = iter(self.loader)
        while True:
            start, cpu = time.perf_counter(), time.process_time()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            finally:
                self.data_s += time.perf_counter() - start
                self.data_cpu_s += time.process_time() - cpu
            yield batch


def quick_manifests(root: Path, sites: int = 2, per_split: int = 4, size: int = 96) -> list[str]:
    """Tiny fundus-like sites from generated PNGs (no shared data needed)."""
    import numpy as np
    from PIL import Image

    from fedfair_med.data.manifest import write_manifest

    paths = []
    for s in range(sites):
        rng = np.random.default_rng(s)
        rows = []
        for split in ("train", "test"):
            for i in range(per_split):
                stem = root / f"site{s}" / f"{split}{i}"
                stem.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(f"{stem}.png")
                mask = (rng.random((size, size)) > 0.8).astype(np.uint8) * 255
                Image.fromarray(mask, mode="L").save(f"{stem}_mask.png")
                rows.append({"id": f"s{s}-{split}{i}", "image": f"{stem}.png", "label": f"{stem}_mask.png",
                             "split": split})
        paths.append(str(write_manifest(root / f"site{s}" / "manifest.csv", rows, site=f"site{s}",
                                         task="fundus")))
    return paths


def build(task_name: str, manifests: list[str], cache: bool) -> tuple[Any, Any, float]:
    """The task's federation with or without caching, and the seconds it took to build."""
    from fedfair_med.tasks import build_task

    task = build_task(task_name)
    start = time.perf_counter()
    federation = task.load_federation(seed=0, manifests=manifests, cache=cache)
    return task, federation, time.perf_counter() - start


def pass_over(loaders: Iterable[Any]) -> tuple[int, float]:
    """One epoch over every site's loader: (images, seconds)."""
    images, start = 0, time.perf_counter()
    for loader in loaders:
        for batch in loader:
            images += int(batch["image"].shape[0])
    return images, time.perf_counter() - start


def throughput(task_name: str, manifests: list[str], epochs: int) -> dict[str, Any]:
    from fedfair_med.data.federation import make_loader

    sides = {}
    for cache in (False, True):
        task, federation, built_s = build(task_name, manifests, cache)
        loaders = [make_loader(site.train, task.defaults.batch_size, shuffle=True, seed=k)
                   for k, site in enumerate(federation.sites)]
        sides[cache] = {"loaders": loaders, "built_s": built_s, "epochs": []}
    for epoch in range(epochs):
        for cache in ((False, True) if epoch % 2 == 0 else (True, False)):
            images, seconds = pass_over(sides[cache]["loaders"])
            sides[cache]["epochs"].append({"images": images, "s": seconds, "images_per_s": images / seconds})
    out = {}
    for cache, side in sides.items():
        rates = [e["images_per_s"] for e in side["epochs"]]
        out["cached" if cache else "uncached"] = {
            "build_s": side["built_s"], "epochs": side["epochs"], "images_per_s": bench.spread(rates)}
    out["speedup"] = (out["cached"]["images_per_s"]["median"] / out["uncached"]["images_per_s"]["median"])
    return out


def training_wait(task_name: str, manifests: list[str], epochs: int) -> dict[str, Any]:
    """Share of local-training time spent in next(loader), per epoch, cached vs not."""
    from fedfair_med.algorithms import build_algorithm
    from fedfair_med.algorithms.base import float_state
    from fedfair_med.contracts import SiteContext
    from fedfair_med.config import RunConfig
    from fedfair_med.data.federation import make_loader
    from fedfair_med.runtime.local import build_sites
    from fedfair_med.runtime.setup import RunSetup, build_global_model, derive_seed
    from fedfair_med.tasks import build_task

    from fedfair_med.data.prefetch import BackgroundBatches

    sides = {}
    for mode in MODES:
        cache = mode != "uncached"
        config = RunConfig(task=task_name, method="fedavg", data={"manifests": manifests, "cache": cache})
        task = build_task(task_name)
        sites = build_sites(RunSetup.create(config, task))
        model = build_global_model(config, task)
        sides[mode] = {"sites": sites, "model": model, "state": float_state(model), "epochs": [],
                       "algorithm": build_algorithm("fedavg")}
    for epoch in range(1, epochs + 1):
        for mode in (MODES if epoch % 2 else MODES[::-1]):
            side = sides[mode]
            data_s = total_s = data_cpu_s = total_cpu_s = 0.0
            for site in side["sites"]:
                seed = derive_seed(0, epoch, site.site_index)
                timed = TimedLoader(make_loader(site.train_set, site.resolved.batch_size, shuffle=True,
                                                seed=seed))
                # prefetch: batches made in a background thread; the wait is what the training
                # thread still spends blocked on the next batch
                loader = BackgroundBatches(timed) if mode == "cached_prefetch" else timed
                ctx = SiteContext(site=site.name, site_index=site.site_index, loader=loader,
                                  objective=site.objective, settings=site.resolved.settings,
                                  round=epoch, num_groups=site.num_groups)
                start, cpu = time.perf_counter(), time.process_time()
                side["algorithm"].client_update(ctx, side["model"], side["state"], {}, site.client_state.kept)
                total_s += time.perf_counter() - start
                total_cpu_s += time.process_time() - cpu
                if mode == "cached_prefetch":  # process CPU time counts both threads: wall only
                    data_s += loader.waited_s
                else:
                    data_s += timed.data_s
                    data_cpu_s += timed.data_cpu_s
            if mode == "cached_prefetch":
                data_cpu_s, total_cpu_s = data_s, total_s
            side["epochs"].append({"epoch": epoch, "data_s": data_s, "total_s": total_s,
                                   "data_share": data_s / total_s, "data_cpu_s": data_cpu_s,
                                   "total_cpu_s": total_cpu_s, "data_share_cpu": data_cpu_s / total_cpu_s})
    out = {}
    for mode, side in sides.items():
        later = side["epochs"][1:] or side["epochs"]
        share = bench.spread([e["data_share"] for e in later])["median"]
        share_cpu = bench.spread([e["data_share_cpu"] for e in later])["median"]
        out[mode] = {
            "epochs": side["epochs"], "data_share_after_first_epoch": share,
            "data_share_cpu_after_first_epoch": share_cpu,
            "meets_target": share <= WAIT_TARGET, "meets_target_cpu": share_cpu <= WAIT_TARGET}
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = bench.parser(__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=None)
    p.add_argument("--epochs", type=int, default=None)
    args = p.parse_args(argv)
    bench.set_threads(args.threads)
    epochs = args.epochs or (2 if args.quick else 5)
    started = time.perf_counter()
    results = []
    if args.quick:
        import tempfile

        scratch = tempfile.TemporaryDirectory()
        plan = [("fundus", quick_manifests(Path(scratch.name)))]
    else:
        plan = [(t, bench.manifests(t, args.limit, args.data)) for t in (args.tasks or ["fundus", "skin"])]
    for task_name, manifests in plan:
        results.append({"task": task_name, "manifests": manifests,
                        "throughput": throughput(task_name, manifests, epochs),
                        "training_wait": training_wait(task_name, manifests, epochs)})
    payload = {"benchmark": "data_loading", "quick": args.quick, "machine": bench.machine(argv),
               "target": f"with cache: data wait <= {WAIT_TARGET:.0%} of local step time after epoch 1",
               "results": results, "wall_s": round(time.perf_counter() - started, 1)}
    path = bench.write_result("data_loading", payload, args.out)
    rows = []
    for r in results:
        for key in MODES:
            t, w = r["throughput"]["cached" if key != "uncached" else key], r["training_wait"][key]
            rows.append([r["task"], key, t["build_s"], t["images_per_s"]["median"],
                         f"{w['epochs'][0]['data_share']:.1%} / {w['epochs'][0]['data_share_cpu']:.1%}",
                         f"{w['data_share_after_first_epoch']:.1%} / {w['data_share_cpu_after_first_epoch']:.1%}",
                         bench.verdict(w["data_share_after_first_epoch"], WAIT_TARGET) + " / "
                         + bench.verdict(w["data_share_cpu_after_first_epoch"], WAIT_TARGET)])
    bench.print_table("MONAI pipelines: throughput and time waiting on data during local training",
                      ["task", "pipeline", "build s", "images/s", "wait epoch 1 (wall / CPU)",
                       "wait later (wall / CPU)", f"≤ {WAIT_TARGET:.0%} (wall / CPU)"], rows)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main(sys.argv[1:])
