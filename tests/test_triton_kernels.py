"""Triton kernels vs kernels.reference on small shapes: values and every gradient.

Where the tests run:
- with CUDA: the compiled kernels, on the GPU, in this process;
- without CUDA: under the Triton interpreter. TRITON_INTERPRET=1 only works when it is set before the process first
  imports triton (triton.language's own helpers, e.g. tl.max, are compiled or interpreted from that moment on), and in
  a full pytest session other test modules import triton (through liger-kernel) before this one is collected; setting
  it for the whole session would also send every other test's "auto" backend through the (slow) interpreter. So the
  session runs ``test_in_triton_interpreter``, which re-runs this file in a fresh process with TRITON_INTERPRET=1,
  where every test below runs (and reports). Running the file directly with TRITON_INTERPRET=1 in the environment
  (``TRITON_INTERPRET=1 python -m pytest tests/test_triton_kernels.py``) runs them in-process.

Tolerances (relative, ||triton - ref|| / ||ref||, fp32 math in both):
- fp32 inputs: values 1e-5, gradients 1e-4.
- bf16 inputs: losses and focus 1e-4 (both sides do fp32 math on the same bf16 values); dW, db 1e-4; dq, dk, df_s
  3e-2: the kernels feed bf16 copies of P * dP to the gradient matmuls (as flash-attention does) and return bf16
  gradients, and the interpreter truncates fp32 -> bf16 where a GPU rounds to nearest (measured ~1e-2 on CPU).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels.reference as ref
from alloc_log import AllocLog, NoLaunch

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DIRECT = DEV == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"  # kernels can run in this process
INNER = os.environ.get("ALIGNKD_TRITON_TESTS_INNER") == "1"  # this process is test_in_triton_interpreter's child
ROOT = Path(__file__).resolve().parents[1]
TOL = {torch.float32: dict(val=1e-5, grad=1e-4, grad_qk=1e-4), torch.bfloat16: dict(val=1e-4, grad=1e-4, grad_qk=3e-2)}
_lse = aa = pk = None  # the kernel modules, imported only where they can run (fixture below)
_OUTER_ONLY = {"test_in_triton_interpreter"}
_ANY_PROCESS = {"test_kernels_compile_offline_for_rtx3090_and_h100_within_shared_memory"}


@pytest.fixture(autouse=True)
def _placement(request):
    global _lse, aa, pk
    name = request.node.originalname
    if name in _OUTER_ONLY:
        if DIRECT:
            pytest.skip("the kernels run in this process (CUDA, or TRITON_INTERPRET=1 set from the start)")
    elif name in _ANY_PROCESS:
        if INNER:
            pytest.skip("runs in the parent pytest process")
    elif not DIRECT:
        pytest.skip("runs in the interpreter subprocess started by test_in_triton_interpreter")
    else:
        import kernels._lse as m1
        import kernels.attention_alignment as m2
        import kernels.projection_kd as m3

        _lse, aa, pk = m1, m2, m3
    yield


def test_in_triton_interpreter():
    """Runs this file's tests in a fresh process with TRITON_INTERPRET=1 (see the module docstring)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "ALIGNKD_TRITON_TESTS_INNER": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs",
                           str(Path(__file__).resolve())], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and " failed" not in proc.stdout, tail


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return float((a - b).norm() / b.norm().clamp(min=1e-30)) if b.norm() > 0 else float(a.norm())


def _masks(B, L, layout, pad, vis_len):
    """text/vision/attention masks. layout: after | mixed | before | empty."""
    vm = torch.zeros(B, L, dtype=torch.bool)
    tm = torch.zeros(B, L, dtype=torch.bool)
    am = torch.ones(B, L, dtype=torch.bool)
    for b in range(B):
        end = L - (3 * b + 2 if pad else 0)  # right padding, different per sample
        start = 2 if (pad and b == 1) else 0  # left padding for sample 1
        s0 = start + 3 + b
        vm[b, s0: s0 + vis_len] = True
        if layout in ("after", "empty"):
            tm[b, s0 + vis_len: end] = True
        elif layout == "mixed":  # text queries before and after the image
            tm[b, start: s0] = True
            tm[b, s0 + vis_len: end] = True
        elif layout == "before":  # only sample 0 has text after the image
            tm[b, start: s0] = True
            if b == 0:
                tm[b, s0 + vis_len: end] = True
        am[b, end:] = False
        am[b, :start] = False
    if layout == "empty":  # sample 0: no text rows; sample 1: no vision columns
        tm[0] = False
        if B > 1:
            vm[1] = False
    return tm, vm, (am if pad else None)


