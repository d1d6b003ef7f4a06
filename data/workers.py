"""DataLoader workers that survive a stop request sent to the whole process group.

Slurm's preemption notice, `timeout` and a terminal's Ctrl-C signal every process of the group, the DataLoader
workers included. A worker killed by SIGTERM/SIGINT makes the main process raise "DataLoader worker is killed by
signal" before its own handler can save a checkpoint. So workers ignore both signals (`ignore_stop_signals`, their
`worker_init_fn`) and the main process alone decides what a stop means. `iterate` starts the workers with both
signals blocked, so that one arriving while a worker is being forked and has not yet run its init function stays
pending (the worker discards it, the main process receives it when the workers are up), and shuts them down as
soon as the iteration ends. (The blocked mask is inherited with the `fork` start method, Linux's default up to
Python 3.13; with `spawn`/`forkserver` a worker is protected from the moment its init function runs.) A worker
still ends with its parent: torch's workers exit when the main process is gone, and SIGKILL cannot be ignored.
"""
from __future__ import annotations

import signal
from collections.abc import Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_HAS_SIGMASK = hasattr(signal, "pthread_sigmask")


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: this worker ignores SIGINT and SIGTERM (and drops one that arrived since its
    fork, while they were blocked)."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    if _HAS_SIGMASK:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def iterate(loader) -> Iterator:
    """The batches of `loader`. Its workers start with SIGINT/SIGTERM blocked in this thread (one that arrives then
    is delivered right after, to this process only), and are shut down as soon as the iteration ends, however it
    ends (exhausted, an exception, `close()`). Workers that ignore SIGTERM must not be left to the interpreter's
    exit: multiprocessing ends daemon children there with SIGTERM and then waits for them without a timeout."""
    if loader.num_workers and _HAS_SIGMASK:
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            it = iter(loader)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    else:
        it = iter(loader)
    try:
        yield from it
    finally:
        shutdown = getattr(it, "_shutdown_workers", None)  # torch's own shutdown: tell the workers, join them
        if shutdown is not None:
            shutdown()
