"""Checkpoint folders of a training run: atomic saves in the official MobileVLM layout, `latest`, pruning, the
resume state (optimizer, scheduler, RNGs, data position) and log.jsonl's trimming on resume.

OUTPUT_DIR/checkpoint-STEP/ holds config.json + pytorch_model.bin (+ tokenizer files, vision_tower/), the Align-KD
adapters (alignkd_adapters.pt), lora_trainable.pt or master_weights.pt when used, trainer_state.pt (tensors only) and
trainer_state.json (counters, arguments, numpy/Python RNG). Every file is read back with weights_only=True.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from losses import AlignKDLoss
from model import MobileVLM
from model.lora import is_lora, merged_state_dict, trainable_state_dict
from model.master_weights import MasterWeights
from training.sharding import load_whole, optimizer_state_like, placed_like


def trained_tensors(student: MobileVLM, loss_fn: AlignKDLoss | None, opt,
                    masters: MasterWeights | None = None) -> dict:
    """What a checkpoint stores of the trained state, as the run holds it (DTensor shards under FSDP): the student's
    weights (LoRA merged), the LoRA adapters, the Align-KD adapters, the optimizer state and the fp32 masters."""
    lora = is_lora(student)
    return {"student": merged_state_dict(student) if lora else student.state_dict(),
            "lora": trainable_state_dict(student) if lora else None,
            "adapters": loss_fn.state_dict() if loss_fn is not None else None,
            "optimizer": opt.state_dict(), "masters": masters.masters() if masters is not None else None}


def save_checkpoint(out: Path, step: int, student: MobileVLM, loss_fn: AlignKDLoss | None, opt, sched, state: dict,
                    tokenizer_dir: Path, keep: int, masters: MasterWeights | None = None,
                    tensors: dict | None = None) -> Path:
    """Write checkpoint-STEP atomically: build it in a temp folder, rename, then repoint `latest`. `tensors`: the
    `trained_tensors` to write (whole tensors gathered from the ranks under FSDP); default: the modules' own."""
    t = tensors if tensors is not None else trained_tensors(student, loss_fn, opt, masters)
    final = out / f"checkpoint-{step}"
    tmp = out / f".tmp-checkpoint-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    student.save_pretrained(tmp, tokenizer_dir=tokenizer_dir, state_dict=t["student"],
                            final_path=final)  # config.json names final/vision_tower, where it will be
    if t["lora"] is not None:  # the merged weights serve evaluation; resuming needs the adapters on top of the base
        torch.save(t["lora"], tmp / "lora_trainable.pt")
    if t["masters"] is not None:  # the bf16 weights are rounded: exact resume needs the fp32 copies
        torch.save(t["masters"], tmp / "master_weights.pt")
    if t["adapters"] is not None:  # a --no-distill run has no adapters to keep
        torch.save(t["adapters"], tmp / "alignkd_adapters.pt")
    # tensors only (loadable with weights_only=True); counters, arguments and the numpy/python RNG states as JSON
    torch.save({"optimizer": t["optimizer"], "scheduler": sched.state_dict(), "torch_rng": torch.get_rng_state()},
               tmp / "trainer_state.pt")
    (tmp / "trainer_state.json").write_text(json.dumps({**state, "rng": rng_state_json()}, indent=1, default=_jsonable))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    latest_tmp = out / "latest.tmp"
    latest_tmp.write_text(final.name + "\n")
    os.replace(latest_tmp, out / "latest")
    prune_checkpoints(out, final, keep)
    return final


def checkpoint_step(path: Path) -> int | None:
    step = path.name.removeprefix("checkpoint-")
    return int(step) if path.name.startswith("checkpoint-") and step.isdigit() and path.is_dir() else None


def prune_checkpoints(out: Path, current: Path, keep: int) -> None:
    """Keep `current` and the keep-1 newest checkpoints before it (keep < 1: keep all). Checkpoints numbered above
    `current` (left by a run that this one continues from an earlier step) are removed first."""
    if keep < 1:
        return
    step = checkpoint_step(current)
    others = [(s, p) for p in out.glob("checkpoint-*") if (s := checkpoint_step(p)) is not None and p != current]
    others.sort(key=lambda sp: (sp[0] < step, sp[0]), reverse=True)
    for _, old in others[keep - 1:]:
        shutil.rmtree(old, ignore_errors=True)


def _jsonable(x):
    return sorted(x) if isinstance(x, (set, frozenset)) else str(x)


def rng_state_json() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"numpy": [name, keys.tolist(), pos, has_gauss, cached], "python": [version, list(internal), gauss_next]}


def set_rng_state_json(rng: dict) -> None:
    name, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = rng["python"]
    random.setstate((version, tuple(internal), gauss_next))