def _inputs(B, L, Ht, Hs, Dt, Ds, dtype, seed, noncontig=False):
    g = torch.Generator().manual_seed(seed)

    def qk(H, D):
        # scale 1.5 gives peaked, non-uniform attention, like real layer-0 heads
        x = torch.randn(B, L, H, D, generator=g) * 1.5
        x = x.transpose(1, 2) if noncontig else x.transpose(1, 2).contiguous()
        return x.to(dtype).to(DEV)

    q_t, k_t, q_s, k_s = qk(Ht, Dt), qk(Ht, Dt), qk(Hs, Ds), qk(Hs, Ds)
    w = (torch.randn(Hs, Ht, generator=g) / Ht).to(DEV)
    b = (torch.randn(Hs, generator=g) * 0.01).to(DEV)
    return q_t, k_t, q_s, k_s, w, b


def _leaf(x):
    return x.detach().clone().requires_grad_(True)


CASES = {
    # name: (dtype, B, L, Ht, Hs, Dt, Ds, layout, pad, vis_len, noncontig)
    "fp32-b1-after": (torch.float32, 1, 37, 4, 2, 32, 16, "after", False, 12, False),
    "fp32-b3-mixed-pad-odd-dims": (torch.float32, 3, 53, 3, 5, 24, 20, "mixed", True, 17, True),
    "fp32-b3-empty-rows-cols": (torch.float32, 3, 41, 2, 3, 16, 16, "empty", True, 11, False),
    "bf16-b2-after-pad": (torch.bfloat16, 2, 45, 4, 3, 32, 32, "after", True, 14, False),
    "bf16-b3-before-image": (torch.bfloat16, 3, 39, 3, 2, 16, 32, "before", False, 9, True),
    "fp32-b2-one-head-each": (torch.float32, 2, 29, 1, 1, 16, 16, "mixed", False, 8, False),
}


@pytest.mark.parametrize("name", list(CASES))
def test_attention_alignment_matches_reference(name):
    dtype, B, L, Ht, Hs, Dt, Ds, layout, pad, vis_len, noncontig = CASES[name]
    tm, vm, am = _masks(B, L, layout, pad, vis_len)
    tm, vm = tm.to(DEV), vm.to(DEV)
    am = am.to(DEV) if am is not None else None
    q_t, k_t, q_s, k_s, w, b = _inputs(B, L, Ht, Hs, Dt, Ds, dtype, seed=len(name))
    tol = TOL[dtype]
    upstream = 1.7  # the backward must scale by the incoming gradient

    leaves_k = [_leaf(x) for x in (q_s, k_s, w, b)]
    loss_k, focus_k = aa.attention_alignment_triton(q_t, k_t, *leaves_k[:2], tm, vm, *leaves_k[2:], am, need_focus=True)
    (loss_k * upstream).backward()

    leaves_r = [_leaf(x) for x in (q_s, k_s, w, b)]
    loss_r = ref.attention_alignment_loss(q_t, k_t, *leaves_r[:2], tm, vm, *leaves_r[2:], attention_mask=am)
    (loss_r * upstream).backward()
    focus_r = ref.text_focus(q_t, k_t, tm, vm, attention_mask=am)

    assert loss_k.shape == () and loss_k.dtype == torch.float32
    assert abs(loss_k.item() - loss_r.item()) <= tol["val"] * abs(loss_r.item()) + 1e-9, (loss_k.item(), loss_r.item())
    assert focus_k.shape == (B, L) and focus_k.dtype == torch.float32
    assert _rel(focus_k, focus_r) <= tol["val"], _rel(focus_k, focus_r)
    assert not focus_k[~vm].any(), "focus must be 0 outside the vision columns"
    for nm, lk, lr, t in zip(("dq_s", "dk_s", "dW", "db"), leaves_k, leaves_r,
                             (tol["grad_qk"], tol["grad_qk"], tol["grad"], tol["grad"])):
        assert lk.grad is not None and lk.grad.dtype == lr.grad.dtype and lk.grad.shape == lr.grad.shape, nm
        assert _rel(lk.grad, lr.grad) <= t, (nm, _rel(lk.grad, lr.grad))


