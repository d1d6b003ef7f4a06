"""AlignKDLoss: the Align-KD training objective with its two trainable adapters.

    L = CE + w_logit * L_logit + w_attn * L_attn + w_proj_all * L_proj_all + w_proj_focus * L_proj_focus

The adapters are parameters of this module, so the trainer puts them in the optimizer and saves them with every
checkpoint (the original code's adapters never trained):
- ``attn_weight`` [Hs, Ht], ``attn_bias`` [Hs]: the 1x1 conv over heads mapping teacher attention to student heads.
  Init: student head hs is the average of "its" teacher heads: the heads are laid on [0, 1) in equal slices and
  W[hs, ht] is the overlap of slice ht with slice hs, normalized so each row sums to 1 (Ht = 2 Hs: the plain mean of
  heads 2hs and 2hs+1). Bias 0. So the initial target is a convex mix of teacher probabilities, a valid attention row.
- ``proj``: nn.Linear(d_t, d_s, bias=True), the projection adapter; PyTorch's default init.

Rows and sets (all from the batch, never from hard-coded positions as in the original code):
- CE: next-token cross-entropy of the student, hidden[:, :-1] predicting labels[:, 1:], mean over targets != -100,
  chunked over rows (the [N, V] logits are never built).
- Logit KD: the same supervised shifted rows, KL(p_t || p_s) ("forward") or KL(p_s || p_t) ("reverse"), fp32 softmax,
  temperature T, no T^2. On the fast path CE and KD come from one chunked Liger pass.
- Attention alignment and text focus: one ``kernels.attention_alignment_and_focus`` call over the samples whose pair
  set E (text row after a vision key) is non-empty; samples without such pairs contribute nothing.
- Focus set: top-``topk`` of the 144 vision tokens of a sample by the teacher's text focus F, read at
  vision_start .. vision_start + N - 1; only for samples that have an image and at least one (text, vision) pair.
- Projection KD: samples with an image only. L_proj_focus averages over the focus tokens of the samples that have a
  focus set. Terms with no eligible sample are 0 and still backpropagate (zero gradients).

Returned dict: "loss" carries the gradients; "ce", "logit", "attn", "proj_all", "proj_focus" are detached fp32 values
for logging (the Liger pass returns CE and KD only as parts of one differentiable sum).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn as nn

from . import dispatch, reference

IGNORE_INDEX = dispatch.IGNORE_INDEX


@dataclass
class KDSide:
    """One model's tensors for the losses."""

    hidden: torch.Tensor  # [B, L, H] final normed hidden states (lm_head input)
    lm_head_weight: torch.Tensor  # [V, H]
    q0: torch.Tensor | None  # [B, heads, L, D] layer-0 post-RoPE queries
    k0: torch.Tensor | None  # [B, heads, L, D] layer-0 post-RoPE keys, repeated to the query heads
    vision_tokens: torch.Tensor | None  # [B, 144, H] projector outputs (rows of text-only samples are ignored)
    lse0: torch.Tensor | None = None  # [B, heads, L] layer-0 row LSEs (teacher cache: k0 then only at vision columns)


@dataclass
class KDBatch:
    """Per-sample layout of the spliced sequence (shared by teacher and student)."""

    labels: torch.Tensor  # [B, L] long, -100 on unsupervised positions (already expanded to the spliced sequence)
    attention_mask: torch.Tensor  # [B, L] bool, valid tokens
    vision_mask: torch.Tensor  # [B, L] bool, the image positions
    text_mask: torch.Tensor  # [B, L] bool, text positions after the image
    has_image: torch.Tensor  # [B] bool
    vision_start: torch.Tensor  # [B] long, first image position, -1 for text-only samples


def head_average_init(student_heads: int, teacher_heads: int) -> torch.Tensor:
    """[Hs, Ht] row-stochastic matrix: student head hs averages the teacher heads that overlap its slice of [0, 1)."""
    hs = torch.arange(student_heads, dtype=torch.float64)[:, None]
    ht = torch.arange(teacher_heads, dtype=torch.float64)[None, :]
    lo = torch.maximum(hs / student_heads, ht / teacher_heads)
    hi = torch.minimum((hs + 1) / student_heads, (ht + 1) / teacher_heads)
    w = (hi - lo).clamp(min=0) * student_heads  # overlap / (1 / Hs): each row sums to 1
    return w.float()


