"""Fault injection: is a run that is killed and resumed many times the run that was never interrupted?

    python bench/soak.py                  # 10 interruptions of a 36-step tiny run (save every 3 steps)
    python bench/soak.py --quick          # 3 interruptions of a 16-step run
    python bench/soak.py --interruptions 30 --seed 1

A tiny random teacher and student on synthetic records (made once under OUT/assets) are trained by
`train_alignkd.py` as a subprocess, with DataLoader workers (--num-workers 2): once uninterrupted (the reference),
then again with interruptions at random moments. They alternate: SIGKILL to the main process (a crash, an OOM
kill; nothing is saved, the workers are orphaned) and SIGTERM to the whole process group (a cluster's preemption,
`timeout`; one checkpoint is saved, exit 143). Each is sent either a random 0-0.25 s after a random step (1-3 steps
into the segment) or 0-20 ms after a checkpoint's temporary folder appears (during a save). After each, `latest` is
checked (a `latest` that does not load is a broken checkpoint) and the run continues with --resume (from scratch if
it had no checkpoint yet). At the end the final checkpoint (student weights, Align-KD adapters, optimizer state,
data position) and log.jsonl (one record per step, every loss term, lr and gradient norm; not tokens_per_s) are
compared with the reference's, bit for bit; every checkpoint folder left must load, no temporary folder may be left
and no process of any segment may outlive it by more than 15 s. Prints a summary and writes OUT/soak.json; exits 1
unless all of that holds.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from data import load_tokenizer, make_demo_tokenizer, make_synthetic_dataset  # noqa: E402
from model import MobileVLM  # noqa: E402

# what log.jsonl records per step that must not depend on interruptions (tokens_per_s is a timing)
TIMING_FIELDS = ("tokens_per_s",)
EXPECTED_EXITS = {-signal.SIGKILL, 128 + signal.SIGTERM}


def make_assets(root: Path) -> Path:
    """Synthetic records, a demo tokenizer and a tiny teacher/student sharing one frozen CLIP, made once under
    `root` (the tests' small runs use them too)."""
    tok_dir = root / "tokenizer"
    if not (tok_dir / "tokenizer.model").exists():
        make_demo_tokenizer(tok_dir)
    if not (root / "synthetic_mixed.json").exists():
        make_synthetic_dataset(root, n=96, seed=0, kind="mixed")
    if not (root / "student" / "config.json").exists():
        vocab = load_tokenizer(tok_dir).vocab_size
        student = MobileVLM.tiny(seed=2, vocab_size=vocab, hidden_size=64, num_heads=4, num_layers=2)
        teacher = MobileVLM.tiny(seed=1, vocab_size=vocab, hidden_size=128, num_heads=8, num_layers=3)
        teacher.vision_tower.load_state_dict(student.vision_tower.state_dict())
        teacher.save_pretrained(root / "teacher", tokenizer_dir=tok_dir)
        student.save_pretrained(root / "student", tokenizer_dir=tok_dir)
    return root


def train_argv(assets: Path, out: Path, steps: int, save_every: int, workers: int) -> list[str]:
    return ["--data", str(assets / "synthetic_mixed.json"), "--image-folder", str(assets), "--template", "v1",
            "--student", str(assets / "student"), "--teacher", str(assets / "teacher"), "--max-steps", str(steps),
            "--lr", "3e-3", "--batch-size", "4", "--max-len", "512", "--save-every", str(save_every),
            "--keep", "2", "--num-workers", str(workers), "--output-dir", str(out),
            # every Align-KD term on (the paper's objective): all of their state must survive a resume
            "--attn-form", "mse", "--w-attn", "1", "--w-proj-all", "1", "--w-proj-focus", "1"]


def start(argv: list[str], log_path: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w") as log:
        return subprocess.Popen([sys.executable, str(ROOT / "train_alignkd.py"), *argv], cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, env=env)


def logged_steps(out: Path) -> list[int]:
    path = out / "log.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            pass  # a line being written
    return steps


def temp_checkpoints(out: Path, since: float = 0.0) -> list[str]:
    """Temporary checkpoint folders (a save in progress, or one a kill interrupted) modified at or after `since`."""
    found = []
    for p in out.glob(".tmp-checkpoint-*"):
        try:
            if p.stat().st_mtime >= since:
                found.append(p.name)
        except FileNotFoundError:  # renamed or removed meanwhile
            pass
    return sorted(found)


_BAR = re.compile(r"\| *(\d+)/\d+ \[")


def segment_step(log_path: Path) -> int:
    """The step this segment's progress bar last showed (it starts at the resumed step; -1 before it appears). The
    bar, unlike log.jsonl, is this process's own: log.jsonl can still hold a killed run's records until --resume
    trims it."""
    try:
        text = log_path.read_text(errors="replace")
    except FileNotFoundError:
        return -1
    found = _BAR.findall(text)
    return int(found[-1]) if found else -1


def check_checkpoint(ckpt: Path) -> tuple[str, str]:
    """('ok' | 'broken', detail): does this checkpoint load as --resume loads it?"""
    try:
        MobileVLM.from_pretrained(ckpt)
        for name in ("alignkd_adapters.pt", "trainer_state.pt"):
            torch.load(ckpt / name, map_location="cpu", weights_only=True)
        info = json.loads((ckpt / "trainer_state.json").read_text())
        return "ok", f"{ckpt.name} (step {info['step']})"
    except Exception as e:  # noqa: BLE001 - any failure to load is what is counted
        return "broken", f"{ckpt.name}: {type(e).__name__}: {str(e)[:200]}"


def check_latest(out: Path) -> tuple[str, str]:
    """('none' | 'ok' | 'broken', detail) of the checkpoint `latest` names."""
    pointer = out / "latest"
    if not pointer.exists():
        return "none", "no latest"
    return check_checkpoint(out / pointer.read_text().strip())


def wait_for(proc: subprocess.Popen, condition, poll: float) -> bool:
    """Poll until condition() or the process ends; True if the condition was met while it ran."""
    while proc.poll() is None:
        if condition():
            return True
        time.sleep(poll)
    return False


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def compare(ref: Path, run: Path, steps: int) -> dict:
    """Bitwise comparison of the final checkpoints and of log.jsonl, with the largest absolute difference found."""
    a, b = ref / f"checkpoint-{steps}", run / f"checkpoint-{steps}"
    result: dict = {"mismatches": []}
    max_diff = 0.0

    def tensors(x, y, what: str) -> bool:
        nonlocal max_diff
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            if x.shape != y.shape or x.dtype != y.dtype:
                result["mismatches"].append(f"{what}: shape/dtype")
                return False
            if torch.equal(x, y):
                return True
            if x.is_floating_point():
                max_diff = max(max_diff, float((x.double() - y.double()).abs().max()))
            result["mismatches"].append(what)
            return False
        if isinstance(x, dict) and isinstance(y, dict):
            if x.keys() != y.keys():
                result["mismatches"].append(f"{what}: keys")
                return False
            return all([tensors(x[k], y[k], f"{what}.{k}") for k in x])
        if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
            if len(x) != len(y):
                result["mismatches"].append(f"{what}: length")
                return False
            return all([tensors(u, v, f"{what}[{i}]") for i, (u, v) in enumerate(zip(x, y))])
        if x != y:
            result["mismatches"].append(what)
            return False
        return True

    if not b.is_dir():
        result["mismatches"].append(f"{b.name} missing")
        return {**result, "equal": False}
    load = lambda p: torch.load(p, map_location="cpu", weights_only=True)  # noqa: E731
    result["weights_equal"] = tensors(load(a / "pytorch_model.bin"), load(b / "pytorch_model.bin"), "weights")
    result["adapters_equal"] = tensors(load(a / "alignkd_adapters.pt"), load(b / "alignkd_adapters.pt"), "adapters")
    sa, sb = load(a / "trainer_state.pt"), load(b / "trainer_state.pt")
    result["optimizer_equal"] = tensors(sa["optimizer"], sb["optimizer"], "optimizer") and \
        tensors(sa["scheduler"], sb["scheduler"], "scheduler")
    ja, jb = (json.loads((p / "trainer_state.json").read_text()) for p in (a, b))
    result["position_equal"] = all(tensors(ja[k], jb[k], k) for k in ("step", "epoch", "offset", "skipped"))
    la, lb = ([json.loads(x) for x in (p / "log.jsonl").read_text().splitlines()] for p in (ref, run))
    result["log_steps"] = [r["step"] for r in lb]
    one_per_step = result["log_steps"] == list(range(1, steps + 1))
    if not one_per_step:
        result["mismatches"].append("log.jsonl: not one record per step 1..N")
    same_records = len(la) == len(lb) and all(
        tensors({k: v for k, v in ra.items() if k not in TIMING_FIELDS},
                {k: v for k, v in rb.items() if k not in TIMING_FIELDS}, f"log step {ra.get('step')}")
        for ra, rb in zip(la, lb))
    result["log_equal"] = one_per_step and same_records
    result["max_abs_diff"] = max_diff
    result["equal"] = all(result[k] for k in ("weights_equal", "adapters_equal", "optimizer_equal",
                                              "position_equal", "log_equal"))
    return result


def soak(out: Path, steps: int = 36, save_every: int = 3, interruptions: int = 10, seed: int = 0,
         workers: int = 2, timeout: float = 600.0, verbose: bool = True) -> dict:
    """The reference run and the interrupted one under OUT; returns the summary (see the module docstring)."""
    say = print if verbose else (lambda *a, **k: None)
    out = Path(out)
    assets = make_assets(out / "assets")
    ref, run, logs = out / "reference", out / "interrupted", out / "segments"
    for p in (ref, run, logs):
        shutil.rmtree(p, ignore_errors=True)
    logs.mkdir(parents=True)
    t0 = time.time()
    proc = start(train_argv(assets, ref, steps, save_every, workers), logs / "reference.log")
    if proc.wait(timeout=timeout) != 0:
        raise RuntimeError(f"the reference run failed (exit {proc.returncode}): see {logs / 'reference.log'}")
    reference_s = time.time() - t0
    say(f"reference: {steps} steps in {reference_s:.1f} s")

    rng = random.Random(seed)
    argv = train_argv(assets, run, steps, save_every, workers)
    events, exits, broken, pgids = [], Counter(), [], []
    resumes = fresh_starts = 0
    t1 = time.time()
    seg_log, seg_start, base = logs / "00.log", time.time(), 0
    proc = start(argv, seg_log)
    pgids.append(proc.pid)
    for i in range(interruptions):
        kind = "SIGKILL" if i % 2 == 0 else "SIGTERM"
        timing = rng.choice(("step", "save"))
        # only once this segment trains (its bar passed the step it started from), never during its start-up
        if timing == "step":
            target = base + rng.randint(1, 3)
            hit = wait_for(proc, lambda: segment_step(seg_log) >= target, 0.01)
            delay = rng.uniform(0.0, 0.25)
        else:  # the moment this segment's next checkpoint folder appears (or, if none shows up soon, a later step)
            limit = base + 2 * save_every + 1
            hit = wait_for(proc, lambda: (segment_step(seg_log) > base and temp_checkpoints(run, seg_start))
                           or segment_step(seg_log) >= limit, 0.001)
            delay = rng.uniform(0.0, 0.02)
        if not hit:  # the run finished first: no more interruptions to make
            break
        time.sleep(delay)
        during_save = bool(temp_checkpoints(run, seg_start))
        at_step = segment_step(seg_log)
        if proc.poll() is not None:
            break
        if kind == "SIGKILL":
            os.kill(proc.pid, signal.SIGKILL)
        else:
            os.killpg(proc.pid, signal.SIGTERM)
        rc = proc.wait(timeout=timeout)
        exits[rc] += 1
        state, detail = check_latest(run)
        if state == "broken":
            broken.append(detail)
        events.append({"n": i + 1, "signal": kind, "timing": timing, "during_save": during_save,
                       "segment_from_step": base, "bar_step_at_signal": at_step, "exit": rc, "latest": state,
                       "detail": detail})
        say(f"{i + 1:3d}: {kind:7s} {'during a save' if during_save else 'between saves':13s} at step {at_step:3d} "
            f"-> exit {rc:4d}; latest {state}: {detail}")
        if state == "broken":  # --resume would refuse it: the soak has its answer
            break
        if rc in (0, -signal.SIGTERM) and detail.startswith(f"checkpoint-{steps} "):
            events[-1]["after_the_end"] = True  # the run had finished (or was tearing down): nothing left to do
            break
        seg_log, seg_start = logs / f"{i + 1:02d}.log", time.time()
        if state == "none":  # killed before its first checkpoint: start again
            fresh_starts, base = fresh_starts + 1, 0
            proc = start([*argv, "--overwrite"], seg_log)
        else:
            resumes += 1
            base = json.loads((run / (run / "latest").read_text().strip() / "trainer_state.json").read_text())["step"]
            proc = start([*argv, "--resume"], seg_log)
        pgids.append(proc.pid)
    rc = proc.wait(timeout=timeout)
    if rc != 0 and not broken and not (events and events[-1].get("after_the_end")):
        raise RuntimeError(f"the last segment failed (exit {rc}): see {logs}")
    interrupted_s = time.time() - t1
    state, detail = check_latest(run)
    if state != "ok" and detail not in broken:
        broken.append(detail)
    cmp = compare(ref, run, steps)
    # every checkpoint folder left, not only `latest`: one a kill cut short while pruning it would show here
    incomplete = [c.name for c in sorted(run.glob("checkpoint-*")) if check_checkpoint(c)[0] != "ok"]
    deadline = time.time() + 15
    while any(group_alive(g) for g in pgids) and time.time() < deadline:
        time.sleep(0.2)
    lingering = sum(group_alive(g) for g in pgids)
    n_kill = sum(e["signal"] == "SIGKILL" for e in events)
    unexpected = Counter(e["exit"] for e in events if e["exit"] not in EXPECTED_EXITS and not e.get("after_the_end"))
    summary = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "machine": platform.machine(), "cpus": os.cpu_count(),
                    "python": platform.python_version(), "torch": torch.__version__},
        "settings": {"steps": steps, "save_every": save_every, "interruptions_planned": interruptions,
                     "seed": seed, "num_workers": workers},
        "interruptions": len(events), "sigkill_to_main": n_kill, "sigterm_to_group": len(events) - n_kill,
        "during_save": sum(e["during_save"] for e in events), "resumes": resumes, "fresh_starts": fresh_starts,
        "exit_codes": {str(k): v for k, v in sorted(exits.items())},
        "unexpected_exits": {str(k): v for k, v in sorted(unexpected.items())},
        "broken_checkpoints": len(broken), "broken": broken,
        "stale_temp_folders": temp_checkpoints(run), "incomplete_checkpoint_folders": incomplete,
        "lingering_process_groups": lingering,
        "equal_bitwise": cmp["equal"], "comparison": cmp,
        "seconds": {"reference": round(reference_s, 1), "interrupted": round(interrupted_s, 1)},
        "events": events,
    }
    summary["ok"] = (cmp["equal"] and not broken and not unexpected and not lingering and not incomplete
                     and not summary["stale_temp_folders"])
    (out / "soak.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def report(s: dict) -> str:
    c, m = s["comparison"], s["machine"]
    lines = [
        f"soak: {s['interruptions']} interruptions of a {s['settings']['steps']}-step run (save every "
        f"{s['settings']['save_every']}, {s['settings']['num_workers']} DataLoader workers, seed {s['settings']['seed']})",
        f"  SIGKILL to the main process   {s['sigkill_to_main']}",
        f"  SIGTERM to the process group  {s['sigterm_to_group']}",
        f"  of which during a save        {s['during_save']}",
        f"  resumes / fresh starts        {s['resumes']} / {s['fresh_starts']}",
        f"  exit codes                    {s['exit_codes']}" + (f" (unexpected: {s['unexpected_exits']})"
                                                                 if s["unexpected_exits"] else ""),
        f"  broken checkpoints            {s['broken_checkpoints']}",
        f"  stale temp folders            {len(s['stale_temp_folders'])}",
        f"  other unloadable checkpoints  {len(s['incomplete_checkpoint_folders'])}",
        f"  lingering processes           {s['lingering_process_groups']} process groups",
        f"  final state vs uninterrupted  weights {c.get('weights_equal')}, adapters {c.get('adapters_equal')}, "
        f"optimizer {c.get('optimizer_equal')}, data position {c.get('position_equal')}, log.jsonl "
        f"{c.get('log_equal')} -> {'bitwise equal' if s['equal_bitwise'] else 'DIFFERENT'}"
        + ("" if s["equal_bitwise"] else f" (max abs diff {c.get('max_abs_diff')}; {c['mismatches'][:5]})"),
        f"  time                          reference {s['seconds']['reference']} s, interrupted "
        f"{s['seconds']['interrupted']} s",
        f"  machine                       {m['platform']}, {m['cpus']} CPUs, python {m['python']}, torch "
        f"{m['torch']}, {s['date']}",
        "  verdict                       " + ("OK" if s["ok"] else "FAILED"),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/soak")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 36; --quick 16)")
    p.add_argument("--save-every", type=int, default=3)
    p.add_argument("--interruptions", type=int, default=None, help="default 10; --quick 3")
    p.add_argument("--seed", type=int, default=0, help="seed of the interruption schedule")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    steps = args.steps or (16 if args.quick else 36)
    n = args.interruptions if args.interruptions is not None else (3 if args.quick else 10)
    summary = soak(Path(args.out), steps, args.save_every, n, args.seed, args.num_workers)
    print(report(summary))
    print(f"written: {Path(args.out) / 'soak.json'}")
    if not summary["ok"]:
        raise SystemExit(1)
    return summary


if __name__ == "__main__":
    main()