@pytest.mark.parametrize("name", ["fp32-b3-mixed-pad-odd-dims", "bf16-b2-after-pad", "fp32-b3-empty-rows-cols"])
def test_given_teacher_lse_matches_reference_and_reads_only_vision_keys(name):
    """The teacher-cache path: row LSEs from the kernel's pass 1 (vs the reference), then loss, focus and every
    gradient from q_t + LSE with every non-vision teacher key replaced by noise, vs the reference on the true keys."""
    dtype, B, L, Ht, Hs, Dt, Ds, layout, pad, vis_len, noncontig = CASES[name]
    tm, vm, am = _masks(B, L, layout, pad, vis_len)
    tm, vm = tm.to(DEV), vm.to(DEV)
    am = am.to(DEV) if am is not None else None
    q_t, k_t, q_s, k_s, w, b = _inputs(B, L, Ht, Hs, Dt, Ds, dtype, seed=len(name) + 1, noncontig=noncontig)
    tol = TOL[dtype]
    lse_k = aa.attention_row_lse_triton(q_t, k_t, tm, am)
    lse_r = ref.attention_row_lse(q_t, k_t, tm, attention_mask=am)
    fin = torch.isfinite(lse_r)
    assert lse_k.shape == (B, Ht, L) and torch.equal(torch.isfinite(lse_k), fin) and fin.any()
    assert _rel(lse_k[fin], lse_r[fin]) <= 1e-5
    noise = torch.where(vm[:, None, :, None], k_t, (torch.randn(k_t.shape) * 9.0).to(dtype).to(DEV))

    leaves_k = [_leaf(x) for x in (q_s, k_s, w, b)]
    loss_k, focus_k = aa.attention_alignment_triton(q_t, noise, *leaves_k[:2], tm, vm, *leaves_k[2:], am,
                                                    need_focus=True, teacher_lse=lse_k)
    loss_k.backward()
    leaves_r = [_leaf(x) for x in (q_s, k_s, w, b)]
    loss_r, focus_r = ref.attention_alignment_and_focus(q_t, k_t, *leaves_r[:2], tm, vm, *leaves_r[2:],
                                                        attention_mask=am)
    loss_r.backward()
    assert abs(loss_k.item() - loss_r.item()) <= tol["val"] * abs(loss_r.item()) + 1e-9, (loss_k.item(), loss_r.item())
    assert _rel(focus_k, focus_r) <= tol["val"]
    assert _rel(aa.text_focus_triton(q_t, noise, tm, vm, am, teacher_lse=lse_k), focus_r) <= tol["val"]
    for nm, lk, lr, t in zip(("dq_s", "dk_s", "dW", "db"), leaves_k, leaves_r,
                             (tol["grad_qk"], tol["grad_qk"], tol["grad"], tol["grad"])):
        assert _rel(lk.grad, lr.grad) <= t, (nm, _rel(lk.grad, lr.grad))


