"""Attention KL: kernels.reference.attention_kl_loss vs a naive float64 loop, and the Triton kernel vs the reference.

The naive version walks every (sample, text row) with explicit loops, builds the row's full causal softmax over all of
its valid keys in float64, and renormalizes it over the row's earlier vision keys; it runs from the same (possibly
bf16-rounded) input values.

Triton tests run with CUDA, or on the CPU under TRITON_INTERPRET=1 (tests/conftest.py sets it when there is no GPU,
before anything imports triton); otherwise they skip.

Tolerances (relative norms):
- reference vs naive: values 1e-5; gradients 1e-4, of bf16 leaves 2e-2 (autograd returns them rounded to bf16).
- Triton vs reference, fp32 inputs: values 1e-5, gradients 1e-4. bf16 inputs: value and dmix 1e-4 (fp32 math on the
  same bf16 values on both sides); dq, dk 3e-2 (the kernel feeds bf16 copies of dS to the gradient matmuls and returns
  bf16 gradients; the interpreter truncates fp32 -> bf16 where a GPU rounds).
"""
from __future__ import annotations

import math
import os

import pytest
import torch

import kernels.reference as ref
from alloc_log import AllocLog, NoLaunch

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_OK = DEV == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(not TRITON_OK, reason="needs CUDA or TRITON_INTERPRET=1 (set by tests/conftest.py)")
TOL = {torch.float32: dict(val=1e-5, grad=1e-4, grad_qk=1e-4), torch.bfloat16: dict(val=1e-4, grad=1e-4, grad_qk=3e-2)}


def _rel(a, b) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    nb = b.norm()
    return float((a - b).norm() / nb) if nb > 0 else float(a.norm())


def _leaf(x):
    return x.detach().clone().requires_grad_(True)


# --------------------------------------------------------------------------------------------------------------------
# inputs


def _masks(B, L, layout, pad, vis_len):
    """text/vision/attention masks [B, L]. Every layout has text rows before the image (no vision key: excluded).

    after: prompt text, image, text. pad: right padding per sample, left padding and one padded vision key in
    sample 1 (so a text row right after it sees fewer keys). text_only: the last sample has no image (its text rows
    are all excluded). first_key_padded: in sample 0 the image's first key is padded and a text row sits right after
    it, i.e. a text row whose only earlier vision key is padding (empty V_i).
    """
    tm = torch.zeros(B, L, dtype=torch.bool)
    vm = torch.zeros(B, L, dtype=torch.bool)
    am = torch.ones(B, L, dtype=torch.bool)
    for b in range(B):
        end = L - (3 * b + 2 if pad else 0)
        start = 2 if (pad and b == 1) else 0
        s0 = start + 3 + b
        tm[b, start:s0] = True
        vm[b, s0:s0 + vis_len] = True
        tm[b, s0 + vis_len:end] = True
        am[b, end:] = False
        am[b, :start] = False
        if pad and b == 1:
            am[b, s0 + 2] = False
    if layout == "text_only":
        vm[-1] = False
        tm[-1, :L - 2] = True
    elif layout == "first_key_padded":
        s0 = 3
        vm[0, s0:s0 + vis_len] = False
        vm[0, s0] = True
        tm[0, s0 + 1] = True  # sees only the padded key s0
        vm[0, s0 + 2:s0 + vis_len] = True
        tm[0, s0 + vis_len:] = True
        am[0, s0] = False
        am[0, s0 + 1] = True
    return tm, vm, (am if pad or layout == "first_key_padded" else None)


def _qk(B, H, L, D, g, dtype, noncontig=False):
    # scale 1.5: peaked, non-uniform attention, like real layer-0 heads
    x = torch.randn(B, L, H, D, generator=g) * 1.5
    x = x.transpose(1, 2) if noncontig else x.transpose(1, 2).contiguous()
    return x.to(dtype)


