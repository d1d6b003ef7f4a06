"""Shared pieces of the Triton attention-alignment path: compact index lists, the row log-sum-exp pass, configs.

Everything here works on *compact* per-sample lists: text rows (queries) and vision columns (keys) are sparse in
[0, L), so the host builds, with O(B*L) torch ops, the sorted positions of each sample's text rows / vision columns
and the kernels iterate over those lists only.

Log-sum-exps are stored in the log2 domain (flash-attention style): with qk = scale*log2(e)*q.k,
P[i, j] = exp2(qk[i, j] - lse2[i]). A row without any valid key gets lse2 = +inf, so every P of that row is 0.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634

# Under TRITON_INTERPRET=1 (CPU tests) triton 3.9's interpreter multiplies bf16 *bit patterns* in tl.dot (numpy has no
# bf16), so bf16 dot operands are upcast to fp32 there. This is exact: a bf16 x bf16 product fits in fp32, and the GPU
# accumulates in fp32 too. (The interpreter also truncates fp32 -> bf16 casts where the GPU rounds to nearest, so the
# CPU tests see slightly *larger* bf16 errors than a GPU.)
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Shared memory per block on sm86/sm89 (RTX 3090/4090) is 101,376 B; every config below stays under 99 KB.
SMEM_LIMIT = 99 * 1024


@triton.jit
def _dot(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """fp32-accumulating dot; PREC is "ieee" for fp32 operands (exact fp32 math), "tf32" (ignored) for bf16/fp16."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PREC)


def dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


# --------------------------------------------------------------------------------------------------------------------
# compact index lists


@dataclass
class Compact:
    """Per-sample compact lists built from the masks (all int32, O(B*L))."""

    tidx: torch.Tensor  # [B, NT] positions of text rows, sorted; entries >= n_text[b] are padding (0)
    vidx: torch.Tensor  # [B, NV] positions of vision columns, sorted; padding 0
    n_text: torch.Tensor  # [B]
    n_vis: torch.Tensor  # [B]
    ct_excl: torch.Tensor  # [B, L] number of text positions < p
    cv_excl: torch.Tensor  # [B, L] number of vision positions < p
    vpos: torch.Tensor  # [B, L] compact vision index of position p, or -1
    kvalid: torch.Tensor | None  # [B, L] int8 valid keys, None = all valid
    nt_max: int
    nv_max: int
    n_pairs: torch.Tensor  # |E| as a 0-dim float32 tensor on the device


def _compact_positions(mask: torch.Tensor, nmax: int) -> torch.Tensor:
    B, L = mask.shape
    pos = torch.arange(L, device=mask.device, dtype=torch.int32).expand(B, L)
    slot = torch.cumsum(mask, 1, dtype=torch.int32) - 1
    slot = torch.where(mask, slot, torch.full_like(slot, nmax)).long()  # padding goes to a dummy column
    out = torch.zeros(B, nmax + 1, dtype=torch.int32, device=mask.device)
    out.scatter_(1, slot, pos)
    return out[:, :nmax].contiguous() if nmax > 0 else out[:, :1].zero_().contiguous()


def build_compact(text_mask: torch.Tensor, vision_mask: torch.Tensor, attention_mask: torch.Tensor | None) -> Compact:
    tm = text_mask.to(torch.bool)
    vm = vision_mask.to(torch.bool)
    n_text = tm.sum(1, dtype=torch.int32)
    n_vis = vm.sum(1, dtype=torch.int32)
    nt_max, nv_max = (int(x) for x in torch.stack([n_text.max(), n_vis.max()]).tolist())  # the one host sync
    ct = torch.cumsum(tm, 1, dtype=torch.int32)
    cv = torch.cumsum(vm, 1, dtype=torch.int32)
    ct_excl = (ct - tm.to(torch.int32)).contiguous()
    cv_excl = (cv - vm.to(torch.int32)).contiguous()
    vpos = torch.where(vm, cv - 1, torch.full_like(cv, -1)).contiguous()
    # E = {(b, i, j): text i, vision j, j < i}: for each text row, the number of vision positions before it
    n_pairs = (cv_excl.to(torch.float64) * tm).sum().to(torch.float32)
    kvalid = None if attention_mask is None else attention_mask.to(torch.bool).to(torch.int8).contiguous()
    return Compact(
        tidx=_compact_positions(tm, nt_max),
        vidx=_compact_positions(vm, nv_max),
        n_text=n_text.contiguous(),
        n_vis=n_vis.contiguous(),
        ct_excl=ct_excl,
        cv_excl=cv_excl,
        vpos=vpos,
        kvalid=kvalid,
        nt_max=nt_max,
        nv_max=nv_max,
        n_pairs=n_pairs,
    )


