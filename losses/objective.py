"""AlignKDLoss: the Align-KD training objective with its two trainable adapters.

    L = CE + sum over the registered terms of w_term * L_term      (losses/terms.py, losses/registry.py)

CE is the student's next-token cross-entropy: hidden[:, :-1] predicting labels[:, 1:], mean over the supervised
targets, chunked over rows (the [N, V] logits are never built). In training CE and the ``logit`` term come from one
chunked Liger pass over the student's logits; every other term is added as w * term. A term at weight 0 is
computed and logged but adds no gradient.

The adapters are parameters of this module, so the trainer puts them in the optimizer and saves them with every
checkpoint:
- ``attn_weight`` [Hs, Ht], ``attn_bias`` [Hs] ("mse" form): the 1x1 conv over heads mapping teacher attention to
  student heads; ``attn_mix`` [Hs, Ht] ("kl" form): logits of a convex mix of teacher heads. Init: student head hs
  averages "its" teacher heads (the heads laid on [0, 1) in equal slices, W[hs, ht] the overlap of slice ht with
  slice hs, rows summing to 1), so the initial target is a valid attention row. Bias 0.
- ``proj``: nn.Linear, the projection adapter (d_t -> d_s on the teacher's tokens, or d_s -> d_t on the student's
  with ``proj_side="student"``); PyTorch's default init.
- ``term_adapters``: the modules of registered terms that bring their own (``Term.adapter``), by term name.

Returned dict: "loss" carries the gradients; "ce" and each registered term are detached fp32 values for logging.
"""
from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any

import torch
import torch.nn as nn

from kernels import dispatch
from kernels.dispatch import IGNORE_INDEX

from .inputs import KDBatch, KDSide
from .registry import TERMS

ATTN_FORMS = ("mse", "kl")
PROJ_SIDES = ("teacher", "student")
FUSED_WITH_CE = "logit"  # the term computed in the CE's chunked pass over the student's logits


def head_average_init(student_heads: int, teacher_heads: int) -> torch.Tensor:
    """[Hs, Ht] row-stochastic matrix: student head hs averages the teacher heads that overlap its slice of [0, 1)."""
    hs = torch.arange(student_heads, dtype=torch.float64)[:, None]
    ht = torch.arange(teacher_heads, dtype=torch.float64)[None, :]
    lo = torch.maximum(hs / student_heads, ht / teacher_heads)
    hi = torch.minimum((hs + 1) / student_heads, (ht + 1) / teacher_heads)
    w = (hi - lo).clamp(min=0) * student_heads  # overlap / (1 / Hs): each row sums to 1
    return w.float()


def check_skip(skip: Collection[str], weights: Mapping[str, float]) -> frozenset[str]:
    """The terms not to compute: each registered, at weight 0 (a weighted one needs its value), and not the one
    fused with the CE (that pass needs the teacher's logits)."""
    skip = frozenset(skip)
    bad = sorted(n for n in skip if n not in weights or weights[n] != 0.0 or n == FUSED_WITH_CE)
    if bad:
        raise ValueError(f"terms {bad} cannot be skipped: only registered terms at weight 0, other than "
                         f"{FUSED_WITH_CE!r} (computed with the CE)")
    return skip


class TermContext:
    """One micro-batch as a term sees it: both sides, the batch layout, the objective (options, adapters, weights)
    and the supervised rows. ``shared(fn)`` computes fn(ctx) once for every term that asks (one attention pass
    gives L_attn and the focus set of L_proj_focus)."""

    def __init__(self, loss_fn: "AlignKDLoss", student: KDSide, teacher: KDSide | None, batch: KDBatch):
        self.loss_fn, self.student, self.teacher, self.batch = loss_fn, student, teacher, batch
        self.rows = batch.labels[:, 1:] != IGNORE_INDEX  # [B, L-1]: hidden[:, :-1] predicts labels[:, 1:]
        self.targets = batch.labels[:, 1:][self.rows]
        self.h_s = student.hidden[:, :-1][self.rows]  # [N, H_s]
        self._shared: dict[Callable, Any] = {}

    @property
    def h_t(self) -> torch.Tensor:
        """[N, H_t] the teacher's hidden states at the supervised rows (no gradient)."""
        return self.teacher.hidden[:, :-1][self.rows].detach()

    def adapter(self, name: str) -> nn.Module:
        """The trainable module of term ``name`` (its ``Term.adapter``), owned by the objective."""
        return self.loss_fn.term_adapters[name]

    def shared(self, fn: Callable[["TermContext"], Any]) -> Any:
        if fn not in self._shared:
            self._shared[fn] = fn(self)
        return self._shared[fn]