def _mix(Hs, Ht, g, kind):
    if kind == "softmax":
        return torch.softmax(torch.randn(Hs, Ht, generator=g), 1)
    if kind == "positive":  # rows do not sum to 1
        return torch.rand(Hs, Ht, generator=g) * 0.7 + 0.05
    if kind == "zeros":  # a zero entry in every row, and an all-zero row: m = 0 exactly for that head
        w = torch.softmax(torch.randn(Hs, Ht, generator=g), 1)
        w[:, 0] = 0.0
        w[-1] = 0.0
        return w
    if kind == "signed":  # negative entries: m < 0 somewhere
        return torch.randn(Hs, Ht, generator=g) / Ht
    raise ValueError(kind)


def _inputs(B, L, Ht, Hs, Dt, Ds, dtype, seed, mix_kind="softmax", noncontig=False):
    g = torch.Generator().manual_seed(seed)
    q_t, k_t = _qk(B, Ht, L, Dt, g, dtype, noncontig), _qk(B, Ht, L, Dt, g, dtype, noncontig)
    q_s, k_s = _qk(B, Hs, L, Ds, g, dtype, noncontig), _qk(B, Hs, L, Ds, g, dtype, noncontig)
    return q_t, k_t, q_s, k_s, _mix(Hs, Ht, g, mix_kind)


# --------------------------------------------------------------------------------------------------------------------
# naive float64


def naive_attention_kl(q_t, k_t, q_s, k_s, tm, vm, mix, am):
    """(loss float64, number of rows kept) by loops over (b, i): full causal softmax, renormalized over V_i."""
    B, Ht, L, Dt = q_t.shape
    Hs, Ds = q_s.shape[1], q_s.shape[3]

    def renormalized(q, k, b, i, keys, vis, D):
        s = torch.einsum("hd,hjd->hj", q[b, :, i].double(), k[b, :, keys].double()) / math.sqrt(D)
        p = torch.softmax(s, -1)  # the row's true attention over every valid causal key
        pv = p[:, [keys.index(j) for j in vis]]
        return pv / pv.sum(-1, keepdim=True)

    total = torch.zeros((), dtype=torch.float64)
    n_rows = 0
    for b in range(B):
        for i in range(L):
            if not tm[b, i]:
                continue
            keys = [j for j in range(i + 1) if am is None or bool(am[b, j])]
            vis = [j for j in keys if bool(vm[b, j]) and j < i]
            if not vis:
                continue
            n_rows += 1
            p_t = renormalized(q_t.detach(), k_t.detach(), b, i, keys, vis, Dt)  # [Ht, V]
            p_s = renormalized(q_s, k_s, b, i, keys, vis, Ds)  # [Hs, V]
            m = mix.double() @ p_t  # [Hs, V]
            for hs in range(Hs):
                for v in range(len(vis)):
                    mv = m[hs, v]
                    total = total - mv * torch.log(p_s[hs, v])
                    if mv.item() > 0:  # 0 log 0 = 0
                        total = total + mv * torch.log(mv)
    return total / max(n_rows * Hs, 1), n_rows


NAIVE_CASES = {
    # name: (dtype, B, L, Ht, Hs, Dt, Ds, layout, pad, vis_len, mix)
    "fp32-pad-Ht>Hs-Dt!=Ds": (torch.float32, 2, 17, 4, 2, 8, 16, "after", True, 5, "softmax"),
    "fp32-text-only-sample-Hs>Ht": (torch.float32, 3, 16, 2, 3, 16, 8, "text_only", False, 4, "positive"),
    "fp32-empty-Vi-row-mix-zeros": (torch.float32, 2, 16, 3, 2, 8, 8, "first_key_padded", False, 5, "zeros"),
    "fp32-signed-mix": (torch.float32, 2, 15, 3, 2, 8, 8, "after", True, 4, "signed"),
    "bf16-pad": (torch.bfloat16, 2, 16, 3, 2, 8, 16, "after", True, 5, "softmax"),
}


