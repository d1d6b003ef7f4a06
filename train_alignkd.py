"""Align-KD training: distill MobileVLM V2-7B (teacher) into MobileVLM V2-1.7B (student) on one GPU.

    python train_alignkd.py                      # the embedded demo: synthetic data, tiny models, about a minute
    python train_alignkd.py --subset sharegpt4v --student DIR --teacher DIR --data-root DIR

One readable loop: batch -> shared CLIP features -> student (grad) and teacher (no grad) forwards -> Align-KD losses
(CE + logit KD + layer-0 text->vision attention + projector KD on all and on text-focused tokens) -> step.
Checkpoints are written atomically in the official MobileVLM layout, with the adapters and the optimizer state,
and `--resume` continues from the latest one with the same data order. Ctrl-C or SIGTERM (a cluster's preemption
notice) finishes the current optimizer step, saves a checkpoint and exits; a second one aborts at once.
`--cache-teacher DIR` stores the teacher's part of the losses once (training/teacher_cache.py) and trains from it
without the teacher.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm
from transformers import get_cosine_schedule_with_warmup

from data import SUBSETS, Collator, DataFileError, LLaVADataset, load_tokenizer, resolve_subset
from data.dataset import IMAGE_MODES
from data.templates import TEMPLATES
from data.tokenizer import tokenizer_fingerprint
from data.workers import ignore_stop_signals, iterate as iterate_loader
from evaluation.heldout import HeldOut
from losses import ATTN_FORMS, PROJ_SIDES, TERMS, AlignKDLoss, KDBatch, KDSide, flag, logged_terms
from model import MobileVLM
from model.lora import apply_lora, lora_parameter_counts
from model.master_weights import MasterWeights
from model.quantize import load_teacher, model_bytes
from training.checkpoints import (clear_run, existing_run, latest_checkpoint, load_checkpoint,
                                  remove_unfinished_saves, resume_checkpoint, save_checkpoint, trained_tensors,
                                  trim_log)
from training.sharding import gather, shard_distill_step, shard_share
from training.teacher_cache import (DEFAULT_SHARD_SIZE, CacheMismatch, IndexedCollator, IndexedDataset, TeacherCache,
                                    build_cache, check_cache, make_manifest, teacher_fingerprint)

log = logging.getLogger("alignkd")


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
    for term in TERMS.values():  # --w-logit, --w-attn, ...: one per registered loss term (losses/terms.py)
        p.add_argument(flag(term.name), type=float, default=term.weight, help=f"weight of {term.help or term.name} "
                       f"(default {term.weight:g})")
    p.add_argument("--attn-form", choices=ATTN_FORMS, default="kl",
                   help="kl (default): KL between the teacher's head-mixed and the student's layer-0 attention "
                        "renormalized over the vision keys (O(1)); mse: the paper's literal form, MSE of text->vision "
                        "attention probabilities through a 1x1 conv over heads (probabilities are ~1/L, so the term "
                        "is ~1e-5)")
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
    p.add_argument("--shard", choices=("ddp", "fsdp"), default="ddp",
                   help="under torchrun: ddp replicates the student and the adapters on every rank; fsdp (FSDP2) "
                        "shards their weights, gradients and optimizer state over the ranks (README, 'More GPUs'). "
                        "The teacher and the frozen CLIP are whole on every rank either way")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop (with a checkpoint) after this many steps of this run; --resume continues")
    p.add_argument("--cache-teacher", metavar="DIR",
                   help="store what the losses need from the teacher in DIR (one resumable pass over the data, with "
                        "--teacher), then train from DIR without loading the teacher; a complete DIR is reused as "
                        "is. --teacher may be left out when DIR is complete (its recorded teacher is used; given, "
                        "it is checked). A DIR made with another teacher, tokenizer, data file, template, image mode "
                        "or --max-len is refused. Size: README, 'Memory' (python bench/cache_size.py)")
    p.add_argument("--cache-shard-size", type=int, default=DEFAULT_SHARD_SIZE, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.projector_lr is None:
        args.projector_lr = args.lr
    args.probe_steps = {int(x) for x in args.probe_grads.split(",") if x.strip()}
    return args


# ---- processes --------------------------------------------------------------------------------------------------------

@dataclass
class Ranks:
    """This process's place in a torchrun job; rank 0 of 1 for a plain `python` run."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched_processes() -> int:
    """How many processes torchrun started for this run (1 for a plain `python train_alignkd.py`)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_shard(args: argparse.Namespace) -> None:
    """--shard fsdp: in one process there is nothing to shard (the flag is dropped, saying so); under torchrun,
    refuse, before anything is loaded, what cannot work with the student's weights in shards."""
    if args.shard != "fsdp":
        return
    if launched_processes() == 1:
        log.info("--shard fsdp: one process has nothing to shard; the student trains whole, as without the flag")
        args.shard = "ddp"
        return
    refused = {
        "--optim adamw8bit": (args.optim == "adamw8bit", "bitsandbytes' 8-bit AdamW cannot step FSDP2's DTensor "
                              "shards (its update op gets mixed torch.Tensor and DTensor); --optim adamw, which "
                              "--optim auto picks under fsdp, keeps its state in shards too"),
        "--eval-data": (bool(args.eval_data), "the held-out evaluation runs on rank 0 alone, and every forward of "
                        "a sharded student needs all ranks"),
        "--probe-grads": (bool(args.probe_steps), "the probe runs on rank 0 alone, and every forward of a sharded "
                          "student needs all ranks"),
        "--lora-r": (bool(args.lora_r), "a LoRA checkpoint merges the adapters into whole base weights; LoRA's "
                     "trainable state is small: train it with --shard ddp"),
    }
    for what, (given, why) in refused.items():
        if given:
            raise SystemExit(f"error: --shard fsdp does not take {what}: {why}")


