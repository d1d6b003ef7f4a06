"""torchrun on CPU (gloo, 2 processes, tiny models): the data split, the gradient and log reductions, resume and a
stop signal behave as one process accumulating the same micro-batches, under DDP and under FSDP2 (--shard fsdp); the
teacher cache built by 2 ranks is the one that one process builds."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import train_alignkd
from losses import logged_terms
from tiny_run import signal_once_started, tiny_args

STEPS = 4
REPO = Path(train_alignkd.__file__).parent
FAST = ["--num-workers", "0", "--save-every", "1000"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(argv: list[str], **popen) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "train_alignkd.py", *argv]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}, **popen)


def _run2(argv: list[str]) -> str:
    proc = _torchrun(argv)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, output[-4000:]
    return output


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.endswith("}")]


def _assert_same_run(a: Path, b: Path, step: int) -> None:
    """Every logged term within 1e-5 relative, the same schedule and data position, the weights and adapters
    within 1e-5."""
    la, lb = _log(a), _log(b)
    assert [r["step"] for r in la] == [r["step"] for r in lb] == list(range(1, step + 1))
    for ra, rb in zip(la, lb):
        for k in [*logged_terms(), "grad_norm", "adapter_grad_norm", "lr"]:
            assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-12), (ra["step"], k)
        assert (ra["skipped"], ra["epoch"]) == (rb["skipped"], rb["epoch"])
    ca, cb = a / f"checkpoint-{step}", b / f"checkpoint-{step}"
    sa, sb = (json.loads((c / "trainer_state.json").read_text()) for c in (ca, cb))
    assert (sa["epoch"], sa["offset"], sa["skipped"]) == (sb["epoch"], sb["offset"], sb["skipped"])
    for name in ("pytorch_model.bin", "alignkd_adapters.pt"):
        wa, wb = (torch.load(c / name, weights_only=True) for c in (ca, cb))
        assert wa.keys() == wb.keys()
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-5, msg=f"{name} {k}")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dist")


@pytest.fixture(scope="module")
def two_ranks(root) -> tuple[Path, float]:
    """An uninterrupted 2-rank run, --batch-size 4 --grad-accum 1; and how long it took."""
    out = root / "two"
    t = time.time()
    _run2(["--output-dir", str(out), *tiny_args(root, STEPS), *FAST])
    return out, time.time() - t


@pytest.fixture(scope="module")
def one_process(root) -> Path:
    """One process accumulating the two ranks' micro-batches: --batch-size 4 --grad-accum 2."""
    out = root / "one"
    train_alignkd.main(["--output-dir", str(out), *tiny_args(root, STEPS), "--grad-accum", "2", *FAST])
    return out


@pytest.fixture(scope="module")
def fsdp_two_ranks(root) -> tuple[Path, str]:
    """The run of `two_ranks` under FSDP2; and its output."""
    out = root / "fsdp"
    return out, _run2(["--output-dir", str(out), *tiny_args(root, STEPS), *FAST, "--shard", "fsdp"])