@pytest.mark.parametrize("name", list(NAIVE_CASES))
def test_reference_matches_naive(name):
    dtype, B, L, Ht, Hs, Dt, Ds, layout, pad, vis_len, mix_kind = NAIVE_CASES[name]
    tm, vm, am = _masks(B, L, layout, pad, vis_len)
    q_t, k_t, q_s, k_s, mix = _inputs(B, L, Ht, Hs, Dt, Ds, dtype, seed=len(name), mix_kind=mix_kind)
    leaves = [_leaf(x) for x in (q_s, k_s, mix)]
    qt_leaf = _leaf(q_t)
    loss = ref.attention_kl_loss(qt_leaf, k_t, *leaves[:2], tm, vm, leaves[2], attention_mask=am)
    (1.3 * loss).backward()
    nleaves = [_leaf(x) for x in (q_s, k_s, mix)]
    nloss, n_rows = naive_attention_kl(q_t, k_t, *nleaves[:2], tm, vm, nleaves[2], am)
    (1.3 * nloss).backward()

    assert n_rows > 0 and loss.dtype == torch.float32 and loss.shape == ()
    assert _rel(loss, nloss) <= 1e-5, (loss.item(), nloss.item())
    assert qt_leaf.grad is None
    bf16 = dtype == torch.bfloat16
    for nm, a, b, tol in zip(("q_s", "k_s", "mix"), leaves, nleaves, (2e-2 if bf16 else 1e-4,) * 2 + (1e-4,)):
        assert a.grad is not None and a.grad.dtype == a.dtype and torch.isfinite(a.grad).all(), nm
        assert b.grad.norm() > 0, nm
        assert _rel(a.grad, b.grad) <= tol, (nm, _rel(a.grad, b.grad))
    # only text rows get dq, only vision columns dk
    assert not leaves[0].grad.transpose(1, 2)[~tm].any() and not leaves[1].grad.transpose(1, 2)[~vm].any()
    if mix_kind == "zeros":  # the all-zero mix row: m = 0 exactly, no student gradient, a finite mix gradient
        assert not leaves[0].grad[:, -1].any() and not leaves[1].grad[:, -1].any()
        assert leaves[2].grad[-1].abs().sum() > 0


def test_reference_reads_teacher_at_text_rows_and_vision_keys_only():
    tm, vm, am = _masks(2, 18, "after", True, 5)
    q_t, k_t, q_s, k_s, mix = _inputs(2, 18, 3, 2, 8, 8, torch.float32, seed=4)
    noisy_q = torch.where(tm[:, None, :, None], q_t, torch.randn_like(q_t) * 9.0)
    noisy_k = torch.where(vm[:, None, :, None], k_t, torch.randn_like(k_t) * 9.0)
    a = ref.attention_kl_loss(q_t, k_t, q_s, k_s, tm, vm, mix, attention_mask=am)
    b = ref.attention_kl_loss(noisy_q, noisy_k, q_s, k_s, tm, vm, mix, attention_mask=am)
    assert a.item() > 0 and a.item() == b.item()


def _empty_sets(B=2, L=14):
    vm = torch.zeros(B, L, dtype=torch.bool)
    vm[:, 5:9] = True
    tm = torch.zeros(B, L, dtype=torch.bool)
    tm[:, 1:5] = True  # text only before the image
    am_vis_padded = torch.ones(B, L, dtype=torch.bool)
    am_vis_padded[:, 5:9] = False
    tm_after = torch.zeros_like(tm)
    tm_after[:, 9:] = True
    return [(tm, vm, None), (torch.zeros_like(tm), vm, None), (tm_after, torch.zeros_like(vm), None),
            (tm_after, vm, am_vis_padded)]  # the last: every vision key is padding


def test_reference_empty_set_gives_zero_loss_with_zero_grads():
    q_t, k_t, q_s, k_s, mix = _inputs(2, 14, 2, 3, 8, 8, torch.float32, seed=9)
    for tm, vm, am in _empty_sets():
        leaves = [_leaf(x) for x in (q_s, k_s, mix)]
        loss = ref.attention_kl_loss(q_t, k_t, *leaves[:2], tm, vm, leaves[2], attention_mask=am)
        loss.backward()
        assert loss.dtype == torch.float32 and loss.item() == 0.0
        assert all(x.grad is not None and not x.grad.any() for x in leaves)


def test_kl_is_zero_when_the_student_matches_the_target():
    """Student heads = teacher heads and mix = identity: KL = 0 and no gradient to q_s, k_s."""
    tm, vm, am = _masks(2, 16, "after", True, 5)
    q_t, k_t, _, _, _ = _inputs(2, 16, 3, 3, 8, 8, torch.float32, seed=2)
    leaves = [_leaf(x) for x in (q_t, k_t, torch.eye(3))]
    loss = ref.attention_kl_loss(q_t, k_t, *leaves[:2], tm, vm, leaves[2], attention_mask=am)
    loss.backward()
    assert abs(loss.item()) < 1e-6 and leaves[0].grad.abs().max() < 1e-5 and leaves[1].grad.abs().max() < 1e-5


