"""Align-KD training: distill MobileVLM V2-7B (teacher) into MobileVLM V2-1.7B (student) on one GPU.

    python train_alignkd.py                      # the embedded demo: synthetic data, tiny models, about a minute
    python train_alignkd.py --subset sharegpt4v --student DIR --teacher DIR --data-root DIR

One readable loop: batch -> shared CLIP features -> student (grad) and teacher (no grad) forwards -> Align-KD losses
(CE + logit KD + layer-0 text->vision attention + projector KD on all and on text-focused tokens) -> step.
Checkpoints are written atomically in the official MobileVLM layout, with the adapters and the optimizer state,
and `--resume` continues from the latest one with the same data order. Ctrl-C or SIGTERM (a cluster's preemption
notice) finishes the current optimizer step, saves a checkpoint and exits; a second one aborts at once.
`--cache-teacher DIR` stores the teacher's part of the losses once (model/teacher_cache.py) and trains from it
without the teacher.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import pickle
import random
import re
import shutil
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm
from transformers import get_cosine_schedule_with_warmup

from data import SUBSETS, Collator, DataFileError, LLaVADataset, load_tokenizer, resolve_subset
from data.dataset import IMAGE_MODES
from data.templates import TEMPLATES
from data.tokenizer import tokenizer_fingerprint
from data.workers import ignore_stop_signals, iterate as iterate_loader
from evaluation.heldout import HeldOut
from kernels.alignkd_loss import ATTN_FORMS, PROJ_SIDES, AlignKDLoss, KDBatch, KDSide
from model import MobileVLM
from model.master_weights import MasterWeights
from model.lora import apply_lora, is_lora, lora_parameter_counts, merged_state_dict, trainable_state_dict
from model.quantize import load_teacher, model_bytes
from model.teacher_cache import (DEFAULT_SHARD_SIZE, CacheMismatch, IndexedCollator, IndexedDataset, TeacherCache,
                                 build_cache, check_cache, make_manifest, teacher_fingerprint)

log = logging.getLogger("alignkd")
TERMS = ("loss", "ce", "logit", "attn", "proj_all", "proj_focus")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--subset", choices=sorted(SUBSETS), help="sharegpt4v (stage 1, plain) or mix2m (stage 2, v1) "
                   "under --data-root; without --subset and --data the shapes-world demo runs")
    p.add_argument("--data-root", help="MobileVLM data layout root (pretrain_data/, finetune_data/)")
    p.add_argument("--data", help="a LLaVA-format JSON (with --image-folder); with --subset it replaces the subset's")
    p.add_argument("--image-folder", help="image folder for --data")
    p.add_argument("--template", choices=TEMPLATES, help="template of --data without --subset (default v1)")
    p.add_argument("--image-mode", choices=IMAGE_MODES, help="image preprocessing of --data without --subset "
                   "(default pad)")
    p.add_argument("--eval-data", help="held-out LLaVA JSON: answer CE per supervised token and greedy exact match "
                   "at the start, every --eval-every steps and at the end (progress bar and log.jsonl)")
    p.add_argument("--eval-image-folder", help="image folder of --eval-data (default: the training image folder)")
    p.add_argument("--eval-every", type=int, default=0, help="evaluate every N optimizer steps (0: start and end)")
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N held-out records")
    p.add_argument("--no-eval-at-start", action="store_true", help="skip the held-out evaluation before step 1")
    p.add_argument("--student", help="MobileVLM checkpoint folder, or a LLaMA folder (with --vision-tower)")
    p.add_argument("--teacher", help="MobileVLM checkpoint folder (MobileVLM_V2-7B)")
    p.add_argument("--vision-tower", help="local CLIP folder (config, and weights for a LLaMA-folder student)")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the student's folder)")
    p.add_argument("--output-dir", default="runs/alignkd")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default: --epochs over the data)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=1, help="micro-batch size")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--projector-lr", type=float, default=None, help="projector (and adapter) lr; default --lr")
    p.add_argument("--warmup-ratio", type=float, default=0.03)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--max-len", type=int, default=2048, help="longest sequence, image counted as 144 tokens")
    p.add_argument("--seed", type=int, default=0)
    # defaults: the best measured in the shapes world (bench/ablate.py, README); the paper's literal objective is
    # --attn-form mse --w-attn 1 --w-proj-all 1 --w-proj-focus 1
    p.add_argument("--w-logit", type=float, default=1.0)
    p.add_argument("--w-attn", type=float, default=0.1)
    p.add_argument("--attn-form", choices=ATTN_FORMS, default="kl",
                   help="kl (default): KL between the teacher's head-mixed and the student's layer-0 attention "
                        "renormalized over the vision keys (O(1)); mse: the paper's literal form, MSE of text->vision "
                        "attention probabilities through a 1x1 conv over heads (probabilities are ~1/L, so the term "
                        "is ~1e-5)")
    p.add_argument("--w-proj-all", type=float, default=0.0, help="the paper uses 1")
    p.add_argument("--w-proj-focus", type=float, default=0.0, help="the paper uses 1")
    p.add_argument("--proj-side", choices=PROJ_SIDES, default="teacher",
                   help="teacher: the paper's adapter A(teacher tokens) ~ student tokens; student: A(student tokens) "
                        "~ teacher tokens (the adapter cannot absorb the loss by itself)")
    p.add_argument("--topk", type=int, default=16, help="text-focus vision tokens per sample")
    p.add_argument("--kl", choices=("forward", "reverse"), default="forward")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--no-distill", action="store_true", help="plain fine-tuning baseline: CE only, no teacher")
    p.add_argument("--train-vision-tower", action="store_true",
                   help="train the CLIP too (with --no-distill only: a distilled student shares the teacher's frozen CLIP)")
    p.add_argument("--probe-grads", default="", metavar="STEPS",
                   help="comma-separated steps at which each weighted term's gradient norm on the student's "
                        "parameters is measured on that step's first micro-batch (log.jsonl: grad_norms)")
    p.add_argument("--backend", choices=("auto", "triton", "reference"), default="auto", help="Align-KD loss kernels")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR's latest checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in an OUTPUT_DIR that holds one: delete its checkpoints, `latest` and "
                        "log.jsonl first (without --resume or --overwrite such a folder is refused)")
    p.add_argument("--save-every", type=int, default=500, help="checkpoint every N optimizer steps (and at the end)")
    p.add_argument("--keep", type=int, default=2, help="checkpoints to keep")
    p.add_argument("--log-every", type=int, default=1)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-checkpointing", action="store_true", help="disable the student's activation checkpointing")
    p.add_argument("--teacher-dtype", choices=("auto", "nf4", "bf16"), default="auto",
                   help="teacher weights: 4-bit NF4 (default on CUDA) or unquantized (default on CPU)")
    p.add_argument("--optim", choices=("auto", "adamw8bit", "adamw"), default="auto",
                   help="auto: bitsandbytes paged 8-bit AdamW on CUDA, torch AdamW on CPU")
    p.add_argument("--master-weights", choices=("auto", "fp32", "none"), default="auto",
                   help="fp32 copies of bf16 trainable weights (auto: on for a bf16 student without LoRA)")
    p.add_argument("--lora-r", type=int, default=0, help="train LoRA adapters of this rank (+ the projector)")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop (with a checkpoint) after this many steps of this run; --resume continues")
    p.add_argument("--cache-teacher", metavar="DIR",
                   help="store what the losses need from the teacher in DIR (one resumable pass over the data, with "
                        "--teacher), then train from DIR without loading the teacher; a complete DIR is reused as "
                        "is. --teacher may be left out when DIR is complete (its recorded teacher is used; given, "
                        "it is checked). A DIR made with another teacher, tokenizer, data file, template, image mode "
                        "or --max-len is refused. Size: see model/teacher_cache.py (~2.5-26 MB per sample at 7B shapes)")
    p.add_argument("--cache-shard-size", type=int, default=DEFAULT_SHARD_SIZE, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.projector_lr is None:
        args.projector_lr = args.lr
    args.probe_steps = {int(x) for x in args.probe_grads.split(",") if x.strip()}
    return args


# ---- models -----------------------------------------------------------------------------------------------------------

def load_model(path: str, args: argparse.Namespace, dtype: torch.dtype, what: str) -> MobileVLM:
    folder = Path(path)
    if not folder.is_dir():
        raise SystemExit(f"error: {what} folder {folder} does not exist")
    cfg = json.loads((folder / "config.json").read_text()) if (folder / "config.json").exists() else {}
    if cfg.get("model_type") not in (None, "mobilevlm") or (cfg and "mm_projector_type" not in cfg):
        if not args.vision_tower:
            raise SystemExit(f"error: {what} {folder} is a plain language model: pass --vision-tower CLIP_DIR")
        return MobileVLM.from_llm(folder, args.vision_tower, dtype=dtype, device=args.device)
    return MobileVLM.from_pretrained(folder, vision_tower=args.vision_tower, dtype=dtype, device=args.device)


def same_vision_tower(a: MobileVLM, b: MobileVLM) -> bool:
    """Whether two models carry the same CLIP: same config and bit-identical weights (compared on the device)."""
    if a.vision_tower.vision_tower.config.to_dict() != b.vision_tower.vision_tower.config.to_dict():
        return False
    sa, sb = a.vision_tower.state_dict(), b.vision_tower.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k].to(sa[k].device, sa[k].dtype)) for k in sa)


def resolve_quant(args: argparse.Namespace, device: torch.device) -> str:
    return args.teacher_dtype if args.teacher_dtype != "auto" else ("nf4" if device.type == "cuda" else "bf16")


def load_frozen_teacher(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, tokenizer) -> MobileVLM:
    quant = resolve_quant(args, device)
    if not Path(args.teacher).is_dir():
        raise SystemExit(f"error: teacher folder {args.teacher} does not exist")
    teacher = load_teacher(args.teacher, quant, args.vision_tower, device, compute_dtype=dtype)
    log.info(f"teacher: {quant if quant == 'nf4' else str(dtype).removeprefix('torch.')}, "
             f"{model_bytes(teacher) / 2**20:,.1f} MiB of weights")
    t_tok = Path(args.teacher)
    if (t_tok / "tokenizer.model").exists() or (t_tok / "tokenizer.json").exists():
        if tokenizer_fingerprint(load_tokenizer(t_tok)) != tokenizer_fingerprint(tokenizer):
            raise SystemExit("error: teacher and student tokenizers differ; logit KD needs one vocabulary")
    return teacher


def prepare_teacher_cache(args: argparse.Namespace, dataset, tokenizer, data_desc: tuple, device: torch.device,
                          dtype: torch.dtype) -> TeacherCache:
    """--cache-teacher DIR: refuse a cache made from something else, build what is missing (the teacher is loaded
    for this pass only, then freed), and open it for reading."""
    json_path, image_folder, template, image_mode = data_desc
    teacher_id = teacher_fingerprint(args.teacher, resolve_quant(args, device), args.vision_tower) \
        if args.teacher else None
    expected = make_manifest(teacher_id, tokenizer_fingerprint(tokenizer), json_path, image_folder, template,
                             image_mode, args.max_len, len(dataset), args.cache_shard_size, dtype)
    try:
        state = check_cache(args.cache_teacher, expected, check_quant=args.teacher_dtype != "auto")
        if state != "complete":
            if teacher_id is None:
                raise SystemExit(f"error: teacher cache {args.cache_teacher} is {state}: pass --teacher to build it")
            teacher = load_frozen_teacher(args, device, dtype, tokenizer)
            teacher.enable_qk_capture()
            with torch.random.fork_rng(devices=[]):  # the run's random state is the same with or without this pass
                build_cache(args.cache_teacher, teacher, dataset, expected, args.batch_size, args.num_workers,
                            tokenizer.pad_token_id)
            del teacher
            if device.type == "cuda":
                torch.cuda.empty_cache()
        cache = TeacherCache(args.cache_teacher)
    except CacheMismatch as e:
        raise SystemExit(f"error: {e}") from None
    log.info(f"teacher: not loaded; read from {args.cache_teacher}: {cache.describe()}"
             + ("" if teacher_id else " (no --teacher: not checked against a teacher folder)"))
    return cache


# ---- checkpoints --------------------------------------------------------------------------------------------------------

def save_checkpoint(out: Path, step: int, student: MobileVLM, loss_fn: AlignKDLoss | None, opt, sched, state: dict,
                    tokenizer_dir: Path, keep: int, masters: MasterWeights | None = None) -> Path:
    """Write checkpoint-STEP atomically: build it in a temp folder, rename, then repoint `latest`."""
    final = out / f"checkpoint-{step}"
    tmp = out / f".tmp-checkpoint-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    lora = is_lora(student)
    student.save_pretrained(tmp, tokenizer_dir=tokenizer_dir, state_dict=merged_state_dict(student) if lora else None,
                            final_path=final)  # config.json names final/vision_tower, where it will be
    if lora:  # the merged weights serve evaluation; resuming needs the adapters on top of the base model
        torch.save(trainable_state_dict(student), tmp / "lora_trainable.pt")
    if masters is not None:  # the bf16 weights are rounded: exact resume needs the fp32 copies
        torch.save(masters.masters(), tmp / "master_weights.pt")
    if loss_fn is not None:  # a --no-distill run has no adapters to keep
        torch.save(loss_fn.state_dict(), tmp / "alignkd_adapters.pt")
    # tensors only (loadable with weights_only=True); counters, arguments and the numpy/python RNG states as JSON
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "torch_rng": torch.get_rng_state()},
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


# ---- data order -------------------------------------------------------------------------------------------------------

class EpochSampler(torch.utils.data.Sampler):
    """A seeded permutation per epoch, started at an offset: a resumed run sees exactly the remaining samples."""

    def __init__(self, n: int, seed: int, epoch: int = 0, start: int = 0):
        self.n, self.seed, self.epoch, self.start = n, seed, epoch, start

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g)[self.start:].tolist())

    def __len__(self) -> int:
        return self.n - self.start


def oom_message(args: argparse.Namespace, device: torch.device) -> str:
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return (f"error: out of GPU memory (peak allocated {peak:.2f} GiB, batch {args.batch_size}, max-len "
            f"{args.max_len}). Lower it with: --batch-size 1 and a larger --grad-accum, a smaller --max-len, "
            f"--teacher-dtype nf4, --optim adamw8bit, --lora-r 64, or activation checkpointing (on unless "
            f"--no-checkpointing).")


def make_optimizer(groups: list[dict], args: argparse.Namespace, device: torch.device) -> torch.optim.Optimizer:
    kind = args.optim if args.optim != "auto" else ("adamw8bit" if device.type == "cuda" else "adamw")
    kw = dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=args.weight_decay)
    if kind == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(groups, **kw)
    return torch.optim.AdamW(groups, **kw)


def distill_forward(student: MobileVLM, teacher: MobileVLM | None, loss_fn: AlignKDLoss, batch: dict,
                    device: torch.device, dtype: torch.dtype, shared_vision: bool = True, cache=None,
                    distill: bool = True, separate: bool = False) -> dict[str, torch.Tensor]:
    """One micro-batch: one CLIP forward, the student (with grad), the teacher (no grad; or its cached tensors),
    and the Align-KD terms (nothing is backpropagated here)."""
    ids = batch["input_ids"].to(device)
    mask = batch["attention_mask"].to(device)
    labels = batch["labels"].to(device)
    images = batch["images"].to(device, dtype)
    has_image = batch["has_image"].to(device)
    feats = student.encode_images(images[has_image]) if bool(has_image.any()) else None
    s = student(ids, mask, labels=labels, image_features=feats, compute_logits=False)
    kd_batch = KDBatch(labels=s.mm.labels, attention_mask=s.mm.attention_mask, vision_mask=s.mm.vision_mask,
                       text_mask=s.mm.text_mask, has_image=s.mm.has_image, vision_start=s.mm.vision_start)
    s_side = KDSide(s.hidden_states, student.lm_head.weight, s.q0, s.k0, s.mm.vision_tokens)
    t_side = None
    if cache is not None:  # the teacher's tensors of these samples, stored by --cache-teacher
        t_side = cache.teacher_side(batch["index"], kd_batch, device, dtype)
    elif teacher is not None:
        with torch.no_grad():
            t_feats = feats if shared_vision or feats is None else teacher.encode_images(images[has_image])
            t = teacher(ids, mask, image_features=t_feats, compute_logits=False)
        t_side = KDSide(t.hidden_states, teacher.lm_head.weight, t.q0, t.k0, t.mm.vision_tokens)
    return loss_fn(s_side, t_side, kd_batch, distill=distill, separate=separate)


def clip_gradients(student_params: list, adapters: list, max_norm: float) -> tuple[float, float | None]:
    """Clip the student's and the Align-KD adapters' gradients each to `max_norm`, separately: one shared norm would
    let the adapters' gradients (large under a heavily weighted term) shrink the student's update. Returns the two
    norms before clipping (None without adapters)."""
    s = float(torch.nn.utils.clip_grad_norm_(student_params, max_norm))
    a = float(torch.nn.utils.clip_grad_norm_(adapters, max_norm)) if adapters else None
    return s, a


def probe_term_grads(student: MobileVLM, teacher: MobileVLM | None, loss_fn: AlignKDLoss, batch: dict,
                     device: torch.device, dtype: torch.dtype, shared_vision: bool, cache, distill: bool
                     ) -> dict[str, float]:
    """L2 norm of each weighted term's gradient on the student's trainable parameters (adapters excluded), from a
    separate forward of one micro-batch; nothing is accumulated into .grad."""
    params = [p for p in student.parameters() if p.requires_grad]
    terms = distill_forward(student, teacher, loss_fn, batch, device, dtype, shared_vision, cache, distill,
                            separate=True)
    norms = {}
    for k in TERMS[1:]:
        t = terms.get(k)
        if t is None or not t.requires_grad:
            norms[k] = 0.0
            continue
        grads = torch.autograd.grad(t, params, retain_graph=True, allow_unused=True)
        norms[k] = float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None)))
    return norms


# ---- main -------------------------------------------------------------------------------------------------------------

class StopRequest:
    """SIGINT/SIGTERM while training: the first asks the loop to save and stop after the current optimizer step (a
    step of many accumulated micro-batches is not thrown away); a second one raises KeyboardInterrupt at once. The
    DataLoader workers ignore both (data/workers.py), so a signal sent to the whole process group (Slurm, `timeout`,
    Ctrl-C) is handled here alone."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def __enter__(self) -> "StopRequest":
        try:
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        except ValueError:  # not the main thread (the first signal.signal raises): signals stay as they are
            pass
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        log.info(f"{signal.Signals(signum).name}: saving a checkpoint after this step, then stopping "
                 f"(send it again to abort without saving)")


