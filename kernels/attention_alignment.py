"""Fused Triton attention alignment (Align-KD L_attn) and text focus that never build attention maps.

Semantics: identical to ``kernels.reference.attention_alignment_loss`` / ``text_focus``.
P = causal + key-padding-masked softmax with scale 1/sqrt(D); E = {(b,i,j): text i, vision j, j < i};
L = mean over E x Hs of (sum_ht W[hs,ht] P_t[ht,i,j] + b[hs] - P_s[hs,i,j])^2;
F[b,j] = (1/Ht) sum_ht sum_{i:(b,i,j) in E} P_t[ht,i,j].

Passes (all on compact text-row / vision-column lists, see ``_lse.py``):

1. ``row_lse``: log-sum-exp of every text row for each teacher and student head (flash forward without V).
2. ``_align_kernel``: one program per (sample, block of BM text rows, group of HS_G student heads). For each block of
   BN vision columns it rebuilds P_t for every teacher head from q_t, k_t and the LSE, mixes heads with W into a
   [HS_G, BM, BN] register tile (and sums columns for the focus), compares with P_s and accumulates the loss, db, dW (a
   second sweep over the teacher heads, since dW needs the finished difference), the softmax "delta"
   D_i = sum_j P_s dP, and the vision-slice parts of dq (registers, [HS_G, BM, D]) and dk (fp32 atomics into a
   [B, Hs, |V|, D] buffer). It then finishes dq for its rows with a flash-backward sweep over all causal keys
   (dS = -P * D_i outside the slice term), so no dq scratch is needed.
3. ``_dk_kernel``: one program per (sample, student head, block of key positions): dk = scale * sum over text rows of
   dS^T q with dS = -P * D_i, plus the vision-slice part from pass 2.

Gradients are computed in the forward (when the student q/k or the adapter need them) and scaled by the incoming
gradient in backward, as Liger's fused losses do. Extra memory: LSEs and deltas O(B * H * |text|), the dk slice
buffer B * Hs * |V| * D fp32, per-block partials O(B * |text|/16 * Hs * Ht); never an L x L or |text| x |V| map.
The only non-deterministic reduction is the fp32 atomic add of the dk vision slice (fp32 rounding-level).

Block sizes: ``_lse.pick_config``. ``python -m kernels._offline_compile`` compiles the kernels for a GPU architecture
without one and reports their shared memory and registers; ``bench/kernels.py --sweep`` times the alternatives on a
GPU. Most of the align kernel's registers hold the dq tile, kept in registers to avoid a dq scratch buffer.
"""
from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

from ._lse import INTERPRET, LOG2E, Compact, _dot, build_compact, dot_precision, pick_config, pow2, row_lse

__all__ = ["attention_alignment_triton", "attention_row_lse_triton", "text_focus_triton"]


@triton.jit
def _teacher_probs(QT, KT, LSE_T, b, ht, rows, cols, offs_r, offs_dt, rmask, cmask, dtm, p_mask,
                   sqt_b, sqt_h, sqt_l, sqt_d, skt_b, skt_h, skt_l, skt_d, slt_b, slt_h, qk_t,
                   PREC_T: tl.constexpr, UPCAST: tl.constexpr):
    """Teacher head ht's probabilities on a (text rows x vision columns) block, from its row log-sum-exps
    (base 2), zero outside the pair set: rebuilt on demand instead of stored."""
    qt = tl.load(QT + b * sqt_b + ht * sqt_h + rows[:, None] * sqt_l + offs_dt[None, :] * sqt_d,
                 mask=rmask[:, None] & dtm[None, :], other=0.0)
    kt = tl.load(KT + b * skt_b + ht * skt_h + cols[:, None] * skt_l + offs_dt[None, :] * skt_d,
                 mask=cmask[:, None] & dtm[None, :], other=0.0)
    lse_t = tl.load(LSE_T + b * slt_b + ht * slt_h + offs_r, mask=rmask, other=float("inf"))
    s = _dot(qt, tl.trans(kt), PREC_T, UPCAST) * qk_t
    return tl.where(p_mask, tl.exp2(s - lse_t[:, None]), 0.0)