# --------------------------------------------------------------------------------------------------------------------
# configs and shared-memory estimates
#
# Estimates count the tiles Triton keeps in shared memory: operands of tl.dot (pipelined loads are multiplied by the
# number of stages) and the register<->shared layout conversions of tiles fed to a second dot or accumulated across
# layouts. Accumulators live in registers. smem_estimate() gives, at D=128 (both models' head dim):
#
#   kernel    dtype  blocks                              estimate
#   row-LSE   bf16   BM=64 BN=64 stages=2                q 16 + k 2x16                               = 48.0 KB
#             fp32   BM=32 BN=32 stages=2                q 16 + k 2x16                               = 48.0 KB
#   align     bf16   BM=16 BN=16 BKN=64 stages=2         q_t,k_t,q_s,k_s 4x4 + y 0.5 + keys 2x16
#                                                        + ds 2 + dq conversion 8                    = 62.5 KB
#             fp32   BM=16 BN=16 BKN=32 stages=2         4x8 + 1 + 2x16 + 2 + 8                      = 83.0 KB
#   dk        bf16   BN=64 BM=64 stages=2                k 16 + q 2x16 + ds 8                        = 56.0 KB
#             fp32   BN=32 BM=32 stages=2                k 16 + q 2x16 + ds 4                        = 52.0 KB
# All under SMEM_LIMIT (99 KB, RTX 3090/4090). tests/test_triton_kernels.py checks these estimates for D=64/128, and
# tests/test_triton_gpu.py reads the compiled kernels' real shared-memory use (metadata.shared) on a GPU.


@dataclass(frozen=True)
class Cfg:
    lse_m: int
    lse_n: int
    lse_warps: int
    al_m: int
    al_n: int
    al_kn: int
    al_warps: int
    hs_group: int
    dk_n: int
    dk_m: int
    dk_warps: int
    stages: int


def smem_estimate(cfg: Cfg, d_t: int, d_s: int, elem: int) -> dict:
    dt, ds, st = pow2(d_t), pow2(d_s), cfg.stages
    return {
        "lse": max(cfg.lse_m * dt + st * cfg.lse_n * dt, cfg.lse_m * ds + st * cfg.lse_n * ds) * elem,
        "align": (2 * cfg.al_m * dt + cfg.al_n * dt + cfg.al_m * ds + cfg.al_n * ds) * elem
        + cfg.al_m * cfg.al_n * elem
        + st * cfg.al_kn * ds * elem
        + cfg.al_m * cfg.al_kn * elem
        + cfg.al_m * ds * 4,  # mma -> blocked conversion of the fp32 dq tile
        "dk": (cfg.dk_n * ds + st * cfg.dk_m * ds + cfg.dk_n * cfg.dk_m) * elem,
    }


# Field overrides for tuning on a GPU (bench/kernels.py --sweep sets them); empty in normal use.
CONFIG_OVERRIDE: dict = {}