def init_distributed(args: argparse.Namespace) -> Ranks:
    """Under torchrun with more than one process: a process group, nccl on CUDA (each rank on its LOCAL_RANK's
    GPU), gloo on CPU. A plain run, or torchrun with one process, stays single-process: no group, nothing reduced."""
    world = launched_processes()
    if world == 1:
        return Ranks()
    if args.device.startswith("cuda"):
        args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(args.device)
    dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    return Ranks(dist.get_rank(), world)


# ---- models and the objective ------------------------------------------------------------------------------------

def load_student(args: argparse.Namespace, dtype: torch.dtype) -> MobileVLM:
    """--student: a MobileVLM checkpoint folder, or a LLaMA folder given a CLIP (--vision-tower)."""
    folder = Path(args.student)
    if not folder.is_dir():
        raise SystemExit(f"error: student folder {folder} does not exist")
    cfg = json.loads((folder / "config.json").read_text()) if (folder / "config.json").exists() else {}
    if cfg.get("model_type") not in (None, "mobilevlm") or (cfg and "mm_projector_type" not in cfg):
        if not args.vision_tower:
            raise SystemExit(f"error: student {folder} is a plain language model: pass --vision-tower CLIP_DIR")
        return MobileVLM.from_llm(folder, args.vision_tower, dtype=dtype, device=args.device)
    return MobileVLM.from_pretrained(folder, vision_tower=args.vision_tower, dtype=dtype, device=args.device)


def same_vision_tower(a: MobileVLM, b: MobileVLM) -> bool:
    """Whether two models carry the same CLIP: same config and bit-identical weights (compared on the device)."""
    if a.vision_tower.vision_tower.config.to_dict() != b.vision_tower.vision_tower.config.to_dict():
        return False
    sa, sb = a.vision_tower.state_dict(), b.vision_tower.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k].to(sa[k].device, sa[k].dtype)) for k in sa)


def term_weights(args: argparse.Namespace) -> dict[str, float]:
    return {name: getattr(args, "w_" + name) for name in TERMS}


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
                          dtype: torch.dtype, ranks: Ranks = Ranks()) -> TeacherCache:
    """--cache-teacher DIR: refuse a cache made from something else, build what is missing (the teacher is loaded
    for this pass only, then freed; under torchrun each rank builds a share of the shards), and open it for
    reading."""
    json_path, image_folder, template, image_mode = data_desc
    teacher_id = teacher_fingerprint(args.teacher, resolve_quant(args, device), args.vision_tower) \
        if args.teacher else None
    expected = make_manifest(teacher_id, tokenizer_fingerprint(tokenizer), json_path, image_folder, template,
                             image_mode, args.max_len, len(dataset), args.cache_shard_size, dtype)
    try:
        state = check_cache(args.cache_teacher, expected, check_quant=args.teacher_dtype != "auto",
                            weights=term_weights(args))
        if state != "complete":
            if teacher_id is None:
                raise SystemExit(f"error: teacher cache {args.cache_teacher} is {state}: pass --teacher to build it")
            if ranks.world > 1:  # every rank has looked at DIR before rank 0 starts writing to it
                dist.barrier()
            teacher = load_frozen_teacher(args, device, dtype, tokenizer)
            teacher.enable_qk_capture()
            with torch.random.fork_rng(devices=[]):  # the run's random state is the same with or without this pass
                build_cache(args.cache_teacher, teacher, dataset, expected, args.batch_size, args.num_workers,
                            tokenizer.pad_token_id, ranks.rank, ranks.world)  # the ranks build disjoint shards
            del teacher
            if device.type == "cuda":
                torch.cuda.empty_cache()
        cache = TeacherCache(args.cache_teacher)
    except CacheMismatch as e:
        raise SystemExit(f"error: {e}") from None
    log.info(f"teacher: not loaded; read from {args.cache_teacher}: {cache.describe()}"
             + ("" if teacher_id else " (no --teacher: not checked against a teacher folder)"))
    return cache