def test_two_ranks_equal_one_process_accumulating_their_micro_batches(two_ranks, one_process):
    out2, _ = two_ranks
    _assert_same_run(one_process, out2, STEPS)
    assert json.loads((out2 / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())["offset"] == STEPS * 2 * 4


def test_two_ranks_stopped_half_way_and_resumed_equal_an_uninterrupted_run(two_ranks, tmp_path):
    full, _ = two_ranks
    parts = tmp_path / "parts"
    argv = ["--output-dir", str(parts), *tiny_args(full.parent, STEPS), *FAST]
    _run2([*argv, "--stop-after", str(STEPS // 2)])
    assert (parts / "latest").read_text().strip() == f"checkpoint-{STEPS // 2}"
    one = tmp_path / "one"
    shutil.copytree(parts, one)
    _run2([*argv, "--resume"])
    _assert_same_run(parts, full, STEPS)
    # another split of the step's micro-batches is refused before anything is written ...
    with pytest.raises(SystemExit, match=r"same --batch-size and the same processes x --grad-accum \(2\)"):
        train_alignkd.main(["--output-dir", str(one), *argv[2:], "--resume"])
    # ... while one process accumulating both ranks' micro-batches continues the same order exactly
    train_alignkd.main(["--output-dir", str(one), *argv[2:], "--resume", "--grad-accum", "2"])
    _assert_same_run(one, full, STEPS)


def test_fsdp_two_ranks_equal_one_process_accumulating_their_micro_batches(fsdp_two_ranks, one_process):
    out, output = fsdp_two_ranks
    assert "FSDP2: each of 2 ranks holds" in output, output[-4000:]
    _assert_same_run(one_process, out, STEPS)  # the same checkpoint layout, whole tensors, as one process writes


def test_fsdp_stopped_half_way_and_resumed_equals_an_uninterrupted_run(fsdp_two_ranks, one_process, tmp_path):
    """From FSDP2's mid-run checkpoint: FSDP2 resumes exactly, and so does one process accumulating both ranks'
    micro-batches (a checkpoint has one layout however the run was split)."""
    full, _ = fsdp_two_ranks
    parts = tmp_path / "parts"
    argv = ["--output-dir", str(parts), *tiny_args(full.parent, STEPS), *FAST, "--shard", "fsdp"]
    _run2([*argv, "--stop-after", str(STEPS // 2)])
    one = tmp_path / "one"
    shutil.copytree(parts, one)
    _run2([*argv, "--resume"])
    _assert_same_run(parts, full, STEPS)
    train_alignkd.main(["--output-dir", str(one), *argv[2:-2], "--resume", "--grad-accum", "2"])
    _assert_same_run(one, one_process, STEPS)


@pytest.mark.parametrize("flags, refused", [
    (["--optim", "adamw8bit"], "--optim adamw8bit: bitsandbytes' 8-bit AdamW cannot step FSDP2's DTensor shards"),
    (["--lora-r", "4"], "--lora-r"),
    (["--probe-grads", "1"], "--probe-grads"),
])
def test_fsdp_refuses_what_a_sharded_student_cannot_do_before_loading_anything(flags, refused, tmp_path,
                                                                                monkeypatch):
    argv = ["--output-dir", str(tmp_path / "run"), "--data", "d.json", "--image-folder", ".", "--student", ".",
            "--teacher", ".", "--shard", "fsdp", *flags]
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it; the refusal comes before the process group
    with pytest.raises(SystemExit, match=f"--shard fsdp does not take {refused}"):
        train_alignkd.main(argv)
    assert not (tmp_path / "run").exists()
    monkeypatch.delenv("WORLD_SIZE")  # one process: nothing is sharded nor refused for it (it fails later, at the
    with pytest.raises(FileNotFoundError, match="no tokenizer.model"):  # student folder's missing tokenizer)
        train_alignkd.main(argv)


def _cache_tensors(folder: Path) -> dict[str, tuple[dict, dict[str, torch.Tensor]]]:
    """Each safetensors file of a teacher cache: (metadata, tensors)."""
    out = {}
    for path in sorted(folder.rglob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            out[str(path.relative_to(folder))] = (f.metadata(), {k: f.get_tensor(k) for k in f.keys()})
    return out


def test_teacher_cache_built_by_two_ranks_is_the_one_process_build_and_trains_the_same(root, one_process, tmp_path):
    """Shards of 8 samples: 12 shards, 6 built by each rank. Same files, tensors, metadata, manifest and index as one
    process's build (the bytes differ only in the order safetensors writes a header's metadata keys, which varies
    between processes), and a 2-rank run from it is the 1-process run from the 1-process build."""
    argv = [*tiny_args(root, STEPS), *FAST, "--cache-shard-size", "8"]
    output = _run2(["--output-dir", str(tmp_path / "two"), *argv, "--cache-teacher", str(tmp_path / "cache2")])
    assert "6 shards of rank 0; each of 2 ranks builds its own" in output, output[-4000:]
    train_alignkd.main(["--output-dir", str(tmp_path / "one"), *argv, "--grad-accum", "2",
                        "--cache-teacher", str(tmp_path / "cache1")])
    c1, c2 = tmp_path / "cache1", tmp_path / "cache2"
    assert sorted(p.relative_to(c1) for p in c1.rglob("*")) == sorted(p.relative_to(c2) for p in c2.rglob("*"))
    for name in ("manifest.json", "index.json"):
        assert (c1 / name).read_text() == (c2 / name).read_text()
    t1, t2 = _cache_tensors(c1), _cache_tensors(c2)
    assert t1.keys() == t2.keys() and len(t1) == 13  # lm_head + 12 shards
    for name, (meta, tensors) in t1.items():
        assert meta == t2[name][0] and tensors.keys() == t2[name][1].keys(), name
        for k, t in tensors.items():
            assert torch.equal(t, t2[name][1][k]), (name, k)
    _assert_same_run(tmp_path / "one", tmp_path / "two", STEPS)


def _ranks_of(pid: int) -> list[int]:
    """The launcher's worker processes (children of torchrun)."""
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_sigterm_to_the_launchers_group_and_one_rank_stops_all_after_one_step_and_resume_finishes(tmp_path):
    """As Slurm delivers it: SIGTERM to the launcher's process group (torchrun forwards it to every rank) and, a
    second time, to rank 1 directly. All ranks stop after the same step; one complete checkpoint; --resume ends the
    run."""
    total = 40
    out = tmp_path / "run"
    argv = ["--output-dir", str(out), *tiny_args(tmp_path, total), "--num-workers", "1", "--save-every", "1000"]
    proc = _torchrun(argv, start_new_session=True)

    def send(pgid: int) -> None:
        workers = _ranks_of(proc.pid)
        os.killpg(pgid, signal.SIGTERM)
        with contextlib.suppress(ProcessLookupError):
            os.kill(workers[-1], signal.SIGTERM)

    output = signal_once_started(proc, lambda: (out / "log.jsonl").exists() and bool(_log(out)), send)
    # (the launcher itself ends with a traceback of the signal it received: torchrun's, not the trainer's)
    assert 'train_alignkd.py", line' not in output and "KeyboardInterrupt" not in output, output[-4000:]
    n = _log(out)[-1]["step"]
    assert [r["step"] for r in _log(out)] == list(range(1, n + 1)) and n < total, output[-4000:]
    assert f"stopped at step {n} (SIGTERM)" in output, output[-4000:]
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == [f"checkpoint-{n}"]
    assert (out / "latest").read_text().strip() == f"checkpoint-{n}"
    assert json.loads((out / f"checkpoint-{n}" / "trainer_state.json").read_text())["step"] == n
    _run2([*argv, "--resume"])
    assert [r["step"] for r in _log(out)] == list(range(1, total + 1))
    assert (out / "latest").read_text().strip() == f"checkpoint-{total}"


def test_a_rank_whose_micro_batch_is_all_skipped_joins_the_step(tmp_path):
    """--batch-size 1: two records (one in rank 0's share, one in rank 1's, never both in one step) name a missing
    image. The run does not hang, the skips are counted once each over the ranks."""
    argv = tiny_args(tmp_path, STEPS)
    records = json.loads(Path(argv[argv.index("--data") + 1]).read_text())[:2 * STEPS]
    perm = torch.randperm(len(records), generator=torch.Generator().manual_seed(0)).tolist()
    for i in (perm[1], perm[4]):  # step 1's rank-1 micro-batch, step 3's rank-0 micro-batch
        records[i]["image"] = "images/missing.png"
    data = tmp_path / "with_missing.json"
    data.write_text(json.dumps(records))
    out = tmp_path / "run"
    argv[argv.index("--data") + 1], argv[argv.index("--batch-size") + 1] = str(data), "1"
    _run2(["--output-dir", str(out), *argv, *FAST])
    log = _log(out)
    assert [r["step"] for r in log] == list(range(1, STEPS + 1))
    assert [r["skipped"] for r in log] == [{"missing_image": 1}] * 2 + [{"missing_image": 2}] * 2
    state = json.loads((out / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    assert state["skipped"] == {"missing_image": 2} and (state["epoch"], state["offset"]) == (1, 0)
