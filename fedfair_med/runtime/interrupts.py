"""Ctrl-C that is never lost during a run.

Python raises ``KeyboardInterrupt`` wherever the main thread happens to be. When that is a
callback the interpreter runs on the side (an import lock's weakref callback, a ``__del__``, the
garbage collector), the exception is printed as "Exception ignored" and the run simply goes on:
the user pressed Ctrl-C and the run finished and replaced their directory anyway. So during a run
the SIGINT handler also *records* the signal, and the round loop re-raises it at its next
boundary (:func:`raise_if_interrupted`) if the first raise was swallowed.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator

_pending = False


def _on_sigint(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
    global _pending
    _pending = True
    raise KeyboardInterrupt


@contextmanager
def interrupts_recorded() -> Iterator[None]:
    """Record SIGINT for :func:`raise_if_interrupted` while the block runs.

    Off the main thread (signals cannot be handled there), when SIGINT is ignored (a job a
    shell started with ``&``, which must stay immune to Ctrl-C) and when a handler installed
    outside Python holds it (it could not be put back) the disposition is left alone.
    """
    global _pending
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) in (signal.SIG_IGN, None):
        yield
        return
    previous = signal.signal(signal.SIGINT, _on_sigint)
    _pending = False
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _pending = False


def raise_if_interrupted() -> None:
    """Raise ``KeyboardInterrupt`` if SIGINT arrived in this block and was swallowed."""
    if _pending:
        raise KeyboardInterrupt
