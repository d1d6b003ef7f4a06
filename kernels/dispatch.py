"""Backend choice for the Align-KD losses, the chunked logit KD (Liger) and the chunked cross-entropy.

Backends
--------
``backend`` is "auto", "triton" or "reference" (or None = "auto"). "auto" first consults the environment variable
``ALIGNKD_BACKEND`` (same three values), so a run can be forced without code changes; an explicit "triton" or
"reference" keyword wins over the variable.

- attention alignment / text focus / attention KL / projection KD: "auto" runs the Triton kernels
  (``kernels.attention_alignment``, ``kernels.attention_kl``, ``kernels.projection_kd``) for CUDA tensors, and for
  CPU tensors when ``TRITON_INTERPRET=1``; otherwise ``kernels.reference``. If the Triton modules cannot be
  imported, "auto" falls back to the reference with a one-time warning; "triton" raises.
- logit KD: "auto" and "triton" run Liger-Kernel's chunked fused-linear distillation (plain PyTorch, any device; never
  the full [N, V] logits of both models at once); "reference" materializes the logits.

The Triton modules are imported lazily (inside the functions), so this package imports without them.
"""
from __future__ import annotations

import os
import warnings

import torch

from . import reference

BACKENDS = ("auto", "triton", "reference")
ENV_VAR = "ALIGNKD_BACKEND"
IGNORE_INDEX = -100  # the target the losses skip (PyTorch's ignore_index); the labels use it
DEFAULT_CHUNK_ROWS = 1024

_warned: set[str] = set()


