"""Preemption as clusters and terminals deliver it: SIGTERM / SIGINT to the whole process group (Slurm, `timeout`,
Ctrl-C) while DataLoader workers run. The workers ignore both; the main process saves one checkpoint and exits
143 / 130; --resume finishes the run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train_alignkd
from model import MobileVLM
from tiny_run import assert_group_exits, signal_once_started, tiny_args

STEPS = 8


def _steps(out: Path) -> list[int]:
    path = out / "log.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_to_the_process_group_with_workers_saves_once_and_resumes(tmp_path, signum):
    out = tmp_path / "run"
    argv = ["--output-dir", str(out), *tiny_args(out, STEPS), "--num-workers", "2", "--save-every", "1000"]
    proc = subprocess.Popen([sys.executable, "train_alignkd.py", *argv], cwd=Path(train_alignkd.__file__).parent,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    # the signal goes to the main process and both DataLoader workers
    output = signal_once_started(proc, lambda: bool(_steps(out)), lambda pgid: os.killpg(pgid, signum))
    assert proc.returncode == 128 + signum, output[-3000:]
    assert "Traceback" not in output and "DataLoader worker" not in output, output[-3000:]
    n = _steps(out)[-1]
    assert _steps(out) == list(range(1, n + 1)) and n < STEPS, output[-3000:]
    assert f"stopped at step {n} ({signal.Signals(signum).name})" in output
    assert "vision towers are identical" in output  # student and teacher read their CLIP from their own folders
    # exactly one checkpoint, complete and loadable; nothing half-written
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == [f"checkpoint-{n}"]
    assert (out / "latest").read_text().strip() == f"checkpoint-{n}"
    ckpt = out / f"checkpoint-{n}"
    MobileVLM.from_pretrained(ckpt)
    for name in ("alignkd_adapters.pt", "trainer_state.pt"):
        torch.load(ckpt / name, weights_only=True)
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == n
    # its CLIP folder is named where the checkpoint ended up, not where it was written before the rename
    assert json.loads((ckpt / "config.json").read_text())["mm_vision_tower"] == str(ckpt.resolve() / "vision_tower")
    result = train_alignkd.main([*argv, "--resume", "--num-workers", "0"])  # in-process: no workers needed here
    assert result["history"][0]["step"] == n + 1 and result["signal"] is None
    assert _steps(out) == list(range(1, STEPS + 1))
    assert (out / "latest").read_text().strip() == f"checkpoint-{STEPS}"


def test_a_second_signal_to_the_group_aborts_at_once_and_no_worker_is_left(tmp_path):
    """The second signal raises KeyboardInterrupt in the main process (as documented); its DataLoader workers, which
    ignore SIGTERM, are shut down on the way out instead of blocking the interpreter's exit."""
    import threading

    out = tmp_path / "run"
    argv = ["--output-dir", str(out), *tiny_args(out, 1000), "--num-workers", "2", "--save-every", "1000"]
    proc = subprocess.Popen([sys.executable, "train_alignkd.py", *argv], cwd=Path(train_alignkd.__file__).parent,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    pgid = os.getpgid(proc.pid)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.time() + 120
        while not _steps(out):
            assert proc.poll() is None and time.time() < deadline, "training did not start"
            time.sleep(0.02)
        os.killpg(pgid, signal.SIGTERM)
        while not any("saving a checkpoint after this step" in line for line in lines):
            assert proc.poll() is None and time.time() < deadline, "".join(lines)[-3000:]
            time.sleep(0.005)
        os.killpg(pgid, signal.SIGTERM)
        proc.wait(timeout=60)
        reader.join(timeout=10)
        assert_group_exits(pgid)  # no DataLoader worker is left
    finally:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    output = "".join(lines)
    if proc.returncode != 128 + signal.SIGTERM:  # (unless the first signal's save won the race)
        assert proc.returncode == -signal.SIGINT and "KeyboardInterrupt" in output, output[-3000:]
        assert not (out / "latest").exists() and not list(out.glob("checkpoint-*"))


def test_resume_removes_what_a_killed_save_left(tmp_path):
    """A save killed midway leaves its temporary folder (and maybe latest.tmp); `latest` never points there, and
    --resume deletes them."""
    out = tmp_path / "run"
    argv = ["--output-dir", str(out), *tiny_args(out, 4), "--num-workers", "0"]
    train_alignkd.main([*argv, "--stop-after", "1"])
    (out / ".tmp-checkpoint-3").mkdir()
    (out / ".tmp-checkpoint-3" / "pytorch_model.bin.tmp").write_bytes(b"cut sh")
    (out / "latest.tmp").write_text("checkpoint-3\n")
    assert train_alignkd.main([*argv, "--resume", "--stop-after", "1"])["history"][0]["step"] == 2
    assert not (out / ".tmp-checkpoint-3").exists() and not (out / "latest.tmp").exists()
    assert (out / "latest").read_text().strip() == "checkpoint-2"
