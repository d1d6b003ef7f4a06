"""Triton kernels vs kernels.reference at the real shapes (GPU only; conftest skips these without CUDA).

Shapes: MobileVLM V2 layer 0 - teacher Ht=32, student Hs=16, head dim 128, 144 vision tokens after a short prompt,
text after the image up to each sample's length (right padding), L up to 2,048, B up to 4; bf16 q/k as in training.

The reference materializes [B, H, L, L] maps, so it runs one sample at a time here and the per-sample losses are
recombined with weights |E_b| / |E| (the loss is a mean over all pairs of the batch); gradients add up the same way.

Tolerances (relative norms, both sides fp32 math on the same inputs):
- bf16 inputs: loss 1e-4, focus 1e-4, dW and db 1e-3, dq and dk 2e-2 (the kernels' gradient matmuls take bf16 copies
  of P * dP like flash-attention's backward, and the gradients are returned in bf16).
- fp32 inputs: loss and focus 1e-5, every gradient 1e-4 (fp32 "ieee" dots).
Peak extra memory (fwd + bwd, beyond the inputs and the returned gradients) must stay O(B * H * L): the bound below
is the sum of the LSE/delta vectors, the dk vision-slice buffer and the per-block partials, with 4 MB of slack.
"""
from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.gpu

HT, HS, D, NV, PROMPT = 32, 16, 128, 144, 35