@dataclass
class Models:
    """What every micro-batch needs besides the batch: the trained student, the teacher's side (a live frozen
    teacher, its cache, or neither for --no-distill) and the objective with its adapters."""

    student: MobileVLM
    loss_fn: AlignKDLoss
    device: torch.device
    dtype: torch.dtype
    teacher: MobileVLM | None = None
    cache: TeacherCache | None = None
    shared_vision: bool = False  # one CLIP forward feeds both models
    distill: bool = True  # from the live teacher, or from the cache
    parallel: torch.nn.Module | None = None  # under torchrun: DistillStep under DDP, or sharded by FSDP2
    sharded: bool = False  # FSDP2: parameters, gradients and optimizer state are DTensor shards


def build_models(args: argparse.Namespace, tokenizer, cache: TeacherCache | None, device: torch.device,
                 dtype: torch.dtype) -> Models:
    student = load_student(args, dtype)
    teacher = load_frozen_teacher(args, device, dtype, tokenizer) if not args.no_distill and cache is None else None
    return prepare_models(args, student, teacher, cache, device, dtype)


def prepare_models(args: argparse.Namespace, student: MobileVLM, teacher: MobileVLM | None,
                   cache: TeacherCache | None, device: torch.device, dtype: torch.dtype) -> Models:
    """Loaded models made ready to train: one CLIP for both when they carry the same, layer-0 q/k capture, LoRA,
    activation checkpointing, and the objective sized to both."""
    shared_vision = False
    if teacher is not None:
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
        weights=term_weights(args), topk=args.topk, kl=args.kl, temperature=args.temperature, backend=args.backend,
        attn_form=args.attn_form, proj_side=args.proj_side,
        skip=cache.terms_without_fields() if cache is not None else ()).to(device)
    return Models(student, loss_fn, device, dtype, teacher, cache, shared_vision, distill=not args.no_distill)


# ---- optimizer ----------------------------------------------------------------------------------------------------------

def make_optimizer(groups: list[dict], args: argparse.Namespace, device: torch.device) -> torch.optim.Optimizer:
    kind = args.optim if args.optim != "auto" else (
        "adamw8bit" if device.type == "cuda" and args.shard != "fsdp" else "adamw")
    kw = dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=args.weight_decay)
    if kind == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(groups, **kw)
    return torch.optim.AdamW(groups, **kw)


@dataclass
class Optimization:
    """Parameter groups (the LLM at --lr; the projector, a trained CLIP and the Align-KD adapters at --projector-lr),
    fp32 master weights of a bf16 student, the optimizer and the LR schedule."""

    groups: list[dict]
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    masters: MasterWeights | None

    @property
    def student_params(self) -> list[torch.nn.Parameter]:
        return [p for g in self.groups[:2] for p in g["params"]]

    @property
    def adapters(self) -> list[torch.nn.Parameter]:
        return [p for g in self.groups[2:] for p in g["params"]]


def build_optimizer(args: argparse.Namespace, models: Models, total: int) -> Optimization:
    student = models.student
    proj_params = list(student.mm_projector.parameters())
    if args.train_vision_tower:
        proj_params += list(student.vision_tower.parameters())
    proj_ids = {id(p) for p in proj_params}
    llm_params = [p for p in student.parameters() if p.requires_grad and id(p) not in proj_ids]
    groups = [{"params": llm_params, "lr": args.lr},
              {"params": proj_params, "lr": args.projector_lr}]
    adapters = list(models.loss_fn.parameters()) if models.distill else []
    if adapters:
        groups.append({"params": adapters, "lr": args.projector_lr})
    use_masters = args.master_weights == "fp32" or (args.master_weights == "auto" and models.dtype != torch.float32
                                                         and not args.lora_r)
    masters = MasterWeights(groups) if use_masters else None
    opt = make_optimizer(masters.groups if masters else groups, args, models.device)
    sched = get_cosine_schedule_with_warmup(opt, int(args.warmup_ratio * total), total)  # as MobileVLM trains
    return Optimization(groups, opt, sched, masters)


def clip_gradients(student_params: list, adapters: list, max_norm: float) -> tuple[float, float | None]:
    """Clip the student's and the Align-KD adapters' gradients each to `max_norm`, separately: one shared norm would
    let the adapters' gradients (large under a heavily weighted term) shrink the student's update. Returns the two
    norms before clipping (None without adapters)."""
    s = float(torch.nn.utils.clip_grad_norm_(student_params, max_norm))
    a = float(torch.nn.utils.clip_grad_norm_(adapters, max_norm)) if adapters else None
    return s, a