def _zero(*tensors) -> torch.Tensor:
    return dispatch._zero_like_graph(*tensors)


ATTN_FORMS = ("mse", "kl")
PROJ_SIDES = ("teacher", "student")


class AlignKDLoss(nn.Module):
    """The objective. ``attn_form``: "mse" is the paper's literal MSE of attention probabilities through the 1x1
    conv over heads (``attn_weight``, ``attn_bias``); "kl" is KL(mix of the teacher's vision-renormalized attention ||
    the student's), with a convex head mix softmax(``attn_mix``) (``kernels.attention_kl_loss``). ``proj_side``:
    "teacher" is the paper's adapter A: d_t -> d_s on the teacher's tokens (A(V_t) vs V_s); "student" puts it on the
    student's tokens (A: d_s -> d_t, A(V_s) vs V_t), so the adapter cannot fit the loss unless the student's tokens
    carry what the teacher's do."""

    def __init__(self, teacher_heads: int, student_heads: int, teacher_dim: int, student_dim: int,
                 w_logit: float = 1.0, w_attn: float = 1.0, w_proj_all: float = 1.0, w_proj_focus: float = 1.0,
                 topk: int = 16, kl: str = "forward", temperature: float = 1.0, backend: str = "auto",
                 chunk_rows: int = dispatch.DEFAULT_CHUNK_ROWS, attn_form: str = "mse", proj_side: str = "teacher"):
        super().__init__()
        if kl not in ("forward", "reverse"):
            raise ValueError(f"kl must be 'forward' or 'reverse', got {kl!r}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        if attn_form not in ATTN_FORMS:
            raise ValueError(f"attn_form must be one of {ATTN_FORMS}, got {attn_form!r}")
        if proj_side not in PROJ_SIDES:
            raise ValueError(f"proj_side must be one of {PROJ_SIDES}, got {proj_side!r}")
        dispatch.resolve_backend(backend)  # validate early
        init = head_average_init(student_heads, teacher_heads)
        if attn_form == "mse":
            self.attn_weight = nn.Parameter(init)
            self.attn_bias = nn.Parameter(torch.zeros(student_heads))
        else:  # softmax(log(init)) = init where init > 0; a small floor lets every teacher head be learned
            self.attn_mix = nn.Parameter(torch.log(init.clamp(min=1e-3)))
        d_in, d_out = (teacher_dim, student_dim) if proj_side == "teacher" else (student_dim, teacher_dim)
        self.proj = nn.Linear(d_in, d_out, bias=True)
        self.w_logit, self.w_attn, self.w_proj_all, self.w_proj_focus = (float(w) for w in (w_logit, w_attn,
                                                                                           w_proj_all, w_proj_focus))
        self.topk, self.kl, self.temperature = int(topk), kl, float(temperature)
        self.backend, self.chunk_rows = backend, int(chunk_rows)
        self.attn_form, self.proj_side = attn_form, proj_side

    def extra_repr(self) -> str:
        return (f"attn {self.attn_form}, proj adapter on the {self.proj_side}, weights logit={self.w_logit} "
                f"attn={self.w_attn} proj_all={self.w_proj_all} proj_focus={self.w_proj_focus}, topk={self.topk}, "
                f"kl={self.kl}, T={self.temperature}, backend={self.backend}")

    # ---------------------------------------------------------------------------------------------------------------

    def forward(self, student: KDSide, teacher: KDSide | None, batch: KDBatch, distill: bool = True,
                separate: bool = False) -> dict[str, torch.Tensor]:
        """The terms of one micro-batch. ``separate=True`` (the gradient probe) returns every weighted term with its
        own graph ("ce", "logit", "attn", "proj_all", "proj_focus"; "loss" their sum) instead of CE + KD fused."""
        rows = batch.labels[:, 1:] != IGNORE_INDEX  # [B, L-1]: hidden[:, :-1] predicts labels[:, 1:]
        targets = batch.labels[:, 1:][rows]
        h_s = student.hidden[:, :-1][rows]  # [N, H_s]
        w_s = student.lm_head_weight
        zero = torch.zeros((), dtype=torch.float32, device=h_s.device)

        if not distill:
            ce = dispatch.chunked_cross_entropy(h_s, w_s, targets, self.chunk_rows)
            return {"loss": ce, "ce": ce if separate else ce.detach(), "logit": zero, "attn": zero, "proj_all": zero,
                    "proj_focus": zero}
        if teacher is None:
            raise ValueError("distill=True needs the teacher's KDSide")

        h_t, w_t = teacher.hidden[:, :-1][rows].detach(), teacher.lm_head_weight.detach()
        attn, focus_idx, has_focus = self._attention(student, teacher, batch)
        proj_all, proj_focus = self._projection(student, teacher, batch, focus_idx, has_focus)
        if separate:
            terms = {"ce": dispatch.chunked_cross_entropy(h_s, w_s, targets, self.chunk_rows),
                     "logit": self.w_logit * dispatch.logit_kd_loss(h_s, w_s, h_t, w_t, kind=self.kl,
                                                                    temperature=self.temperature,
                                                                    backend=self.backend),
                     "attn": self.w_attn * attn, "proj_all": self.w_proj_all * proj_all,
                     "proj_focus": self.w_proj_focus * proj_focus}
            return {"loss": sum(terms.values()), **terms}
        total, ce, logit = self._ce_and_logit(h_s, w_s, h_t, w_t, targets)
        for w, term in ((self.w_attn, attn), (self.w_proj_all, proj_all), (self.w_proj_focus, proj_focus)):
            if w != 0.0:
                total = total + w * term
        return {"loss": total, "ce": ce, "logit": logit, "attn": attn.detach(), "proj_all": proj_all.detach(),
                "proj_focus": proj_focus.detach()}

    # ---------------------------------------------------------------------------------------------------------------

    def _ce_and_logit(self, h_s, w_s, h_t, w_t, targets):
        """(CE + w_logit * KD with gradients, CE detached, KD detached) over the selected rows."""
        total, kd, ce = dispatch.fused_logit_kd_and_ce(h_s, w_s, h_t, w_t, targets, kind=self.kl,
                                                       temperature=self.temperature, weight_ce=1.0,
                                                       weight_kd=self.w_logit, chunk_rows=self.chunk_rows,
                                                       backend=self.backend)
        return total, ce, kd

    def _attention(self, student, teacher, batch):
        """(L_attn, focus_idx [B, K] or None, has_focus [B] bool)."""
        tm, vm = batch.text_mask.bool(), batch.vision_mask.bool()
        am = batch.attention_mask.bool() if batch.attention_mask is not None else None
        # a sample has pairs when some text row comes after some vision position
        vision_before = (torch.cumsum(vm.to(torch.int32), 1) - vm.to(torch.int32)) > 0
        has_pairs = (tm & vision_before).any(1)
        has_focus = has_pairs & batch.has_image.bool()
        adapter = [self.attn_weight, self.attn_bias] if self.attn_form == "mse" else [self.attn_mix]
        q_s, k_s = student.q0, student.k0
        if not bool(has_pairs.any()):
            return _zero(q_s, k_s, *adapter), None, has_focus
        q_t, k_t, lse_t = teacher.q0.detach(), teacher.k0.detach(), teacher.lse0
        if not bool(has_pairs.all()):  # only the samples that have pairs (the others add nothing to sum or count)
            sel = has_pairs.nonzero().squeeze(1)
            q_t, k_t, q_s, k_s = (x.index_select(0, sel) for x in (q_t, k_t, q_s, k_s))
            lse_t = lse_t.index_select(0, sel) if lse_t is not None else None
            tm, vm = tm[sel], vm[sel]
            am = am[sel] if am is not None else None
        else:
            sel = None
        with contextlib.nullcontext() if self.w_attn != 0.0 else torch.no_grad():  # w_attn 0: reported only, no grads
            if self.attn_form == "mse":
                attn, focus = dispatch.attention_alignment_and_focus(q_t, k_t, q_s, k_s, tm, vm, *adapter, am,
                                                                     teacher_lse=lse_t, backend=self.backend)
            else:
                attn = dispatch.attention_kl_loss(q_t, k_t, q_s, k_s, tm, vm, self.mix(), am, backend=self.backend)
                focus = dispatch.text_focus(q_t, k_t, tm, vm, am, teacher_lse=lse_t, backend=self.backend)
        focus = focus.detach()
        if sel is not None:  # back to the whole batch (samples without pairs: F = 0)
            focus = focus.new_zeros(batch.labels.shape[0], focus.shape[1]).index_copy_(0, sel, focus)
        focus_idx = self.select_focus(focus, batch.vision_start, student.vision_tokens.shape[1])
        return attn, focus_idx, has_focus

    def mix(self) -> torch.Tensor:
        """[Hs, Ht] convex mix of teacher heads of the "kl" form (rows sum to 1)."""
        return torch.softmax(self.attn_mix.float(), dim=1)

    def select_focus(self, focus: torch.Tensor, vision_start: torch.Tensor, n_vis: int) -> torch.Tensor:
        """Focus set: top-``topk`` vision-token indices (into 0..n_vis-1) by the text focus F [B, L]: [B, K] long.

        F is read at each sample's positions vision_start .. vision_start + n_vis - 1. Rows of samples without an image
        are meaningless (the caller masks them out with has_focus). Ties go to torch.topk's order."""
        L = focus.shape[1]
        start = vision_start.long().clamp(min=0)
        pos = (start[:, None] + torch.arange(n_vis, device=focus.device)[None, :]).clamp(max=L - 1)
        window = focus.gather(1, pos)  # [B, n_vis]
        return window.topk(min(self.topk, n_vis), dim=1).indices

    def _projection(self, student, teacher, batch, focus_idx, has_focus):
        """(L_proj_all, L_proj_focus) over the samples with an image (focus: those with a focus set)."""
        A = self.proj
        img = batch.has_image.bool()
        f_s_all = student.vision_tokens
        if not bool(img.any()):
            z = _zero(f_s_all, A.weight, A.bias)
            return z, z
        sel = img.nonzero().squeeze(1)
        f_t = teacher.vision_tokens.detach().index_select(0, sel)
        f_s = f_s_all.index_select(0, sel)
        foc = has_focus.index_select(0, sel) if focus_idx is not None else torch.zeros_like(sel, dtype=torch.bool)
        if self.proj_side == "student":
            idx = focus_idx.index_select(0, sel)[foc] if bool(foc.any()) else None
            return reference.student_projection_kd_loss(f_t, f_s, A.weight, A.bias, idx, foc)
        if bool(foc.all()):  # the common case: one fused call for both terms
            return dispatch.projection_kd_loss(f_t, f_s, A.weight, A.bias, focus_idx.index_select(0, sel),
                                               backend=self.backend)
        loss_all, _ = dispatch.projection_kd_loss(f_t, f_s, A.weight, A.bias, backend=self.backend)
        if not bool(foc.any()):
            return loss_all, _zero(f_s, A.weight, A.bias)
        # focus tokens of the samples that have a focus set, gathered: their "all tokens" mean is L_proj_focus
        fsel = foc.nonzero().squeeze(1)
        idx = focus_idx.index_select(0, sel).index_select(0, fsel)  # [Bf, K]
        g_t = f_t.index_select(0, fsel).gather(1, idx[:, :, None].expand(-1, -1, f_t.shape[2]))
        g_s = f_s.index_select(0, fsel).gather(1, idx[:, :, None].expand(-1, -1, f_s.shape[2]))
        loss_focus, _ = dispatch.projection_kd_loss(g_t, g_s, A.weight, A.bias, backend=self.backend)
        return loss_all, loss_focus
