"""Benchmark of one Align-KD training step on one GPU, against the original approach (not a test).

    python bench/train_step.py                          # L 1024, 2048 x B 1, 4; configs a, b, c; needs CUDA
    python bench/train_step.py --configs a,c --lengths 2048 --batches 1
    python bench/train_step.py --peak-tflops 989        # for a GPU whose bf16 peak is not in the built-in list
    python bench/train_step.py --tiny                   # smoke run: tiny models on whatever device exists

Models: full-size, random weights of the real shapes (no download), built directly on the GPU with a seeded
N(0, 0.02) init: student MobileVLM V2-1.7B (MobileLLaMA-1.4B: 24 layers, d 2048, 16 heads, FFN 5632, vocab 32000),
teacher MobileVLM V2-7B (Vicuna-7B: 32 layers, d 4096, 32 heads, FFN 11008), both with CLIP ViT-L/14-336 and LDPv2.
Data: synthetic v1-like samples of exactly L tokens after splicing (35 prompt tokens, 144 image tokens, then turns
of a 32-token question and a 96-token supervised answer), all samples of a batch the same length (no padding).
One step = one micro-batch forward + backward + gradient clipping + optimizer step (grad accumulation 1).

Configurations (all in one run, on the same GPU):
 (a) this project's step, built and stepped by the trainer's own functions (train_alignkd.prepare_models,
     build_optimizer, micro_step, optimizer_step) with the paper's objective (every term at weight 1, --attn-form
     mse): NF4 double-quant teacher made from the in-memory bf16 model with model.quantize.quantize_model (bf16 copy
     freed), one CLIP shared by both models, bf16 student with activation checkpointing, layer-0 q/k capture, SDPA
     in every layer, AlignKDLoss(backend="auto": Triton attention-alignment / projection kernels, Liger chunked CE +
     KL), the trainer's parameter groups, fp32 master weights of the bf16 student stepped in chunks
     (--master-weights auto/fp32/none as the trainer's flag), bitsandbytes PagedAdamW8bit, the trainer's LR
     schedule, gradient clipping at 1.0 (student and adapters separately, as the trainer).
 (b) the original approach (benchmark-only; the product never does this): fp16 teacher not quantized, with its own
     CLIP; fp16 student with activation checkpointing; eager attention with output_attentions=True in every layer of
     both models; full-vocab fp16 logits of both; CE on the fp16 logits; KD as the original computes it (soft CE
     -mean over all positions of sum_v softmax(z_t) log_softmax(z_s), in fp16); the attention loss through a
     Conv2d(32->16, 1x1) over the full teacher map and the projection KD through a Conv1d(4096->2048, 1) with top-16
     focus from the head-mean teacher map (text rows x vision columns, i.e. with the original's mask defects fixed: same cost); fp32
     master weights stepped by torch.optim.AdamW (fused on CUDA) with dynamic loss scaling, as DeepSpeed fp16 does on
     one GPU. Micro-batch 1 only (the original's setting); OOM is reported, not fatal.
 (c) a layer-0-only PyTorch baseline without the fused pieces: the same models, optimizer and step as (a) but
     AlignKDLoss(backend="reference"): kernels.reference attention alignment / text focus on materialized layer-0
     maps of the text rows ([B, H, |text|, L] fp32 for both models) and projection KD, the logit KD from full-vocab
     fp32 logits of both models on the supervised rows (kernels.reference.logit_kd_loss), CE chunked.

Order: (b) first, then (a) and (c) with one optimizer: bitsandbytes never returns paged optimizer memory (its
managed buffers are not freed when the optimizer is), so one PagedAdamW8bit serves every (a)/(c) measurement.

Memory: torch.cuda.max_memory_allocated over warm-up and timed steps after reset_peak_memory_stats, in GiB (weights
included); the weights and the optimizer state are also reported separately. bitsandbytes' paged optimizer keeps
its 8-bit state in CUDA managed memory that the torch allocator does not see, so for (a) and (c) the table adds that
state to the peak (the JSON has both: peak_alloc_gib and paged_optimizer_state_gib). Speed: median step time over
--iters timed steps after --warmup steps, CUDA-synchronized; tokens/s = B * L / median step. MFU of (a) against
--peak-tflops (FLOP_FORMULA below). An out-of-memory error (while building or stepping) is reported as "OOM" with
the peak allocated at the failure, and the run goes on. Prints one table with the ratios (a)/(b) and (a)/(c) and
writes JSON (device, versions, date, every number).

Refuses to run without CUDA (exit 2) unless --tiny. --tiny runs the same three configurations with tiny models
(student d 64, teacher d 128) on whatever device exists: a smoke test of the code path, labelled as such, not a
measurement (no memory numbers on CPU, no MFU unless --peak-tflops). On CPU (a) and (c) use the trainer's CPU dtype
(fp32), (b) stays fp16, the 4-bit teacher and the 8-bit optimizer run through bitsandbytes' CPU paths (not
paged), and "auto" resolves the attention/projection losses to kernels.reference, as the trainer's would; with
TRITON_INTERPRET=1 in the environment (a) runs the Triton kernels under the interpreter instead (minutes).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# the repo root first: run as a script, sys.path[0] is bench/, whose kernels.py would shadow the kernels package
_ROOT = str(Path(__file__).resolve().parents[1])
if sys.path[:1] != [_ROOT]:
    sys.path.insert(0, _ROOT)
from bench._common import (  # noqa: E402
    ANSWER, PROMPT, QUESTION, ROOT, gib, make_batch, peak_tflops_for, random_model, student_config, sync,
    teacher_config, tiny_configs, versions, write_report,
)
from data.constants import IGNORE_INDEX, NUM_IMAGE_TOKENS  # noqa: E402
from model.quantize import model_bytes, quantize_model  # noqa: E402
from train_alignkd import build_optimizer, micro_step, optimizer_step, prepare_models  # noqa: E402
from train_alignkd import parse_args as parse_trainer_args  # noqa: E402

CONFIGS = {
    "a": "this project's step (NF4 teacher, shared CLIP, fused losses, fp32 masters + 8-bit paged AdamW)",
    "b": "original approach (fp16 teacher, eager + output_attentions everywhere, fp16 full logits, fp32 AdamW)",
    "c": "layer-0-only PyTorch baseline (as (a) but kernels.reference losses and full-vocab logit KD)",
}
# (a)/(c): the trainer's flags for MobileVLM's stage 2 with every Align-KD term on (the paper's objective)
TRAINER_FLAGS = ["--lr", "2e-5", "--projector-lr", "1e-3", "--max-grad-norm", "1", "--optim", "adamw8bit",
                 "--attn-form", "mse", "--w-attn", "1", "--w-proj-all", "1", "--w-proj-focus", "1"]
_TRAINER_ARGS = parse_trainer_args(TRAINER_FLAGS)
LR, MAX_GRAD_NORM = _TRAINER_ARGS.lr, _TRAINER_ARGS.max_grad_norm  # (b) steps as (a) and (c)

FLOP_FORMULA = (
    "FLOPs(a) = (6 + 2r) * P_s * T + (3 + r) * A_s + 6 * V * d_s * N + 2 * P_t * T + A_t + 2 * V * d_t * N "
    "+ 6 * P_proj_s * 576 * I + 2 * P_proj_t * 576 * I + I * (2 * P_clip * 577 + n_clip * 4 * 577^2 * d_clip); "
    "T = B * L tokens, N = supervised rows (CE and logit KD), I = images; P_s, P_t = decoder linear weights "
    "(n_layers * (4 d^2 + 3 d * ffn): 1.233e9 student, 6.476e9 teacher), A_x = n_layers * B * 2 * L^2 * d (causal "
    "QK^T + PV forward), P_proj = LDPv2 linears (1024 d + d^2), P_clip = CLIP layer linears (24 * (4 * 1024^2 + "
    "2 * 1024 * 4096)); r = 1 counts the recompute of the student's checkpointed decoder (mfu), r = 0 does not "
    "(mfu_excl_recompute); the Align-KD loss kernels, softmaxes, norms and embeddings are not counted")


# ---------------------------------------------------------------------------------------------------------------------
# helpers


def flush(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_oom(exc: BaseException) -> bool:
    """An out-of-memory error from the torch allocator, cuBLAS or a library that only says so in its message."""
    text = str(exc)
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in text.lower() or "ALLOC_FAILED" in text


def allocated(device: torch.device) -> int | None:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


def tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> tuple[int, int]:
    """(bytes in the torch allocator or on the host, bytes in bitsandbytes' paged CUDA managed memory)."""
    plain, paged = [], []
    for state in opt.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                (paged if getattr(v, "is_paged", False) else plain).append(v)
    return tensor_bytes(plain), tensor_bytes(paged)


def decoder_linear_params(cfg) -> int:
    d, ffn, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    kv = cfg.fields.get("num_key_value_heads") or cfg.num_attention_heads
    kv_dim = kv * cfg.head_dim
    return n * (d * d * 2 + 2 * d * kv_dim + 3 * d * ffn)


def step_flops(s_cfg, t_cfg, clip_cfg, B: int, L: int, n_sup: int, n_img: int, recompute: bool) -> float:
    """FLOPs of one (a) step, FLOP_FORMULA."""
    r = 1 if recompute else 0
    T = B * L
    P_s, P_t = decoder_linear_params(s_cfg), decoder_linear_params(t_cfg)
    d_s, d_t, V = s_cfg.hidden_size, t_cfg.hidden_size, s_cfg.vocab_size
    A_s = s_cfg.num_hidden_layers * B * 2 * L * L * d_s
    A_t = t_cfg.num_hidden_layers * B * 2 * L * L * d_t
    mm = s_cfg.mm_hidden_size
    P_proj_s, P_proj_t = mm * d_s + d_s * d_s, mm * d_t + d_t * d_t
    patches = (clip_cfg.image_size // clip_cfg.patch_size) ** 2
    dc, n_clip = clip_cfg.hidden_size, clip_cfg.num_hidden_layers
    P_clip = n_clip * (4 * dc * dc + 2 * dc * clip_cfg.intermediate_size)
    clip = 2 * P_clip * (patches + 1) + n_clip * 4 * (patches + 1) ** 2 * dc
    return float((6 + 2 * r) * P_s * T + (3 + r) * A_s + 6 * V * d_s * n_sup + 2 * P_t * T + A_t
                 + 2 * V * d_t * n_sup + 6 * P_proj_s * patches * n_img + 2 * P_proj_t * patches * n_img
                 + n_img * clip)


def batch_stats(batch: dict) -> tuple[int, int]:
    """(supervised next-token rows, images) of a collated batch."""
    labels = batch["labels"]
    return int((labels[:, 1:] != IGNORE_INDEX).sum()), int(batch["has_image"].sum())


# ---------------------------------------------------------------------------------------------------------------------
# (a) and (c): the trainer's step


def build_project_models(s_cfg, t_cfg, device, dtype, seed, trainer_args):
    """NF4 teacher (from an in-memory random bf16 model, which is then freed) and bf16 student with one CLIP, made
    ready by the trainer's prepare_models. Returns (the trainer's Models, memory info)."""
    info = {}
    base = allocated(device)
    if base is not None:
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    t_src = random_model(t_cfg, device, seed, dtype)
    teacher = quantize_model(t_src, "nf4", device=device, compute_dtype=dtype)
    del t_src
    flush(device)
    student = random_model(s_cfg, device, seed + 1, dtype)
    # MobileVLM V2-1.7B and -7B carry the same frozen CLIP, which the trainer then keeps once
    student.vision_tower.load_state_dict(teacher.vision_tower.state_dict())
    student.requires_grad_(True)
    student.model.vision_tower.requires_grad_(False)
    models = prepare_models(trainer_args, student, teacher, None, device, dtype)
    if not models.shared_vision:
        raise RuntimeError("vision towers differ after copying the weights")
    flush(device)
    clip = model_bytes(student.vision_tower)
    info.update(dtype=str(dtype).replace("torch.", ""), teacher_nf4_bytes=model_bytes(teacher) - clip,
                student_bytes=model_bytes(student) - clip,
                shared_clip_bytes=clip, build_seconds=time.perf_counter() - t0)
    if base is not None:  # the bench's own setup peak (bf16 teacher + its NF4 copy); the trainer streams from disk
        info["weights_cuda_alloc"] = allocated(device) - base
        info["build_peak_alloc_gib"] = gib(torch.cuda.max_memory_allocated(device))
    return models, info


def project_micro_step(models, batch: dict) -> dict:
    """One micro-batch of the trainer (grad_accum 1): its forward and backward."""
    return micro_step(models, batch, grad_accum=1)


class ProjectState:
    """The trainer's optimizer side (build_optimizer: its parameter groups, fp32 master weights of a bf16 student,
    PagedAdamW8bit, its LR schedule) and its optimizer_step. Built once for (a) and (c): bitsandbytes never frees
    paged optimizer memory, so one optimizer serves every measurement."""

    def __init__(self, trainer_args, models):
        self.optim = build_optimizer(trainer_args, models, total=10_000)
        self.opt, self.masters, self.max_grad_norm = self.optim.opt, self.optim.masters, trainer_args.max_grad_norm

    def master_bytes(self) -> int:
        return tensor_bytes(self.masters.masters()) if self.masters else 0

    def step(self) -> float:
        return optimizer_step(self.optim, self.max_grad_norm)[0]


# ---------------------------------------------------------------------------------------------------------------------
# (b): the original approach


class OriginalAdapters(nn.Module):
    """The original's adapters: Conv2d(Ht -> Hs, 1x1) over attention heads, Conv1d(d_t -> d_s, 1) over channels."""

    def __init__(self, ht: int, hs: int, d_t: int, d_s: int):
        super().__init__()
        self.attn = nn.Conv2d(ht, hs, 1)
        self.proj = nn.Conv1d(d_t, d_s, 1)


def build_original_models(s_cfg, t_cfg, device, dtype, seed):
    info = {}
    base = allocated(device)
    if base is not None:
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    teacher = random_model(t_cfg, device, seed, dtype)  # with its own CLIP: the original loads the whole 7B model
    after_teacher = allocated(device)
    student = random_model(s_cfg, device, seed + 1, dtype)
    for m in (student, teacher):
        m.model.set_attn_implementation("eager")  # output_attentions needs eager attention
    student.requires_grad_(True)
    student.model.vision_tower.requires_grad_(False)
    student.enable_activation_checkpointing()
    student.train()
    with torch.device(device):
        adapters = OriginalAdapters(t_cfg.num_attention_heads, s_cfg.num_attention_heads, t_cfg.hidden_size,
                                    s_cfg.hidden_size).to(dtype)
    info.update(dtype=str(dtype).replace("torch.", ""), teacher_bytes=model_bytes(teacher),
                student_bytes=model_bytes(student),
                adapters_bytes=model_bytes(adapters), build_seconds=time.perf_counter() - t0)
    if base is not None:
        info["teacher_cuda_alloc"] = after_teacher - base
        info["weights_cuda_alloc"] = allocated(device) - base
        info["build_peak_alloc_gib"] = gib(torch.cuda.max_memory_allocated(device))
    return student, teacher, adapters, info


def _eager_forward(model, ids, mask, images, labels=None):
    mm = model.prepare_multimodal(ids, mask, images=images, labels=labels)  # runs the model's own CLIP
    am = None if bool(mm.attention_mask.all()) else mm.attention_mask
    out = model.model(inputs_embeds=mm.inputs_embeds, attention_mask=am, position_ids=mm.position_ids,
                      output_attentions=True, use_cache=False)
    return mm, out, model.lm_head(out.last_hidden_state)  # full-vocab logits in the model dtype


def original_kd(s_logits: torch.Tensor, t_logits: torch.Tensor) -> torch.Tensor:
    """The original logit loss: -mean over all B*L positions of sum_v softmax(z_t) * log_softmax(z_s), in the logits'
    dtype (fp16), inf logits masked (MiniLLM's get_distil_loss without the label mask)."""
    t_probs = F.softmax(t_logits, dim=-1)
    s_logp = F.log_softmax(s_logits, dim=-1)
    prod = torch.masked_fill(t_probs * s_logp, torch.isinf(s_logits), 0)
    return -prod.sum(-1).view(-1).mean()


def original_attn_loss(conv: nn.Conv2d, a_t, a_s, text_mask, vision_mask) -> torch.Tensor:
    """MSE between Conv2d(teacher map) [B, Hs, L, L] and the student map over text-query x vision-key entries."""
    mapped = conv(a_t)
    sel = (text_mask[:, :, None] & vision_mask[:, None, :])[:, None].expand_as(a_s)
    return ((mapped - a_s) ** 2)[sel].mean()


def original_v_loss(conv: nn.Conv1d, a_t, v_t, v_s, text_mask, vision_start, k: int = 16):
    """(MSE over all 144 tokens, MSE over the top-k tokens by the head-mean teacher map summed over text rows)."""
    with torch.no_grad():
        score = (a_t.mean(1) * text_mask[:, :, None]).sum(1)  # [B, L]: attention each key gets from text rows
        pos = vision_start.clamp(min=0)[:, None] + torch.arange(v_t.shape[1], device=v_t.device)[None, :]
        idx = score.gather(1, pos).topk(k, dim=1).indices  # [B, k] into 0..143
    mapped = conv(v_t.transpose(1, 2)).transpose(1, 2)  # [B, 144, d_s]

    def pick(x):
        return x.gather(1, idx[:, :, None].expand(-1, -1, x.shape[2]))

    return F.mse_loss(mapped, v_s), F.mse_loss(pick(mapped), pick(v_s))


def original_micro_step(student, teacher, adapters, batch, device, dtype, scaler) -> dict:
    ids = batch["input_ids"].to(device)
    mask = batch["attention_mask"].to(device)
    labels = batch["labels"].to(device)
    images = batch["images"].to(device, dtype)
    s_mm, s_out, s_logits = _eager_forward(student, ids, mask, images, labels)
    V = s_logits.shape[-1]
    ce = F.cross_entropy(s_logits[:, :-1].reshape(-1, V), s_mm.labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
    with torch.no_grad():
        t_mm, t_out, t_logits = _eager_forward(teacher, ids, mask, images)
    kd = original_kd(s_logits, t_logits)
    a_t, a_s = t_out.attentions[0], s_out.attentions[0]
    attn = original_attn_loss(adapters.attn, a_t, a_s, s_mm.text_mask, s_mm.vision_mask)
    v_all, v_focus = original_v_loss(adapters.proj, a_t, t_mm.vision_tokens, s_mm.vision_tokens, s_mm.text_mask,
                                     s_mm.vision_start)
    loss = ce + kd + attn + v_all + v_focus
    scaler.scale(loss).backward()
    return {"loss": loss.item(), "ce": ce.item(), "logit": kd.item(), "attn": attn.item(),
            "proj_all": v_all.item(), "proj_focus": v_focus.item()}


class OriginalState:
    """fp16 model weights and gradients, fp32 master weights stepped by torch.optim.AdamW (fused on CUDA), dynamic
    loss scaling: DeepSpeed's fp16 layout on one GPU (2 + 2 + 4 + 4 (fp32 grads at the step) + 8 bytes per param)."""

    def __init__(self, params, device):
        self.device = device
        self.params = [p for p in params if p.requires_grad]
        self.master = [p.detach().float().clone().requires_grad_(True) for p in self.params]
        self.opt = torch.optim.AdamW(self.master, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                                     fused=device.type == "cuda")
        self.reset_scaler()

    def reset_scaler(self) -> None:
        # DeepSpeed starts at 2^16 and halves the scale at every overflow (a skipped step); with random weights that
        # takes a few steps, so start where it settles (2^10 keeps tiny random models finite in fp16) and keep the
        # scaler across measurements: the timed steps are real steps (skipped ones are counted and reported)
        self.scaler = torch.amp.GradScaler(self.device.type, init_scale=2.0 ** 10)
        self.skipped = 0  # steps skipped for inf/nan gradients (their optimizer work is not done)

    def step(self) -> float:
        for p, m in zip(self.params, self.master):  # fp16 grads -> fp32 master grads, one tensor at a time
            m.grad = p.grad.float() if p.grad is not None else None
            p.grad = None
        self.scaler.unscale_(self.opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.master, MAX_GRAD_NORM)
        scale = self.scaler.get_scale()
        self.scaler.step(self.opt)
        self.scaler.update()
        self.skipped += int(self.scaler.get_scale() < scale)
        with torch.no_grad():
            for p, m in zip(self.params, self.master):
                p.copy_(m)
        self.opt.zero_grad(set_to_none=True)
        return float(grad_norm)


# ---------------------------------------------------------------------------------------------------------------------
# measurement


def measure(config: str, L: int, B: int, device: torch.device, warmup: int, iters: int, micro_step, state,
            batch: dict, cleanup) -> dict:
    """Warm-up + timed steps; peak memory over all of them; an OOM is caught and reported with the peak so far."""
    n_sup, n_img = batch_stats(batch)
    rec = {"config": config, "L": L, "B": B, "tokens": B * L, "supervised_rows": n_sup, "images": n_img}
    flush(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    rec["static_gib"] = gib(allocated(device))
    fb, op, tot, terms, oom = [], [], [], None, False
    skipped_before = None
    try:
        for i in range(warmup + iters):
            if i == warmup:
                skipped_before = getattr(state, "skipped", None)
            sync(device)
            t0 = time.perf_counter()
            terms = micro_step(batch)
            sync(device)
            t1 = time.perf_counter()
            grad_norm = state.step()
            sync(device)
            t2 = time.perf_counter()
            if i >= warmup:
                fb.append(t1 - t0), op.append(t2 - t1), tot.append(t2 - t0)
    except RuntimeError as exc:  # torch.OutOfMemoryError is one
        if not is_oom(exc):
            raise
        oom = True
    if cuda:
        rec["peak_alloc_gib"] = gib(torch.cuda.max_memory_allocated(device))
        rec["peak_reserved_gib"] = gib(torch.cuda.max_memory_reserved(device))
    else:
        rec["peak_alloc_gib"] = rec["peak_reserved_gib"] = None
    cleanup()
    flush(device)
    if oom:
        rec.update(status="OOM", error=f"out of memory (peak allocated {rec['peak_alloc_gib']:.2f} GiB at failure)"
                   if cuda else "out of memory")
        return rec
    plain, paged = optimizer_state_bytes(state.opt)
    if isinstance(state, ProjectState):
        rec["master_weights_gib"] = gib(state.master_bytes())
    if isinstance(state, OriginalState):
        plain += tensor_bytes(state.master)
        # timed steps whose optimizer update was skipped for inf/nan gradients under loss scaling
        rec["skipped_timed_steps"] = state.skipped - (skipped_before or 0)
    rec.update(status="ok", step_s=statistics.median(tot), fwd_bwd_s=statistics.median(fb),
               optim_s=statistics.median(op), step_s_all=tot, optimizer_state_gib=gib(plain),
               paged_optimizer_state_gib=gib(paged), last_terms=terms, last_grad_norm=grad_norm)
    rec["tokens_per_s"] = B * L / rec["step_s"]
    rec["tokens_per_s_fwd_bwd"] = B * L / rec["fwd_bwd_s"]
    rec["peak_plus_paged_gib"] = None if rec["peak_alloc_gib"] is None else rec["peak_alloc_gib"] + gib(paged)
    rec["finite"] = all(math.isfinite(v) for v in terms.values())
    return rec


def zero_grads(*modules) -> None:
    for m in modules:
        for p in m.parameters():
            p.grad = None


def setup_oom(config_rows, what: str, device, results, setup_entry: dict) -> None:
    """Report every row of a configuration whose models or optimizer did not fit as OOM, with the peak at failure."""
    peak = gib(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
    flush(device)
    setup_entry.update(status=f"OOM while building {what}", peak_alloc_gib=peak)
    for config, L, B in config_rows:
        results.append({"config": config, "L": L, "B": B, "tokens": B * L, "status": "OOM", "peak_alloc_gib": peak,
                        "error": f"out of memory while building {what}"
                                 + (f" (peak allocated {peak:.2f} GiB)" if peak is not None else "")})


def run_original(args, s_cfg, t_cfg, device, dtype, results, setup) -> None:
    lengths = args.lengths
    if 1 not in args.batches:
        setup["b"] = {"status": "not run: (b) runs micro-batch 1 only and --batches has no 1"}
        return
    student = state = None
    try:
        student, teacher, adapters, info = build_original_models(s_cfg, t_cfg, device, dtype, args.seed)
        state = OriginalState(list(student.parameters()) + list(adapters.parameters()), device)
    except RuntimeError as exc:
        if not is_oom(exc):
            raise
        student = teacher = adapters = state = None
    if state is None:
        setup["b"] = {}
        setup_oom([("b", L, 1) for L in lengths], "the fp16 models and fp32 master weights", device, results,
                  setup["b"])
        return
    setup["b"] = {**info, "weights_gib": gib(info.get("weights_cuda_alloc"))}
    for L in lengths:
        batch = make_batch(1, L, s_cfg.vocab_size, args.seed)

        def step(b, _s=student, _t=teacher, _a=adapters):
            return original_micro_step(_s, _t, _a, b, device, dtype, state.scaler)

        def cleanup():
            zero_grads(student, adapters)
            for m in state.master:
                m.grad = None

        rec = measure("b", L, 1, device, args.warmup, args.iters, lambda b: step(b), state, batch, cleanup)
        if rec["status"] != "ok":  # an OOM may have left the scaler between unscale_ and update
            state.reset_scaler()
        results.append(rec)
        print(_progress(rec), flush=True)
    plain, _ = optimizer_state_bytes(state.opt)
    setup["b"]["optimizer_state_bytes"] = plain + tensor_bytes(state.master)
    del student, teacher, adapters, state
    flush(device)


def run_project(args, s_cfg, t_cfg, device, dtype, results, setup, peak_tflops) -> None:
    configs = [c for c in ("a", "c") if c in args.configs]
    state = None
    trainer_args = parse_trainer_args([*TRAINER_FLAGS, "--master-weights", args.master_weights, "--device", device.type])
    try:
        models, info = build_project_models(s_cfg, t_cfg, device, dtype, args.seed, trainer_args)
        student, teacher, loss_fn = models.student, models.teacher, models.loss_fn
        state = ProjectState(trainer_args, models)
    except RuntimeError as exc:
        if not is_oom(exc):
            raise
        models = student = teacher = loss_fn = state = None
    if state is None:
        setup["a_c"] = {}
        setup_oom([(c, L, B) for c in configs for L in args.lengths for B in args.batches],
                  "the NF4 teacher and the student", device, results, setup["a_c"])
        return
    info["adapters_bytes"] = model_bytes(loss_fn)
    info["master_weights"] = state.masters is not None
    info["master_weights_bytes"] = state.master_bytes()
    info["weights_gib"] = gib(info.get("weights_cuda_alloc", 0) + info["adapters_bytes"]) \
        if device.type == "cuda" else None
    setup["a_c"] = info
    clip_cfg = student.vision_tower.vision_tower.config
    backend_of = {"a": "auto", "c": "reference"}
    for config in configs:
        loss_fn.backend = backend_of[config]  # a plain attribute, read at every call
        for L in args.lengths:
            for B in args.batches:
                batch = make_batch(B, L, s_cfg.vocab_size, args.seed)

                def cleanup():
                    zero_grads(student, loss_fn)
                    for m in (student, teacher):
                        m.qk_capture.clear()

                rec = measure(config, L, B, device, args.warmup, args.iters,
                              lambda b: project_micro_step(models, b), state,
                              batch, cleanup)
                if config == "a":
                    n_sup, n_img = rec["supervised_rows"], rec["images"]
                    rec["flops"] = step_flops(s_cfg, t_cfg, clip_cfg, B, L, n_sup, n_img, recompute=True)
                    rec["flops_excl_recompute"] = step_flops(s_cfg, t_cfg, clip_cfg, B, L, n_sup, n_img, False)
                    if rec["status"] == "ok":
                        rec["tflops_per_s"] = rec["flops"] / rec["step_s"] / 1e12
                        if peak_tflops:
                            rec["mfu"] = rec["tflops_per_s"] / peak_tflops
                            rec["mfu_excl_recompute"] = rec["flops_excl_recompute"] / rec["step_s"] / 1e12 / peak_tflops
                            rec["mfu_fwd_bwd_only"] = rec["flops"] / rec["fwd_bwd_s"] / 1e12 / peak_tflops
                results.append(rec)
                print(_progress(rec), flush=True)
    plain, paged = optimizer_state_bytes(state.opt)
    setup["a_c"].update(optimizer_state_bytes=plain, paged_optimizer_state_bytes=paged)
    del models, student, teacher, loss_fn, state
    flush(device)


# ---------------------------------------------------------------------------------------------------------------------
# report


def _fmt(x, spec=".2f", none="n/a"):
    return none if x is None else format(x, spec)


def _progress(rec: dict) -> str:
    head = f"  ({rec['config']}) L={rec['L']:>5} B={rec['B']}: "
    if rec["status"] != "ok":
        return head + rec.get("error", rec["status"])
    mem = ("memory n/a (no CUDA)" if rec["peak_alloc_gib"] is None else
           f"peak {rec['peak_alloc_gib']:.2f} GiB (+paged optimizer state {rec['paged_optimizer_state_gib']:.2f})")
    return (head + f"step {rec['step_s'] * 1e3:,.1f} ms, {rec['tokens_per_s']:,.0f} tok/s, {mem}, loss "
            f"{rec['last_terms']['loss']:.4g}"
            + (f", {rec['skipped_timed_steps']} timed step(s) skipped by the loss scaler"
               if rec.get("skipped_timed_steps") else ""))


def _mem(rec):
    """Peak memory used for ratios: allocated peak plus paged optimizer state."""
    if rec is None or rec.get("status") != "ok" or rec.get("peak_alloc_gib") is None:
        return None
    return rec["peak_alloc_gib"] + (rec.get("paged_optimizer_state_gib") or 0.0)


def ratios(results: list[dict], lengths, batches) -> list[dict]:
    idx = {(r["config"], r["L"], r["B"]): r for r in results}
    out = []
    for L in lengths:
        for B in batches:
            a, b, c = idx.get(("a", L, B)), idx.get(("b", L, 1)), idx.get(("c", L, B))
            if a is None or a["status"] != "ok":
                continue
            row = {"L": L, "B": B, "b_batch": 1}
            for name, other in (("b", b), ("c", c)):
                if other is None:
                    continue
                if other["status"] != "ok":
                    row[f"mem_a_over_{name}"] = row[f"tokens_per_s_a_over_{name}"] = other["status"]
                    continue
                ma, mo = _mem(a), _mem(other)
                row[f"mem_a_over_{name}"] = None if ma is None or mo is None else ma / mo
                row[f"tokens_per_s_a_over_{name}"] = a["tokens_per_s"] / other["tokens_per_s"]
            out.append(row)
    return out


def print_table(report: dict) -> None:
    meta, results = report["meta"], report["results"]
    idx = {(r["config"], r["L"], r["B"]): r for r in results}
    rat = {(r["L"], r["B"]): r for r in report["ratios"]}
    if meta["smoke"]:
        print("\n*** SMOKE RUN (--tiny): tiny random models on "
              f"{meta['device']}; these numbers check the code path end to end, they are NOT measurements ***")
    print(f"\nAlign-KD training step, {meta['device']}, torch {meta['versions']['torch']}, transformers "
          f"{meta['versions']['transformers']}, bitsandbytes {meta['versions']['bitsandbytes']}, triton "
          f"{meta['versions']['triton']}, liger-kernel {meta['versions']['liger_kernel']}, {meta['date']}")
    for k, v in CONFIGS.items():
        if k in meta["configs"]:
            print(f"  ({k}) {v}")
    s = report["setup"]
    ac, b = s.get("a_c"), s.get("b")
    if ac and "teacher_nf4_bytes" in ac:
        alloc = f"{ac['weights_gib']:.2f} GiB allocated: " if ac.get("weights_gib") is not None else ""
        print(f"  weights (a)/(c): {alloc}teacher NF4 {gib(ac['teacher_nf4_bytes']):.3f} + student {ac['dtype']} "
              f"{gib(ac['student_bytes']):.3f} + shared CLIP {gib(ac['shared_clip_bytes']):.3f} + adapters "
              f"{gib(ac['adapters_bytes']):.3f} GiB; fp32 master weights "
              f"{gib(ac['master_weights_bytes']):.3f} GiB{'' if ac['master_weights'] else ' (off)'}; 8-bit optimizer "
              "state "
              f"{gib(ac.get('paged_optimizer_state_bytes', 0)):.3f} GiB paged (CUDA managed memory, outside the "
              f"torch allocator) + {gib(ac.get('optimizer_state_bytes', 0)):.3f} GiB")
    elif ac:
        print(f"  (a)/(c): {ac.get('status')}")
    if b and "teacher_bytes" in b:
        alloc = f"{b['weights_gib']:.2f} GiB allocated: " if b.get("weights_gib") is not None else ""
        print(f"  weights (b): {alloc}teacher {b['dtype']} with its CLIP {gib(b['teacher_bytes']):.3f} + student "
              f"{b['dtype']} with its CLIP {gib(b['student_bytes']):.3f} + adapters {gib(b['adapters_bytes']):.3f} "
              f"GiB; fp32 master weights + AdamW state {gib(b.get('optimizer_state_bytes', 0)):.3f} GiB")
    elif b:
        print(f"  (b): {b.get('status')}")
    print("  peak = torch.cuda.max_memory_allocated over warm-up + timed steps (weights included), + the paged 8-bit "
          "optimizer state for (a)/(c); tok/s = B*L / median step (fwd + bwd + clip + optimizer step)")
    if meta.get("peak_tflops"):
        print(f"  MFU of (a) against {meta['peak_tflops']:g} TFLOP/s ({meta['peak_tflops_source']}); {FLOP_FORMULA}")
    else:
        print(f"  MFU: n/a (no peak TFLOP/s); {FLOP_FORMULA}")

    def cell(rec, mfu=False):
        if rec is None:
            return ("-", "-") + (("-",) if mfu else ())
        if rec["status"] != "ok":
            peak = rec.get("peak_alloc_gib")
            return (f"{rec['status']}" + (f"@{peak:.1f}" if peak is not None else ""), "-") + (("-",) if mfu else ())
        out = (_fmt(_mem(rec)), f"{rec['tokens_per_s']:,.0f}")
        if mfu:
            out += (_fmt(rec.get("mfu") and 100 * rec["mfu"], ".1f") + ("%" if rec.get("mfu") else ""),)
        return out

    def ratio(x):
        if x is None:
            return "-"
        return x if isinstance(x, str) else f"{x:.2f}x"

    header = ["L", "B", "(a) GiB", "(a) tok/s", "(a) MFU", "(b) GiB", "(b) tok/s", "(c) GiB", "(c) tok/s",
              "mem a/b", "tok/s a/b", "mem a/c", "tok/s a/c"]
    rows = []
    for L in meta["lengths"]:
        for B in meta["batches"]:
            r = rat.get((L, B), {})
            star = "*" if B != 1 and ("b", L, 1) in idx else ""
            rows.append([str(L), str(B), *cell(idx.get(("a", L, B)), mfu=True), *cell(idx.get(("b", L, B))),
                         *cell(idx.get(("c", L, B))), ratio(r.get("mem_a_over_b")) + star,
                         ratio(r.get("tokens_per_s_a_over_b")) + star, ratio(r.get("mem_a_over_c")),
                         ratio(r.get("tokens_per_s_a_over_c"))])
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    print()
    print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    for row in rows:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
    print("  * (b) runs micro-batch 1 only (the original's setting): ratios at B>1 are against (b) at B=1, same L")
    print("  OOM@x: out of memory, x = peak allocated GiB at the failure")


# ---------------------------------------------------------------------------------------------------------------------
# main


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="a,b,c", help="comma list of a, b, c (default: all)")
    ap.add_argument("--lengths", type=_int_list, default=None,
                    help="total sequence lengths incl. 144 image tokens (default 1024,2048; --tiny: 224,320)")
    ap.add_argument("--batches", type=_int_list, default=[1, 4], help="micro-batch sizes (default 1,4)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2; --tiny: 1)")
    ap.add_argument("--iters", type=int, default=None, help="timed steps, median reported (default 5; --tiny: 2)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="bf16 dense peak of the GPU for MFU (default: by device name: H100 SXM/H200 989, "
                         "RTX 4090 165, RTX 3090 71; required for other GPUs)")
    ap.add_argument("--master-weights", choices=("auto", "fp32", "none"), default="auto",
                    help="(a)/(c): fp32 copies of the bf16 student's weights, as train_alignkd.py --master-weights "
                         "(auto: on for a bf16 student, i.e. on CUDA)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiny", action="store_true",
                    help="smoke run: the same three configurations with tiny models on whatever device exists")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON output (default bench/results/train_step.json; "
                         "--tiny: bench/results/train_step_tiny.json)")
    args = ap.parse_args(argv)
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    bad = [c for c in args.configs if c not in CONFIGS]
    if bad or not args.configs:
        ap.error(f"--configs takes a comma list of a, b, c; got {bad or args.configs}")
    if args.lengths is None:
        args.lengths = [224, 320] if args.tiny else [1024, 2048]
    if args.warmup is None:
        args.warmup = 1 if args.tiny else 2
    if args.iters is None:
        args.iters = 2 if args.tiny else 5
    if args.iters < 1 or args.warmup < 0 or not args.batches or min(args.batches) < 1:
        ap.error("--iters >= 1, --warmup >= 0 and batch sizes >= 1 are required")
    if args.out is None:
        args.out = ROOT / "bench" / "results" / ("train_step_tiny.json" if args.tiny else "train_step.json")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        print("error: bench/train_step.py measures GPU memory and speed and needs CUDA, which is not available "
              "(torch.cuda.is_available() is False); nothing is reported without a GPU. Run with --tiny for a smoke "
              "run of the code path on this machine (not a measurement).", file=sys.stderr)
        raise SystemExit(2)
    device = torch.device("cuda" if cuda else "cpu")
    device_name = torch.cuda.get_device_name(device) if cuda else "cpu"
    peak_tflops, peak_src = args.peak_tflops, "--peak-tflops"
    if peak_tflops is None and cuda:
        peak_tflops, peak_src = peak_tflops_for(device_name), "built-in table, bf16 dense"
    if "a" in args.configs and cuda and not args.tiny and peak_tflops is None:
        print(f"error: no bf16 peak known for {device_name!r}: pass --peak-tflops (bf16 dense TFLOP/s of this GPU) "
              "for the MFU of (a)", file=sys.stderr)
        raise SystemExit(2)
    if args.tiny and args.peak_tflops is None:
        peak_tflops = None  # a tiny model's MFU means nothing
    min_len = PROMPT + NUM_IMAGE_TOKENS + QUESTION + 1
    if min(args.lengths) < min_len:
        raise SystemExit(f"error: lengths must be >= {min_len} (prompt + image + one question + an answer)")

    dtype = torch.bfloat16 if cuda else torch.float32  # as train_alignkd.py: bf16 on CUDA, fp32 on CPU
    orig_dtype = torch.float16  # the original's fp16 (CPU too: the tiny smoke run takes the same fp16 path)
    s_cfg, t_cfg = tiny_configs() if args.tiny else (student_config(), teacher_config())
    if cuda:
        fused = "triton"
    elif os.environ.get("TRITON_INTERPRET") == "1":
        fused = "triton interpreter (TRITON_INTERPRET=1)"
    else:
        fused = ("kernels.reference for attention/projection (no Triton device; TRITON_INTERPRET=1 runs the Triton "
                 "kernels under the interpreter, very slowly), Liger chunked CE + KL")
    meta = {
        "bench": "train_step", "smoke": bool(args.tiny),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "device": device_name, "capability": list(torch.cuda.get_device_capability(device)) if cuda else None,
        "gpu_memory_gib": gib(torch.cuda.get_device_properties(device).total_memory) if cuda else None,
        "versions": versions(), "configs": args.configs, "config_descriptions": {k: CONFIGS[k] for k in args.configs},
        "lengths": args.lengths, "batches": args.batches, "warmup": args.warmup, "iters": args.iters,
        "seed": args.seed, "dtype_a_c": str(dtype), "master_weights_a_c": args.master_weights, "dtype_b": str(orig_dtype), "fused_backend_a": fused,
        "sample_layout": f"{PROMPT} prompt + {NUM_IMAGE_TOKENS} image + turns of {QUESTION} question / {ANSWER} "
                         "supervised answer tokens; all samples of a batch have length L (no padding)",
        "shapes": {name: {k: cfg.fields.get(k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                          "num_attention_heads", "vocab_size", "rms_norm_eps")}
                   for name, cfg in (("student", s_cfg), ("teacher", t_cfg))},
        "peak_tflops": peak_tflops, "peak_tflops_source": peak_src if peak_tflops else None,
        "flop_formula": FLOP_FORMULA,
    }
    print(("SMOKE RUN (--tiny), not a measurement: " if args.tiny else "") +
          f"train step benchmark on {device_name}: configs {','.join(args.configs)}, L {args.lengths}, "
          f"B {args.batches}, {args.warmup} warm-up + {args.iters} timed steps", flush=True)
    t_start = time.perf_counter()
    results, setup = [], {}
    # (b) first: bitsandbytes' paged optimizer memory of (a)/(c) is never returned to the device
    if "b" in args.configs:
        run_original(args, s_cfg, t_cfg, device, orig_dtype, results, setup)
    if "a" in args.configs or "c" in args.configs:
        run_project(args, s_cfg, t_cfg, device, dtype, results, setup, peak_tflops)
    report = {"meta": meta, "setup": setup, "results": results,
              "ratios": ratios(results, args.lengths, args.batches),
              "wall_seconds": time.perf_counter() - t_start}
    print_table(report)
    write_report(args.out, report)
    print(f"wrote {args.out} ({report['wall_seconds']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