def _rel(a, b):
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def _batch(B, L, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def qk(H):
        return (torch.randn(B, H, L, D, device="cuda", generator=g) * 1.5).to(dtype)

    q_t, k_t, q_s, k_s = qk(HT), qk(HT), qk(HS), qk(HS)
    lengths = [L - 97 * b for b in range(B)]  # right padding, different per sample
    am = torch.zeros(B, L, dtype=torch.bool, device="cuda")
    vm = torch.zeros_like(am)
    tm = torch.zeros_like(am)
    for b, n in enumerate(lengths):
        am[b, :n] = True
        vm[b, PROMPT: PROMPT + NV] = True
        tm[b, PROMPT + NV: n] = True
    w = torch.randn(HS, HT, device="cuda", generator=g) / HT
    bias = torch.randn(HS, device="cuda", generator=g) * 0.01
    return q_t, k_t, q_s, k_s, tm, vm, am, w, bias


def _pairs(tm, vm):
    cv = torch.cumsum(vm, 1) - vm.long()
    return (cv * tm).sum(1).double()  # per sample |E_b|


def _reference_by_sample(ref, q_t, k_t, q_s, k_s, tm, vm, am, w, bias):
    """Loss, focus and grads from the reference, one sample at a time (memory), recombined exactly."""
    B = q_t.shape[0]
    e = _pairs(tm, vm)
    qs, ks, wl, bl = (x.detach().clone().requires_grad_(True) for x in (q_s, k_s, w, bias))
    total, focus = 0.0, []
    for b in range(B):
        sl = slice(b, b + 1)
        with torch.no_grad():
            focus.append(ref.text_focus(q_t[sl], k_t[sl], tm[sl], vm[sl], attention_mask=am[sl]).float())
        if e[b] == 0:
            continue
        loss_b = ref.attention_alignment_loss(q_t[sl], k_t[sl], qs[sl], ks[sl], tm[sl], vm[sl], wl, bl,
                                              attention_mask=am[sl])
        weight = float(e[b] / e.sum())
        (loss_b * weight).backward()
        total += loss_b.item() * weight
        del loss_b
        torch.cuda.empty_cache()
    return total, torch.cat(focus), qs.grad, ks.grad, wl.grad, bl.grad


@pytest.mark.parametrize("B,L,dtype", [
    (1, 2048, torch.bfloat16),
    (4, 2048, torch.bfloat16),
    (2, 1024, torch.bfloat16),
    (1, 1024, torch.float32),
])
def test_attention_alignment_real_shapes(B, L, dtype):
    import kernels.reference as ref
    from kernels.attention_alignment import attention_alignment_triton

    q_t, k_t, q_s, k_s, tm, vm, am, w, bias = _batch(B, L, dtype, seed=B * L)
    leaves = [x.detach().clone().requires_grad_(True) for x in (q_s, k_s, w, bias)]
    loss, focus = attention_alignment_triton(q_t, k_t, leaves[0], leaves[1], tm, vm, leaves[2], leaves[3], am,
                                             need_focus=True)
    loss.backward()
    r_loss, r_focus, *r_grads = _reference_by_sample(ref, q_t, k_t, q_s, k_s, tm, vm, am, w, bias)
    bf16 = dtype == torch.bfloat16
    assert abs(loss.item() - r_loss) <= (1e-4 if bf16 else 1e-5) * abs(r_loss), (loss.item(), r_loss)
    assert _rel(focus, r_focus) <= (1e-4 if bf16 else 1e-5)
    tols = (2e-2, 2e-2, 1e-3, 1e-3) if bf16 else (1e-4,) * 4
    for name, leaf, rg, tol in zip(("dq_s", "dk_s", "dW", "db"), leaves, r_grads, tols):
        assert _rel(leaf.grad, rg) <= tol, (name, _rel(leaf.grad, rg))


def test_given_teacher_lse_real_shapes():
    """The teacher-cache path at real shapes: pass-1 LSEs vs the reference, and loss/focus/grads from q_t + LSE with
    noise in every non-vision teacher key vs the fused kernel on the true keys (same math: 1e-5 / 1e-3)."""
    import kernels.reference as ref
    from kernels.attention_alignment import attention_alignment_triton, attention_row_lse_triton

    q_t, k_t, q_s, k_s, tm, vm, am, w, bias = _batch(2, 2048, torch.bfloat16, seed=5)
    lse = attention_row_lse_triton(q_t, k_t, tm, am)
    for b in range(2):
        sl = slice(b, b + 1)
        want = ref.attention_row_lse(q_t[sl], k_t[sl], tm[sl], attention_mask=am[sl])
        fin = torch.isfinite(want)
        assert torch.equal(torch.isfinite(lse[sl]), fin) and _rel(lse[sl][fin], want[fin]) <= 1e-5
    noise = torch.where(vm[:, None, :, None], k_t, torch.randn_like(k_t) * 9.0)
    runs = []
    for k, given in ((k_t, None), (noise, lse)):
        leaves = [x.detach().clone().requires_grad_(True) for x in (q_s, k_s, w, bias)]
        loss, focus = attention_alignment_triton(q_t, k, leaves[0], leaves[1], tm, vm, leaves[2], leaves[3], am,
                                                 need_focus=True, teacher_lse=given)
        loss.backward()
        runs.append((loss, focus, [x.grad for x in leaves]))
    (l0, f0, g0), (l1, f1, g1) = runs
    assert abs(l1.item() - l0.item()) <= 1e-5 * abs(l0.item()) and _rel(f1, f0) <= 1e-5
    for name, a, b in zip(("dq_s", "dk_s", "dW", "db"), g1, g0):
        assert _rel(a, b) <= 1e-3, (name, _rel(a, b))


def _extra_bound(B, L, nt, nv, cfg):
    n_mb = math.ceil(nt / cfg.al_m)
    hsp = math.ceil(HS / cfg.hs_group) * cfg.hs_group
    lse_delta = B * (HT + 2 * HS) * nt * 4
    dkv = B * HS * nv * D * 4
    partials = B * n_mb * hsp * (32 + 2) * 4 + B * n_mb * nv * 4
    masks = 16 * B * L * 4  # compact lists, cumsums, focus
    return lse_delta + dkv + partials + masks + 4 * 2 ** 20


@pytest.mark.parametrize("B,L", [(1, 2048), (4, 2048)])
def test_peak_extra_memory_is_o_bhl(B, L):
    from kernels._lse import pick_config
    from kernels.attention_alignment import attention_alignment_triton

    q_t, k_t, q_s, k_s, tm, vm, am, w, bias = _batch(B, L, torch.bfloat16)
    leaves = [x.detach().clone().requires_grad_(True) for x in (q_s, k_s, w, bias)]
    attention_alignment_triton(q_t, k_t, leaves[0], leaves[1], tm, vm, leaves[2], leaves[3], am)[0].backward()  # warm
    for x in leaves:
        x.grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss, focus = attention_alignment_triton(q_t, k_t, leaves[0], leaves[1], tm, vm, leaves[2], leaves[3], am,
                                             need_focus=True)
    loss.backward()
    torch.cuda.synchronize()
    grads = sum(x.grad.numel() * x.grad.element_size() for x in leaves)
    extra = torch.cuda.max_memory_allocated() - base - grads
    nt, nv = int(tm.sum(1).max()), int(vm.sum(1).max())
    bound = _extra_bound(B, L, nt, nv, pick_config(D, D, HS, torch.bfloat16))
    forbidden = B * HT * nt * nv * 2  # the teacher's text x vision slice, even in bf16
    assert extra <= bound < forbidden, (extra / 2 ** 20, bound / 2 ** 20, forbidden / 2 ** 20)


def _compiled(fn):
    """Compiled kernels of a JITFunction (triton internals: device_caches in 3.x, cache in older versions)."""
    out = []
    try:
        caches = getattr(fn, "device_caches", None)
        if caches:
            for entry in caches.values():
                out += [k for k in entry[0].values() if hasattr(k, "metadata")]
        else:
            for per_dev in getattr(fn, "cache", {}).values():
                out += [k for k in per_dev.values() if hasattr(k, "metadata")]
    except (AttributeError, TypeError, IndexError):
        return []
    return out


def test_compiled_kernels_fit_consumer_shared_memory():
    """Every kernel compiled by the tests above (bf16 and fp32, D=128) uses at most 99 KB of shared memory."""
    from kernels import _lse, attention_alignment as aa, projection_kd as pk
    from kernels.projection_kd import projection_kd_triton

    q_t, k_t, q_s, k_s, tm, vm, am, w, bias = _batch(1, 512, torch.bfloat16)
    for dt in (torch.bfloat16, torch.float32):
        leaves = [x.detach().clone().to(dt if i < 2 else x.dtype).requires_grad_(True)
                  for i, x in enumerate((q_s, k_s, w, bias))]
        aa.attention_alignment_triton(q_t.to(dt), k_t.to(dt), leaves[0], leaves[1], tm, vm, leaves[2], leaves[3], am,
                                      need_focus=True)[0].backward()
    f_t = torch.randn(2, 144, 4096, device="cuda", dtype=torch.bfloat16)
    f_s = torch.randn(2, 144, 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    pw = torch.randn(2048, 4096, device="cuda", requires_grad=True)
    pb = torch.zeros(2048, device="cuda", requires_grad=True)
    sum(projection_kd_triton(f_t, f_s, pw, pb, torch.randint(0, 144, (2, 16), device="cuda"))).backward()
    seen = {}
    for fn in (_lse._row_lse_kernel, aa._align_kernel, aa._dk_kernel, pk._proj_fwd_kernel, pk._proj_bwd_kernel):
        for k in _compiled(fn):
            seen.setdefault(getattr(fn, "__name__", str(fn)), []).append(k.metadata.shared)
    if not seen:
        pytest.skip("this triton version does not expose compiled kernels' metadata")
    for name, sizes in seen.items():
        assert max(sizes) <= _lse.SMEM_LIMIT, (name, sizes)


@pytest.mark.parametrize("B", [1, 4])
def test_projection_kd_real_shapes(B):
    import kernels.reference as ref
    from kernels.projection_kd import projection_kd_triton

    g = torch.Generator(device="cuda").manual_seed(B)
    f_t = torch.randn(B, NV, 4096, device="cuda", generator=g).to(torch.bfloat16)
    f_s = torch.randn(B, NV, 2048, device="cuda", generator=g).to(torch.bfloat16)
    w = torch.randn(2048, 4096, device="cuda", generator=g) / 64
    bias = torch.randn(2048, device="cuda", generator=g) * 0.1
    idx = torch.randint(0, NV, (B, 16), device="cuda", generator=g)
    lk = [x.detach().clone().requires_grad_(True) for x in (f_s, w, bias)]
    la, lf = projection_kd_triton(f_t, *lk, idx)
    (la + 0.5 * lf).backward()
    lr = [x.detach().clone().requires_grad_(True) for x in (f_s, w, bias)]
    ra, rf = ref.projection_kd_loss(f_t, *lr, focus_idx=idx)
    (ra + 0.5 * rf).backward()
    assert abs(la.item() - ra.item()) <= 1e-4 * ra.item() and abs(lf.item() - rf.item()) <= 1e-4 * rf.item()
    for name, a, r, tol in zip(("df_s", "dW", "db"), lk, lr, (1e-2, 1e-4, 1e-4)):
        assert _rel(a.grad, r.grad) <= tol, (name, _rel(a.grad, r.grad))