def load_tensors(path: Path, map_location) -> object:
    """torch.load with weights_only=True: tensors and plain data only, never arbitrary objects. A file that holds
    anything else, or cannot be read, is a one-line error."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        m = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\s+Please use|\n|$)", str(e))
        raise SystemExit(f"error: {path} is refused: it holds more than tensors and plain data "
                         f"({m.group(1) if m else 'not loadable with weights_only=True'})") from None
    except Exception as e:  # cut short, not a torch file, ...
        raise SystemExit(f"error: cannot read {path}: {type(e).__name__}: {str(e).strip()[:200] or 'empty'}") from None


def latest_checkpoint(out: Path) -> Path | None:
    pointer = out / "latest"
    if not pointer.exists():
        return None
    ckpt = out / pointer.read_text().strip()
    return ckpt if (ckpt / "trainer_state.pt").exists() and (ckpt / "trainer_state.json").exists() else None


def existing_run(out: Path) -> list[str]:
    """What in OUTPUT_DIR belongs to an earlier run: its checkpoints (by step) and the `latest` pointer."""
    found = sorted((s, p.name) for p in out.glob("checkpoint-*") if (s := checkpoint_step(p)) is not None)
    return [name for _, name in found] + (["latest"] if (out / "latest").exists() else [])


def clear_run(out: Path) -> None:
    """--overwrite: delete the earlier run's checkpoints (and unfinished ones), `latest` and log.jsonl."""
    for p in [*out.glob("checkpoint-*"), *out.glob(".tmp-checkpoint-*")]:
        if p.is_dir():
            shutil.rmtree(p)
    for name in ("latest", "latest.tmp", "log.jsonl", "log.jsonl.tmp"):
        (out / name).unlink(missing_ok=True)


def remove_unfinished_saves(out: Path) -> list[str]:
    """On resume: delete what a save killed midway left (a temporary checkpoint folder, `latest.tmp`); `latest` never
    points to them. Returns their names."""
    found = sorted(p.name for p in out.glob(".tmp-checkpoint-*") if p.is_dir())
    for name in found:
        shutil.rmtree(out / name, ignore_errors=True)
    if (out / "latest.tmp").exists():
        (out / "latest.tmp").unlink()
        found.append("latest.tmp")
    return found


def trim_log(path: Path, step: int) -> int:
    """On resume from checkpoint-STEP: keep one record per step up to STEP (a step-0 evaluation included), drop the
    records a stopped run wrote after its last checkpoint (and a line cut short); rewritten atomically. Returns the
    number of lines dropped."""
    if not path.exists():
        return 0
    lines = path.read_text(errors="replace").splitlines()
    kept: dict[int, str] = {}
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step:
            kept[rec["step"]] = line  # a repeated step: the later record is the one this checkpoint continues
    dropped = len(lines) - len(kept)
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept[s] + "\n" for s in sorted(kept)))
        os.replace(tmp, path)
    return dropped



def resume_checkpoint(out: Path) -> Path:
    """The checkpoint `--resume` continues from: OUTPUT_DIR's latest complete one (a one-line error otherwise)."""
    ckpt = latest_checkpoint(out)
    if ckpt is None:
        pointed = out / (out / "latest").read_text().strip() if (out / "latest").exists() else None
        if pointed is not None and (pointed / "trainer_state.pt").exists():
            raise SystemExit(f"error: --resume: {pointed} has no trainer_state.json (an older checkpoint format, "
                             f"whose trainer_state.pt is not loaded: it needs unrestricted unpickling)")
        raise SystemExit(f"error: --resume but {out} has no complete checkpoint")
    return ckpt


def load_checkpoint(ckpt: Path, student: MobileVLM, loss_fn: AlignKDLoss | None, opt, sched,
                    masters: MasterWeights | None, vision_tower: str | None, device: torch.device,
                    dtype: torch.dtype) -> dict:
    """Restore what `save_checkpoint` wrote into the built run (weights, adapters, fp32 masters, optimizer,
    scheduler, torch/numpy/Python RNG); returns trainer_state.json (step, epoch, offset, skipped, args)."""
    if is_lora(student):
        student.load_state_dict(load_tensors(ckpt / "lora_trainable.pt", device), strict=False)
    else:
        try:
            resumed = MobileVLM.from_pretrained(ckpt, vision_tower=vision_tower, dtype=dtype,
                                                device=device)  # weights_only=True (model/checkpoint.py)
        except pickle.UnpicklingError:
            raise SystemExit(f"error: {ckpt} is refused: its weights hold more than tensors") from None
        load_whole(student, resumed.state_dict())
        del resumed
    if loss_fn is not None:
        load_whole(loss_fn, load_tensors(ckpt / "alignkd_adapters.pt", device))
    st = load_tensors(ckpt / "trainer_state.pt", "cpu")
    try:
        info = json.loads((ckpt / "trainer_state.json").read_text())
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: cannot read {ckpt / 'trainer_state.json'}: {e}") from None
    if masters is not None:
        if (ckpt / "master_weights.pt").exists():
            saved = load_tensors(ckpt / "master_weights.pt", device)
            masters.load_masters([placed_like(t, m) for t, m in zip(saved, masters.masters(), strict=True)])
        else:
            masters.load_masters([p.detach() for p, m in masters.pairs if m is not p])
    opt.load_state_dict(optimizer_state_like(st["optimizer"], opt))
    sched.load_state_dict(st["scheduler"])
    torch.set_rng_state(st["torch_rng"]), set_rng_state_json(info["rng"])
    return info