def optimizer_step(optim: Optimization, max_grad_norm: float) -> tuple[float, float | None]:
    """Clip, step (through the fp32 masters when there are), advance the schedule, clear the gradients; returns the
    student's and the adapters' gradient norms before clipping."""
    grad_norm, adapter_norm = clip_gradients(optim.student_params, optim.adapters, max_grad_norm)
    if optim.masters is not None:
        optim.masters.step(optim.opt)
    else:
        optim.opt.step()
    optim.sched.step()
    optim.opt.zero_grad(set_to_none=True)
    return grad_norm, adapter_norm


def reduce_step(sums: Counter, n_tokens: int, usable: int, skips: Counter, signum: int | None, grad_accum: int,
                optim: Optimization, device: torch.device, ranks: Ranks) -> tuple[Counter, int, Counter, int | None]:
    """Under torchrun, once per optimizer step, before it: the logged terms become the mean over the step's usable
    micro-batches of all ranks; tokens and skip counts are summed over the ranks; a stop signal on any rank becomes
    every rank's (a MAX all-reduce of the flag), so that all ranks stop after the same step. DDP averaged the
    gradients over the N x grad_accum micro-batches, a skipped one counting as a zero loss: when there were such,
    they are rescaled to the mean over the usable ones. Returns (terms, tokens, skips, signal) of the whole step."""
    terms = logged_terms()
    total = torch.tensor([sums[k] for k in terms] + [n_tokens, usable, sum(skips.values())], dtype=torch.float64,
                         device=device)
    dist.all_reduce(total)
    flag = torch.tensor([signum or 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    *term_sums, n_tokens, usable, n_skipped = total.tolist()
    if usable == 0:  # every rank sees it: all of them exit, none is left waiting
        raise SystemExit(f"error: every sample of an optimizer step ({ranks.world} ranks x --batch-size x "
                         f"--grad-accum) was skipped; check the data (skip reasons: log.jsonl)")
    expected = ranks.world * grad_accum
    if usable < expected:
        for p in optim.student_params + optim.adapters:
            if p.grad is not None:
                p.grad.mul_(expected / usable)
    step_skips = Counter()
    if n_skipped:
        gathered = [None] * ranks.world
        dist.all_gather_object(gathered, dict(skips))
        for g in gathered:
            step_skips.update(g)
    mean = Counter({k: v * grad_accum / usable for k, v in zip(terms, term_sums)})
    return mean, int(n_tokens), step_skips, int(flag.item()) or None


# ---- one micro-batch ----------------------------------------------------------------------------------------------------

def distill_forward(models: Models, batch: dict, separate: bool = False) -> dict[str, torch.Tensor]:
    """One micro-batch: one CLIP forward, the student (with grad), the teacher (no grad; or its cached tensors),
    and the Align-KD terms (nothing is backpropagated here)."""
    student, teacher, device, dtype = models.student, models.teacher, models.device, models.dtype
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
    if models.cache is not None:  # the teacher's tensors of these samples, stored by --cache-teacher
        t_side = models.cache.teacher_side(batch["index"], kd_batch, device, dtype)
    elif teacher is not None:
        with torch.no_grad():
            t_feats = feats if models.shared_vision or feats is None else teacher.encode_images(images[has_image])
            t = teacher(ids, mask, image_features=t_feats, compute_logits=False)
        t_side = KDSide(t.hidden_states, teacher.lm_head.weight, t.q0, t.k0, t.mm.vision_tokens)
    return models.loss_fn(s_side, t_side, kd_batch, distill=models.distill, separate=separate)


class DistillStep(torch.nn.Module):
    """The student and the Align-KD adapters as one module, for DDP or FSDP2: its forward is one micro-batch's
    `distill_forward`, so the backward reduces the gradients of both. The teacher is no submodule: it is frozen,
    loaded by every rank, and never wrapped, sharded nor broadcast. `standin` (FSDP2): a batch of one usable sample."""

    def __init__(self, models: Models, standin: dict | None = None):
        super().__init__()
        self.student, self.loss_fn = models.student, models.loss_fn
        self.models = models  # a plain attribute (not a module): reaches the teacher without registering it
        self.standin = standin

    def forward(self, batch: dict | None) -> dict[str, torch.Tensor]:
        if batch is None:  # every sample of this rank's micro-batch was skipped; its backward must still join the
            # other ranks' gradient reduction, at zero weight
            if self.standin is not None:  # FSDP2: each unit gathers its weights in its forward and reduce-scatters
                # in its backward, so this rank runs them all, on a real sample
                terms = distill_forward(self.models, self.standin)
                return {k: terms[k] * 0.0 for k in logged_terms()}
            # DDP: a zero loss that reaches every trained parameter
            zero = sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0
            return {k: zero for k in logged_terms()}
        return distill_forward(self.models, batch)


def micro_step(models: Models, batch: dict | None, grad_accum: int) -> dict[str, float]:
    """Forward and backward of one of `grad_accum` micro-batches; returns its logged terms divided by grad_accum.
    Under torchrun the forward goes through DDP (whose backward all-reduces the gradients unless
    `require_backward_grad_sync` is off) or FSDP2 (whose backward reduce-scatters them), and `batch` is None for a
    micro-batch whose samples were all skipped."""
    terms = models.parallel(batch) if models.parallel is not None else distill_forward(models, batch)
    (terms["loss"] / grad_accum).backward()
    return {k: terms[k].detach().item() / grad_accum for k in logged_terms()}


def probe_term_grads(models: Models, batch: dict) -> dict[str, float]:
    """L2 norm of each weighted term's gradient on the student's trainable parameters (adapters excluded), from a
    separate forward of one micro-batch; nothing is accumulated into .grad."""
    params = [p for p in models.student.parameters() if p.requires_grad]
    terms = distill_forward(models, batch, separate=True)
    norms = {}
    for k in logged_terms()[1:]:
        t = terms.get(k)
        if t is None or not t.requires_grad:
            norms[k] = 0.0
            continue
        grads = torch.autograd.grad(t, params, retain_graph=True, allow_unused=True)
        norms[k] = float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None)))
    return norms


