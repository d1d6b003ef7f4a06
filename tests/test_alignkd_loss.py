"""AlignKDLoss and the kernels dispatch: the original code's adapter and attention-gradient defects stay fixed
(docs/original-defects.md), the fast logit/CE paths equal the plain ones, the focus set is the most attended vision
tokens, text-only samples add no vision terms, and no-distill is CE only.

The attention/projection terms run on the reference here (the Triton kernels have their own tests): every test that
uses backend "auto" first removes TRITON_INTERPRET and ALIGNKD_BACKEND from the environment, so "auto" on CPU means
the reference for attention/projection and Liger's chunked loss for the logits.

Tolerances: fp32 1e-5 (values) / 1e-4 (gradients), relative. bf16 Liger logit path against the fp32-matmul
reference: values 3e-3, gradients 5e-2 (measured up to 3e-2 at T=0.7 with logits up to ~40: the lm_head matmul runs
in bf16, so the fast path's logits are bf16-rounded, as the models' own lm_head outputs are). Against a naive fp32
softmax of the same bf16-rounded logits the fast path agrees to 2e-5 (values) and 1e-2 (bf16 gradients), which
pins down that its softmax is fp32 (a bf16 softmax is measurably further off).
"""
from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn.functional as F

import kernels
import kernels.reference as ref
from kernels import dispatch
from losses import AlignKDLoss, KDBatch, KDSide, head_average_init
from losses.terms import select_focus


@pytest.fixture
def plain_env(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("ALIGNKD_BACKEND", raising=False)


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    nb = b.norm()
    return float((a - b).norm() / nb) if nb > 0 else float(a.norm())


# --------------------------------------------------------------------------------------------------------------------
# a small synthetic batch in the spliced layout

HS, HT, DS, DT, V, NV, D = 2, 4, 12, 20, 40, 6, 8


def make_batch(specs, L=22, seed=0, dtype=torch.float32):
    """specs: per sample (vision_start or -1, n_valid). Image samples: prompt before vision_start, NV image tokens,
    then text (supervised on every other position) up to n_valid; text-only samples: supervised text everywhere."""
    g = torch.Generator().manual_seed(seed)
    B = len(specs)
    labels = torch.full((B, L), -100, dtype=torch.long)
    am = torch.zeros(B, L, dtype=torch.bool)
    vm = torch.zeros(B, L, dtype=torch.bool)
    tm = torch.zeros(B, L, dtype=torch.bool)
    has_image = torch.zeros(B, dtype=torch.bool)
    vstart = torch.full((B,), -1, dtype=torch.long)
    for b, (s, n_valid) in enumerate(specs):
        am[b, :n_valid] = True
        if s >= 0:
            has_image[b], vstart[b] = True, s
            vm[b, s:s + NV] = True
            tm[b, s + NV:n_valid] = True
            sup = torch.arange(s + NV + 1, max(n_valid, s + NV + 1), 2)
        else:
            sup = torch.arange(2, n_valid)
        labels[b, sup] = torch.randint(0, V, (len(sup),), generator=g)
    batch = KDBatch(labels=labels, attention_mask=am, vision_mask=vm, text_mask=tm, has_image=has_image,
                    vision_start=vstart)

    def side(H, d, heads, grad):
        t = [torch.randn(B, L, d, generator=g), torch.randn(V, d, generator=g) / math.sqrt(d),
             torch.randn(B, heads, L, D, generator=g) * 1.5, torch.randn(B, heads, L, D, generator=g) * 1.5,
             torch.randn(B, NV, d, generator=g)]
        t = [x.to(dtype).requires_grad_(grad) for x in t]
        return KDSide(*t)

    return side(None, DS, HS, True), side(None, DT, HT, False), batch


def make_loss(weights=None, **kw):
    torch.manual_seed(0)
    return AlignKDLoss(teacher_heads=HT, student_heads=HS, teacher_dim=DT, student_dim=DS, weights=weights, **kw)


def student_leaves(s: KDSide):
    return [s.hidden, s.lm_head_weight, s.q0, s.k0, s.vision_tokens]


# --------------------------------------------------------------------------------------------------------------------
# the attention loss reaches the student's q and k


def test_attention_loss_has_gradient_wrt_student_q_and_k():
    s, t, batch = make_batch([(3, 20), (5, 22)])
    fn = make_loss({"logit": 0.0, "proj_all": 0.0, "proj_focus": 0.0}, backend="reference")
    out = fn(s, t, batch)
    assert out["attn"].item() > 0
    out["loss"].backward()  # CE does not depend on q0/k0: their gradient is the attention term's
    text_rows = batch.text_mask[:, None, :, None].expand_as(s.q0)
    assert s.q0.grad[text_rows].abs().sum() > 0 and s.k0.grad.abs().sum() > 0
    assert not s.q0.grad[~text_rows].any()  # only text queries are aligned
    # the original code's block (vision queries, text keys) lies above the causal diagonal: nothing to learn there
    q, k = s.q0.detach().requires_grad_(), s.k0.detach().requires_grad_()
    bad = ref.attention_alignment_loss(t.q0, t.k0, q, k, batch.vision_mask, batch.text_mask, fn.attn_weight,
                                       fn.attn_bias, batch.attention_mask)
    bad.backward()
    assert bad.item() == 0.0 and not q.grad.any() and not k.grad.any()


# --------------------------------------------------------------------------------------------------------------------
# the adapters are trained


def test_optimizer_step_changes_both_adapters(plain_env):
    s, t, batch = make_batch([(3, 20), (-1, 18), (4, 22)])
    fn = make_loss()
    names = {n for n, _ in fn.named_parameters()}
    assert names == {"attn_weight", "attn_bias", "proj.weight", "proj.bias"}
    assert names <= set(fn.state_dict())
    before = {n: p.detach().clone() for n, p in fn.named_parameters()}
    opt = torch.optim.AdamW(list(fn.parameters()) + student_leaves(s), lr=1e-2)
    fn(s, t, batch)["loss"].backward()
    for n, p in fn.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
    opt.step()
    for n, p in fn.named_parameters():
        assert not torch.equal(p.detach(), before[n]), f"{n} did not change"


def test_attention_adapter_init_averages_teacher_head_groups():
    assert torch.allclose(head_average_init(2, 4), torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5]]))
    assert torch.allclose(head_average_init(2, 3), torch.tensor([[2 / 3, 1 / 3, 0.0], [0.0, 1 / 3, 2 / 3]]))
    assert torch.allclose(head_average_init(16, 32).sum(1), torch.ones(16))
    fn = make_loss()
    assert torch.equal(fn.attn_weight.detach(), head_average_init(HS, HT)) and not fn.attn_bias.any()
    assert fn.proj.weight.shape == (DS, DT) and fn.proj.bias.shape == (DS,)


