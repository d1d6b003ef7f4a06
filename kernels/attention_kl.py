"""Fused Triton attention KL (normalized attention alignment) that never builds attention maps.

Semantics: ``kernels.reference.attention_kl_loss``. Pv = softmax of q k^T / sqrt(D) over the vision keys
V_i = {vision j < i, valid} of each text row i; m = mix-weighted sum of the teacher heads' Pv_t;
L = mean over (rows with V_i non-empty) x Hs of KL(m || Pv_s).

Passes (on the compact text-row / vision-column lists of ``_lse.build_compact``):

1. ``_vision_lse_kernel``: the log-sum-exp of every text row over its vision keys only, for each teacher and each
   student head (online max/sum over vision-column blocks). A launch of its own, so that each teacher head's LSE is
   computed once and not once per student-head group of pass 2. The teacher is read at its text rows (q) and vision
   columns (k) only: a teacher cache of the vision keys is enough.
2. ``_kl_kernel``: one program per (sample, block of BM text rows, group of HS_G student heads). For each block of BN
   vision columns it rebuilds Pv_t for every teacher head, mixes them into m [HS_G, BM, BN] (registers), rebuilds
   Pv_s per student head and accumulates the loss, dS, dq (registers) and dk (fp32 atomics into a [B, Hs, |V|, D]
   buffer scattered back on the host); a second teacher sweep over the same block gives dmix, which needs the
   finished log m - log Pv_s. dS_ij = M Pv_s_ij - m_ij needs the row sum M = sum_j m_ij, which is known up front:
   every Pv_t row sums to 1 over V_i, so M = sum_ht mix[hs, ht] (exact up to rounding, for any mix). Hence one
   sweep, and no pass over a whole row first.

Gradients are computed in the forward (for the inputs that need them) and scaled by the incoming gradient in
backward. Extra memory: LSEs O(B * H * |text|), the dk buffer B * Hs * |V| * D fp32, per-block partials
O(B * |text|/BM * Hs * Ht); never an L x L or |text| x |V| map. The dk atomics are the only non-deterministic sum.

Block sizes come from ``_lse.pick_config``: pass 1 uses the row-LSE blocks, pass 2 the align kernel's (16 text rows
x 16 vision columns, up to 8 student heads per program), so its tiles are those of ``_align_kernel`` without the
dq sweep over all keys. ``python -m kernels._offline_compile`` compiles both for sm_86/sm_90 and checks 99 KB.
"""
from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

from ._lse import INTERPRET, LOG2E, Compact, _dot, build_compact, dot_precision, pick_config, pow2
from .attention_alignment import _cast_pair, _check, _dummy, _teacher_probs

__all__ = ["attention_kl_triton"]

LN2: tl.constexpr = tl.constexpr(0.6931471805599453)  # log p = LN2 * log2 p