# ---- data order ---------------------------------------------------------------------------------------------------------

class EpochSampler(torch.utils.data.Sampler):
    """A seeded permutation per epoch, started at an offset: a resumed run sees exactly the remaining samples."""

    def __init__(self, n: int, seed: int, epoch: int = 0, start: int = 0):
        self.n, self.seed, self.epoch, self.start = n, seed, epoch, start

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g)[self.start:].tolist())

    def __len__(self) -> int:
        return self.n - self.start


@dataclass
class Position:
    """Where a run is in its data (saved with every checkpoint): the epoch, the samples of it already drawn and the
    samples skipped so far, by reason."""

    epoch: int = 0
    offset: int = 0
    skipped: Counter = field(default_factory=Counter)


def rank_micro_batches(n: int, seed: int, batch_size: int, ranks: Ranks,
                       pos: Position) -> Iterator[tuple[list[int], int, int]]:
    """This rank's micro-batches from `pos` on: the one seeded order is cut into micro-batches exactly as a single
    process cuts it (EpochSampler, --batch-size, an epoch's last one short), and of each run of N consecutive ones
    rank r takes the r-th. Yields (dataset indices, epoch, offset), the position being the one after the whole run
    of N: the same on every rank, so any rank's checkpoint continues every rank's order."""
    def global_order():
        epoch, offset = pos.epoch, pos.offset
        while True:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
            for start in range(offset, n, batch_size):
                end = min(start + batch_size, n)
                yield perm[start:end], *((epoch + 1, 0) if end == n else (epoch, end))
            epoch, offset = epoch + 1, 0

    micro = global_order()
    while True:
        run = [next(micro) for _ in range(ranks.world)]
        yield run[ranks.rank][0], *run[-1][1:]


def rank_batch_stream(data, collate, args: argparse.Namespace, pos: Position, ranks: Ranks) -> Iterator[dict]:
    """batch_stream under torchrun: this rank's share (rank_micro_batches), one loader across epochs. A batch whose
    samples were all skipped is yielded as it is (it is not replaced by the next one, which belongs to another
    rank); the trainer lets it contribute nothing."""
    plan = rank_micro_batches(len(data), args.seed, args.batch_size, ranks, pos)
    indices = (ix for ix, _, _ in rank_micro_batches(len(data), args.seed, args.batch_size, ranks, pos))
    loader = torch.utils.data.DataLoader(data, batch_sampler=indices, collate_fn=collate,
                                         num_workers=args.num_workers, worker_init_fn=ignore_stop_signals)
    with contextlib.closing(iterate_loader(loader)) as loader_batches:
        for batch, (_, epoch, offset) in zip(loader_batches, plan):  # the plan walks in step with the loader
            pos.epoch, pos.offset = epoch, offset
            yield batch


def loader_parts(dataset, tokenizer, indexed: bool) -> tuple:
    """(dataset, collate function) of the training batches. `indexed`: each batch carries its rows' dataset indices
    ("index"), which reading the teacher cache needs."""
    return ((IndexedDataset(dataset), IndexedCollator(tokenizer.pad_token_id)) if indexed else
            (dataset, Collator(tokenizer.pad_token_id)))


def first_usable_batch(dataset, tokenizer, indexed: bool) -> dict:
    """A batch of the data's first usable sample (--shard fsdp: what a rank runs at zero weight in place of a
    micro-batch whose samples were all skipped)."""
    data, collate = loader_parts(dataset, tokenizer, indexed)
    for i in range(len(data)):
        sample = data[i]
        if "skip" not in sample:
            return collate([sample])
    raise SystemExit(f"error: no usable sample in the data ({len(data)} records)")