@triton.jit
def _align_kernel(
    QT, KT, QS, KS, LSE_T, LSE_S, TIDX, VIDX, NTEXT, CVX, KVALID, W, BIAS, COEF,
    LOSS_P, DB_P, DW_P, FOC_P, DELTA, DQ, DKV,
    sqt_b, sqt_h, sqt_l, sqt_d, skt_b, skt_h, skt_l, skt_d,
    sqs_b, sqs_h, sqs_l, sqs_d, sks_b, sks_h, sks_l, sks_d,
    sdq_b, sdq_h, sdq_l, sdq_d, sdkv_b, sdkv_h, sdkv_v, sdkv_d,
    st_b, sv_b, scv_b, skv_b, slt_b, slt_h, sls_b, sls_h, sw_o, sw_i,
    HT, HS, DT, DS, N_MB, NV_MAX, HSP,
    qk_t, qk_s, sm_scale_s,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KN: tl.constexpr,
    BLOCK_DT: tl.constexpr, BLOCK_DS: tl.constexpr, HS_G: tl.constexpr, HT_P: tl.constexpr,
    NEED_LOSS: tl.constexpr, NEED_FOCUS: tl.constexpr, NEED_DQ: tl.constexpr, NEED_DK: tl.constexpr,
    NEED_DW: tl.constexpr, HAS_KV: tl.constexpr,
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
    # vision columns before the block's last row (vision lists are sorted): the only ones that can be in E
    nv_hi = tl.load(CVX + b * scv_b + tl.maximum(last, 0))
    nv_hi = tl.where(last >= 0, nv_hi, 0)

    offs_dt = tl.arange(0, BLOCK_DT)
    dtm = offs_dt < DT
    offs_ds = tl.arange(0, BLOCK_DS)
    dsm = offs_ds < DS
    offs_g = tl.arange(0, HS_G)
    hs_vec = pid_g * HS_G + offs_g
    hmask = hs_vec < HS
    offs_ht = tl.arange(0, HT_P)

    loss_acc = tl.zeros((HS_G,), tl.float32)
    db_acc = tl.zeros((HS_G,), tl.float32)
    dw_acc = tl.zeros((HS_G, HT_P), tl.float32)
    delta_acc = tl.zeros((HS_G, BLOCK_M), tl.float32)
    dq3 = tl.zeros((HS_G, BLOCK_M, BLOCK_DS), tl.float32)
    if NEED_LOSS:
        bias = tl.load(BIAS + hs_vec, mask=hmask, other=0.0).to(tl.float32)

    for n0 in range(0, nv_hi, BLOCK_N):
        offs_c = n0 + tl.arange(0, BLOCK_N)
        cmask = offs_c < nv_hi
        cols = tl.load(VIDX + b * sv_b + offs_c, mask=cmask, other=0)
        e_mask = rmask[:, None] & cmask[None, :] & (cols[None, :] < rows[:, None])
        if HAS_KV:
            kv = tl.load(KVALID + b * skv_b + cols, mask=cmask, other=0)
            p_mask = e_mask & (kv != 0)[None, :]
        else:
            p_mask = e_mask

        # ---- teacher: P_t for every head, mixed with W into acc3[hs, i, j]; focus column sums
        acc3 = tl.zeros((HS_G, BLOCK_M, BLOCK_N), tl.float32)
        fcol = tl.zeros((BLOCK_N,), tl.float32)
        for ht in range(0, HT):
            p = _teacher_probs(QT, KT, LSE_T, b, ht, rows, cols, offs_r, offs_dt, rmask, cmask, dtm, p_mask,
                               sqt_b, sqt_h, sqt_l, sqt_d, skt_b, skt_h, skt_l, skt_d, slt_b, slt_h, qk_t,
                               PREC_T, UPCAST)
            if NEED_LOSS:
                w = tl.load(W + hs_vec * sw_o + ht * sw_i, mask=hmask, other=0.0).to(tl.float32)
                acc3 += w[:, None, None] * p[None, :, :]
            if NEED_FOCUS:
                fcol += tl.sum(p, 0)
        if NEED_FOCUS:
            tl.store(FOC_P + (b * N_MB + pid_m) * NV_MAX + offs_c, fcol, mask=cmask & ((offs_c * 0 + pid_g) == 0))

        if NEED_LOSS:
            acc3 += bias[:, None, None]
            # ---- student: P_s per head, difference, loss/db, delta and the vision-slice gradient terms
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
                ps = tl.where(p_mask, tl.exp2(s - lse_s[:, None]), 0.0)
                t = tl.sum(tl.where(sel[:, None, None], acc3, 0.0), 0)
                diff = tl.where(e_mask, t - ps, 0.0) * hvf
                loss_acc += tl.where(sel, tl.sum(tl.sum(diff * diff, 1), 0), 0.0)
                db_acc += tl.where(sel, tl.sum(tl.sum(diff, 1), 0), 0.0)
                if NEED_DW:
                    acc3 = tl.where(sel[:, None, None], diff[None, :, :], acc3)  # slot hl now holds the difference
                if NEED_DQ or NEED_DK:
                    y = ps * (ps - t)  # P_s * dL/dP_s, up to the factor 2/N applied at the end
                    y = tl.where(e_mask, y, 0.0) * hvf
                    delta_acc += tl.where(sel[:, None], tl.sum(y, 1)[None, :], 0.0)
                    if NEED_DQ:
                        dqp = _dot(y.to(ks.dtype), ks, PREC_S, UPCAST)  # [BM, DS]
                        dq3 += sel.to(tl.float32)[:, None, None] * dqp[None, :, :]
                    if NEED_DK:
                        dkp = _dot(tl.trans(y).to(qs.dtype), qs, PREC_S, UPCAST)  # [BN, DS]
                        tl.atomic_add(DKV + b * sdkv_b + hs_c * sdkv_h + offs_c[:, None] * sdkv_v
                                      + offs_ds[None, :] * sdkv_d, dkp,
                                      mask=(cmask & ((offs_c * 0 + hs) < HS))[:, None] & dsm[None, :])
            if NEED_DW:
                # ---- second teacher sweep: dW[hs, ht] = sum over E of diff[hs] * P_t[ht]
                for ht in range(0, HT):
                    p = _teacher_probs(QT, KT, LSE_T, b, ht, rows, cols, offs_r, offs_dt, rmask, cmask, dtm,
                                       p_mask, sqt_b, sqt_h, sqt_l, sqt_d, skt_b, skt_h, skt_l, skt_d, slt_b,
                                       slt_h, qk_t, PREC_T, UPCAST)
                    contrib = tl.sum(tl.sum(acc3 * p[None, :, :], 2), 1)  # [HS_G]
                    dw_acc += tl.where(offs_ht[None, :] == ht, contrib[:, None], 0.0)

    if NEED_LOSS:
        part = (b * N_MB + pid_m) * HSP + hs_vec
        tl.store(LOSS_P + part, loss_acc, mask=hmask)
        tl.store(DB_P + part, db_acc, mask=hmask)
        if NEED_DW:
            tl.store(DW_P + part[:, None] * HT_P + offs_ht[None, :], dw_acc,
                     mask=hmask[:, None] & (offs_ht[None, :] < HT))
    if NEED_DQ or NEED_DK:
        tl.store(DELTA + b * sls_b + hs_vec[:, None] * sls_h + offs_r[None, :], delta_acc,
                 mask=hmask[:, None] & rmask[None, :])
    if NEED_DQ:
        # ---- finish dq for these rows: dq_i = scale * 2/N * (sum_{j in V} Y_ij k_j - D_i sum_{j<=i} P_ij k_j)
        coef = tl.load(COEF) * sm_scale_s
        hi = last + 1
        for hl in range(0, HS_G):
            hs = pid_g * HS_G + hl
            hs_c = tl.minimum(hs, HS - 1)
            sel = offs_g == hl
            rmask_h = rmask & ((offs_r * 0 + hs) < HS)
            qs = tl.load(QS + b * sqs_b + hs_c * sqs_h + rows[:, None] * sqs_l + offs_ds[None, :] * sqs_d,
                         mask=rmask[:, None] & dsm[None, :], other=0.0)
            lse_s = tl.load(LSE_S + b * sls_b + hs_c * sls_h + offs_r, mask=rmask, other=float("inf"))
            dlt = tl.sum(tl.where(sel[:, None], delta_acc, 0.0), 0)
            dq = tl.sum(sel.to(tl.float32)[:, None, None] * dq3, 0)
            for k0 in range(0, tl.where(hs < HS, hi, 0), BLOCK_KN):
                offs_k = k0 + tl.arange(0, BLOCK_KN)
                kmask = offs_k < hi
                ks = tl.load(KS + b * sks_b + hs_c * sks_h + offs_k[:, None] * sks_l + offs_ds[None, :] * sks_d,
                             mask=kmask[:, None] & dsm[None, :], other=0.0)
                s = _dot(qs, tl.trans(ks), PREC_S, UPCAST) * qk_s
                valid = (offs_k[None, :] <= rows[:, None]) & kmask[None, :] & rmask[:, None]
                if HAS_KV:
                    kvk = tl.load(KVALID + b * skv_b + offs_k, mask=kmask, other=0)
                    valid = valid & (kvk != 0)[None, :]
                p = tl.where(valid, tl.exp2(s - lse_s[:, None]), 0.0)
                ds = -p * dlt[:, None]
                dq += _dot(ds.to(ks.dtype), ks, PREC_S, UPCAST)
            dq = dq * coef
            tl.store(DQ + b * sdq_b + hs_c * sdq_h + rows[:, None] * sdq_l + offs_ds[None, :] * sdq_d,
                     dq.to(DQ.dtype.element_ty), mask=rmask_h[:, None] & dsm[None, :])


@triton.jit
def _dk_kernel(
    QS, KS, LSE_S, DELTA, TIDX, NTEXT, CTX, KVALID, VPOS, DKV, DK, COEF,
    sqs_b, sqs_h, sqs_l, sqs_d, sks_b, sks_h, sks_l, sks_d,
    sdk_b, sdk_h, sdk_l, sdk_d, sdkv_b, sdkv_h, sdkv_v, sdkv_d,
    st_b, sct_b, skv_b, svp_b, sls_b, sls_h,
    HS, DS, L, qk_s, sm_scale_s,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DS: tl.constexpr,
    HAS_KV: tl.constexpr, PREC_S: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HS
    hs = pid_bh % HS
    offs_k = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    kmask = offs_k < L
    offs_ds = tl.arange(0, BLOCK_DS)
    dsm = offs_ds < DS
    ks = tl.load(KS + b * sks_b + hs * sks_h + offs_k[:, None] * sks_l + offs_ds[None, :] * sks_d,
                 mask=kmask[:, None] & dsm[None, :], other=0.0)
    kval = kmask
    if HAS_KV:
        kv = tl.load(KVALID + b * skv_b + offs_k, mask=kmask, other=0)
        kval = kval & (kv != 0)
    n_text = tl.load(NTEXT + b)
    # text rows before this key block cannot attend to it (causal): start at the block holding the first later row
    first = tl.load(CTX + b * sct_b + tl.minimum(pid_n * BLOCK_N, L - 1))
    m_start = (first // BLOCK_M) * BLOCK_M
    dk = tl.zeros((BLOCK_N, BLOCK_DS), tl.float32)
    for r0 in range(m_start, n_text, BLOCK_M):
        offs_r = r0 + tl.arange(0, BLOCK_M)
        rmask = offs_r < n_text
        rows = tl.load(TIDX + b * st_b + offs_r, mask=rmask, other=0)
        qs = tl.load(QS + b * sqs_b + hs * sqs_h + rows[:, None] * sqs_l + offs_ds[None, :] * sqs_d,
                     mask=rmask[:, None] & dsm[None, :], other=0.0)
        lse = tl.load(LSE_S + b * sls_b + hs * sls_h + offs_r, mask=rmask, other=float("inf"))
        dlt = tl.load(DELTA + b * sls_b + hs * sls_h + offs_r, mask=rmask, other=0.0)
        st = _dot(ks, tl.trans(qs), PREC_S, UPCAST) * qk_s  # [BN keys, BM rows]
        valid = kval[:, None] & rmask[None, :] & (offs_k[:, None] <= rows[None, :])
        pt = tl.where(valid, tl.exp2(st - lse[None, :]), 0.0)
        dst = -pt * dlt[None, :]
        dk += _dot(dst.to(qs.dtype), qs, PREC_S, UPCAST)
    vp = tl.load(VPOS + b * svp_b + offs_k, mask=kmask, other=-1)
    dkv = tl.load(DKV + b * sdkv_b + hs * sdkv_h + tl.maximum(vp, 0)[:, None] * sdkv_v + offs_ds[None, :] * sdkv_d,
                  mask=(vp >= 0)[:, None] & dsm[None, :], other=0.0)
    dk = (dk + dkv) * (tl.load(COEF) * sm_scale_s)
    tl.store(DK + b * sdk_b + hs * sdk_h + offs_k[:, None] * sdk_l + offs_ds[None, :] * sdk_d,
             dk.to(DK.dtype.element_ty), mask=kmask[:, None] & dsm[None, :])


# --------------------------------------------------------------------------------------------------------------------
# host side

_DUMMY = {}


def _dummy(device) -> torch.Tensor:
    key = str(device)
    if key not in _DUMMY:
        _DUMMY[key] = torch.zeros(1, dtype=torch.float32, device=device)
    return _DUMMY[key]


def _s4(t: torch.Tensor):
    return t.stride() if t.dim() == 4 else (0, 0, 0, 0)


def _check(q, k, name):
    if q.dim() != 4 or q.shape != k.shape:
        raise ValueError(f"{name}: q and k must be [B, H, L, D] with equal shapes, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}")
    if k.dtype != q.dtype:
        raise ValueError(f"{name}: q and k dtypes differ ({q.dtype}, {k.dtype})")


def _compact_lse(lse: torch.Tensor, comp: Compact) -> torch.Tensor:
    """A given [B, H, L] natural-log LSE in the kernels' layout: [B, H, NT] log2 domain, +inf where no mass."""
    B, H, _ = lse.shape
    nt = max(comp.nt_max, 1)
    rows = comp.tidx[:, None, :nt].long().expand(B, H, nt)
    out = lse.float().gather(2, rows) * LOG2E
    return torch.where(torch.isfinite(out), out, torch.full_like(out, float("inf"))).contiguous()


def _run(q_t, k_t, q_s, k_s, comp: Compact, weight, bias, need_loss, need_focus, need_dq, need_dk, need_dw,
         teacher_lse=None):
    """Launch passes 1-3. Returns dict with loss (sum, unnormalized), focus, grads (already scaled by 2/N).
    With teacher_lse ([B, Ht, L]) the teacher's pass 1 is skipped and k_t is read at the vision columns only."""
    B, HT, L, DT = q_t.shape
    dev = q_t.device
    out = {}
    HS, DS = (q_s.shape[1], q_s.shape[3]) if need_loss else (1, 16)
    cfg = pick_config(DT, DS, HS, q_s.dtype if need_loss else q_t.dtype)
    hs_g = cfg.hs_group if need_loss else 2
    n_g = triton.cdiv(HS, hs_g) if need_loss else 1
    hsp = n_g * hs_g
    ht_p = max(triton.next_power_of_2(HT), 2)
    n_mb = triton.cdiv(comp.nt_max, cfg.al_m)
    nv = max(comp.nv_max, 1)
    f32 = dict(dtype=torch.float32, device=dev)
    need_grad_qk = need_dq or need_dk

    lse_t = row_lse(q_t, k_t, comp, cfg) if teacher_lse is None else _compact_lse(teacher_lse, comp)
    if need_loss:
        lse_s = row_lse(q_s, k_s, comp, cfg)
        loss_p = torch.zeros(B, max(n_mb, 1), hsp, **f32)
        db_p = torch.zeros(B, max(n_mb, 1), hsp, **f32)
        dw_p = torch.zeros(B, max(n_mb, 1), hsp, ht_p, **f32) if need_dw else _dummy(dev)
        coef = (2.0 / comp.n_pairs.clamp(min=1.0) / HS).reshape(1)
        delta = torch.zeros_like(lse_s) if need_grad_qk else lse_s
        dq = torch.zeros_like(q_s) if need_dq else q_s
        dkv = torch.zeros(B, HS, nv, DS, **f32) if need_grad_qk else _dummy(dev)
        w_ = weight
        b_ = bias
    else:
        lse_s, loss_p, db_p, dw_p, coef, delta, dq, dkv = (lse_t,) + (_dummy(dev),) * 7
        q_s, k_s, w_, b_ = q_t, k_t, _dummy(dev), _dummy(dev)
    foc_p = torch.zeros(B, max(n_mb, 1), nv, **f32) if need_focus else _dummy(dev)
    kv = comp.kvalid if comp.kvalid is not None else comp.n_text
    dkv_strides = _s4(dkv)
    w_strides = w_.stride() if w_.dim() == 2 else (0, 0)

    if n_mb > 0:
        _align_kernel[(n_mb, B, n_g)](
            q_t, k_t, q_s, k_s, lse_t, lse_s, comp.tidx, comp.vidx, comp.n_text, comp.cv_excl, kv, w_, b_, coef,
            loss_p, db_p, dw_p, foc_p, delta, dq, dkv,
            *q_t.stride(), *k_t.stride(), *q_s.stride(), *k_s.stride(), *_s4(dq), *dkv_strides,
            comp.tidx.stride(0), comp.vidx.stride(0), comp.cv_excl.stride(0),
            kv.stride(0) if comp.kvalid is not None else 0,
            lse_t.stride(0), lse_t.stride(1), lse_s.stride(0), lse_s.stride(1), *w_strides,
            HT, HS, DT, DS, max(n_mb, 1), nv, hsp,
            LOG2E / math.sqrt(DT), LOG2E / math.sqrt(DS), 1.0 / math.sqrt(DS),
            BLOCK_M=cfg.al_m, BLOCK_N=cfg.al_n, BLOCK_KN=cfg.al_kn, BLOCK_DT=pow2(DT), BLOCK_DS=pow2(DS),
            HS_G=hs_g, HT_P=ht_p,
            NEED_LOSS=need_loss, NEED_FOCUS=need_focus, NEED_DQ=need_dq, NEED_DK=need_dk, NEED_DW=need_dw,
            HAS_KV=comp.kvalid is not None, PREC_T=dot_precision(q_t.dtype), PREC_S=dot_precision(q_s.dtype),
            UPCAST=INTERPRET, num_warps=cfg.al_warps, num_stages=cfg.stages,
        )
    if need_focus:
        vals = foc_p.sum(1) / HT  # [B, NV]
        valid = torch.arange(nv, device=dev)[None, :] < comp.n_vis[:, None]
        idx = torch.where(valid, comp.vidx[:, :nv].long(), torch.full_like(comp.vidx[:, :nv], L).long())
        focus = torch.zeros(B, L + 1, **f32)
        focus.scatter_(1, idx, torch.where(valid, vals, torch.zeros_like(vals)))
        out["focus"] = focus[:, :L].contiguous()
    if need_loss:
        n = comp.n_pairs.clamp(min=1.0) * HS
        out["loss"] = loss_p.sum() / n
        if need_dw:
            out["dw"] = dw_p.sum((0, 1))[:HS, :HT] * (2.0 / n)
        out["db"] = db_p.sum((0, 1))[:HS] * (2.0 / n)
        if need_dq:
            out["dq"] = dq
        if need_dk:
            dk = torch.empty_like(k_s)
            _dk_kernel[(triton.cdiv(L, cfg.dk_n), B * HS)](
                q_s, k_s, lse_s, delta, comp.tidx, comp.n_text, comp.ct_excl, kv, comp.vpos, dkv, dk, coef,
                *q_s.stride(), *k_s.stride(), *dk.stride(), *dkv.stride(),
                comp.tidx.stride(0), comp.ct_excl.stride(0), kv.stride(0) if comp.kvalid is not None else 0,
                comp.vpos.stride(0), lse_s.stride(0), lse_s.stride(1),
                HS, DS, L, LOG2E / math.sqrt(DS), 1.0 / math.sqrt(DS),
                BLOCK_N=cfg.dk_n, BLOCK_M=cfg.dk_m, BLOCK_DS=pow2(DS),
                HAS_KV=comp.kvalid is not None, PREC_S=dot_precision(q_s.dtype), UPCAST=INTERPRET,
                num_warps=cfg.dk_warps, num_stages=cfg.stages,
            )
            out["dk"] = dk
    return out


class _AttentionAlignment(torch.autograd.Function):
    """Differentiable in q_s, k_s, weight, bias; the teacher (q_t, k_t) is constant. Outputs (loss, focus)."""

    @staticmethod
    def forward(ctx, q_s, k_s, weight, bias, q_t, k_t, comp, need_focus, teacher_lse):
        need = ctx.needs_input_grad
        res = _run(q_t, k_t, q_s, k_s, comp, weight, bias, True, need_focus,
                   need_dq=need[0], need_dk=need[1], need_dw=need[2], teacher_lse=teacher_lse)
        ctx.grads = (res.get("dq"), res.get("dk"),
                     res["dw"].to(weight.dtype) if need[2] else None,
                     res["db"].to(bias.dtype) if need[3] else None)
        focus = res.get("focus")
        if focus is None:
            focus = torch.zeros(0, device=q_s.device)
        ctx.mark_non_differentiable(focus)
        return res["loss"], focus

    @staticmethod
    def backward(ctx, g_loss, g_focus):
        if ctx.grads is None:
            raise RuntimeError("attention_alignment_triton: backward through the same graph twice is not supported")
        # the gradients were computed in forward for an upstream gradient of 1; scale them in place (no copies)
        grads = tuple(None if g is None else g.mul_(g_loss.to(g.dtype)) for g in ctx.grads)
        ctx.grads = None
        return (*grads, None, None, None, None, None)


def _cast_pair(q, k):
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        q, k = q.float(), k.float()
    return q, k


def attention_alignment_triton(q_t, k_t, q_s, k_s, text_mask, vision_mask, weight, bias, attention_mask=None,
                               need_focus=False, need_loss=True, teacher_lse=None):
    """Fused L_attn (and optionally the text focus) -> (loss or None, focus [B, L] fp32 or None).

    q/k: [B, H, L, D] (k repeated to q's heads), bf16/fp16/fp32; masks bool [B, L]; weight [Hs, Ht]; bias [Hs];
    teacher_lse: optional [B, Ht, L] natural-log row LSEs of the teacher (``kernels.reference`` docstring).
    """
    if q_t.is_cuda:  # triton launches on the current device
        with torch.cuda.device(q_t.device):
            return _attention_alignment(q_t, k_t, q_s, k_s, text_mask, vision_mask, weight, bias, attention_mask,
                                        need_focus, need_loss, teacher_lse)
    return _attention_alignment(q_t, k_t, q_s, k_s, text_mask, vision_mask, weight, bias, attention_mask,
                                need_focus, need_loss, teacher_lse)


def _attention_alignment(q_t, k_t, q_s, k_s, text_mask, vision_mask, weight, bias, attention_mask, need_focus,
                         need_loss, teacher_lse):
    _check(q_t, k_t, "teacher")
    q_t, k_t = _cast_pair(q_t.detach(), k_t.detach())
    if not need_loss and not need_focus:
        return None, None
    if teacher_lse is not None and tuple(teacher_lse.shape) != tuple(q_t.shape[:3]):
        raise ValueError(f"teacher_lse must be [B, Ht, L] = {list(q_t.shape[:3])}, got {list(teacher_lse.shape)}")
    comp = build_compact(text_mask, vision_mask, attention_mask)
    if not need_loss:
        with torch.no_grad():
            res = _run(q_t, k_t, None, None, comp, None, None, False, True, False, False, False, teacher_lse)
        return None, res["focus"]
    _check(q_s, k_s, "student")
    if q_s.shape[0] != q_t.shape[0] or q_s.shape[2] != q_t.shape[2]:
        raise ValueError("teacher and student q/k must share batch size and length")
    if tuple(weight.shape) != (q_s.shape[1], q_t.shape[1]) or tuple(bias.shape) != (q_s.shape[1],):
        raise ValueError(f"adapter shapes: weight must be [Hs, Ht], bias [Hs]; got {tuple(weight.shape)}, "
                         f"{tuple(bias.shape)}")
    q_s, k_s = _cast_pair(q_s, k_s)
    loss, focus = _AttentionAlignment.apply(q_s, k_s, weight, bias, q_t, k_t, comp, need_focus, teacher_lse)
    return loss, (focus if need_focus else None)


def text_focus_triton(q_t, k_t, text_mask, vision_mask, attention_mask=None, teacher_lse=None):
    """Text focus F [B, L] fp32 from the teacher's layer-0 q/k, without the attention map."""
    return attention_alignment_triton(q_t, k_t, None, None, text_mask, vision_mask, None, None, attention_mask,
                                      need_focus=True, need_loss=False, teacher_lse=teacher_lse)[1]


@torch.no_grad()
def attention_row_lse_triton(q, k, row_mask, attention_mask=None) -> torch.Tensor:
    """[B, H, L] fp32 natural-log row LSEs (semantics of ``kernels.reference.attention_row_lse``), by pass 1."""
    _check(q, k, "attention_row_lse")
    q, k = _cast_pair(q, k)
    B, H, L, D = q.shape
    comp = build_compact(row_mask, torch.zeros_like(row_mask, dtype=torch.bool), attention_mask)
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():  # triton launches on the current one
        lse2 = row_lse(q, k, comp, pick_config(D, D, 1, q.dtype))  # [B, H, NT], +inf: no key
    out = torch.full((B, H, L + 1), float("-inf"), dtype=torch.float32, device=q.device)
    if comp.nt_max == 0:
        return out[..., :L].contiguous()
    valid = torch.arange(comp.nt_max, device=q.device)[None, :] < comp.n_text[:, None]
    dest = torch.where(valid, comp.tidx.long(), torch.full_like(comp.tidx, L).long())[:, None, :].expand(B, H, -1)
    val = torch.where(torch.isfinite(lse2), lse2 / LOG2E, torch.full_like(lse2, float("-inf")))
    return out.scatter_(2, dest, val)[..., :L].contiguous()