def resolve_backend(backend: str | None = None) -> str:
    """The effective backend name: an explicit "triton"/"reference" wins; None/"auto" defers to $ALIGNKD_BACKEND."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend in (None, "auto"):
        env = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
        if env not in BACKENDS:
            raise ValueError(f"${ENV_VAR} must be one of {BACKENDS}, got {env!r}")
        return env
    return backend


def _triton_device(device: torch.device) -> bool:
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1")


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _triton_impl(module: str, name: str, device: torch.device, backend: str | None):
    """The Triton entry point to use, or None for the reference."""
    b = resolve_backend(backend)
    if b == "reference":
        return None
    if b == "triton" and not _triton_device(device):
        raise RuntimeError(f"backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors "
                           f"(got {device} tensors)")
    if b == "auto" and not _triton_device(device):
        return None
    try:
        mod = __import__(f"kernels.{module}", fromlist=[name])
        return getattr(mod, name)
    except Exception as exc:  # noqa: BLE001 - an absent or broken Triton module must not break "auto"
        if b == "triton":
            raise RuntimeError(f"backend='triton' but kernels.{module}.{name} is unavailable: {exc!r}") from exc
        _warn_once(module, f"kernels.{module}.{name} is unavailable ({exc!r}); using the PyTorch reference")
        return None


# --------------------------------------------------------------------------------------------------------------------
# attention alignment, text focus, projection KD


def attention_alignment_and_focus(q_t, k_t, q_s, k_s, text_mask, vision_mask, weight, bias, attention_mask=None, *,
                                  teacher_lse=None, backend=None):
    """(L_attn scalar, F [B, L] fp32) in one pass; semantics of ``kernels.reference.attention_alignment_and_focus``."""
    fn = _triton_impl("attention_alignment", "attention_alignment_triton", q_s.device, backend)
    if fn is None:
        return reference.attention_alignment_and_focus(q_t, k_t, q_s, k_s, text_mask, vision_mask, weight, bias,
                                                       attention_mask, teacher_lse)
    return fn(q_t, k_t, q_s, k_s, text_mask, vision_mask, weight, bias, attention_mask, need_focus=True,
              need_loss=True, teacher_lse=teacher_lse)


def text_focus(q_t, k_t, text_mask, vision_mask, attention_mask=None, *, teacher_lse=None, backend=None):
    """Text focus F [B, L] fp32 (no gradient); semantics of ``kernels.reference.text_focus``."""
    fn = _triton_impl("attention_alignment", "attention_alignment_triton", q_t.device, backend)
    if fn is None:
        return reference.text_focus(q_t, k_t, text_mask, vision_mask, attention_mask, teacher_lse)
    return fn(q_t, k_t, None, None, text_mask, vision_mask, None, None, attention_mask, need_focus=True,
              need_loss=False, teacher_lse=teacher_lse)[1]


def attention_row_lse(q, k, row_mask, attention_mask=None, *, backend=None):
    """[B, H, L] fp32 row log-sum-exps (no gradient); semantics of ``kernels.reference.attention_row_lse``."""
    fn = _triton_impl("attention_alignment", "attention_row_lse_triton", q.device, backend)
    if fn is None:
        return reference.attention_row_lse(q, k, row_mask, attention_mask)
    return fn(q, k, row_mask, attention_mask)


def attention_kl_loss(q_t, k_t, q_s, k_s, text_mask, vision_mask, mix, attention_mask=None, *, backend=None):
    """Attention KL (fp32 scalar); semantics of ``kernels.reference.attention_kl_loss``."""
    fn = _triton_impl("attention_kl", "attention_kl_triton", q_s.device, backend)
    if fn is None:
        return reference.attention_kl_loss(q_t, k_t, q_s, k_s, text_mask, vision_mask, mix, attention_mask)
    return fn(q_t, k_t, q_s, k_s, text_mask, vision_mask, mix, attention_mask)


def projection_kd_loss(f_t, f_s, weight, bias, focus_idx=None, *, backend=None):
    """(L_proj_all, L_proj_focus); semantics of ``kernels.reference.projection_kd_loss`` (focus None -> zero)."""
    fn = _triton_impl("projection_kd", "projection_kd_triton", f_s.device, backend)
    if fn is None:
        return reference.projection_kd_loss(f_t, f_s, weight, bias, focus_idx)
    return fn(f_t, f_s, weight, bias, focus_idx)


# --------------------------------------------------------------------------------------------------------------------
# logit KD (+ cross-entropy) through Liger's chunked fused-linear distillation


def _liger_function():
    """A Liger chunked distillation Function whose KL runs in fp32 (built on first use; Liger is imported lazily).

    Liger's own JSD loss runs log_softmax in the *input* dtype (bf16 logits -> bf16 softmax). This subclass upcasts
    each chunk's logits to fp32 before the temperature and the softmax, so only the lm_head matmul runs in the input
    dtype (fp32 accumulation, as the models' own lm_head). Liger's hard loss (CE) already upcasts; it ignores the
    temperature. beta=0 is KL(p_t || p_s) (forward), beta=1 is KL(p_s || p_t) (reverse). Both terms are divided by the
    number of rows whose target is not IGNORE_INDEX.
    """
    global _LIGER_FN
    if _LIGER_FN is not None:
        return _LIGER_FN
    from liger_kernel.chunked_loss.fused_linear_distillation import LigerFusedLinearDistillationBase
    from liger_kernel.chunked_loss.jsd_loss import LigerFusedLinearJSDFunction

    class _FP32KLFunction(LigerFusedLinearDistillationBase):
        @staticmethod
        def distillation_loss_fn(student_logits, teacher_logits, beta=0.0, target=None, ignore_index=IGNORE_INDEX,
                                 kd_temperature=1.0):
            return LigerFusedLinearJSDFunction.distillation_loss_fn(
                student_logits.float() / kd_temperature, teacher_logits.float() / kd_temperature, beta=beta,
                target=target, ignore_index=ignore_index)

        @classmethod
        def forward(cls, ctx, h_s, w_s, h_t, w_t, target, beta, temperature, weight_hard, weight_soft, chunk_rows,
                    parts):
            # parts=True returns (combined, soft, hard) and makes Liger compute the CE even at weight_hard == 0
            return LigerFusedLinearDistillationBase.forward(
                cls=cls, ctx=ctx, student_input=h_s, student_weight=w_s, teacher_input=h_t, teacher_weight=w_t,
                target=target, chunk_size=chunk_rows, ignore_index=IGNORE_INDEX, weight_hard_loss=weight_hard,
                weight_soft_loss=weight_soft, beta=beta, temperature=1.0, compiled=False, return_soft_hard_loss=parts,
                kd_temperature=float(temperature))

        @staticmethod
        def backward(ctx, grad_loss, *unused):
            # Liger computes the gradients of the *combined* loss during forward and rescales them here; the
            # soft/hard outputs are for reporting only (their incoming gradients are ignored).
            g_h, g_w = LigerFusedLinearDistillationBase.backward(ctx, grad_loss)[:2]
            return g_h, g_w, None, None, None, None, None, None, None, None, None

    _LIGER_FN = _FP32KLFunction
    return _LIGER_FN


_LIGER_FN = None


def _liger_or_none(backend):
    """The Liger Function, or None for the reference ("reference", or "auto" when Liger cannot be imported)."""
    b = resolve_backend(backend)
    if b == "reference":
        return None
    try:
        return _liger_function()
    except Exception as exc:  # noqa: BLE001 - an absent liger-kernel must not break "auto"
        if b == "triton":
            raise RuntimeError(f"backend='triton' but liger-kernel's chunked loss is unavailable: {exc!r}") from exc
        _warn_once("liger", f"liger-kernel's chunked loss is unavailable ({exc!r}); using the PyTorch reference "
                            f"(full [N, V] logits)")
        return None


def _check_rows(h_s, w_s, h_t, w_t):
    if h_s.dim() != 2 or h_t.dim() != 2 or h_s.shape[0] != h_t.shape[0]:
        raise ValueError(f"h_s [N, d_s] and h_t [N, d_t] expected, got {tuple(h_s.shape)}, {tuple(h_t.shape)}")
    if w_s.shape[0] != w_t.shape[0] or w_s.shape[1] != h_s.shape[1] or w_t.shape[1] != h_t.shape[1]:
        raise ValueError(f"lm_head weights must be [V, d]: got w_s {tuple(w_s.shape)}, w_t {tuple(w_t.shape)} for "
                         f"h_s {tuple(h_s.shape)}, h_t {tuple(h_t.shape)}")


def _beta(kind: str) -> float:
    if kind not in ("forward", "reverse"):
        raise ValueError(f"kind must be 'forward' or 'reverse', got {kind!r}")
    return 0.0 if kind == "forward" else 1.0


def zero_like_graph(*tensors) -> torch.Tensor:
    """An exact fp32 zero connected to every tensor that requires grad (they get zero gradients)."""
    out = torch.zeros((), dtype=torch.float32, device=tensors[0].device)
    for t in tensors:
        if t.requires_grad:
            out = out + 0.0 * t.reshape(-1)[:1].float().sum()  # one element is enough to join the graph
    return out


def fused_logit_kd_and_ce(h_s, w_s, h_t, w_t, targets, kind="forward", temperature=1.0, weight_ce=1.0,
                          weight_kd=1.0, chunk_rows=DEFAULT_CHUNK_ROWS, *, backend=None):
    """Chunked CE + logit KD over N rows in one pass over the student logits (Liger).

    h_s [N, d_s], w_s [V, d_s], h_t [N, d_t], w_t [V, d_t], targets [N] long (IGNORE_INDEX rows are skipped by both
    terms). Returns (combined, kd, ce): combined = weight_ce * CE + weight_kd * KD carries the gradients (to h_s,
    w_s); kd and ce are detached fp32 values for logging. KD = mean over rows of KL (forward or reverse) of the fp32
    softmax at the temperature; CE = mean next-token cross-entropy of the student at temperature 1. Per chunk of
    ``chunk_rows`` rows Liger builds the student's and teacher's logits only for that chunk.

    backend "reference" (or "auto" when liger-kernel cannot be imported, with a one-time warning): the chunked CE
    below plus ``reference.logit_kd_loss`` (which builds the [N, V] logits). "triton" without Liger raises.
    """
    _check_rows(h_s, w_s, h_t, w_t)
    beta = _beta(kind)
    if h_s.shape[0] == 0:
        z = zero_like_graph(h_s, w_s)
        return z, z.detach(), z.detach()
    fn = _liger_or_none(backend)
    if fn is None:
        ce = chunked_cross_entropy(h_s, w_s, targets, chunk_rows)
        keep = targets != IGNORE_INDEX
        kd = reference.logit_kd_loss(h_s[keep], w_s, h_t[keep], w_t, kind=kind, temperature=temperature)
        total = weight_ce * ce + weight_kd * kd
        return total, kd.detach(), ce.detach()
    combined, kd, ce = fn.apply(h_s.contiguous(), w_s, h_t.detach().contiguous(), w_t.detach(), targets.long(), beta,
                                temperature, float(weight_ce), float(weight_kd), int(chunk_rows), True)
    return combined, kd.detach().float(), ce.detach().float()


def logit_kd_loss(h_s, w_s, h_t, w_t, kind="forward", temperature=1.0, *, backend=None,
                  chunk_rows=DEFAULT_CHUNK_ROWS):
    """Logit KD over already selected rows; semantics of ``kernels.reference.logit_kd_loss``.

    Fast path ("auto"/"triton"): Liger's chunked fused-linear loss with fp32 softmax per chunk (the lm_head matmul runs
    in the input dtype, so bf16 inputs give bf16-rounded logits, as the model's own lm_head would).
    """
    fn = _liger_or_none(backend)
    if fn is None:
        return reference.logit_kd_loss(h_s, w_s, h_t, w_t, kind=kind, temperature=temperature)
    _check_rows(h_s, w_s, h_t, w_t)
    beta = _beta(kind)
    if h_s.shape[0] == 0:
        return zero_like_graph(h_s, w_s)
    targets = torch.zeros(h_s.shape[0], dtype=torch.long, device=h_s.device)  # every row counts; no CE is computed
    return fn.apply(h_s.contiguous(), w_s, h_t.detach().contiguous(), w_t.detach(), targets, beta, temperature, 0.0,
                    1.0, int(chunk_rows), False)


# --------------------------------------------------------------------------------------------------------------------
# chunked cross-entropy (no full logits; the backward recomputes each chunk)


class _ChunkedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, targets, chunk_rows):
        valid = targets != IGNORE_INDEX
        n_valid = int(valid.sum())
        lse = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        safe_t = torch.where(valid, targets, torch.zeros_like(targets))
        for s in range(0, h.shape[0], chunk_rows):
            z = (h[s:s + chunk_rows] @ w.t()).float()
            lse_c = torch.logsumexp(z, dim=-1)
            lse[s:s + chunk_rows] = lse_c
            nll = lse_c - z.gather(1, safe_t[s:s + chunk_rows, None]).squeeze(1)
            total += (nll * valid[s:s + chunk_rows]).sum()
        ctx.save_for_backward(h, w, safe_t, valid, lse)
        ctx.chunk_rows, ctx.n_valid = chunk_rows, n_valid
        return total / max(n_valid, 1)

    @staticmethod
    def backward(ctx, grad):
        h, w, safe_t, valid, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        scale = grad.float() / max(ctx.n_valid, 1)
        dh = torch.empty_like(h) if need_h else None
        dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
        for s in range(0, h.shape[0], ctx.chunk_rows):
            hc = h[s:s + ctx.chunk_rows]
            z = (hc @ w.t()).float()
            g = torch.exp(z - lse[s:s + ctx.chunk_rows, None])  # softmax
            g.scatter_add_(1, safe_t[s:s + ctx.chunk_rows, None], -torch.ones_like(g[:, :1]))
            g = (g * (valid[s:s + ctx.chunk_rows, None] * scale)).to(h.dtype)
            if need_h:
                dh[s:s + ctx.chunk_rows] = g @ w
            if need_w:
                dw += (g.t() @ hc).float()
        return dh, (dw.to(w.dtype) if need_w else None), None, None


def chunked_cross_entropy(h, w, targets, chunk_rows=DEFAULT_CHUNK_ROWS):
    """Mean cross-entropy of logits h @ w.T over rows whose target is not IGNORE_INDEX, without the [N, V] logits.

    h [N, d], w [V, d], targets [N] long. Equals F.cross_entropy((h @ w.T).float(), targets, ignore_index=-100)
    (0 when no row is valid, still backpropagating zeros). Logits are built ``chunk_rows`` rows at a time in the input
    dtype and upcast to fp32 for the log-sum-exp; the backward recomputes them chunk by chunk (memory O(chunk x V)).
    """
    if h.dim() != 2 or w.dim() != 2 or h.shape[1] != w.shape[1] or targets.shape != h.shape[:1]:
        raise ValueError(f"h [N, d], w [V, d], targets [N] expected, got {tuple(h.shape)}, {tuple(w.shape)}, "
                         f"{tuple(targets.shape)}")
    if h.shape[0] == 0:
        return zero_like_graph(h, w)
    return _ChunkedLinearCE.apply(h.contiguous(), w, targets.long(), int(chunk_rows))


__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "resolve_backend",
    "attention_alignment_and_focus",
    "text_focus",
    "attention_row_lse",
    "attention_kl_loss",
    "projection_kd_loss",
    "logit_kd_loss",
    "fused_logit_kd_and_ce",
    "chunked_cross_entropy",
    "zero_like_graph",
]