def test_gpu_block_config_at_real_head_dim_and_student_heads(monkeypatch):
    """The bf16 config a GPU gets (pick_config(interpret=False): 64-wide LSE/dk blocks, 64-key dq sweep, 8 student
    heads per program) run here at D=128 and Hs=16, i.e. two head groups, with padding; Ht=8 and 40 vision tokens
    keep the interpreter at ~30 s. The other tests use the interpreter's small blocks."""
    real = _lse.pick_config(128, 128, 16, torch.bfloat16, interpret=False)
    assert real.hs_group == 8 and real.lse_m == 64 and real.al_kn == 64
    monkeypatch.setattr(_lse, "CONFIG_OVERRIDE", dict(real.__dict__))
    B, L, Ht, Hs, D, nv, prompt = 2, 120, 8, 16, 128, 40, 35
    g = torch.Generator().manual_seed(0)
    q_t, k_t, q_s, k_s = ((torch.randn(B, H, L, D, generator=g) * 1.5).to(torch.bfloat16).to(DEV)
                          for H in (Ht, Ht, Hs, Hs))
    am = torch.zeros(B, L, dtype=torch.bool)
    vm, tm = torch.zeros_like(am), torch.zeros_like(am)
    for b in range(B):
        n = L - 37 * b
        am[b, :n], vm[b, prompt:prompt + nv], tm[b, prompt + nv:n] = True, True, True
    am, vm, tm = am.to(DEV), vm.to(DEV), tm.to(DEV)
    w, bias = (torch.randn(Hs, Ht, generator=g) / Ht).to(DEV), (torch.randn(Hs, generator=g) * 0.01).to(DEV)
    lk = [_leaf(x) for x in (q_s, k_s, w, bias)]
    loss, focus = aa.attention_alignment_triton(q_t, k_t, *lk[:2], tm, vm, *lk[2:], am, need_focus=True)
    loss.backward()
    lr = [_leaf(x) for x in (q_s, k_s, w, bias)]
    r_loss, r_focus = ref.attention_alignment_and_focus(q_t, k_t, *lr[:2], tm, vm, *lr[2:], attention_mask=am)
    r_loss.backward()
    tol = TOL[torch.bfloat16]
    assert abs(loss.item() - r_loss.item()) <= tol["val"] * abs(r_loss.item()), (loss.item(), r_loss.item())
    assert _rel(focus, r_focus) <= tol["val"]
    for nm, a, b, t in zip(("dq_s", "dk_s", "dW", "db"), lk, lr, (tol["grad_qk"],) * 2 + (tol["grad"],) * 2):
        assert _rel(a.grad, b.grad) <= t, (nm, _rel(a.grad, b.grad))


def test_empty_pair_set_gives_zero_loss_and_zero_grads():
    B, L = 2, 30
    vm = torch.zeros(B, L, dtype=torch.bool)
    vm[:, 10:20] = True
    tm = torch.zeros(B, L, dtype=torch.bool)
    tm[:, :10] = True  # text only before the image: no (text, vision, j < i) pair
    q_t, k_t, q_s, k_s, w, b = _inputs(B, L, 2, 2, 16, 16, torch.float32, seed=3)
    leaves = [_leaf(x) for x in (q_s, k_s, w, b)]
    loss, focus = aa.attention_alignment_triton(q_t, k_t, leaves[0], leaves[1], tm.to(DEV), vm.to(DEV), leaves[2],
                                                leaves[3], need_focus=True)
    assert loss.item() == 0.0 and not focus.any()
    loss.backward()
    for x in leaves:
        assert x.grad is not None and not x.grad.any()
    # and a batch with no vision token at all
    loss2, _ = aa.attention_alignment_triton(q_t, k_t, _leaf(q_s), _leaf(k_s), tm.to(DEV),
                                             torch.zeros_like(vm).to(DEV), w, b)
    assert loss2.item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_text_focus_only_matches_reference(dtype):
    B, L, Ht = 3, 43, 4
    tm, vm, am = _masks(B, L, "mixed", True, 13)
    q_t, k_t, *_ = _inputs(B, L, Ht, 2, 32, 16, dtype, seed=11)
    tm, vm, am = tm.to(DEV), vm.to(DEV), am.to(DEV)
    f_k = aa.text_focus_triton(q_t, k_t, tm, vm, am)
    loss, f_k2 = aa.attention_alignment_triton(q_t, k_t, None, None, tm, vm, None, None, am, need_focus=True,
                                               need_loss=False)
    assert loss is None
    f_r = ref.text_focus(q_t, k_t, tm, vm, attention_mask=am)
    assert f_k.shape == (B, L) and f_k.dtype == torch.float32
    assert _rel(f_k, f_r) <= 1e-5, _rel(f_k, f_r)
    assert torch.equal(f_k, f_k2)
    # the focus is a sum of probabilities: per sample, sum_j F = (number of text rows after some vision col) * mass
    assert (f_k >= 0).all()


