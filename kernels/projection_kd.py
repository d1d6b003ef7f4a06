"""Fused projection KD (Align-KD L_proj_all and L_proj_focus): matmul + bias + squared error + weighted reduction.

A(x) = x @ weight.T + bias (weight [d_s, d_t]); R = A(f_t) - f_s over the B*N tokens.
loss_all = sum(R^2) / (B*N*d_s); loss_focus = sum_tokens mult(token) * sum_c R^2 / (B*K*d_s), where mult is how many
times the token appears in focus_idx[b, :] (K per sample; repeats count, as in a gather).

Forward kernel: one program per (block of tokens x block of output channels) computes the GEMM tile in fp32, adds
the bias, subtracts f_s, stores R (fp32, B*N*d_s: the size of f_s) for the backward, and writes per-token partial sums
of R^2 (deterministic: reduced with torch afterwards). Backward kernel: one program per (d_s block x d_t block)
forms dR = 2 R (g_all / (B N d_s) + g_focus mult / (B K d_s)) on the fly and accumulates dW = dR^T f_t; the programs
of the first d_t block also write db = sum dR and df_s = -dR. The teacher features f_t get no gradient.

Shared memory (fp32 operands, the worst case): forward BM=64 BN=64 BK=32, 3 stages: (64*32 + 64*32)*4*3 = 48 KB;
backward BS=64 BT=64 BM=32, 3 stages: (32*64 + 32*64)*4*3 = 48 KB (+ 8 KB layout conversion of dR). Well under 99 KB.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._lse import INTERPRET, _dot

__all__ = ["projection_kd_triton"]


@triton.jit
def _proj_fwd_kernel(
    FT, W, BIAS, FS, R, ROWP,
    sft_m, sft_k, sw_n, sw_k, sfs_m, sfs_n, sr_m,
    M, DS, DT,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    STORE_R: tl.constexpr, CAST_F32: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = offs_m < M
    nmask = offs_n < DS
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, DT, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        kmask = offs_k < DT
        a = tl.load(FT + offs_m[:, None] * sft_m + offs_k[None, :] * sft_k, mask=mmask[:, None] & kmask[None, :],
                    other=0.0)
        w = tl.load(W + offs_n[:, None] * sw_n + offs_k[None, :] * sw_k, mask=nmask[:, None] & kmask[None, :],
                    other=0.0)
        if CAST_F32:  # mixed dtypes (e.g. bf16 features, fp32 adapter): exact fp32 math
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc += _dot(a, tl.trans(w), PREC, UPCAST)
    bias = tl.load(BIAS + offs_n, mask=nmask, other=0.0).to(tl.float32)
    fs = tl.load(FS + offs_m[:, None] * sfs_m + offs_n[None, :] * sfs_n, mask=mmask[:, None] & nmask[None, :],
                 other=0.0).to(tl.float32)
    r = tl.where(mmask[:, None] & nmask[None, :], acc + bias[None, :] - fs, 0.0)
    if STORE_R:
        tl.store(R + offs_m[:, None] * sr_m + offs_n[None, :], r, mask=mmask[:, None] & nmask[None, :])
    tl.store(ROWP + pid_n * M + offs_m, tl.sum(r * r, 1), mask=mmask)


@triton.jit
def _proj_bwd_kernel(
    R, RW, FT, DW, DB, DFS,
    sr_m, sft_m, sft_k, sdw_s, sdw_t, sdfs_m, sdfs_n,
    M, DS, DT,
    BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr,
    NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, NEED_DFS: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_s = tl.program_id(0)
    pid_t = tl.program_id(1)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    smask = offs_s < DS
    tmask = offs_t < DT
    first = (offs_s * 0 + pid_t) == 0  # vector form: the interpreter rejects scalar bools in masks
    acc = tl.zeros((BLOCK_S, BLOCK_T), tl.float32)
    db = tl.zeros((BLOCK_S,), tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mmask = offs_m < M
        r = tl.load(R + offs_m[:, None] * sr_m + offs_s[None, :], mask=mmask[:, None] & smask[None, :], other=0.0)
        rw = tl.load(RW + offs_m, mask=mmask, other=0.0)
        dr = 2.0 * r * rw[:, None]  # [BM, BS]
        if NEED_DW:
            ft = tl.load(FT + offs_m[:, None] * sft_m + offs_t[None, :] * sft_k,
                         mask=mmask[:, None] & tmask[None, :], other=0.0).to(tl.float32)
            acc += _dot(tl.trans(dr), ft, PREC, UPCAST)
        if NEED_DB:
            db += tl.sum(dr, 0)
        if NEED_DFS:
            tl.store(DFS + offs_m[:, None] * sdfs_m + offs_s[None, :] * sdfs_n, (-dr).to(DFS.dtype.element_ty),
                     mask=mmask[:, None] & (smask & first)[None, :])
    if NEED_DW:
        tl.store(DW + offs_s[:, None] * sdw_s + offs_t[None, :] * sdw_t, acc.to(DW.dtype.element_ty),
                 mask=smask[:, None] & tmask[None, :])
    if NEED_DB:
        tl.store(DB + offs_s, db.to(DB.dtype.element_ty), mask=smask & first)


def _launch_on(device, kernel, *args, **kwargs):
    if device.type == "cuda":
        with torch.cuda.device(device):
            return kernel(*args, **kwargs)
    return kernel(*args, **kwargs)


def _cfg(interpret: bool | None = None):
    if INTERPRET if interpret is None else interpret:
        return dict(fm=16, fn=16, fk=16, bs=16, bt=16, bm=16, warps=4, stages=1)
    return dict(fm=64, fn=64, fk=32, bs=64, bt=64, bm=32, warps=4, stages=3)


def _multiplicity(focus_idx: torch.Tensor, B: int, N: int, device) -> torch.Tensor:
    mult = torch.zeros(B, N, dtype=torch.float32, device=device)
    mult.scatter_add_(1, focus_idx.long(), torch.ones(focus_idx.shape, dtype=torch.float32, device=device))
    return mult.reshape(-1)


class _ProjectionKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, f_s, weight, bias, f_t, mult, k):
        B, N, DT = f_t.shape
        DS = weight.shape[0]
        M = B * N
        ft = f_t.reshape(M, DT)
        fs = f_s.reshape(M, DS)
        c = _cfg()
        need_grad = any(ctx.needs_input_grad[:3])
        r = torch.empty(M, DS, dtype=torch.float32, device=f_t.device) if need_grad else fs
        n_nb = triton.cdiv(DS, c["fn"])
        rowp = torch.empty(n_nb, M, dtype=torch.float32, device=f_t.device)
        same = ft.dtype == weight.dtype
        prec = "ieee" if (ft.dtype == torch.float32 or not same) else "tf32"
        if M > 0:
            _proj_fwd_kernel[(triton.cdiv(M, c["fm"]), n_nb)](
                ft, weight, bias, fs, r, rowp,
                ft.stride(0), ft.stride(1), weight.stride(0), weight.stride(1), fs.stride(0), fs.stride(1),
                r.stride(0), M, DS, DT,
                BLOCK_M=c["fm"], BLOCK_N=c["fn"], BLOCK_K=c["fk"], STORE_R=need_grad, CAST_F32=not same,
                PREC=prec, UPCAST=INTERPRET, num_warps=c["warps"], num_stages=c["stages"],
            )
        rows = rowp.sum(0)  # [M] sum over channels of R^2
        loss_all = rows.sum() / max(M * DS, 1)
        if mult is not None:
            loss_focus = (rows * mult).sum() / max(B * k * DS, 1)
        else:
            loss_focus = torch.zeros((), dtype=torch.float32, device=f_t.device)
        if need_grad:
            ctx.save_for_backward(r, ft, mult)
            ctx.dims = (B, N, DS, DT, k)
            ctx.fs_shape, ctx.fs_dtype = f_s.shape, f_s.dtype
        return loss_all, loss_focus

    @staticmethod
    def backward(ctx, g_all, g_focus):
        r, ft, mult = ctx.saved_tensors
        B, N, DS, DT, k = ctx.dims
        M = B * N
        need_dfs, need_dw, need_db = ctx.needs_input_grad[:3]
        g_all = torch.zeros((), device=r.device) if g_all is None else g_all.float()
        rw = (g_all / max(M * DS, 1)).expand(M)
        if mult is not None and g_focus is not None:
            rw = rw + g_focus.float() * mult / max(B * k * DS, 1)
        rw = rw.contiguous()
        c = _cfg()
        dev = r.device
        dw = torch.empty(DS, DT, dtype=torch.float32, device=dev) if need_dw else r
        db = torch.empty(DS, dtype=torch.float32, device=dev) if need_db else r
        dfs = torch.empty(M, DS, dtype=ctx.fs_dtype, device=dev) if need_dfs else r
        n_t = triton.cdiv(DT, c["bt"]) if need_dw else 1
        if M > 0:
            _launch_on(dev, _proj_bwd_kernel[(triton.cdiv(DS, c["bs"]), n_t)],
                r, rw, ft, dw, db, dfs,
                r.stride(0), ft.stride(0), ft.stride(1), dw.stride(0), dw.stride(-1), dfs.stride(0), dfs.stride(-1),
                M, DS, DT,
                BLOCK_S=c["bs"], BLOCK_T=c["bt"], BLOCK_M=c["bm"],
                NEED_DW=need_dw, NEED_DB=need_db, NEED_DFS=need_dfs,
                PREC="ieee", UPCAST=INTERPRET, num_warps=c["warps"], num_stages=c["stages"],
            )
        else:
            dw, db, dfs = dw.zero_(), db.zero_(), dfs.zero_()
        return (
            dfs.reshape(ctx.fs_shape) if need_dfs else None,
            dw if need_dw else None,
            db if need_db else None,
            None, None, None,
        )


def projection_kd_triton(f_t, f_s, weight, bias, focus_idx=None):
    """(loss_all, loss_focus) of the projection adapter; see the module docstring.

    f_t [B, N, d_t] (teacher, constant), f_s [B, N, d_s], weight [d_s, d_t], bias [d_s], focus_idx [B, K] or None.
    With focus_idx None, loss_focus is a zero scalar.
    """
    if f_t.dim() != 3 or f_s.dim() != 3 or f_t.shape[:2] != f_s.shape[:2]:
        raise ValueError(f"f_t [B, N, d_t] and f_s [B, N, d_s] expected, got {tuple(f_t.shape)}, {tuple(f_s.shape)}")
    B, N, DT = f_t.shape
    DS = f_s.shape[2]
    if tuple(weight.shape) != (DS, DT) or tuple(bias.shape) != (DS,):
        raise ValueError(f"weight must be [d_s, d_t] = [{DS}, {DT}] and bias [{DS}]; got {tuple(weight.shape)}, "
                         f"{tuple(bias.shape)}")
    f_t = f_t.detach()
    if f_t.stride(-1) != 1 or not f_t.is_contiguous():
        f_t = f_t.contiguous()
    if focus_idx is not None:
        if focus_idx.dim() != 2 or focus_idx.shape[0] != B:
            raise ValueError(f"focus_idx must be [B, K], got {tuple(focus_idx.shape)}")
        mult, k = _multiplicity(focus_idx, B, N, f_t.device), focus_idx.shape[1]
    else:
        mult, k = None, 0
    f_s = f_s if f_s.is_contiguous() else f_s.contiguous()
    if f_t.is_cuda:  # triton launches on the current device (the backward runs on the autograd device thread)
        with torch.cuda.device(f_t.device):
            return _ProjectionKD.apply(f_s, weight, bias, f_t, mult, k)
    return _ProjectionKD.apply(f_s, weight, bias, f_t, mult, k)