def resolve_data(args: argparse.Namespace) -> tuple[Path, Path, str, str]:
    """(json, image folder, template, image mode): a named subset (whose paths --data/--image-folder may replace), or
    --data + --image-folder with --template / --image-mode."""
    if args.subset:
        if args.template or args.image_mode:
            raise SystemExit(f"error: --template/--image-mode are for --data without --subset ({args.subset} is "
                             f"{SUBSETS[args.subset].template}, {SUBSETS[args.subset].image_mode})")
        return resolve_subset(args.subset, args.data_root, args.data, args.image_folder)
    if not args.image_folder:
        raise SystemExit("error: --data needs --image-folder DIR (the folder its records' image paths are relative to)")
    json_path, folder = Path(args.data), Path(args.image_folder)
    if not json_path.is_file():
        raise SystemExit(f"error: --data {json_path} does not exist")
    if not folder.is_dir():
        raise SystemExit(f"error: --image-folder {folder} does not exist")
    return json_path, folder, args.template or "v1", args.image_mode or "pad"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.subset and not args.data:
        if argv is None and len(sys.argv) == 1:
            from demo import run_demo

            return run_demo()
        raise SystemExit("error: give --subset NAME (with --data-root) or --data FILE --image-folder DIR; "
                         "run with no arguments for the demo")
    if not args.student or (not args.teacher and not args.no_distill and not args.cache_teacher):
        raise SystemExit("error: --student and --teacher are required (or --no-distill without --teacher); "
                         "run with no arguments for the demo")
    if args.cache_teacher and args.no_distill:
        raise SystemExit("error: --cache-teacher stores a teacher for distillation; --no-distill uses none")
    if args.train_vision_tower and not args.no_distill:
        raise SystemExit("error: --train-vision-tower needs --no-distill (teacher and student share a frozen CLIP)")
    for what, folder in (("student", args.student), ("teacher", None if args.no_distill else args.teacher),
                         ("tokenizer", args.tokenizer), ("vision tower", args.vision_tower),
                         ("eval image folder", args.eval_image_folder)):
        if folder is not None and not Path(folder).is_dir():
            raise SystemExit(f"error: {what} folder {folder} does not exist")
    if args.eval_data and not Path(args.eval_data).is_file():
        raise SystemExit(f"error: --eval-data {args.eval_data} does not exist")
    out = Path(args.output_dir)
    if args.resume and args.overwrite:
        raise SystemExit("error: --resume continues the run in OUTPUT_DIR, --overwrite deletes it: give one")
    held = existing_run(out) if not args.resume and out.is_dir() else []
    if held and not args.overwrite:
        shown = ", ".join(held if len(held) <= 4 else [*held[:3], "...", held[-1]])
        raise SystemExit(f"error: {out} already holds a run ({shown}): continue it with --resume, or start anew "
                         f"with --overwrite (deletes its checkpoints, latest and log.jsonl)")
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    random.seed(args.seed), np.random.seed(args.seed), torch.manual_seed(args.seed)

    # data
    tok_dir = Path(args.tokenizer or args.student)
    tokenizer = load_tokenizer(tok_dir)
    json_path, image_folder, template, image_mode = resolve_data(args)
    dataset = LLaVADataset(json_path, image_folder, tokenizer, template, image_mode, args.max_len,
                           cache_dir=out / "index_cache")
    log.info(f"data: {json_path} ({len(dataset)} records, template {template}, images {image_mode})")
    heldout = HeldOut(args.eval_data, args.eval_image_folder or image_folder, tokenizer, template, image_mode,
                      args.max_len, args.eval_limit, cache_dir=out / "index_cache") if args.eval_data else None
    cache = prepare_teacher_cache(args, dataset, tokenizer, (json_path, image_folder, template, image_mode), device,
                                  dtype) if args.cache_teacher else None

    # models
    student = load_model(args.student, args, dtype, "student")
    teacher, shared_vision = None, False
    distill = not args.no_distill  # from the live teacher, or from the cache
    if distill and cache is None:
        teacher = load_frozen_teacher(args, device, dtype, tokenizer)
        if same_vision_tower(student, teacher):
            log.info("vision towers are identical: one CLIP forward feeds both models")
            teacher.model.vision_tower = student.model.vision_tower
            shared_vision = True
        else:
            log.info("vision towers differ: each model runs its own CLIP")
        teacher.enable_qk_capture()
    student.enable_qk_capture()
    if args.lora_r:
        apply_lora(student, args.lora_r)
        log.info(f"LoRA r={args.lora_r}: trainable {lora_parameter_counts(student)}")
    if args.train_vision_tower:
        student.vision_tower.set_trainable(True)
    if not args.no_checkpointing:
        student.enable_activation_checkpointing()
    student.train()
    t_shape = cache or teacher or student  # heads and width of the teacher (the student's for the baseline)
    loss_fn = AlignKDLoss(
        teacher_heads=t_shape.num_heads, student_heads=student.num_heads,
        teacher_dim=t_shape.hidden_size, student_dim=student.hidden_size,
        w_logit=args.w_logit, w_attn=args.w_attn, w_proj_all=args.w_proj_all, w_proj_focus=args.w_proj_focus,
        topk=args.topk, kl=args.kl, temperature=args.temperature, backend=args.backend, attn_form=args.attn_form,
        proj_side=args.proj_side).to(device)

    # optimizer: LLM at --lr, projector and adapters (and a trained vision tower) at --projector-lr
    proj_params = list(student.mm_projector.parameters())
    if args.train_vision_tower:
        proj_params += list(student.vision_tower.parameters())
    proj_ids = {id(p) for p in proj_params}
    llm_params = [p for p in student.parameters() if p.requires_grad and id(p) not in proj_ids]
    groups = [{"params": llm_params, "lr": args.lr},
              {"params": proj_params, "lr": args.projector_lr}]
    adapters = list(loss_fn.parameters()) if distill else []
    if adapters:
        groups.append({"params": adapters, "lr": args.projector_lr})
    use_masters = args.master_weights == "fp32" or (args.master_weights == "auto" and dtype != torch.float32
                                                         and not args.lora_r)
    masters = MasterWeights(groups) if use_masters else None
    opt = make_optimizer(masters.groups if masters else groups, args, device)
    micro_per_epoch = max(1, len(dataset) // args.batch_size)
    total = args.max_steps or max(1, int(args.epochs * micro_per_epoch / args.grad_accum))
    sched = get_cosine_schedule_with_warmup(opt, int(args.warmup_ratio * total), total)  # as MobileVLM trains

    # resume
    step, epoch, offset, skipped = 0, 0, 0, Counter()
    if args.resume:
        ckpt = latest_checkpoint(out)
        if ckpt is None:
            pointed = out / (out / "latest").read_text().strip() if (out / "latest").exists() else None
            if pointed is not None and (pointed / "trainer_state.pt").exists():
                raise SystemExit(f"error: --resume: {pointed} has no trainer_state.json (an older checkpoint format, "
                                 f"whose trainer_state.pt is not loaded: it needs unrestricted unpickling)")
            raise SystemExit(f"error: --resume but {out} has no complete checkpoint")
        if is_lora(student):
            student.load_state_dict(load_tensors(ckpt / "lora_trainable.pt", device), strict=False)
        else:
            try:
                resumed = MobileVLM.from_pretrained(ckpt, vision_tower=args.vision_tower, dtype=dtype,
                                                    device=args.device)  # weights_only=True (model/checkpoint.py)
            except pickle.UnpicklingError:
                raise SystemExit(f"error: {ckpt} is refused: its weights hold more than tensors") from None
            student.load_state_dict(resumed.state_dict())
            del resumed
        if distill:
            loss_fn.load_state_dict(load_tensors(ckpt / "alignkd_adapters.pt", device))
        st = load_tensors(ckpt / "trainer_state.pt", "cpu")
        try:
            info = json.loads((ckpt / "trainer_state.json").read_text())
        except (ValueError, OSError) as e:
            raise SystemExit(f"error: cannot read {ckpt / 'trainer_state.json'}: {e}") from None
        if masters is not None:
            if (ckpt / "master_weights.pt").exists():
                masters.load_masters(load_tensors(ckpt / "master_weights.pt", device))
            else:
                masters.load_masters([p.detach() for p, m in masters.pairs if m is not p])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        step, epoch, offset, skipped = info["step"], info["epoch"], info["offset"], Counter(info["skipped"])
        torch.set_rng_state(st["torch_rng"]), set_rng_state_json(info["rng"])
        dropped = trim_log(out / "log.jsonl", step)
        if dropped:
            log.info(f"log.jsonl: {dropped} records after step {step} (written after the last checkpoint) removed")
        unfinished = remove_unfinished_saves(out)
        if unfinished:
            log.info(f"removed {', '.join(unfinished)}: a save that was killed before it completed")
        log.info(f"resumed from {ckpt} at step {step} (epoch {epoch}, sample {offset})")
    elif args.overwrite:
        clear_run(out)

    def batches():
        nonlocal epoch, offset
        # reading the cache needs each row's dataset index ("index" in the batch)
        data, collate = ((IndexedDataset(dataset), IndexedCollator(tokenizer.pad_token_id)) if cache else
                         (dataset, Collator(tokenizer.pad_token_id)))
        while True:
            sampler = EpochSampler(len(dataset), args.seed, epoch, offset)
            # workers ignore SIGINT/SIGTERM: a stop sent to the process group is this process's to handle
            loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, sampler=sampler,
                                                 collate_fn=collate, num_workers=args.num_workers,
                                                 persistent_workers=False, worker_init_fn=ignore_stop_signals)
            whole_pass, usable, pass_skips = offset == 0, False, Counter()
            with contextlib.closing(iterate_loader(loader)) as loader_batches:  # closing this closes the workers
                for batch in loader_batches:
                    offset += args.batch_size
                    usable = usable or "input_ids" in batch
                    pass_skips.update(batch["skipped"])
                    yield batch
            if whole_pass and not usable:  # another epoch would yield nothing either
                why = (", ".join(f"{k} {v}" for k, v in sorted(pass_skips.items())) if pass_skips else
                       "none; the file holds no records")
                raise SystemExit(f"error: no usable sample in {json_path} (skipped: {why})")
            epoch, offset = epoch + 1, 0

    start_step = step
    stream = batches()
    log_file = open(out / "log.jsonl", "a" if args.resume else "w")  # a new run: no checkpoint, no earlier records
    pbar = tqdm(total=total, initial=step, desc="align-kd" if distill else "fine-tune", dynamic_ncols=True)
    history, t0, tokens = [], time.time(), 0
    def accumulate(sums: Counter, probe: dict | None) -> int:
        """Forward/backward of --grad-accum micro-batches; returns the number of real tokens."""
        n_tokens = 0
        for _ in range(args.grad_accum):
            batch = next(stream)
            skipped.update(batch["skipped"])
            while "input_ids" not in batch:  # every sample of this batch was skipped
                batch = next(stream)
                skipped.update(batch["skipped"])
            if probe is not None and not probe:  # the step's first micro-batch, before its own backward
                probe.update(probe_term_grads(student, teacher, loss_fn, batch, device, dtype, shared_vision, cache,
                                              distill))
            terms = distill_forward(student, teacher, loss_fn, batch, device, dtype, shared_vision, cache, distill)
            (terms["loss"] / args.grad_accum).backward()
            for k in TERMS:
                sums[k] += terms[k].detach().item() / args.grad_accum
            n_tokens += int(batch["attention_mask"].sum())
        return n_tokens

    def evaluate(record: dict) -> None:
        record.update(heldout.evaluate(student))
        evals.append(record)
        pbar.set_postfix_str(f"held-out acc {record['eval_acc']:.3f} CE {record['eval_ce']:.3f}", refresh=False)
        log.info(f"step {record['step']}: held-out exact match {record['eval_acc']:.3f}, answer CE "
                 f"{record['eval_ce']:.4f} ({record['eval_n']} records)")

    evals: list[dict] = []
    if heldout is not None and step == 0 and not args.no_eval_at_start:  # the student before any update
        record = {"step": 0}
        evaluate(record)
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()
    student_params = [p for g in groups[:2] for p in g["params"]]
    # log lines above the bar, not inside it; the bar is closed before an error line is printed. The data stream is
    # closed on the way out, however the loop ends: that shuts its DataLoader workers down (data/workers.py)
    with pbar, contextlib.closing(stream), StopRequest() as stop_request, logging_redirect_tqdm():
        while step < total:
            sums = Counter()
            probe = {} if step + 1 in args.probe_steps else None
            try:
                tokens += accumulate(sums, probe)
            except torch.OutOfMemoryError:
                raise SystemExit(oom_message(args, device)) from None
            grad_norm, adapter_norm = clip_gradients(student_params, adapters, args.max_grad_norm)
            if masters is not None:
                masters.step(opt)
            else:
                opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            bad = [k for k in TERMS if not math.isfinite(sums[k])]
            if bad:
                raise SystemExit(f"error: non-finite loss terms {bad} at step {step}; last checkpoint is kept")
            record = {"step": step, **{k: sums[k] for k in TERMS}, "lr": sched.get_last_lr()[0],
                      "grad_norm": float(grad_norm), "tokens_per_s": tokens / (time.time() - t0),
                      "skipped": dict(skipped), "epoch": epoch}
            if adapter_norm is not None:
                record["adapter_grad_norm"] = float(adapter_norm)
            if probe:
                record["grad_norms"] = probe
            stop = (args.stop_after is not None and step - start_step >= args.stop_after) or stop_request.signum
            if heldout is not None and (step == total or stop or (args.eval_every and step % args.eval_every == 0)):
                evaluate(record)
            history.append(record)
            if step % args.log_every == 0 or step == total or "eval_acc" in record or probe:
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
                pbar.set_postfix({k: f"{sums[k]:.3g}" for k in TERMS}
                                 | ({"skip": sum(skipped.values())} if skipped else {}))
            pbar.update(1)
            if step % args.save_every == 0 or step == total or stop:
                state = {"step": step, "epoch": epoch, "offset": offset, "skipped": dict(skipped), "args": vars(args)}
                save_checkpoint(out, step, student, loss_fn if distill else None, opt, sched, state, tok_dir,
                                args.keep, masters)
            if stop:
                why = (signal.Signals(stop_request.signum).name if stop_request.signum else
                       f"after {args.stop_after} steps (--stop-after)")
                log.info(f"stopped at step {step} ({why}); continue with --resume")
                break
    pbar.close()
    log_file.close()
    if skipped:
        log.info("skipped samples: " + ", ".join(f"{k} {v}" for k, v in sorted(skipped.items())))
    if history:
        first, last = history[0], history[-1]
        log.info("loss terms, first -> last step: " +
                 ", ".join(f"{k} {first[k]:.4g} -> {last[k]:.4g}" for k in TERMS))
    log.info(f"checkpoint: {latest_checkpoint(out)}")
    return {"history": history, "evals": evals, "skipped": dict(skipped), "checkpoint": str(latest_checkpoint(out)),
            "signal": stop_request.signum}


if __name__ == "__main__":
    try:
        result = main()
    except (FileNotFoundError, KeyError, DataFileError) as e:  # missing or unreadable files: no traceback
        raise SystemExit(f"error: {e}") from None
    if result.get("signal"):
        raise SystemExit(128 + result["signal"])  # the shell's convention for "ended by this signal"