# --------------------------------------------------------------------------------------------------------------------
# Triton vs reference

KERNEL_CASES = {
    # name: (dtype, B, L, Ht, Hs, Dt, Ds, layout, pad, vis_len, mix, noncontig)
    # 17 vision columns: two vision-column blocks; Hs=5: two student-head groups (the interpreter's group is 4)
    "fp32-b3-pad-two-blocks-two-groups": (torch.float32, 3, 47, 3, 5, 24, 20, "after", True, 17, "softmax", True),
    "fp32-b3-text-only-positive-mix": (torch.float32, 3, 37, 2, 3, 16, 16, "text_only", False, 12, "positive", False),
    "fp32-b2-empty-Vi-mix-zeros": (torch.float32, 2, 33, 4, 2, 16, 16, "first_key_padded", False, 9, "zeros", False),
    "fp32-b2-signed-mix": (torch.float32, 2, 31, 3, 2, 16, 32, "after", True, 10, "signed", False),
    "bf16-b2-pad-two-groups": (torch.bfloat16, 2, 45, 4, 6, 32, 16, "after", True, 18, "softmax", False),
    "bf16-b3-text-only": (torch.bfloat16, 3, 35, 3, 2, 16, 32, "text_only", False, 11, "softmax", True),
}


def _compare(q_t, k_t, q_s, k_s, tm, vm, mix, am, tol, upstream=1.7):
    from kernels.attention_kl import attention_kl_triton

    dev = lambda x: None if x is None else x.to(DEV)  # noqa: E731
    q_t, k_t, tm, vm, am = dev(q_t), dev(k_t), dev(tm), dev(vm), dev(am)
    lk = [_leaf(dev(x)) for x in (q_s, k_s, mix)]
    loss_k = attention_kl_triton(q_t, k_t, *lk[:2], tm, vm, lk[2], am)
    (upstream * loss_k).backward()  # the backward must scale by the incoming gradient
    lr = [_leaf(dev(x)) for x in (q_s, k_s, mix)]
    loss_r = ref.attention_kl_loss(q_t, k_t, *lr[:2], tm, vm, lr[2], attention_mask=am)
    (upstream * loss_r).backward()
    assert loss_k.shape == () and loss_k.dtype == torch.float32
    assert abs(loss_k.item() - loss_r.item()) <= tol["val"] * abs(loss_r.item()) + 1e-9, (loss_k.item(), loss_r.item())
    for nm, a, b, t in zip(("dq_s", "dk_s", "dmix"), lk, lr, (tol["grad_qk"], tol["grad_qk"], tol["grad"])):
        assert a.grad is not None and a.grad.dtype == b.grad.dtype and a.grad.shape == b.grad.shape, nm
        assert torch.isfinite(a.grad).all(), nm
        assert _rel(a.grad, b.grad) <= t, (nm, _rel(a.grad, b.grad))
    return loss_k, lk


@needs_triton
@pytest.mark.parametrize("name", list(KERNEL_CASES))
def test_triton_matches_reference(name):
    dtype, B, L, Ht, Hs, Dt, Ds, layout, pad, vis_len, mix_kind, noncontig = KERNEL_CASES[name]
    tm, vm, am = _masks(B, L, layout, pad, vis_len)
    q_t, k_t, q_s, k_s, mix = _inputs(B, L, Ht, Hs, Dt, Ds, dtype, seed=len(name), mix_kind=mix_kind,
                                      noncontig=noncontig)
    loss, leaves = _compare(q_t, k_t, q_s, k_s, tm, vm, mix, am, TOL[dtype])
    assert loss.item() > 0 or mix_kind == "signed"  # KL of a signed m can be negative
    assert not leaves[1].grad.transpose(1, 2)[~vm.to(DEV)].any(), "dk must be 0 outside the vision columns"