def test_partial_requires_grad_and_no_grad():
    B, L = 2, 33
    tm, vm, _ = _masks(B, L, "after", False, 10)
    tm, vm = tm.to(DEV), vm.to(DEV)
    q_t, k_t, q_s, k_s, w, b = _inputs(B, L, 3, 2, 16, 16, torch.float32, seed=5)
    qs = _leaf(q_s)
    loss, focus = aa.attention_alignment_triton(q_t, k_t, qs, k_s, tm, vm, w, b)
    assert focus is None
    loss.backward()
    qr = _leaf(q_s)
    ref.attention_alignment_loss(q_t, k_t, qr, k_s, tm, vm, w, b).backward()
    assert _rel(qs.grad, qr.grad) <= 1e-4
    with torch.no_grad():
        l2, _ = aa.attention_alignment_triton(q_t, k_t, q_s, k_s, tm, vm, w, b)
    assert abs(l2.item() - loss.item()) <= 1e-6 * abs(loss.item())
    wl = _leaf(w)  # only the adapter trains
    l3, _ = aa.attention_alignment_triton(q_t, k_t, q_s, k_s, tm, vm, wl, b)
    l3.backward()
    wr = _leaf(w)
    ref.attention_alignment_loss(q_t, k_t, q_s, k_s, tm, vm, wr, b).backward()
    assert _rel(wl.grad, wr.grad) <= 1e-4


def test_dispatch_backend_triton_reaches_these_kernels():
    """kernels' public API with backend="triton" runs these entry points (same numbers as calling them directly)."""
    import kernels

    B, L = 2, 35
    tm, vm, am = _masks(B, L, "after", True, 9)
    tm, vm, am = tm.to(DEV), vm.to(DEV), am.to(DEV)
    q_t, k_t, q_s, k_s, w, b = _inputs(B, L, 3, 2, 16, 16, torch.float32, seed=2)
    loss_d, focus_d = kernels.attention_alignment_and_focus(q_t, k_t, q_s, k_s, tm, vm, w, b, am, backend="triton")
    loss_k, focus_k = aa.attention_alignment_triton(q_t, k_t, q_s, k_s, tm, vm, w, b, am, need_focus=True)
    assert loss_d.item() == loss_k.item() and torch.equal(focus_d, focus_k)
    assert torch.equal(kernels.text_focus(q_t, k_t, tm, vm, am, backend="triton"), focus_k)
    f_t, f_s = torch.randn(B, 5, 24).to(DEV), torch.randn(B, 5, 16).to(DEV)
    pw, pb = torch.randn(16, 24).to(DEV), torch.randn(16).to(DEV)
    idx = torch.tensor([[0, 0], [4, 1]]).to(DEV)
    got = kernels.projection_kd_loss(f_t, f_s, pw, pb, idx, backend="triton")
    want = pk.projection_kd_triton(f_t, f_s, pw, pb, idx)
    assert all(x.item() == y.item() for x, y in zip(got, want))


def test_memory_contract_no_attention_map_or_teacher_slice(monkeypatch):
    """The host side of the Triton path allocates nothing of size B*H*L*L or B*Ht*|text|*|vision|.

    Shapes are chosen so that both forbidden sizes exceed the student's gradient (B*Hs*L*Ds), the largest thing the
    path may allocate; kernels are replaced by no-ops so this runs in milliseconds.
    """
    B, L, Ht, Hs, Dt, Ds = 2, 96, 8, 2, 16, 16
    tm, vm, am = _masks(B, L, "after", True, 24)
    nt, nv = int(tm.sum(1).max()), int(vm.sum(1).max())
    forbidden = min(B * Hs * L * L, B * Ht * nt * nv)
    budget = B * Hs * L * Ds
    assert budget < forbidden
    q_t, k_t, q_s, k_s, w, b = _inputs(B, L, Ht, Hs, Dt, Ds, torch.float32, seed=1)
    for name in ("_align_kernel", "_dk_kernel"):
        monkeypatch.setattr(aa, name, NoLaunch())
    monkeypatch.setattr(_lse, "_row_lse_kernel", NoLaunch())
    leaves = [_leaf(x) for x in (q_s, k_s, w, b)]
    log = AllocLog()
    with log:
        loss, _ = aa.attention_alignment_triton(q_t, k_t, leaves[0], leaves[1], tm.to(DEV), vm.to(DEV), leaves[2],
                                                leaves[3], am.to(DEV), need_focus=True)
        loss.backward()
    biggest = max(log.sizes, key=lambda s: s[2])
    assert biggest[2] <= budget, biggest
    extra = sum(n for f, s, n in log.sizes if n > B * L) - 2 * budget  # minus the two q/k gradients
    assert extra <= 4 * B * (Ht + Hs) * L + B * Hs * nv * Ds, (extra, log.sizes)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("d", [64, 128])
