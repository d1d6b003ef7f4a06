"""kernels.reference against naive, fully materialized computations written independently here.

The naive versions build every [B, H, L, L] attention map with masks assembled by explicit loops, walk the pair set
E = {(b, i, j): text i, vision j, j < i} one pair at a time, and compute KL from full logits with torch.log_softmax.
They run in float64 from the same (possibly bf16-rounded) input values.

Tolerances (relative: ||ref - naive|| / ||naive||):
- fp32 inputs: values 1e-5, gradients 1e-4 (fp32 vs float64 rounding only).
- bf16 inputs: values 1e-5 (both sides do the math in >= fp32 on the same bf16 values); gradients of bf16 leaves
  2e-2 (autograd returns them in bf16: a rounding of 2^-8 = 4e-3 per element), of fp32 leaves (adapters) 1e-4.
"""
from __future__ import annotations

import math

import pytest
import torch

import kernels.reference as ref

# --------------------------------------------------------------------------------------------------------------------
# helpers


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    nb = b.norm()
    return float((a - b).norm() / nb) if nb > 0 else float(a.norm())


def _leaf(x, dtype=None):
    x = x.detach().clone()
    if dtype is not None:
        x = x.to(dtype)
    return x.requires_grad_(True)


def naive_probs(q, k, attention_mask):
    """Full [B, H, L, L] softmax attention in float64 with a causal + key-padding mask built by loops."""
    B, H, L, D = q.shape
    allowed = torch.zeros(B, L, L, dtype=torch.bool)
    for b in range(B):
        for i in range(L):
            for j in range(L):
                allowed[b, i, j] = j <= i and (attention_mask is None or bool(attention_mask[b, j]))
    s = torch.einsum("bhid,bhjd->bhij", q.double(), k.double()) / math.sqrt(D)
    row_ok = allowed.any(-1)[:, None, :, None]  # a row with no valid key (left padding) has P = 0
    s = torch.where(allowed[:, None], s, torch.full_like(s, float("-inf")))
    s = torch.where(row_ok, s, torch.zeros_like(s))  # keep NaN out of the backward
    return torch.softmax(s, dim=-1) * row_ok


def naive_pairs(text_mask, vision_mask):
    B, L = text_mask.shape
    return [(b, i, j) for b in range(B) for i in range(L) for j in range(L)
            if text_mask[b, i] and vision_mask[b, j] and j < i]


def naive_attention_loss(q_t, k_t, q_s, k_s, tm, vm, w, bias, am):
    p_t = naive_probs(q_t.detach(), k_t.detach(), am)
    p_s = naive_probs(q_s, k_s, am)
    pairs = naive_pairs(tm, vm)
    Hs = q_s.shape[1]
    total = torch.zeros((), dtype=torch.float64)
    for b, i, j in pairs:
        target = w.double() @ p_t[b, :, i, j] + bias.double()  # [Hs]
        total = total + ((target - p_s[b, :, i, j]) ** 2).sum()
    return total / max(len(pairs) * Hs, 1), len(pairs)


def naive_focus(q_t, k_t, tm, vm, am):
    p_t = naive_probs(q_t, k_t, am)
    B, Ht, L, _ = p_t.shape
    f = torch.zeros(B, L, dtype=torch.float64)
    for b, i, j in naive_pairs(tm, vm):
        f[b, j] += p_t[b, :, i, j].sum() / Ht
    return f


