"""BackgroundBatches: same batches in the same order, errors surface, early stops release."""

from __future__ import annotations

import threading
import time

import pytest

from fedfair_med.data.prefetch import BackgroundBatches, prefetch_enabled


class SlowLoader:
    """Yields 0..n-1, taking ``delay`` seconds per item; records how many it produced."""

    def __init__(self, n: int, delay: float = 0.0, fail_at: int | None = None) -> None:
        self.n, self.delay, self.fail_at = n, delay, fail_at
        self.produced = 0
        self.dataset = list(range(n))

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        for i in range(self.n):
            if i == self.fail_at:
                raise OSError(f"cannot read item {i}")
            time.sleep(self.delay)
            self.produced += 1
            yield i


def test_batches_come_in_order_and_twice_per_two_epochs() -> None:
    wrapped = BackgroundBatches(SlowLoader(7))
    assert len(wrapped) == 7 and wrapped.dataset == list(range(7))
    assert list(wrapped) == list(range(7))
    assert list(wrapped) == list(range(7))  # a new epoch, a new pass


def test_a_loader_error_is_raised_in_the_consumer() -> None:
    with pytest.raises(OSError, match="item 3"):
        list(BackgroundBatches(SlowLoader(6, fail_at=3)))


def test_stopping_early_ends_the_producer_thread() -> None:
    loader = SlowLoader(1000, delay=0.001)
    before = threading.active_count()
    for i, _ in enumerate(BackgroundBatches(loader, depth=2)):
        if i == 2:
            break
    assert threading.active_count() == before
    assert loader.produced <= 3 + 2 + 1  # consumed + queue depth + the one in hand


def test_the_producer_runs_ahead_while_the_consumer_works() -> None:
    """While the consumer holds batch 0, the thread prepares the next ``depth`` batches."""
    loader = SlowLoader(10)
    iterator = iter(BackgroundBatches(loader, depth=2))
    assert next(iterator) == 0
    deadline = time.monotonic() + 10
    while loader.produced < 4 and time.monotonic() < deadline:  # 0 taken, 1-2 queued, 3 in hand
        time.sleep(0.01)
    assert loader.produced == 4
    time.sleep(0.05)
    assert loader.produced == 4  # and no further: the queue is full
    assert list(iterator) == list(range(1, 10))


def test_setting(monkeypatch) -> None:
    monkeypatch.setenv("FEDFAIR_PREFETCH", "0")
    assert prefetch_enabled() is False
    monkeypatch.setenv("FEDFAIR_PREFETCH", "1")
    assert prefetch_enabled() is True