@needs_triton
def test_triton_gpu_block_config_at_real_head_dim(monkeypatch):
    """The bf16 config a GPU gets (64-wide vision-LSE blocks, 8 student heads per program) at D=128 with Hs=16, i.e.
    two head groups, and 40 vision tokens (three 16-column blocks); Ht=4 keeps the interpreter fast."""
    import kernels._lse as lse

    real = lse.pick_config(128, 128, 16, torch.bfloat16, interpret=False)
    assert real.hs_group == 8 and real.lse_m == 64
    monkeypatch.setattr(lse, "CONFIG_OVERRIDE", dict(real.__dict__))
    B, L, Ht, Hs, D, nv, prompt = 1, 72, 4, 16, 128, 40, 7
    tm = torch.zeros(B, L, dtype=torch.bool)
    vm = torch.zeros_like(tm)
    vm[:, prompt:prompt + nv] = True
    tm[:, :prompt] = True
    tm[:, prompt + nv:] = True
    q_t, k_t, q_s, k_s, mix = _inputs(B, L, Ht, Hs, D, D, torch.bfloat16, seed=0)
    _compare(q_t, k_t, q_s, k_s, tm, vm, mix, None, TOL[torch.bfloat16])


@needs_triton
def test_triton_empty_set_gives_zero_loss_with_zero_grads():
    from kernels.attention_kl import attention_kl_triton

    q_t, k_t, q_s, k_s, mix = (x.to(DEV) for x in _inputs(2, 14, 2, 3, 16, 16, torch.float32, seed=9))
    for tm, vm, am in _empty_sets():
        leaves = [_leaf(x) for x in (q_s, k_s, mix)]
        loss = attention_kl_triton(q_t, k_t, *leaves[:2], tm.to(DEV), vm.to(DEV), leaves[2],
                                   None if am is None else am.to(DEV))
        loss.backward()
        assert loss.dtype == torch.float32 and loss.item() == 0.0
        assert all(x.grad is not None and not x.grad.any() for x in leaves)


@needs_triton
def test_triton_partial_grads_no_grad_teacher_noise_and_dispatch():
    """Only mix trainable; no grad at all; noise in every non-text teacher query and non-vision teacher key changes
    nothing; kernels.attention_kl_loss(backend="triton") reaches this kernel."""
    import kernels
    from kernels.attention_kl import attention_kl_triton

    tm, vm, am = (None if x is None else x.to(DEV) for x in _masks(2, 33, "after", True, 10))
    q_t, k_t, q_s, k_s, mix = (x.to(DEV) for x in _inputs(2, 33, 3, 2, 16, 16, torch.float32, seed=5))
    wk, wr = _leaf(mix), _leaf(mix)
    lk = attention_kl_triton(q_t, k_t, q_s, k_s, tm, vm, wk, am)
    lk.backward()
    ref.attention_kl_loss(q_t, k_t, q_s, k_s, tm, vm, wr, attention_mask=am).backward()
    assert _rel(wk.grad, wr.grad) <= 1e-4
    with torch.no_grad():
        l2 = attention_kl_triton(q_t, k_t, q_s, k_s, tm, vm, mix, am)
    assert abs(l2.item() - lk.item()) <= 1e-6 * abs(lk.item())
    noisy_q = torch.where(tm[:, None, :, None], q_t, torch.randn_like(q_t) * 9.0)
    noisy_k = torch.where(vm[:, None, :, None], k_t, torch.randn_like(k_t) * 9.0)
    assert attention_kl_triton(noisy_q, noisy_k, q_s, k_s, tm, vm, mix, am).item() == l2.item()
    assert kernels.attention_kl_loss(q_t, k_t, q_s, k_s, tm, vm, mix, am, backend="triton").item() == l2.item()
    r = kernels.attention_kl_loss(q_t, k_t, q_s, k_s, tm, vm, mix, am, backend="reference")
    assert abs(r.item() - l2.item()) <= 1e-5 * abs(r.item())