def test_configs_fit_consumer_gpu_shared_memory(dtype, d):
    cfg = _lse.pick_config(d, d, 16, dtype, interpret=False)
    est = _lse.smem_estimate(cfg, d, d, torch.finfo(dtype).bits // 8)
    assert max(est.values()) <= _lse.SMEM_LIMIT, est
    c = pk._cfg(interpret=False)  # projection kernels: fp32 operands in the worst case
    assert (c["fm"] + c["fn"]) * c["fk"] * 4 * c["stages"] <= _lse.SMEM_LIMIT
    assert (c["bs"] + c["bt"]) * c["bm"] * 4 * c["stages"] + c["bm"] * c["bs"] * 4 <= _lse.SMEM_LIMIT


@pytest.mark.slow
def test_kernels_compile_offline_for_rtx3090_and_h100_within_shared_memory():
    """Every kernel, at the real shapes and in bf16 and fp32, compiles to a cubin for sm_86 (RTX 3090; 4090 is sm_89,
    same 99 KB limit) and sm_90 (H100) with at most 99 KB of shared memory (real metadata, not the estimates).
    Runs `python -m kernels._offline_compile` in a fresh process without the interpreter; no GPU needed."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "kernels._offline_compile", "--sm", "86", "--sm", "90"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode == 3:
        pytest.skip(proc.stdout.strip() or proc.stderr.strip()[-500:])
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "fits" in proc.stdout and proc.stdout.count("_align_kernel") >= 4, proc.stdout


PROJ = {
    # name: (feature dtype, adapter dtype, B, N, d_t, d_s, focus)
    "fp32-b1-nofocus": (torch.float32, torch.float32, 1, 21, 40, 24, None),
    "fp32-b3-focus-repeats": (torch.float32, torch.float32, 3, 19, 36, 20, "repeat"),
    "bf16-feat-fp32-adapter-b2": (torch.bfloat16, torch.float32, 2, 17, 48, 24, "plain"),
    "bf16-all-b2": (torch.bfloat16, torch.bfloat16, 2, 23, 32, 40, "repeat"),
}


@pytest.mark.parametrize("name", list(PROJ))
def test_projection_kd_matches_reference(name):
    fdt, wdt, B, N, DT, DS, focus = PROJ[name]
    g = torch.Generator().manual_seed(7)
    f_t = torch.randn(B, N, DT, generator=g).to(fdt).to(DEV)
    f_s = torch.randn(B, N, DS, generator=g).to(fdt).to(DEV)
    w = (torch.randn(DS, DT, generator=g) / DT ** 0.5).to(wdt).to(DEV)
    b = (torch.randn(DS, generator=g) * 0.1).to(wdt).to(DEV)
    idx = None
    if focus is not None:
        idx = torch.randint(0, N, (B, 6), generator=g)
        if focus == "repeat":
            idx[:, 1] = idx[:, 0]
            idx[0, 2] = idx[0, 0]
        idx = idx.to(DEV)
    tol = TOL[fdt]
    lk = [_leaf(x) for x in (f_s, w, b)]
    la_k, lf_k = pk.projection_kd_triton(f_t, lk[0], lk[1], lk[2], idx)
    lr = [_leaf(x) for x in (f_s, w, b)]
    la_r, lf_r = ref.projection_kd_loss(f_t, lr[0], lr[1], lr[2], focus_idx=idx)
    assert abs(la_k.item() - la_r.item()) <= tol["val"] * abs(la_r.item()), (la_k.item(), la_r.item())
    if idx is None:
        assert lf_r is None or float(lf_r) == 0.0
        (1.3 * la_k).backward()
        (1.3 * la_r).backward()
    else:
        assert abs(lf_k.item() - lf_r.item()) <= tol["val"] * abs(lf_r.item()), (lf_k.item(), lf_r.item())
        (1.3 * la_k + 0.7 * lf_k).backward()
        (1.3 * la_r + 0.7 * lf_r).backward()
    for nm, a, r, t in zip(("df_s", "dW", "db"), lk, lr, (tol["grad_qk"], tol["grad"], tol["grad"])):
        assert a.grad is not None and a.grad.dtype == r.grad.dtype, nm
        assert _rel(a.grad, r.grad) <= t, (nm, _rel(a.grad, r.grad))