def batch_stream(dataset, tokenizer, args: argparse.Namespace, pos: Position, indexed: bool,
                 json_path: Path, ranks: Ranks = Ranks()) -> Iterator[dict]:
    """Collated micro-batches (`loader_parts`) from `pos` on, epoch after epoch, advancing `pos`."""
    data, collate = loader_parts(dataset, tokenizer, indexed)
    if ranks.world > 1:
        yield from rank_batch_stream(data, collate, args, pos, ranks)
        return
    while True:
        sampler = EpochSampler(len(dataset), args.seed, pos.epoch, pos.offset)
        # workers ignore SIGINT/SIGTERM: a stop sent to the process group is this process's to handle
        loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, sampler=sampler,
                                             collate_fn=collate, num_workers=args.num_workers,
                                             persistent_workers=False, worker_init_fn=ignore_stop_signals)
        whole_pass, usable, pass_skips = pos.offset == 0, False, Counter()
        with contextlib.closing(iterate_loader(loader)) as loader_batches:  # closing this closes the workers
            for batch in loader_batches:
                pos.offset += args.batch_size
                usable = usable or "input_ids" in batch
                pass_skips.update(batch["skipped"])
                yield batch
        if whole_pass and not usable:  # another epoch would yield nothing either
            why = (", ".join(f"{k} {v}" for k, v in sorted(pass_skips.items())) if pass_skips else
                   "none; the file holds no records")
            raise SystemExit(f"error: no usable sample in {json_path} (skipped: {why})")
        pos.epoch, pos.offset = pos.epoch + 1, 0


# ---- main ---------------------------------------------------------------------------------------------------------------

def oom_message(args: argparse.Namespace, device: torch.device) -> str:
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return (f"error: out of GPU memory (peak allocated {peak:.2f} GiB, batch {args.batch_size}, max-len "
            f"{args.max_len}). Lower it with: --batch-size 1 and a larger --grad-accum, a smaller --max-len, "
            f"--teacher-dtype nf4, --optim adamw8bit, --lora-r 64, or activation checkpointing (on unless "
            f"--no-checkpointing).")


