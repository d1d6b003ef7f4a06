"""The Align-KD terms (the paper's, and their measured variants), registered in the order they are summed.

- ``logit``: KL of the next-token distributions on the supervised shifted rows, forward KL(p_t || p_s) or reverse,
  fp32 softmax, temperature T, no T^2. In training it shares one chunked Liger pass with the CE (`AlignKDLoss`).
- ``attn``: layer-0 attention alignment over the pair set E (text row after a vision key), through the 1x1 conv
  over heads ("mse", the paper's) or KL of the vision-renormalized rows through a convex head mix ("kl"); samples
  without pairs add nothing. The same pass yields the teacher's text focus F.
- ``proj_all`` / ``proj_focus``: MSE of the projector outputs through the adapter, over every vision token of the
  samples with an image / over the top-``topk`` vision tokens by F of the samples that have a focus set.
A term with no eligible sample is 0 and still backpropagates (zero gradients).
"""
from __future__ import annotations

import contextlib

import torch

from kernels import dispatch, reference

from .objective import TermContext
from .registry import Term, register_term


def logit(ctx: TermContext) -> torch.Tensor:
    loss = ctx.loss_fn
    return dispatch.logit_kd_loss(ctx.h_s, ctx.student.lm_head_weight, ctx.h_t, ctx.teacher.lm_head_weight.detach(),
                                  kind=loss.kl, temperature=loss.temperature, backend=loss.backend)


def attention_and_focus(ctx: TermContext) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(L_attn, focus set [B, K] or None, has_focus [B] bool): one pass over the layer-0 pairs."""
    loss, student, teacher, batch = ctx.loss_fn, ctx.student, ctx.teacher, ctx.batch
    tm, vm = batch.text_mask.bool(), batch.vision_mask.bool()
    am = batch.attention_mask.bool() if batch.attention_mask is not None else None
    # a sample has pairs when some text row comes after some vision position
    vision_before = (torch.cumsum(vm.to(torch.int32), 1) - vm.to(torch.int32)) > 0
    has_pairs = (tm & vision_before).any(1)
    has_focus = has_pairs & batch.has_image.bool()
    adapter = [loss.attn_weight, loss.attn_bias] if loss.attn_form == "mse" else [loss.attn_mix]
    q_s, k_s = student.q0, student.k0
    if not bool(has_pairs.any()):
        return dispatch.zero_like_graph(q_s, k_s, *adapter), None, has_focus
    q_t, k_t, lse_t = teacher.q0.detach(), teacher.k0.detach(), teacher.lse0
    if not bool(has_pairs.all()):  # only the samples that have pairs (the others add nothing to sum or count)
        sel = has_pairs.nonzero().squeeze(1)
        q_t, k_t, q_s, k_s = (x.index_select(0, sel) for x in (q_t, k_t, q_s, k_s))
        lse_t = lse_t.index_select(0, sel) if lse_t is not None else None
        tm, vm = tm[sel], vm[sel]
        am = am[sel] if am is not None else None
    else:
        sel = None
    with contextlib.nullcontext() if loss.weights["attn"] != 0.0 else torch.no_grad():  # weight 0: reported only
        if loss.attn_form == "mse":
            attn, focus = dispatch.attention_alignment_and_focus(q_t, k_t, q_s, k_s, tm, vm, *adapter, am,
                                                                 teacher_lse=lse_t, backend=loss.backend)
        else:
            attn = dispatch.attention_kl_loss(q_t, k_t, q_s, k_s, tm, vm, loss.mix(), am, backend=loss.backend)
            focus = dispatch.text_focus(q_t, k_t, tm, vm, am, teacher_lse=lse_t, backend=loss.backend)
    focus = focus.detach()
    if sel is not None:  # back to the whole batch (samples without pairs: F = 0)
        focus = focus.new_zeros(batch.labels.shape[0], focus.shape[1]).index_copy_(0, sel, focus)
    focus_idx = select_focus(focus, batch.vision_start, student.vision_tokens.shape[1], loss.topk)
    return attn, focus_idx, has_focus


def select_focus(focus: torch.Tensor, vision_start: torch.Tensor, n_vis: int, topk: int) -> torch.Tensor:
    """Focus set: top-``topk`` vision-token indices (into 0..n_vis-1) by the text focus F [B, L]: [B, K] long.

    F is read at each sample's positions vision_start .. vision_start + n_vis - 1. Rows of samples without an image
    are meaningless (the caller masks them out with has_focus). Ties go to torch.topk's order."""
    L = focus.shape[1]
    start = vision_start.long().clamp(min=0)
    pos = (start[:, None] + torch.arange(n_vis, device=focus.device)[None, :]).clamp(max=L - 1)
    window = focus.gather(1, pos)  # [B, n_vis]
    return window.topk(min(topk, n_vis), dim=1).indices