class AlignKDLoss(nn.Module):
    """The objective. ``weights``: term name -> weight (None or a missing term: 1). ``attn_form``: "mse" is the
    paper's literal MSE of attention probabilities through the 1x1 conv over heads; "kl" is KL(mix of the teacher's
    vision-renormalized attention || the student's). ``proj_side``: "teacher" is the paper's adapter A(V_t) ~ V_s;
    "student" is A(V_s) ~ V_t, which the adapter cannot fit unless the student's tokens carry what the teacher's
    do. ``skip``: terms at weight 0 whose teacher tensors the run lacks (a teacher cache built without them): not
    computed, logged as 0 as under ``distill=False``."""

    def __init__(self, teacher_heads: int, student_heads: int, teacher_dim: int, student_dim: int,
                 weights: Mapping[str, float] | None = None, topk: int = 16, kl: str = "forward",
                 temperature: float = 1.0, backend: str = "auto", chunk_rows: int = dispatch.DEFAULT_CHUNK_ROWS,
                 attn_form: str = "mse", proj_side: str = "teacher", skip: Collection[str] = ()):
        super().__init__()
        weights = dict(weights or {})
        if set(weights) - set(TERMS):
            raise ValueError(f"unknown loss terms {sorted(set(weights) - set(TERMS))}; registered: {', '.join(TERMS)}")
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
        self.weights = {name: float(weights.get(name, 1.0)) for name in TERMS}
        self.topk, self.kl, self.temperature = int(topk), kl, float(temperature)
        self.backend, self.chunk_rows = backend, int(chunk_rows)
        self.attn_form, self.proj_side = attn_form, proj_side
        self.teacher_heads, self.student_heads = teacher_heads, student_heads
        self.teacher_dim, self.student_dim = teacher_dim, student_dim
        self.skip = check_skip(skip, self.weights)
        # last: a term's factory reads the options, and the built-in adapters keep the random init they had alone
        self.term_adapters = nn.ModuleDict({name: t.adapter(self) for name, t in TERMS.items() if t.adapter})

    def extra_repr(self) -> str:
        weights = " ".join(f"{k}={w}" for k, w in self.weights.items())
        return (f"attn {self.attn_form}, proj adapter on the {self.proj_side}, weights {weights}, topk={self.topk}, "
                f"kl={self.kl}, T={self.temperature}, backend={self.backend}")

    def mix(self) -> torch.Tensor:
        """[Hs, Ht] convex mix of teacher heads of the "kl" form (rows sum to 1)."""
        return torch.softmax(self.attn_mix.float(), dim=1)

    def forward(self, student: KDSide, teacher: KDSide | None, batch: KDBatch, distill: bool = True,
                separate: bool = False) -> dict[str, torch.Tensor]:
        """The terms of one micro-batch. ``separate=True`` (the gradient probe) returns CE and every weighted term
        with its own graph ("loss" their sum) instead of CE + logit KD fused."""
        ctx = TermContext(self, student, teacher, batch)
        w_s = student.lm_head_weight
        if not distill:
            ce = dispatch.chunked_cross_entropy(ctx.h_s, w_s, ctx.targets, self.chunk_rows)
            zero = torch.zeros((), dtype=torch.float32, device=ctx.h_s.device)
            return {"loss": ce, "ce": ce if separate else ce.detach(), **{name: zero for name in TERMS}}
        if teacher is None:
            raise ValueError("distill=True needs the teacher's KDSide")
        zero = torch.zeros((), dtype=torch.float32, device=ctx.h_s.device)
        values = {name: term.fn(ctx) if name not in self.skip else zero for name, term in TERMS.items()
                  if name != FUSED_WITH_CE}
        if separate:
            terms = {"ce": dispatch.chunked_cross_entropy(ctx.h_s, w_s, ctx.targets, self.chunk_rows)}
            for name, term in TERMS.items():
                terms[name] = self.weights[name] * (values[name] if name in values else term.fn(ctx))
            return {"loss": sum(terms.values()), **terms}
        total, kd, ce = dispatch.fused_logit_kd_and_ce(
            ctx.h_s, w_s, ctx.h_t, teacher.lm_head_weight.detach(), ctx.targets, kind=self.kl,
            temperature=self.temperature, weight_ce=1.0, weight_kd=self.weights[FUSED_WITH_CE],
            chunk_rows=self.chunk_rows, backend=self.backend)
        for name, value in values.items():
            if self.weights[name] != 0.0:
                total = total + self.weights[name] * value
        return {"loss": total, "ce": ce, FUSED_WITH_CE: kd, **{name: v.detach() for name, v in values.items()}}