@triton.jit
def _vision_lse_kernel(
    Q, K, TIDX, VIDX, NTEXT, CVX, KVALID, LSE,
    sq_b, sq_h, sq_l, sq_d, sk_b, sk_h, sk_l, sk_d,
    st_b, sv_b, scv_b, skv_b, sl_b, sl_h,
    H, D, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_KV: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    n_text = tl.load(NTEXT + b)
    offs_r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = offs_r < n_text
    rows = tl.load(TIDX + b * st_b + offs_r, mask=rmask, other=0)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    q = tl.load(Q + b * sq_b + h * sq_h + rows[:, None] * sq_l + offs_d[None, :] * sq_d,
                mask=rmask[:, None] & dmask[None, :], other=0.0)
    # vision columns before the block's last row (sorted lists): the only ones any row of the block can see
    last = tl.max(tl.where(rmask, rows, -1), 0)
    nv_hi = tl.where(last >= 0, tl.load(CVX + b * scv_b + tl.maximum(last, 0)), 0)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    for n0 in range(0, nv_hi, BLOCK_N):
        offs_c = n0 + tl.arange(0, BLOCK_N)
        cmask = offs_c < nv_hi
        cols = tl.load(VIDX + b * sv_b + offs_c, mask=cmask, other=0)
        k = tl.load(K + b * sk_b + h * sk_h + cols[:, None] * sk_l + offs_d[None, :] * sk_d,
                    mask=cmask[:, None] & dmask[None, :], other=0.0)
        s = _dot(q, tl.trans(k), PREC, UPCAST) * qk_scale
        valid = rmask[:, None] & cmask[None, :] & (cols[None, :] < rows[:, None])
        if HAS_KV:
            kv = tl.load(KVALID + b * skv_b + cols, mask=cmask, other=0)
            valid = valid & (kv != 0)[None, :]
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
        m_i = m_new
    # +inf for a row with an empty V_i: every Pv of it is 0 (and it is masked out of the loss anyway)
    lse = tl.where(l_i > 0, m_i + tl.log2(tl.maximum(l_i, 1e-30)), float("inf"))
    tl.store(LSE + b * sl_b + h * sl_h + offs_r, lse, mask=rmask)


@triton.jit
def _kl_kernel(
    QT, KT, QS, KS, LSE_T, LSE_S, TIDX, VIDX, NTEXT, CVX, KVALID, MIX, COEF,
    LOSS_P, DMIX_P, DQ, DKV,
    sqt_b, sqt_h, sqt_l, sqt_d, skt_b, skt_h, skt_l, skt_d,
    sqs_b, sqs_h, sqs_l, sqs_d, sks_b, sks_h, sks_l, sks_d,
    sdq_b, sdq_h, sdq_l, sdq_d, sdkv_b, sdkv_h, sdkv_v, sdkv_d,
    st_b, sv_b, scv_b, skv_b, slt_b, slt_h, sls_b, sls_h, smx_o, smx_i,
    HT, HS, DT, DS, N_MB, HSP,
    qk_t, qk_s, sm_scale_s,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DT: tl.constexpr, BLOCK_DS: tl.constexpr,
    HS_G: tl.constexpr, HT_P: tl.constexpr,
    NEED_DQ: tl.constexpr, NEED_DK: tl.constexpr, NEED_DMIX: tl.constexpr, HAS_KV: tl.constexpr,
    PREC_T: tl.constexpr, PREC_S: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b = tl.program_id(1)
    pid_g = tl.program_id(2)
    n_text = tl.load(NTEXT + b)
    offs_r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = offs_r < n_text
    rows = tl.load(TIDX + b * st_b + offs_r, mask=rmask, other=0)
    last = tl.max(tl.where(rmask, rows, -1), 0)
    nv_hi = tl.where(last >= 0, tl.load(CVX + b * scv_b + tl.maximum(last, 0)), 0)

    offs_dt = tl.arange(0, BLOCK_DT)
    dtm = offs_dt < DT
    offs_ds = tl.arange(0, BLOCK_DS)
    dsm = offs_ds < DS
    offs_g = tl.arange(0, HS_G)
    hs_vec = pid_g * HS_G + offs_g
    hmask = hs_vec < HS
    offs_ht = tl.arange(0, HT_P)
    # M[hs] = sum_j m_ij = sum_ht mix[hs, ht] (each Pv_t row sums to 1): dS = M Pv_s - m is local to a column block
    mix_all = tl.load(MIX + hs_vec[:, None] * smx_o + offs_ht[None, :] * smx_i,
                      mask=hmask[:, None] & (offs_ht < HT)[None, :], other=0.0).to(tl.float32)
    msum = tl.sum(mix_all, 1)

    loss_acc = tl.zeros((HS_G,), tl.float32)
    dmix_acc = tl.zeros((HS_G, HT_P), tl.float32)
    dq3 = tl.zeros((HS_G, BLOCK_M, BLOCK_DS), tl.float32)

    for n0 in range(0, nv_hi, BLOCK_N):
        offs_c = n0 + tl.arange(0, BLOCK_N)
        cmask = offs_c < nv_hi
        cols = tl.load(VIDX + b * sv_b + offs_c, mask=cmask, other=0)
        v_mask = rmask[:, None] & cmask[None, :] & (cols[None, :] < rows[:, None])  # j in V_i
        if HAS_KV:
            kv = tl.load(KVALID + b * skv_b + cols, mask=cmask, other=0)
            v_mask = v_mask & (kv != 0)[None, :]

        # ---- teacher: Pv_t of every head, mixed into m3[hs, i, j]
        m3 = tl.zeros((HS_G, BLOCK_M, BLOCK_N), tl.float32)
        for ht in range(0, HT):
            p = _teacher_probs(QT, KT, LSE_T, b, ht, rows, cols, offs_r, offs_dt, rmask, cmask, dtm, v_mask,
                               sqt_b, sqt_h, sqt_l, sqt_d, skt_b, skt_h, skt_l, skt_d, slt_b, slt_h, qk_t,
                               PREC_T, UPCAST)
            w = tl.load(MIX + hs_vec * smx_o + ht * smx_i, mask=hmask, other=0.0).to(tl.float32)
            m3 += w[:, None, None] * p[None, :, :]

        # ---- student heads: KL terms, dS and its dq / dk parts (log2 domain: log p = LN2 * log2 p)
        for hl in range(0, HS_G):
            hs = pid_g * HS_G + hl
            hvf = (hs < HS).to(tl.float32)  # 0 for the padding slots of the last head group
            hs_c = tl.minimum(hs, HS - 1)
            sel = offs_g == hl
            qs = tl.load(QS + b * sqs_b + hs_c * sqs_h + rows[:, None] * sqs_l + offs_ds[None, :] * sqs_d,
                         mask=rmask[:, None] & dsm[None, :], other=0.0)
            ks = tl.load(KS + b * sks_b + hs_c * sks_h + cols[:, None] * sks_l + offs_ds[None, :] * sks_d,
                         mask=cmask[:, None] & dsm[None, :], other=0.0)
            lse_s = tl.load(LSE_S + b * sls_b + hs_c * sls_h + offs_r, mask=rmask, other=float("inf"))
            s = _dot(qs, tl.trans(ks), PREC_S, UPCAST) * qk_s
            lp = tl.where(v_mask, s - lse_s[:, None], 0.0)  # log2 Pv_s on V_i (finite), 0 elsewhere
            m = tl.sum(tl.where(sel[:, None, None], m3, 0.0), 0)
            pos = v_mask & (m > 0.0)
            lm = tl.where(pos, tl.log2(tl.where(pos, m, 1.0)), 0.0)  # 0 log 0 = 0, and no derivative there
            kl = tl.where(v_mask, m * (lm - lp), 0.0) * hvf
            loss_acc += tl.where(sel, tl.sum(tl.sum(kl, 1), 0), 0.0)
            if NEED_DMIX:
                # dL/dm = [m > 0] (log m + 1) - log Pv_s; slot hl of m3 is no longer needed: keep it there
                g = tl.where(v_mask, tl.where(pos, lm * LN2 + 1.0, 0.0) - lp * LN2, 0.0) * hvf
                m3 = tl.where(sel[:, None, None], g[None, :, :], m3)
            if NEED_DQ or NEED_DK:
                msum_h = tl.sum(tl.where(sel, msum, 0.0), 0)
                ds = tl.where(v_mask, msum_h * tl.exp2(lp) - m, 0.0) * hvf  # dL/ds, up to 1/N
                if NEED_DQ:
                    dqp = _dot(ds.to(ks.dtype), ks, PREC_S, UPCAST)  # [BM, DS]
                    dq3 += sel.to(tl.float32)[:, None, None] * dqp[None, :, :]
                if NEED_DK:
                    dkp = _dot(tl.trans(ds).to(qs.dtype), qs, PREC_S, UPCAST)  # [BN, DS]
                    tl.atomic_add(DKV + b * sdkv_b + hs_c * sdkv_h + offs_c[:, None] * sdkv_v
                                  + offs_ds[None, :] * sdkv_d, dkp,
                                  mask=(cmask & ((offs_c * 0 + hs) < HS))[:, None] & dsm[None, :])
        if NEED_DMIX:
            # ---- second teacher sweep of this block: dmix[hs, ht] = sum over V of dL/dm[hs] * Pv_t[ht]
            for ht in range(0, HT):
                p = _teacher_probs(QT, KT, LSE_T, b, ht, rows, cols, offs_r, offs_dt, rmask, cmask, dtm, v_mask,
                                   sqt_b, sqt_h, sqt_l, sqt_d, skt_b, skt_h, skt_l, skt_d, slt_b, slt_h, qk_t,
                                   PREC_T, UPCAST)
                contrib = tl.sum(tl.sum(m3 * p[None, :, :], 2), 1)  # [HS_G]
                dmix_acc += tl.where(offs_ht[None, :] == ht, contrib[:, None], 0.0)

    part = (b * N_MB + pid_m) * HSP + hs_vec
    tl.store(LOSS_P + part, loss_acc * LN2, mask=hmask)
    if NEED_DMIX:
        tl.store(DMIX_P + part[:, None] * HT_P + offs_ht[None, :], dmix_acc,
                 mask=hmask[:, None] & (offs_ht[None, :] < HT))
    if NEED_DQ:
        coef = tl.load(COEF) * sm_scale_s
        for hl in range(0, HS_G):
            hs = pid_g * HS_G + hl
            hs_c = tl.minimum(hs, HS - 1)
            dq = tl.sum((offs_g == hl).to(tl.float32)[:, None, None] * dq3, 0) * coef
            tl.store(DQ + b * sdq_b + hs_c * sdq_h + rows[:, None] * sdq_l + offs_ds[None, :] * sdq_d,
                     dq.to(DQ.dtype.element_ty), mask=(rmask & ((offs_r * 0 + hs) < HS))[:, None] & dsm[None, :])


# --------------------------------------------------------------------------------------------------------------------
# host side


def _vision_lse(q: torch.Tensor, k: torch.Tensor, comp: Compact, block_m: int, block_n: int, warps: int,
                stages: int) -> torch.Tensor:
    """[B, H, NT] fp32 log2-domain LSE of each compact text row over its vision keys (+inf: empty V_i)."""
    B, H, _, D = q.shape
    lse = torch.full((B, H, max(comp.nt_max, 1)), float("inf"), dtype=torch.float32, device=q.device)
    if comp.nt_max == 0 or comp.nv_max == 0:
        return lse
    kv = comp.kvalid if comp.kvalid is not None else comp.n_text  # dummy pointer when unused
    _vision_lse_kernel[(triton.cdiv(comp.nt_max, block_m), B * H)](
        q, k, comp.tidx, comp.vidx, comp.n_text, comp.cv_excl, kv, lse,
        *q.stride(), *k.stride(),
        comp.tidx.stride(0), comp.vidx.stride(0), comp.cv_excl.stride(0),
        kv.stride(0) if comp.kvalid is not None else 0, lse.stride(0), lse.stride(1),
        H, D, LOG2E / math.sqrt(D),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=pow2(D),
        HAS_KV=comp.kvalid is not None, PREC=dot_precision(q.dtype), UPCAST=INTERPRET,
        num_warps=warps, num_stages=stages,
    )
    return lse


def _n_rows(text_mask, vision_mask, attention_mask) -> torch.Tensor:
    """Number of text rows with a non-empty V_i, as a 0-dim fp32 device tensor (no host sync)."""
    vv = vision_mask.bool() if attention_mask is None else vision_mask.bool() & attention_mask.bool()
    before = torch.cumsum(vv, 1, dtype=torch.int32) - vv.to(torch.int32)  # valid vision keys at positions < p
    return ((before > 0) & text_mask.bool()).sum().to(torch.float32)


def _run(q_t, k_t, q_s, k_s, mix, comp: Compact, n_rows, need_dq, need_dk, need_dmix):
    """Passes 1-2: the loss and the gradients (for an upstream gradient of 1) that were asked for."""
    B, HT, L, DT = q_t.shape
    HS, DS = q_s.shape[1], q_s.shape[3]
    dev = q_s.device
    f32 = dict(dtype=torch.float32, device=dev)
    cfg = pick_config(DT, DS, HS, q_s.dtype)
    hs_g = cfg.hs_group
    n_g = triton.cdiv(HS, hs_g)
    hsp = n_g * hs_g
    ht_p = max(triton.next_power_of_2(HT), 2)
    n_mb = triton.cdiv(comp.nt_max, cfg.al_m)
    nv = max(comp.nv_max, 1)
    coef = (1.0 / (n_rows.clamp(min=1.0) * HS)).reshape(1)

    lse_t = _vision_lse(q_t, k_t, comp, cfg.lse_m, cfg.lse_n, cfg.lse_warps, cfg.stages)
    lse_s = _vision_lse(q_s, k_s, comp, cfg.lse_m, cfg.lse_n, cfg.lse_warps, cfg.stages)
    loss_p = torch.zeros(B, max(n_mb, 1), hsp, **f32)
    dmix_p = torch.zeros(B, max(n_mb, 1), hsp, ht_p, **f32) if need_dmix else _dummy(dev)
    dq = torch.zeros_like(q_s) if need_dq else q_s
    dkv = torch.zeros(B, HS, nv, DS, **f32) if need_dk else _dummy(dev)
    kv = comp.kvalid if comp.kvalid is not None else comp.n_text
    dkv_strides = dkv.stride() if need_dk else (0, 0, 0, 0)

    if n_mb > 0 and comp.nv_max > 0:
        _kl_kernel[(n_mb, B, n_g)](
            q_t, k_t, q_s, k_s, lse_t, lse_s, comp.tidx, comp.vidx, comp.n_text, comp.cv_excl, kv, mix, coef,
            loss_p, dmix_p, dq, dkv,
            *q_t.stride(), *k_t.stride(), *q_s.stride(), *k_s.stride(), *dq.stride(), *dkv_strides,
            comp.tidx.stride(0), comp.vidx.stride(0), comp.cv_excl.stride(0),
            kv.stride(0) if comp.kvalid is not None else 0,
            lse_t.stride(0), lse_t.stride(1), lse_s.stride(0), lse_s.stride(1), *mix.stride(),
            HT, HS, DT, DS, max(n_mb, 1), hsp,
            LOG2E / math.sqrt(DT), LOG2E / math.sqrt(DS), 1.0 / math.sqrt(DS),
            BLOCK_M=cfg.al_m, BLOCK_N=cfg.al_n, BLOCK_DT=pow2(DT), BLOCK_DS=pow2(DS), HS_G=hs_g, HT_P=ht_p,
            NEED_DQ=need_dq, NEED_DK=need_dk, NEED_DMIX=need_dmix, HAS_KV=comp.kvalid is not None,
            PREC_T=dot_precision(q_t.dtype), PREC_S=dot_precision(q_s.dtype), UPCAST=INTERPRET,
            num_warps=cfg.al_warps, num_stages=cfg.stages,
        )
    out = {"loss": loss_p.sum() * coef[0]}
    if need_dmix:
        out["dmix"] = dmix_p.sum((0, 1))[:HS, :HT] * coef[0]
    if need_dq:
        out["dq"] = dq
    if need_dk:
        # the vision slice back to its positions; every other key has dk = 0
        dk = torch.zeros_like(k_s)
        if comp.nv_max > 0:
            # padding slots of the vision list point at position 0 and add an exact 0 there (no host sync)
            ok = torch.arange(nv, device=dev)[None, None, :, None] < comp.n_vis[:, None, None, None]
            vals = torch.where(ok, dkv * (coef[0] / math.sqrt(DS)), 0.0).to(dk.dtype)
            dk.scatter_add_(2, comp.vidx[:, None, :nv, None].long().expand(B, HS, nv, DS), vals)
        out["dk"] = dk
    return out


class _AttentionKL(torch.autograd.Function):
    """Differentiable in q_s, k_s and mix; the teacher (q_t, k_t) is constant."""

    @staticmethod
    def forward(ctx, q_s, k_s, mix, q_t, k_t, comp, n_rows):
        need = ctx.needs_input_grad
        res = _run(q_t, k_t, q_s, k_s, mix, comp, n_rows, need_dq=need[0], need_dk=need[1], need_dmix=need[2])
        ctx.grads = (res.get("dq"), res.get("dk"), res["dmix"].to(mix.dtype) if need[2] else None)
        return res["loss"]

    @staticmethod
    def backward(ctx, g_loss):
        if ctx.grads is None:
            raise RuntimeError("attention_kl_triton: backward through the same graph twice is not supported")
        # computed in forward for an upstream gradient of 1; scale in place (no copies)
        grads = tuple(None if g is None else g.mul_(g_loss.to(g.dtype)) for g in ctx.grads)
        ctx.grads = None
        return (*grads, None, None, None, None)


def attention_kl_triton(q_t: torch.Tensor, k_t: torch.Tensor, q_s: torch.Tensor, k_s: torch.Tensor,
                        text_mask: torch.Tensor, vision_mask: torch.Tensor, mix: torch.Tensor,
                        attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Fused attention KL (fp32 scalar): semantics of ``kernels.reference.attention_kl_loss``.

    q/k: [B, H, L, D] (k repeated to q's heads), bf16/fp16/fp32; masks bool [B, L]; mix [Hs, Ht].
    """
    _check(q_t, k_t, "teacher")
    _check(q_s, k_s, "student")
    if q_s.shape[0] != q_t.shape[0] or q_s.shape[2] != q_t.shape[2]:
        raise ValueError("teacher and student q/k must share batch size and length")
    if tuple(mix.shape) != (q_s.shape[1], q_t.shape[1]):
        raise ValueError(f"mix must be [Hs, Ht] = [{q_s.shape[1]}, {q_t.shape[1]}], got {tuple(mix.shape)}")
    q_t, k_t = _cast_pair(q_t.detach(), k_t.detach())
    q_s, k_s = _cast_pair(q_s, k_s)
    with torch.cuda.device(q_s.device) if q_s.is_cuda else contextlib.nullcontext():  # triton launches there
        comp = build_compact(text_mask, vision_mask, attention_mask)
        n_rows = _n_rows(text_mask, vision_mask, attention_mask)
        return _AttentionKL.apply(q_s, k_s, mix, q_t, k_t, comp, n_rows)