def projection(ctx: TermContext) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_proj_all, L_proj_focus) over the samples with an image (focus: those with a focus set)."""
    loss, batch = ctx.loss_fn, ctx.batch
    _, focus_idx, has_focus = ctx.shared(attention_and_focus)
    A = loss.proj
    img = batch.has_image.bool()
    f_s_all = ctx.student.vision_tokens
    if not bool(img.any()):
        z = dispatch.zero_like_graph(f_s_all, A.weight, A.bias)
        return z, z
    sel = img.nonzero().squeeze(1)
    f_t = ctx.teacher.vision_tokens.detach().index_select(0, sel)
    f_s = f_s_all.index_select(0, sel)
    foc = has_focus.index_select(0, sel) if focus_idx is not None else torch.zeros_like(sel, dtype=torch.bool)
    if loss.proj_side == "student":
        idx = focus_idx.index_select(0, sel)[foc] if bool(foc.any()) else None
        return reference.student_projection_kd_loss(f_t, f_s, A.weight, A.bias, idx, foc)
    if bool(foc.all()):  # the common case: one fused call for both terms
        return dispatch.projection_kd_loss(f_t, f_s, A.weight, A.bias, focus_idx.index_select(0, sel),
                                           backend=loss.backend)
    loss_all, _ = dispatch.projection_kd_loss(f_t, f_s, A.weight, A.bias, backend=loss.backend)
    if not bool(foc.any()):
        return loss_all, dispatch.zero_like_graph(f_s, A.weight, A.bias)
    # focus tokens of the samples that have a focus set, gathered: their "all tokens" mean is L_proj_focus
    fsel = foc.nonzero().squeeze(1)
    idx = focus_idx.index_select(0, sel).index_select(0, fsel)  # [Bf, K]
    g_t = f_t.index_select(0, fsel).gather(1, idx[:, :, None].expand(-1, -1, f_t.shape[2]))
    g_s = f_s.index_select(0, fsel).gather(1, idx[:, :, None].expand(-1, -1, f_s.shape[2]))
    loss_focus, _ = dispatch.projection_kd_loss(g_t, g_s, A.weight, A.bias, backend=loss.backend)
    return loss_all, loss_focus


ATTENTION = ("q0", "k0", "lse0")
# defaults: the best measured in the shapes world (bench/ablate.py, README); the paper's literal objective is
# --attn-form mse --w-attn 1 --w-proj-all 1 --w-proj-focus 1
register_term(Term("logit", logit, 1.0, teacher=("hidden", "lm_head_weight"),
                   help="logit KD (forward or reverse KL, --kl, --temperature)"))
register_term(Term("attn", lambda ctx: ctx.shared(attention_and_focus)[0], 1.0, teacher=ATTENTION,
                   help="layer-0 text->vision attention alignment (form: --attn-form; the paper uses 1 with mse, "
                        "whose value is ~1e-5 and moves nothing; kl transfers where the text looks)"))
register_term(Term("proj_all", lambda ctx: ctx.shared(projection)[0], 0.0, teacher=("vision_tokens",),
                   help="projector KD on every vision token (the paper uses 1)"))
register_term(Term("proj_focus", lambda ctx: ctx.shared(projection)[1], 1.0, teacher=("vision_tokens", *ATTENTION),
                   help="projector KD on the text-focused vision tokens (the paper uses 1)"))
