"""Prepare the next batches in a background thread while the current one trains.

After the first epoch a cached pipeline only runs its random augmentations, but those still cost
~1.4 ms per fundus image in the training thread (10 % of a local step on 2 cores). A loader
worker *process* would hide them but changes the augmentation random streams (and so the
numbers) and costs a process per site. A thread keeps the exact order of every draw — the batches
are produced by the same loader, one after another, only earlier — so results are bit-identical
with and without prefetching, and the MONAI/torch kernels release the GIL, so the work overlaps
with the training step on a second core.

The producing thread must not touch torch's global random generator: MONAI's random transforms
draw from their own ``RandomState`` and the loader's shuffling from its own generator, so the
training thread's draws (dropout, mixup) are unaffected.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from typing import Any, Iterable, Iterator

_DONE = object()


def spare_core() -> bool:
    """True when torch leaves at least one core of this machine free for a producer thread."""
    import torch

    return torch.get_num_threads() < (os.cpu_count() or 1)


class BackgroundBatches:
    """Iterate ``loader`` in a thread, ``depth`` batches ahead; ``waited_s`` is the time the
    consumer spent blocked on the next batch (the wait left after prefetching)."""

    def __init__(self, loader: Iterable[Any], depth: int = 2) -> None:
        self.loader = loader
        self.depth = max(1, int(depth))
        self.dataset = getattr(loader, "dataset", None)  # num_examples() reads it
        self.waited_s = 0.0

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        batches: queue.Queue = queue.Queue(maxsize=self.depth)
        stop = threading.Event()

        def produce() -> None:
            try:
                for batch in self.loader:
                    while not stop.is_set():
                        try:
                            batches.put(batch, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                batches.put(_DONE)
            except BaseException as err:  # handed to the consumer, raised there
                batches.put(err)

        thread = threading.Thread(target=produce, name="fedfair-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                started = time.perf_counter()
                item = batches.get()
                self.waited_s += time.perf_counter() - started
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:  # the consumer stopped early (max_steps) or failed: release the producer
            stop.set()
            while thread.is_alive():
                try:
                    batches.get(timeout=0.05)
                except queue.Empty:
                    pass
            thread.join()


def prefetch_enabled() -> bool:
    """``FEDFAIR_PREFETCH``: ``1`` on, ``0`` off, unset or ``auto``: on when a core is spare."""
    setting = os.environ.get("FEDFAIR_PREFETCH", "auto").strip().lower()
    if setting in ("1", "true", "on"):
        return True
    if setting in ("0", "false", "off"):
        return False
    return spare_core()