@needs_triton
def test_memory_contract_no_attention_map_or_text_vision_slice(monkeypatch):
    """The host side of the Triton path allocates nothing of L x L elements per (b, h), nor the teacher's or the
    student's B x H x |text| x |vision| slice: the largest allocation is a q/k gradient, and everything else is
    O(B * H * L) plus the dk vision buffer."""
    import kernels.attention_kl as akl

    B, L, Ht, Hs, Dt, Ds = 2, 96, 8, 2, 16, 16
    tm, vm, am = _masks(B, L, "after", True, 24)
    nt, nv = int(tm.sum(1).max()), int(vm.sum(1).max())
    budget = B * Hs * L * Ds
    assert budget < min(B * Hs * L * L, B * Hs * nt * nv)
    for name in ("_vision_lse_kernel", "_kl_kernel"):
        monkeypatch.setattr(akl, name, NoLaunch())
    q_t, k_t, q_s, k_s, mix = (x.to(DEV) for x in _inputs(B, L, Ht, Hs, Dt, Ds, torch.float32, seed=1))
    leaves = [_leaf(x) for x in (q_s, k_s, mix)]
    log = AllocLog()
    with log:
        akl.attention_kl_triton(q_t, k_t, *leaves[:2], tm.to(DEV), vm.to(DEV), leaves[2], am.to(DEV)).backward()
    biggest = max(log.sizes, key=lambda s: s[2])
    assert biggest[2] <= budget, biggest
    extra = sum(n for f, s, n in log.sizes if n > B * L) - 2 * budget  # minus the two q/k gradients
    assert extra <= 4 * B * (Ht + Hs) * L + 2 * B * Hs * nv * Ds, (extra, log.sizes)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_config_fits_consumer_gpu_shared_memory(dtype):
    """The blocks used at D=128, Ht=32, Hs=16: pass 1 has the row-LSE kernel's tiles and pass 2 the align kernel's
    minus its key sweep, whose estimates must fit 99 KB (``python -m kernels._offline_compile`` compiles both for
    sm_86/sm_90 and reads the real shared memory; test_triton_kernels.py runs it)."""
    import kernels._lse as lse

    cfg = lse.pick_config(128, 128, 16, dtype, interpret=False)
    est = lse.smem_estimate(cfg, 128, 128, torch.finfo(dtype).bits // 8)
    assert est["lse"] <= lse.SMEM_LIMIT and est["align"] <= lse.SMEM_LIMIT, est
    assert cfg.hs_group == 8 and cfg.al_m == 16 and cfg.al_n == 16


# --------------------------------------------------------------------------------------------------------------------
# GPU, real shapes


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_real_shapes_on_gpu(dtype):
    """MobileVLM V2 layer 0: Ht=32, Hs=16, D=128, 144 vision tokens after a 35-token prompt, L=512, right padding."""
    B, L, Ht, Hs, D, nv, prompt = 2, 512, 32, 16, 128, 144, 35
    g = torch.Generator(device="cuda").manual_seed(0)
    q_t, k_t, q_s, k_s = ((torch.randn(B, H, L, D, device="cuda", generator=g) * 1.5).to(dtype)
                          for H in (Ht, Ht, Hs, Hs))
    mix = torch.softmax(torch.randn(Hs, Ht, device="cuda", generator=g), 1)
    am = torch.zeros(B, L, dtype=torch.bool, device="cuda")
    vm, tm = torch.zeros_like(am), torch.zeros_like(am)
    for b in range(B):
        n = L - 97 * b
        am[b, :n], vm[b, prompt:prompt + nv], tm[b, :prompt], tm[b, prompt + nv:n] = True, True, True, True
    tol = dict(TOL[dtype])
    if dtype == torch.bfloat16:
        tol.update(grad=1e-3, grad_qk=2e-2)  # as tests/test_triton_gpu.py for the MSE kernel
    _compare(q_t, k_t, q_s, k_s, tm, vm, mix, am, tol)
    # the compiled kernels' real shared memory (triton 3.x internals: skipped where they differ)
    import kernels._lse as lse
    import kernels.attention_kl as akl

    for fn in (akl._vision_lse_kernel, akl._kl_kernel):
        for entry in (getattr(fn, "device_caches", None) or {}).values():
            for kern in entry[0].values():
                if hasattr(kern, "metadata"):
                    assert kern.metadata.shared <= lse.SMEM_LIMIT, (fn.__name__, kern.metadata.shared)