class StopRequest:
    """SIGINT/SIGTERM while training: the first asks the loop to save and stop after the current optimizer step (a
    step of many accumulated micro-batches is not thrown away); a second one raises KeyboardInterrupt at once. The
    DataLoader workers ignore both (data/workers.py), so a signal sent to the whole process group (Slurm, `timeout`,
    Ctrl-C) is handled here alone. Under torchrun (`repeat_aborts=False`) a second one is ignored: the launcher
    forwards the signal it receives to every rank, which Slurm may also have signalled, and the launcher's SIGKILL
    after its --shutdown_timeout is the abort."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, repeat_aborts: bool = True):
        self.signum: int | None = None
        self.repeat_aborts = repeat_aborts
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
            if self.repeat_aborts:
                raise KeyboardInterrupt
            return
        self.signum = signum
        log.info(f"{signal.Signals(signum).name}: saving a checkpoint after this step, then stopping"
                 + (" (send it again to abort without saving)" if self.repeat_aborts else ""))


def check_layout(info: dict, args: argparse.Namespace, ranks: Ranks) -> None:
    """--resume under torchrun, or of a torchrun checkpoint: the saved data position is exact for any run that cuts
    the order into the same micro-batches and steps, i.e. the same --batch-size and the same N x --grad-accum (2 ranks
    x 1 continue 1 rank x 2 exactly). Anything else is refused: it would change the data order and the schedule."""
    saved_world, saved = info.get("world_size", 1), info["args"]
    if saved_world == ranks.world == 1:
        return
    if (saved["batch_size"], saved_world * saved["grad_accum"]) != (args.batch_size, ranks.world * args.grad_accum):
        raise SystemExit(f"error: --resume: the checkpoint was written by {saved_world} process(es) x --grad-accum "
                         f"{saved['grad_accum']} x --batch-size {saved['batch_size']}; this run is {ranks.world} x "
                         f"{args.grad_accum} x {args.batch_size}. Resume with the same --batch-size and the same "
                         f"processes x --grad-accum ({saved_world * saved['grad_accum']})")


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
    check_shard(args)
    out = Path(args.output_dir)
    if args.resume and args.overwrite:
        raise SystemExit("error: --resume continues the run in OUTPUT_DIR, --overwrite deletes it: give one")
    held = existing_run(out) if not args.resume and out.is_dir() else []
    if held and not args.overwrite:
        shown = ", ".join(held if len(held) <= 4 else [*held[:3], "...", held[-1]])
        raise SystemExit(f"error: {out} already holds a run ({shown}): continue it with --resume, or start anew "
                         f"with --overwrite (deletes its checkpoints, latest and log.jsonl)")
    ranks = init_distributed(args)
    if not ranks.main:  # rank 0 speaks for all
        logging.getLogger().setLevel(logging.WARNING)
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
                      args.max_len, args.eval_limit, cache_dir=out / "index_cache") \
        if args.eval_data and ranks.main else None  # under torchrun rank 0 evaluates; the others wait for it
    cache = prepare_teacher_cache(args, dataset, tokenizer, (json_path, image_folder, template, image_mode), device,
                                  dtype, ranks) if args.cache_teacher else None

    # models, objective, optimizer
    models = build_models(args, tokenizer, cache, device, dtype)
    micro_per_epoch = max(1, len(dataset) // args.batch_size)
    total = args.max_steps or max(1, int(args.epochs * micro_per_epoch / (args.grad_accum * ranks.world)))
    if ranks.world > 1 and args.shard == "fsdp":  # before the optimizer, which steps the shards
        standin = first_usable_batch(dataset, tokenizer, cache is not None)
        models.parallel = DistillStep(models, standin)
        shard_distill_step(models.parallel, models.student.model.layers, models.loss_fn)
        models.sharded = True
        log.info(f"FSDP2: each of {ranks.world} ranks holds {shard_share(models.parallel)} of the student's and the "
                 f"adapters' trained weights (and of their gradients and optimizer state)")
    optim = build_optimizer(args, models, total)
    if ranks.world > 1 and args.shard == "ddp":  # unused parameters are normal: the projector on a text-only
        # micro-batch, a term with no eligible sample. Gradients live in DDP's buckets (no second copy); the buffers
        # are not trained
        models.parallel = DDP(DistillStep(models), device_ids=[device.index] if device.type == "cuda" else None,
                              find_unused_parameters=True, gradient_as_bucket_view=True, forward_sync_buffers=False)

    # resume
    step, pos = 0, Position()
    if args.resume:
        ckpt = resume_checkpoint(out)
        info = load_checkpoint(ckpt, models.student, models.loss_fn if models.distill else None, optim.opt,
                               optim.sched, optim.masters, args.vision_tower, device, dtype)
        step, pos = info["step"], Position(info["epoch"], info["offset"], Counter(info["skipped"]))
        check_layout(info, args, ranks)
        if ranks.main:
            dropped = trim_log(out / "log.jsonl", step)
            if dropped:
                log.info(f"log.jsonl: {dropped} records after step {step} (written after the last checkpoint) removed")
            unfinished = remove_unfinished_saves(out)
            if unfinished:
                log.info(f"removed {', '.join(unfinished)}: a save that was killed before it completed")
        log.info(f"resumed from {ckpt} at step {step} (epoch {pos.epoch}, sample {pos.offset})")
    elif args.overwrite and ranks.main:
        clear_run(out)

    terms = logged_terms()  # loss, ce and every registered term: log.jsonl, the progress bar, the summary
    start_step = step
    stream = batch_stream(dataset, tokenizer, args, pos, cache is not None, json_path, ranks)
    # a new run: no checkpoint, no earlier records. Rank 0 alone writes the log (the others' records are the same)
    log_file = open(out / "log.jsonl" if ranks.main else os.devnull, "a" if args.resume else "w")
    pbar = tqdm(total=total, initial=step, desc="align-kd" if models.distill else "fine-tune", dynamic_ncols=True,
                disable=not ranks.main)
    history, t0, tokens, stop_signal = [], time.time(), 0, None

    def accumulate(sums: Counter, probe: dict | None, skips: Counter) -> tuple[int, int]:
        """Forward/backward of --grad-accum micro-batches; returns the number of real tokens and of usable
        micro-batches. One process replaces a batch whose samples were all skipped by the next one; a rank under
        torchrun runs it as a zero loss instead (the next batch is another rank's), so that it joins the gradient
        all-reduce."""
        n_tokens, usable = 0, 0
        for micro in range(args.grad_accum):
            batch = next(stream)
            skips.update(batch["skipped"])
            while "input_ids" not in batch and not models.parallel:  # every sample of this batch was skipped
                batch = next(stream)
                skips.update(batch["skipped"])
            if isinstance(models.parallel, DDP):  # all-reduce the gradients in the step's last backward only.
                # (FSDP2 reduce-scatters every micro-batch's: it keeps no whole gradient between them)
                models.parallel.require_backward_grad_sync = micro == args.grad_accum - 1
            if "input_ids" not in batch:
                micro_step(models, None, args.grad_accum)
                continue
            if probe is not None and not probe:  # the step's first micro-batch, before its own backward
                probe.update(probe_term_grads(models, batch))
            for k, v in micro_step(models, batch, args.grad_accum).items():
                sums[k] += v
            n_tokens += int(batch["attention_mask"].sum())
            usable += 1
        return n_tokens, usable

    def evaluate(record: dict) -> None:
        record.update(heldout.evaluate(models.student))
        evals.append(record)
        grounding = f", grounding {record['eval_grounding']:.3f}" if "eval_grounding" in record else ""
        pbar.set_postfix_str(f"held-out acc {record['eval_acc']:.3f} CE {record['eval_ce']:.3f}{grounding}",
                             refresh=False)
        log.info(f"step {record['step']}: held-out exact match {record['eval_acc']:.3f}, answer CE "
                 f"{record['eval_ce']:.4f}{grounding} ({record['eval_n']} records)")

    evals: list[dict] = []
    if heldout is not None and step == 0 and not args.no_eval_at_start:  # the student before any update
        record = {"step": 0}
        evaluate(record)
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()
    # log lines above the bar, not inside it; the bar is closed before an error line is printed. The data stream is
    # closed on the way out, however the loop ends: that shuts its DataLoader workers down (data/workers.py)
    with (pbar, contextlib.closing(stream), StopRequest(repeat_aborts=not models.parallel) as stop_request,
          logging_redirect_tqdm()):
        while step < total:
            sums = Counter()
            probe = {} if step + 1 in args.probe_steps and ranks.main else None  # rank 0's is the step's first
            skips = Counter() if models.parallel else pos.skipped  # a rank's own, summed over the ranks below
            try:
                n_tokens, usable = accumulate(sums, probe, skips)
            except torch.OutOfMemoryError:
                raise SystemExit(oom_message(args, device)) from None
            if models.parallel:
                sums, n_tokens, skips, agreed = reduce_step(sums, n_tokens, usable, skips, stop_request.signum,
                                                            args.grad_accum, optim, device, ranks)
                pos.skipped.update(skips)
            tokens += n_tokens
            grad_norm, adapter_norm = optimizer_step(optim, args.max_grad_norm)
            step += 1
            bad = [k for k in terms if not math.isfinite(sums[k])]
            if bad:
                raise SystemExit(f"error: non-finite loss terms {bad} at step {step}; last checkpoint is kept")
            record = {"step": step, **{k: sums[k] for k in terms}, "lr": optim.sched.get_last_lr()[0],
                      "grad_norm": float(grad_norm), "tokens_per_s": tokens / (time.time() - t0),
                      "skipped": dict(pos.skipped), "epoch": pos.epoch}
            if adapter_norm is not None:
                record["adapter_grad_norm"] = float(adapter_norm)
            if probe:
                record["grad_norms"] = probe
            # under torchrun the agreed signal (any rank's, before this step's reduction): every rank stops together
            stop_signal = agreed if models.parallel else stop_request.signum
            stop = (args.stop_after is not None and step - start_step >= args.stop_after) or stop_signal
            if heldout is not None and (step == total or stop or (args.eval_every and step % args.eval_every == 0)):
                evaluate(record)
            history.append(record)
            if step % args.log_every == 0 or step == total or "eval_acc" in record or probe:
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
                pbar.set_postfix({k: f"{sums[k]:.3g}" for k in terms}
                                 | ({"skip": sum(pos.skipped.values())} if pos.skipped else {}))
            pbar.update(1)
            if step % args.save_every == 0 or step == total or stop:
                state = {"step": step, "epoch": pos.epoch, "offset": pos.offset, "skipped": dict(pos.skipped),
                         "world_size": ranks.world, "args": vars(args)}
                adapters = models.loss_fn if models.distill else None
                # FSDP2: every rank gathers the shards, rank 0 keeps them; otherwise the ranks hold the same state
                tensors = gather(trained_tensors(models.student, adapters, optim.opt, optim.masters),
                                 keep=ranks.main) if models.sharded else None
                if ranks.main:
                    save_checkpoint(out, step, models.student, adapters, optim.opt, optim.sched, state, tok_dir,
                                    args.keep, optim.masters, tensors)
            if stop:
                why = (signal.Signals(stop_signal).name if stop_signal else
                       f"after {args.stop_after} steps (--stop-after)")
                log.info(f"stopped at step {step} ({why}); continue with --resume")
                break
    pbar.close()
    log_file.close()
    if models.parallel:  # no rank exits (and has the launcher end the others) while rank 0 is still saving
        dist.barrier()
        dist.destroy_process_group()
    if pos.skipped:
        log.info("skipped samples: " + ", ".join(f"{k} {v}" for k, v in sorted(pos.skipped.items())))
    if history:
        first, last = history[0], history[-1]
        log.info("loss terms, first -> last step: " +
                 ", ".join(f"{k} {first[k]:.4g} -> {last[k]:.4g}" for k in terms))
    log.info(f"checkpoint: {latest_checkpoint(out)}")
    return {"history": history, "evals": evals, "skipped": dict(pos.skipped),
            "checkpoint": str(latest_checkpoint(out)),
            "signal": stop_signal if models.parallel else stop_request.signum}

if __name__ == "__main__":
    try:
        result = main()
    except (FileNotFoundError, KeyError, DataFileError) as e:  # missing or unreadable files: no traceback
        raise SystemExit(f"error: {e}") from None
    if result.get("signal"):
        raise SystemExit(128 + result["signal"])  # the shell's convention for "ended by this signal"