# --------------------------------------------------------------------------------------------------------------------
# logit KD: the Liger path equals the reference


def _logit_inputs(dtype, N=37, seed=1):
    g = torch.Generator().manual_seed(seed)
    return ((torch.randn(N, DS, generator=g) * 3).to(dtype), torch.randn(V, DS, generator=g).to(dtype),
            (torch.randn(N, DT, generator=g) * 3).to(dtype), torch.randn(V, DT, generator=g).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind,T", [("forward", 1.0), ("reverse", 1.0), ("forward", 2.0), ("reverse", 0.7)])
def test_liger_logit_path_matches_reference(plain_env, dtype, kind, T):
    h_s, w_s, h_t, w_t = _logit_inputs(dtype)
    a = [x.clone().requires_grad_() for x in (h_s, w_s)]
    fast = kernels.logit_kd_loss(*a, h_t, w_t, kind=kind, temperature=T, chunk_rows=8)  # 4 chunks
    fast.backward()
    r = [x.clone().requires_grad_() for x in (h_s, w_s)]
    slow = ref.logit_kd_loss(*r, h_t, w_t, kind=kind, temperature=T)
    slow.backward()
    bf16 = dtype == torch.bfloat16
    assert fast.dtype == torch.float32 and slow.item() > 0.1
    assert _rel(fast, slow) <= (3e-3 if bf16 else 1e-5), (fast.item(), slow.item())
    for x, y in zip(a, r):
        assert x.grad.dtype == dtype and _rel(x.grad, y.grad) <= (5e-2 if bf16 else 1e-4)


def test_liger_logit_path_softmax_is_fp32_for_bf16_inputs(plain_env):
    """Liger's own soft loss would run log_softmax on bf16 logits; ours must equal fp32 softmax of the same logits."""
    h_s, w_s, h_t, w_t = _logit_inputs(torch.bfloat16, seed=2)
    a = [x.clone().requires_grad_() for x in (h_s, w_s)]
    fast = kernels.logit_kd_loss(*a, h_t, w_t, chunk_rows=16)
    fast.backward()
    r = [x.clone().requires_grad_() for x in (h_s, w_s)]
    ls32, lt32 = F.log_softmax((r[0] @ r[1].t()).float(), -1), F.log_softmax((h_t @ w_t.t()).float(), -1)
    want = (lt32.exp() * (lt32 - ls32)).sum(-1).mean()
    want.backward()
    with torch.no_grad():
        ls16, lt16 = F.log_softmax(h_s @ w_s.t(), -1), F.log_softmax(h_t @ w_t.t(), -1)
        bf16_softmax = (lt16.exp() * (lt16 - ls16)).float().sum(-1).mean().item()
    assert abs(fast.item() - want.item()) <= 2e-5 * abs(want.item()), (fast.item(), want.item())
    assert abs(bf16_softmax - want.item()) > 10 * 2e-5 * abs(want.item())  # the check above can tell them apart
    for x, y in zip(a, r):
        assert _rel(x.grad, y.grad) <= 1e-2


# --------------------------------------------------------------------------------------------------------------------
# chunked cross-entropy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_ce_equals_full_logits_cross_entropy(dtype):
    g = torch.Generator().manual_seed(3)
    h = (torch.randn(29, DS, generator=g) * 2).to(dtype)
    w = torch.randn(V, DS, generator=g).to(dtype)
    tgt = torch.randint(0, V, (29,), generator=g)
    tgt[[0, 5, 6]] = -100
    a = [x.clone().requires_grad_() for x in (h, w)]
    loss = kernels.chunked_cross_entropy(*a, tgt, chunk_rows=4)
    (loss * 0.7).backward()
    r = [x.clone().requires_grad_() for x in (h, w)]
    want = F.cross_entropy((r[0] @ r[1].t()).float(), tgt, ignore_index=-100)
    (want * 0.7).backward()
    tol_v, tol_g = (1e-6, 1e-5) if dtype == torch.float32 else (1e-5, 2e-2)
    assert _rel(loss, want) <= tol_v, (loss.item(), want.item())
    for x, y in zip(a, r):
        assert x.grad.dtype == dtype and _rel(x.grad, y.grad) <= tol_g
    # no valid row: zero, still differentiable
    z = kernels.chunked_cross_entropy(a[0], a[1], torch.full((29,), -100))
    z.backward()
    assert z.item() == 0.0


def test_fused_ce_and_kd_match_separate_computations(plain_env):
    h_s, w_s, h_t, w_t = _logit_inputs(torch.float32, N=21, seed=4)
    tgt = torch.randint(0, V, (21,))
    a = [x.clone().requires_grad_() for x in (h_s, w_s)]
    total, kd, ce = kernels.fused_logit_kd_and_ce(*a, h_t, w_t, tgt, kind="reverse", temperature=1.5, weight_ce=1.0,
                                                  weight_kd=0.5, chunk_rows=5)
    total.backward()
    r = [x.clone().requires_grad_() for x in (h_s, w_s)]
    ce_r = F.cross_entropy(r[0] @ r[1].t(), tgt)
    kd_r = ref.logit_kd_loss(*r, h_t, w_t, kind="reverse", temperature=1.5)
    (ce_r + 0.5 * kd_r).backward()
    assert _rel(ce, ce_r) <= 1e-5 and _rel(kd, kd_r) <= 1e-5 and _rel(total, ce_r + 0.5 * kd_r) <= 1e-5
    assert not ce.requires_grad and not kd.requires_grad
    for x, y in zip(a, r):
        assert _rel(x.grad, y.grad) <= 1e-4


# --------------------------------------------------------------------------------------------------------------------
# the whole module


def _shifted_ce(s: KDSide, batch: KDBatch):
    logits = s.hidden[:, :-1].float() @ s.lm_head_weight.float().t()  # full logits: test-only
    return F.cross_entropy(logits.reshape(-1, V), batch.labels[:, 1:].reshape(-1), ignore_index=-100)


def test_module_fast_path_equals_reference_backend_and_weights_compose(plain_env):
    kw = dict(weights={"logit": 0.5, "attn": 2.0, "proj_all": 3.0, "proj_focus": 0.25}, topk=3, kl="reverse",
              temperature=1.5)
    grads, outs = [], []
    for backend in ("auto", "reference"):
        s, t, batch = make_batch([(3, 20), (-1, 18), (4, 22)], seed=5)
        fn = make_loss(backend=backend, **kw)
        out = fn(s, t, batch)
        out["loss"].backward()
        outs.append(out)
        grads.append([x.grad for x in student_leaves(s)] + [p.grad for p in fn.parameters()])
    fast, slow = outs
    for key in ("loss", "ce", "logit", "attn", "proj_all", "proj_focus"):
        assert fast[key].shape == () and _rel(fast[key], slow[key]) <= 1e-5, key
        assert slow[key].item() > 0, key
    assert _rel(slow["ce"], _shifted_ce(s, batch)) <= 1e-5
    composed = slow["ce"] + 0.5 * slow["logit"] + 2.0 * slow["attn"] + 3.0 * slow["proj_all"] + 0.25 * slow["proj_focus"]
    assert _rel(slow["loss"], composed) <= 1e-6
    for gf, gr in zip(*grads):
        assert _rel(gf, gr) <= 1e-4


def test_focus_set_is_the_most_attended_vision_tokens():
    """Teacher layer 0 where every text query attends to a known set S of vision keys per sample."""
    L, c = 22, 4.0
    s, t, batch = make_batch([(2, 20), (4, 22)], L=L, seed=6)
    hot = {0: [1, 4, 5], 1: [0, 2, 3]}  # vision-token indices (0..NV-1) with the large keys
    q_t = torch.zeros(2, HT, L, D)
    k_t = torch.zeros(2, HT, L, D)
    q_t[..., 0] = c  # every query points along e0 ...
    for b, idx in hot.items():
        for j in idx:
            k_t[b, :, int(batch.vision_start[b]) + j, 0] = c  # ... and only the hot vision keys do too
    t = KDSide(t.hidden, t.lm_head_weight, q_t, k_t, t.vision_tokens)
    fn = make_loss(topk=3, backend="reference")
    focus = kernels.text_focus(q_t, k_t, batch.text_mask, batch.vision_mask, batch.attention_mask,
                               backend="reference")
    picked = select_focus(focus, batch.vision_start, NV, topk=3)
    assert picked.shape == (2, 3)
    for b, idx in hot.items():
        assert sorted(picked[b].tolist()) == idx
    # end to end: proj_focus is the mean over exactly those tokens
    out = fn(s, t, batch)
    with torch.no_grad():
        r2 = (fn.proj(t.vision_tokens) - s.vision_tokens) ** 2
        want = torch.stack([r2[b, idx].mean() for b, idx in hot.items()]).mean()
    assert _rel(out["proj_focus"], want) <= 1e-5


def test_text_only_samples_get_no_vision_terms():
    s, t, batch = make_batch([(3, 20), (-1, 22)], seed=7)
    fn = make_loss(backend="reference", topk=2)
    out = fn(s, t, batch)
    out["loss"].backward()
    # the text-only sample (index 1): no gradient into its vision tokens or its layer-0 q/k
    assert not s.vision_tokens.grad[1].any() and s.vision_tokens.grad[0].any()
    assert not s.q0.grad[1].any() and not s.k0.grad[1].any() and s.q0.grad[0].any()
    # and the vision terms equal those of the image sample alone
    s1, t1, b1 = make_batch([(3, 20), (-1, 22)], seed=7)
    one = lambda side: KDSide(*(x[:1] if x.dim() > 2 else x for x in  # noqa: E731
                                (side.hidden, side.lm_head_weight, side.q0, side.k0, side.vision_tokens)))
    b_one = KDBatch(*(x[:1] for x in (b1.labels, b1.attention_mask, b1.vision_mask, b1.text_mask, b1.has_image,
                                       b1.vision_start)))
    alone = fn(one(s1), one(t1), b_one)
    for key in ("attn", "proj_all", "proj_focus"):
        assert _rel(out[key], alone[key]) <= 1e-6, key
    assert abs(out["ce"].item() - alone["ce"].item()) > 1e-4  # CE does use the text-only sample


def test_batch_without_images_gives_zero_vision_terms_with_zero_grads():
    s, t, batch = make_batch([(-1, 20), (-1, 22)], seed=8)
    fn = make_loss(backend="reference")
    out = fn(s, t, batch)
    out["loss"].backward()
    for key in ("attn", "proj_all", "proj_focus"):
        assert out[key].item() == 0.0, key
    assert out["logit"].item() > 0
    for n, p in fn.named_parameters():
        assert p.grad is not None and not p.grad.any(), n


def test_image_without_following_text_counts_for_proj_all_only():
    """Sample 1's image ends the sequence: no text row after it, so it has no focus set but still a projection term."""
    L = 22
    s, t, batch = make_batch([(3, 20), (L - NV, L), (-1, 16)], L=L, seed=9)
    assert not batch.text_mask[1].any()
    fn = make_loss(backend="reference", topk=2)
    out = fn(s, t, batch)
    out["loss"].backward()
    with torch.no_grad():
        r2 = (fn.proj(t.vision_tokens) - s.vision_tokens) ** 2
        want_all = r2[:2].mean()
        focus = ref.text_focus(t.q0, t.k0, batch.text_mask, batch.vision_mask, batch.attention_mask)
        top = focus[0, 3:3 + NV].topk(2).indices
        want_focus = r2[0, top].mean()
    assert _rel(out["proj_all"], want_all) <= 1e-5
    assert _rel(out["proj_focus"], want_focus) <= 1e-5
    assert s.vision_tokens.grad[1].any() and not s.vision_tokens.grad[2].any()


def test_no_distill_is_cross_entropy_only():
    s, t, batch = make_batch([(3, 20), (-1, 18)], seed=10)
    fn = make_loss(backend="reference")
    out = fn(s, None, batch, distill=False)
    assert set(out) == {"loss", "ce", "logit", "attn", "proj_all", "proj_focus"}
    for key in ("logit", "attn", "proj_all", "proj_focus"):
        assert out[key].item() == 0.0
    want = _shifted_ce(s, batch)
    assert _rel(out["loss"], want) <= 1e-5 and _rel(out["ce"], want) <= 1e-5
    out["loss"].backward()
    assert s.hidden.grad.any() and s.lm_head_weight.grad.any()
    assert s.q0.grad is None and s.vision_tokens.grad is None
    assert all(p.grad is None for p in fn.parameters())
    with pytest.raises(ValueError):
        fn(s, None, batch, distill=True)


# --------------------------------------------------------------------------------------------------------------------
# dispatch


def test_backend_resolution_and_env(monkeypatch):
    monkeypatch.delenv("ALIGNKD_BACKEND", raising=False)
    assert dispatch.resolve_backend(None) == "auto" and dispatch.resolve_backend("reference") == "reference"
    monkeypatch.setenv("ALIGNKD_BACKEND", "reference")
    assert dispatch.resolve_backend("auto") == "reference" and dispatch.resolve_backend("triton") == "triton"
    monkeypatch.setenv("ALIGNKD_BACKEND", "fast")
    with pytest.raises(ValueError):
        dispatch.resolve_backend(None)
    with pytest.raises(ValueError):
        dispatch.resolve_backend("cuda")


def test_triton_backend_on_plain_cpu_raises(plain_env):
    s, t, batch = make_batch([(3, 20)], seed=11)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        kernels.text_focus(t.q0, t.k0, batch.text_mask, batch.vision_mask, backend="triton")


def test_missing_triton_module_falls_back_once_in_auto_and_raises_when_forced(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # CPU tensors would go to Triton ...
    monkeypatch.delenv("ALIGNKD_BACKEND", raising=False)
    monkeypatch.setitem(sys.modules, "kernels.projection_kd", None)  # ... but the module cannot be imported
    monkeypatch.setattr(dispatch, "_warned", set())
    g = torch.Generator().manual_seed(12)
    f_t, f_s, w, b = torch.randn(2, 5, 6, generator=g), torch.randn(2, 5, 4, generator=g), torch.randn(4, 6), \
        torch.randn(4)
    with pytest.warns(RuntimeWarning, match="projection_kd"):
        got = kernels.projection_kd_loss(f_t, f_s, w, b)
    want = ref.projection_kd_loss(f_t, f_s, w, b)
    assert got[0].item() == want[0].item()
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one-time: no second warning
        kernels.projection_kd_loss(f_t, f_s, w, b)
    with pytest.raises(RuntimeError, match="unavailable"):
        kernels.projection_kd_loss(f_t, f_s, w, b, backend="triton")


def test_missing_liger_falls_back_to_reference_in_auto(monkeypatch, plain_env):
    def broken():
        raise ImportError("No module named 'liger_kernel'")

    monkeypatch.setattr(dispatch, "_liger_function", broken)
    monkeypatch.setattr(dispatch, "_warned", set())
    h_s, w_s, h_t, w_t = _logit_inputs(torch.float32, N=11, seed=13)
    with pytest.warns(RuntimeWarning, match="liger"):
        got = kernels.logit_kd_loss(h_s, w_s, h_t, w_t, kind="reverse")
    assert _rel(got, ref.logit_kd_loss(h_s, w_s, h_t, w_t, kind="reverse")) <= 1e-6
    with pytest.raises(RuntimeError, match="liger"):
        kernels.logit_kd_loss(h_s, w_s, h_t, w_t, backend="triton")
    # the module keeps working on the fallback, with the same numbers as the reference backend
    s, t, batch = make_batch([(3, 20), (-1, 18)], seed=14)
    auto = make_loss()(s, t, batch)
    plain = make_loss(backend="reference")(s, t, batch)
    for key in auto:
        assert _rel(auto[key], plain[key]) <= 1e-6, key
