"""Ctrl-C (SIGINT) and SIGTERM stop a run cleanly: the current optimizer step finishes, a
checkpoint is saved, and :class:`~fdiv_kernels.train.errors.TrainingInterrupted` is raised
(``fdiv-train`` prints the resume command and exits 130). A second Ctrl-C aborts at once.

The request is a flag that the training loop reads after every step; with several processes
the flag is summed over them, so every rank stops at the same step (:func:`~.trainer.train_phase`).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading

_state = {"requested": False}


def interrupt_requested() -> bool:
    """Whether a stop was asked for since :func:`graceful_stop` was entered."""
    return _state["requested"]


def request_stop(signum=signal.SIGINT, frame=None) -> None:
    """The signal handler (also callable directly): the first call asks for a stop, a second
    SIGINT raises ``KeyboardInterrupt``."""
    if _state["requested"] and signum == signal.SIGINT:
        raise KeyboardInterrupt
    _state["requested"] = True
    print("fdiv-train: stopping after this step to save a checkpoint (Ctrl-C again to abort without saving)",
          file=sys.stderr, flush=True)


@contextlib.contextmanager
def graceful_stop():
    """Install :func:`request_stop` for SIGINT and SIGTERM in the block (main thread only)."""
    _state["requested"] = False
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        _state["requested"] = False