def pick_config(d_t: int, d_s: int, hs: int, dtype: torch.dtype, interpret: bool | None = None) -> Cfg:
    hs_group = min(max(triton.next_power_of_2(max(hs, 1)), 2), 8)  # >= 2: no size-1 blocks
    if INTERPRET if interpret is None else interpret:
        # small blocks so that tiny test shapes still run several blocks in every loop
        return Cfg(16, 16, 4, 16, 16, 16, 4, min(hs_group, 4), 16, 16, 4, 1)
    elem = torch.finfo(dtype).bits // 8
    if elem >= 4:
        cfg = Cfg(32, 32, 4, 16, 16, 32, 8, hs_group, 32, 32, 4, 2)
    else:
        cfg = Cfg(64, 64, 4, 16, 16, 64, 8, hs_group, 64, 64, 4, 2)
    # shrink for head dims beyond 128 until every kernel fits
    while max(smem_estimate(cfg, d_t, d_s, elem).values()) > SMEM_LIMIT and cfg.lse_n > 16:
        h = lambda x: max(16, x // 2)  # noqa: E731
        cfg = Cfg(h(cfg.lse_m), h(cfg.lse_n), cfg.lse_warps, cfg.al_m, cfg.al_n, h(cfg.al_kn), cfg.al_warps,
                  max(2, cfg.hs_group // 2), h(cfg.dk_n), h(cfg.dk_m), cfg.dk_warps, 1)
    if max(smem_estimate(cfg, d_t, d_s, elem).values()) > SMEM_LIMIT:
        warnings.warn(f"alignkd kernels: no config fits {SMEM_LIMIT // 1024} KB of shared memory at head dims "
                      f"({d_t}, {d_s}) in {dtype}; it may still compile on GPUs with more (H100: 227 KB)")
    if CONFIG_OVERRIDE:
        cfg = Cfg(**{**cfg.__dict__, **CONFIG_OVERRIDE})
    return cfg


# --------------------------------------------------------------------------------------------------------------------
# pass 1: row log-sum-exp of the text rows (causal + key padding), flash-forward style without V


@triton.jit
def _row_lse_kernel(
    Q, K, TIDX, NTEXT, KVALID, LSE,
    sq_b, sq_h, sq_l, sq_d,
    sk_b, sk_h, sk_l, sk_d,
    st_b, skv_b, sl_b, sl_h,
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
    hi = tl.max(tl.where(rmask, rows, -1), 0) + 1  # keys 0..hi-1 cover every causal key of the block
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    for start in range(0, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        nmask = offs_n < hi
        k = tl.load(K + b * sk_b + h * sk_h + offs_n[:, None] * sk_l + offs_d[None, :] * sk_d,
                    mask=nmask[:, None] & dmask[None, :], other=0.0)
        s = _dot(q, tl.trans(k), PREC, UPCAST) * qk_scale
        valid = (offs_n[None, :] <= rows[:, None]) & nmask[None, :] & rmask[:, None]
        if HAS_KV:
            kv = tl.load(KVALID + b * skv_b + offs_n, mask=nmask, other=0)
            valid = valid & (kv != 0)[None, :]
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
    lse = tl.where(l_i > 0, m_i + tl.log2(tl.maximum(l_i, 1e-30)), float("inf"))
    tl.store(LSE + b * sl_b + h * sl_h + offs_r, lse, mask=rmask)


def row_lse(q: torch.Tensor, k: torch.Tensor, comp: Compact, cfg: Cfg) -> torch.Tensor:
    """[B, H, NT] fp32 log2-domain LSE of each compact text row over its causal, valid keys."""
    B, H, L, D = q.shape
    nt = max(comp.nt_max, 1)
    lse = torch.full((B, H, nt), float("inf"), dtype=torch.float32, device=q.device)
    if comp.nt_max == 0:
        return lse
    kv = comp.kvalid if comp.kvalid is not None else comp.n_text  # dummy pointer when unused
    grid = (triton.cdiv(comp.nt_max, cfg.lse_m), B * H)
    _row_lse_kernel[grid](
        q, k, comp.tidx, comp.n_text, kv, lse,
        *q.stride(), *k.stride(),
        comp.tidx.stride(0), kv.stride(0) if comp.kvalid is not None else 0, lse.stride(0), lse.stride(1),
        H, D, LOG2E / math.sqrt(D),
        BLOCK_M=cfg.lse_m, BLOCK_N=cfg.lse_n, BLOCK_D=pow2(D),
        HAS_KV=comp.kvalid is not None, PREC=dot_precision(q.dtype), UPCAST=INTERPRET,
        num_warps=cfg.lse_warps, num_stages=cfg.stages,
    )
    return lse
