"""Arguments of a small, fast training run for the tests: synthetic shapes records, a tiny random teacher and
student in the official checkpoint layout (made once under ROOT/demo_assets)."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from bench.soak import make_assets


# the paper's objective, every term on: these runs test the trainer's mechanics on all of them
PAPER = ["--attn-form", "mse", "--w-attn", "1", "--w-proj-all", "1", "--w-proj-focus", "1"]


def tiny_args(root: str | Path, steps: int | str) -> list[str]:
    """--data/--image-folder/--student/--teacher and the small-run settings (output dir not included)."""
    assets = make_assets(Path(root) / "demo_assets")
    return ["--data", str(assets / "synthetic_mixed.json"), "--image-folder", str(assets), "--template", "v1",
            "--student", str(assets / "student"), "--teacher", str(assets / "teacher"), "--max-steps", str(steps),
            "--lr", "3e-3", "--batch-size", "4", "--max-len", "512", "--save-every", str(steps), *PAPER]


def signal_once_started(proc: subprocess.Popen, started: Callable[[], bool], send: Callable[[int], None],
                        timeout: float = 120) -> str:
    """Wait until `started()` (the run has logged a step), call `send(pgid)` to signal the run, and return its output
    once every process of its group (the run's workers too) has exited. `proc` runs in its own session; its process
    group is killed afterwards whatever happened, so no test leaves workers behind."""
    pgid = os.getpgid(proc.pid)
    try:
        deadline = time.time() + timeout
        while not started():
            assert proc.poll() is None and time.time() < deadline, "training did not start"
            time.sleep(0.02)
        send(pgid)
        output = proc.communicate(timeout=timeout)[0]
        assert_group_exits(pgid)
        return output
    finally:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def assert_group_exits(pgid: int, timeout: float = 15) -> None:
    """Fail unless every process of the group has exited within `timeout` s (a DataLoader worker or a rank that
    outlives its run)."""
    deadline = time.time() + timeout
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        assert time.time() < deadline, f"a process of group {pgid} outlived the run"
        time.sleep(0.1)