def random_masks(B, L, seed, pad=True, layout="random"):
    """text/vision/attention masks. random: scattered masks; spliced: prompt, image block, text after it (+ before)."""
    g = torch.Generator().manual_seed(seed)
    tm = torch.zeros(B, L, dtype=torch.bool)
    vm = torch.zeros(B, L, dtype=torch.bool)
    am = torch.ones(B, L, dtype=torch.bool)
    for b in range(B):
        n_valid = L - int(torch.randint(0, L // 4, (1,), generator=g)) if pad else L
        am[b, n_valid:] = False
        if layout == "random":
            vm[b] = torch.rand(L, generator=g) < 0.3
            tm[b] = (torch.rand(L, generator=g) < 0.5) & ~vm[b]
        else:
            start = int(torch.randint(1, 5, (1,), generator=g))
            n_vis = int(torch.randint(3, 8, (1,), generator=g))
            vm[b, start:start + n_vis] = True
            tm[b, start + n_vis:n_valid] = True  # text after the image
            tm[b, 1:start] = bool(b % 2)  # and, for odd samples, text before it
    if pad:
        left = min(2, L // 4)
        am[-1, :left] = False  # the last sample also has left padding (keys that are never valid)
    return tm, vm, (am if pad else None)


def qk(B, H, L, D, seed, dtype=torch.float32, scale=1.5):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, L, D, generator=g) * scale).to(dtype), (torch.randn(B, H, L, D, generator=g) *
                                                                       scale).to(dtype)


def adapter(Hs, Ht, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(Hs, Ht, generator=g) / Ht, torch.randn(Hs, generator=g) * 0.05


# --------------------------------------------------------------------------------------------------------------------
# attention alignment + text focus

ATT_CASES = {
    # name: (dtype, B, L, Ht, Hs, D_t, D_s, layout, pad)
    "fp32-random-pad-Ht>Hs": (torch.float32, 3, 19, 4, 2, 8, 16, "random", True),
    "fp32-spliced-text-before-after": (torch.float32, 2, 21, 3, 5, 16, 8, "spliced", False),
    "fp32-spliced-pad": (torch.float32, 3, 18, 2, 2, 8, 8, "spliced", True),
    "bf16-random-pad": (torch.bfloat16, 2, 17, 4, 3, 16, 8, "random", True),
    "bf16-spliced": (torch.bfloat16, 2, 20, 2, 4, 8, 16, "spliced", True),
}


@pytest.mark.parametrize("name", list(ATT_CASES))
def test_attention_alignment_matches_naive(name):
    dtype, B, L, Ht, Hs, Dt, Ds, layout, pad = ATT_CASES[name]
    tm, vm, am = random_masks(B, L, seed=len(name), pad=pad, layout=layout)
    q_t, k_t = qk(B, Ht, L, Dt, 1, dtype)
    q_s, k_s = qk(B, Hs, L, Ds, 2, dtype)
    w, bias = adapter(Hs, Ht, 3)

    leaves = [_leaf(x) for x in (q_s, k_s, w, bias)]
    qt_leaf = _leaf(q_t)  # teacher must not get a gradient
    loss = ref.attention_alignment_loss(qt_leaf, k_t, *leaves[:2], tm, vm, *leaves[2:], attention_mask=am)
    (loss * 1.3).backward()

    nleaves = [_leaf(x) for x in (q_s, k_s, w, bias)]
    nloss, n_pairs = naive_attention_loss(q_t, k_t, *nleaves[:2], tm, vm, *nleaves[2:], am)
    (nloss * 1.3).backward()

    assert n_pairs > 0
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert _rel(loss, nloss) <= 1e-5, (loss.item(), nloss.item())
    assert qt_leaf.grad is None
    bf16 = dtype == torch.bfloat16
    for nm, a, b, tol in zip(("q_s", "k_s", "W", "b"), leaves, nleaves, (2e-2 if bf16 else 1e-4,) * 2 + (1e-4,) * 2):
        assert a.grad is not None and a.grad.dtype == a.dtype, nm
        assert b.grad.norm() > 0, nm  # the naive side has a real gradient: the comparison means something
        assert _rel(a.grad, b.grad) <= tol, (nm, _rel(a.grad, b.grad))


@pytest.mark.parametrize("name", ["fp32-random-pad-Ht>Hs", "bf16-random-pad", "fp32-spliced-text-before-after"])
def test_text_focus_matches_naive(name):
    dtype, B, L, Ht, Hs, Dt, Ds, layout, pad = ATT_CASES[name]
    tm, vm, am = random_masks(B, L, seed=len(name), pad=pad, layout=layout)
    q_t, k_t = qk(B, Ht, L, Dt, 4, dtype)
    f = ref.text_focus(q_t, k_t, tm, vm, attention_mask=am)
    nf = naive_focus(q_t, k_t, tm, vm, am)
    assert f.shape == (B, L) and f.dtype == torch.float32
    assert nf.norm() > 0
    assert _rel(f, nf) <= 1e-5
    assert not f[~vm].any()
    # the one-pass variant returns the same loss and focus
    q_s, k_s = qk(B, Hs, L, Ds, 5, dtype)
    w, bias = adapter(Hs, Ht, 6)
    loss2, f2 = ref.attention_alignment_and_focus(q_t, k_t, q_s, k_s, tm, vm, w, bias, attention_mask=am)
    assert torch.equal(f2, f)
    assert loss2.item() == ref.attention_alignment_loss(q_t, k_t, q_s, k_s, tm, vm, w, bias, attention_mask=am).item()


def test_empty_pair_set_gives_zero_loss_with_zero_grads():
    B, L, H, D = 2, 12, 2, 8
    vm = torch.zeros(B, L, dtype=torch.bool)
    vm[:, 5:9] = True
    tm = torch.zeros(B, L, dtype=torch.bool)
    tm[:, 1:5] = True  # text only before the image: no (text i, vision j < i) pair
    assert naive_pairs(tm, vm) == []
    q_t, k_t = qk(B, H, L, D, 7)
    q_s, k_s = qk(B, H, L, D, 8)
    w, bias = adapter(H, H, 9)
    leaves = [_leaf(x) for x in (q_s, k_s, w, bias)]
    loss, focus = ref.attention_alignment_and_focus(q_t, k_t, *leaves[:2], tm, vm, *leaves[2:])
    assert loss.item() == 0.0 and not focus.any()
    loss.backward()
    for x in leaves:
        assert x.grad is not None and not x.grad.any()
    # no text rows at all, and no vision columns at all
    for tm2, vm2 in ((torch.zeros_like(tm), vm), (tm, torch.zeros_like(vm))):
        leaves = [_leaf(x) for x in (q_s, k_s, w, bias)]
        loss = ref.attention_alignment_loss(q_t, k_t, *leaves[:2], tm2, vm2, *leaves[2:])
        loss.backward()
        assert loss.item() == 0.0 and all(x.grad is not None and not x.grad.any() for x in leaves)


def test_padded_keys_get_no_probability():
    """A padded vision key is still in E (masks define E) but has P = 0, so its pair contributes bias^2."""
    B, L, H, D = 1, 10, 1, 4
    tm = torch.zeros(B, L, dtype=torch.bool)
    vm = torch.zeros(B, L, dtype=torch.bool)
    vm[0, 2:4] = True
    tm[0, 4:6] = True
    am = torch.ones(B, L, dtype=torch.bool)
    am[0, 3] = False  # the second vision key is padding
    q_t, k_t = qk(B, H, L, D, 10)
    q_s, k_s = qk(B, H, L, D, 11)
    w = torch.ones(1, 1)
    bias = torch.tensor([0.25])
    loss = ref.attention_alignment_loss(q_t, k_t, q_s, k_s, tm, vm, w, bias, attention_mask=am)
    nloss, n = naive_attention_loss(q_t, k_t, q_s, k_s, tm, vm, w, bias, am)
    assert n == 4 and _rel(loss, nloss) <= 1e-6
    p_s = naive_probs(q_s, k_s, am)
    assert (p_s[0, 0, :, 3] == 0).all()


def naive_row_lse(q, k, row_mask, attention_mask):
    """[B, H, L] float64 log-sum-exp over the causal, valid keys of each row in row_mask, by loops; -inf elsewhere."""
    B, H, L, D = q.shape
    out = torch.full((B, H, L), float("-inf"), dtype=torch.float64)
    for b in range(B):
        for i in range(L):
            keys = [j for j in range(i + 1) if attention_mask is None or bool(attention_mask[b, j])]
            if row_mask[b, i] and keys:
                s = torch.einsum("hd,hjd->hj", q[b, :, i].double(), k[b, :, keys].double()) / math.sqrt(D)
                out[b, :, i] = torch.logsumexp(s, -1)
    return out


@pytest.mark.parametrize("name", ["fp32-random-pad-Ht>Hs", "bf16-spliced", "fp32-spliced-text-before-after"])
def test_row_lse_and_given_teacher_lse_read_only_the_vision_keys(name):
    """attention_row_lse equals a naive loop; given it, the losses, focus and gradients equal the plain ones even
    when every non-vision teacher key is replaced by noise (what the teacher cache relies on)."""
    dtype, B, L, Ht, Hs, Dt, Ds, layout, pad = ATT_CASES[name]
    tm, vm, am = random_masks(B, L, seed=len(name), pad=pad, layout=layout)
    q_t, k_t = qk(B, Ht, L, Dt, 12, dtype)
    q_s, k_s = qk(B, Hs, L, Ds, 13, dtype)
    w, bias = adapter(Hs, Ht, 14)
    lse = ref.attention_row_lse(q_t, k_t, tm, attention_mask=am)
    want = naive_row_lse(q_t, k_t, tm, am)
    assert lse.shape == (B, Ht, L) and lse.dtype == torch.float32
    fin = torch.isfinite(want)
    assert torch.equal(torch.isfinite(lse), fin) and fin.any() and (~fin).any()
    assert _rel(lse[fin], want[fin]) <= 1e-6
    noise = torch.where(vm[:, None, :, None], k_t, torch.randn_like(k_t.float()).to(dtype) * 9.0)
    leaves = [[_leaf(x) for x in (q_s, k_s, w, bias)] for _ in range(2)]
    outs = [ref.attention_alignment_and_focus(q_t, k_t, *leaves[0][:2], tm, vm, *leaves[0][2:], attention_mask=am),
            ref.attention_alignment_and_focus(q_t, noise, *leaves[1][:2], tm, vm, *leaves[1][2:], attention_mask=am,
                                              teacher_lse=lse)]
    for (loss, _), lv in zip(outs, leaves):
        loss.backward()
    assert outs[0][0].item() > 0 and _rel(outs[1][0], outs[0][0]) <= 1e-5
    assert _rel(outs[1][1], outs[0][1]) <= 1e-5
    assert _rel(ref.text_focus(q_t, noise, tm, vm, am, teacher_lse=lse), outs[0][1]) <= 1e-5
    for a, b in zip(leaves[1], leaves[0]):
        assert _rel(a.grad, b.grad) <= 1e-4
    # the noise matters without the LSE: the check above is not vacuous
    assert _rel(ref.text_focus(q_t, noise, tm, vm, am), outs[0][1]) > 1e-2


# --------------------------------------------------------------------------------------------------------------------
# projection KD


@pytest.mark.parametrize("fdtype,wdtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                           (torch.bfloat16, torch.bfloat16)])
def test_projection_kd_matches_naive(fdtype, wdtype):
    g = torch.Generator().manual_seed(12)
    B, N, DT, DS, K = 3, 11, 20, 12, 4
    f_t = torch.randn(B, N, DT, generator=g).to(fdtype)
    f_s = torch.randn(B, N, DS, generator=g).to(fdtype)
    w = (torch.randn(DS, DT, generator=g) / DT ** 0.5).to(wdtype)
    bias = (torch.randn(DS, generator=g) * 0.1).to(wdtype)
    idx = torch.randint(0, N, (B, K), generator=g)
    idx[0, 1] = idx[0, 0]  # a repeated index counts twice
    leaves = [_leaf(x) for x in (f_s, w, bias)]
    ft_leaf = _leaf(f_t)
    la, lf = ref.projection_kd_loss(ft_leaf, *leaves, focus_idx=idx)
    (la + 2.0 * lf).backward()

    nl = [_leaf(x) for x in (f_s, w, bias)]
    fs_, w_, b_ = (x.double() for x in nl)
    ft = f_t.double()
    n_all = torch.zeros((), dtype=torch.float64)
    for b in range(B):
        for n in range(N):
            n_all = n_all + ((ft[b, n] @ w_.t() + b_ - fs_[b, n]) ** 2).sum()
    n_all = n_all / (B * N * DS)
    n_foc = torch.zeros((), dtype=torch.float64)
    for b in range(B):
        for kk in range(K):
            n = int(idx[b, kk])
            n_foc = n_foc + ((ft[b, n] @ w_.t() + b_ - fs_[b, n]) ** 2).sum()
    n_foc = n_foc / (B * K * DS)
    (n_all + 2.0 * n_foc).backward()

    assert la.dtype == torch.float32 and lf.dtype == torch.float32
    assert _rel(la, n_all) <= 1e-5 and _rel(lf, n_foc) <= 1e-5, (la.item(), n_all.item(), lf.item(), n_foc.item())
    assert ft_leaf.grad is None
    for nm, a, b in zip(("f_s", "W", "b"), leaves, nl):
        tol = 2e-2 if a.dtype == torch.bfloat16 else 1e-4
        assert a.grad is not None and a.grad.dtype == a.dtype
        assert _rel(a.grad, b.grad) <= tol, (nm, _rel(a.grad, b.grad))


def test_projection_kd_without_focus_returns_zero_focus_term():
    f_t, f_s = torch.randn(2, 5, 6), torch.randn(2, 5, 4)
    w, bias = torch.randn(4, 6), torch.randn(4)
    la, lf = ref.projection_kd_loss(f_t, f_s, w, bias)
    assert lf.item() == 0.0 and lf.dtype == torch.float32
    assert abs(la.item() - ((f_t @ w.t() + bias - f_s) ** 2).mean().item()) <= 1e-6 * la.item()


# --------------------------------------------------------------------------------------------------------------------
# logit KD


def naive_kl(h_s, w_s, h_t, w_t, kind, T):
    ls = torch.log_softmax((h_s.double() @ w_s.double().t()) / T, dim=-1)
    lt = torch.log_softmax((h_t.double() @ w_t.double().t()) / T, dim=-1)
    rows = []
    for n in range(h_s.shape[0]):  # row by row, to keep this independent of the vectorized reference
        if kind == "forward":
            rows.append((lt[n].exp() * (lt[n] - ls[n])).sum())
        else:
            rows.append((ls[n].exp() * (ls[n] - lt[n])).sum())
    return torch.stack(rows).mean()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["forward", "reverse"])
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_logit_kd_matches_naive(dtype, kind, T):
    g = torch.Generator().manual_seed(13)
    N, DS, DT, V = 9, 12, 20, 50
    h_s = (torch.randn(N, DS, generator=g) * 2).to(dtype)
    w_s = (torch.randn(V, DS, generator=g) / 2).to(dtype)
    h_t = (torch.randn(N, DT, generator=g) * 2).to(dtype)
    w_t = (torch.randn(V, DT, generator=g) / 2).to(dtype)
    leaves = [_leaf(h_s), _leaf(w_s)]
    t_leaves = [_leaf(h_t), _leaf(w_t)]
    loss = ref.logit_kd_loss(*leaves, *t_leaves, kind=kind, temperature=T)
    loss.backward()
    nleaves = [_leaf(h_s), _leaf(w_s)]
    nloss = naive_kl(*nleaves, h_t, w_t, kind, T)
    nloss.backward()
    assert loss.dtype == torch.float32 and nloss.item() > 0.05
    assert _rel(loss, nloss) <= 1e-5, (loss.item(), nloss.item())
    assert all(x.grad is None for x in t_leaves)
    for a, b in zip(leaves, nleaves):
        assert _rel(a.grad, b.grad) <= (2e-2 if dtype == torch.bfloat16 else 1e-4)


def test_logit_kd_forward_and_reverse_differ_and_temperature_matters():
    g = torch.Generator().manual_seed(14)
    h_s, w_s, h_t, w_t = (torch.randn(6, 8, generator=g) * 2, torch.randn(30, 8, generator=g),
                          torch.randn(6, 8, generator=g) * 2, torch.randn(30, 8, generator=g))
    fwd = ref.logit_kd_loss(h_s, w_s, h_t, w_t, "forward").item()
    rev = ref.logit_kd_loss(h_s, w_s, h_t, w_t, "reverse").item()
    hot = ref.logit_kd_loss(h_s, w_s, h_t, w_t, "forward", temperature=4.0).item()
    assert abs(fwd - rev) > 1e-3 * fwd and hot < fwd
    # identical student and teacher: zero divergence
    assert abs(ref.logit_kd_loss(h_s, w_s, h_s, w_s, "reverse").item()) < 1e-5


def test_logit_kd_no_rows_is_zero_and_backpropagates():
    h_s = _leaf(torch.zeros(0, 4))
    w_s = _leaf(torch.randn(10, 4))
    loss = ref.logit_kd_loss(h_s, w_s, torch.zeros(0, 6), torch.randn(10, 6))
    loss.backward()
    assert loss.item() == 0.0 and w_s.grad is not None and not w_s.grad.any()
