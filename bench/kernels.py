"""Benchmark of the Align-KD loss kernels on one CUDA GPU (not a test).

    python bench/kernels.py                      # L = 1024, 2048; B = 1, 4; writes bench/results/kernels.json
    python bench/kernels.py --sweep              # also time a few alternative block configs of the fused kernels

In one run on the same GPU it measures forward + backward time (median of CUDA-event timings) and the peak extra
memory (max allocated during forward + backward minus what was allocated before: the inputs) of
- fused:     the Triton kernels (kernels/attention_alignment.py), loss only, and loss + text focus in one call;
- reference: kernels.reference.attention_alignment_loss (the plain-PyTorch spec: fp32 scores of every text row
             against every key, [B, H, |text|, L], for both models, with autograd through the student's);
- torch-alt: the best plain-PyTorch alternative written here: layer 0 only, text rows only, the teacher's LSE from
             the SDPA flash op (private, wrapped with a fallback) and its text x vision slice materialized, the
             student's text-row scores [B, Hs, |text|, L] materialized for autograd;
and the same for the projection KD (fused vs reference) at the real adapter shape (4096 -> 2048, 144 tokens).
Shapes are MobileVLM V2's layer 0: teacher 32 heads, student 16 heads, head dim 128, bf16 q/k, 144 vision tokens
after a 35-token prompt, text after the image, right padding (sample b is 97*b tokens shorter).
The "extra" memory includes the gradients the call returns (q_s and k_s: 2 x B*16*L*128 bf16); "extra-grads"
subtracts them. Prints a table with ratios (reference / fused, torch-alt / fused) and writes JSON with the device,
torch / triton / CUDA versions and the date. Refuses to run without CUDA: no numbers are made up.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

HT, HS, D, NV, PROMPT = 32, 16, 128, 144, 35


# --------------------------------------------------------------------------------------------------------------------
# inputs


def make_inputs(B, L, device, dtype=torch.bfloat16, ht=HT, hs=HS, d=D, nv=NV, prompt=PROMPT, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)

    def qk(H):
        return (torch.randn(B, H, L, d, device=device, generator=g) * 1.5).to(dtype)

    q_t, k_t, q_s, k_s = qk(ht), qk(ht), qk(hs), qk(hs)
    am = torch.zeros(B, L, dtype=torch.bool, device=device)
    vm = torch.zeros_like(am)
    tm = torch.zeros_like(am)
    for b in range(B):
        n = max(L - 97 * b, prompt + nv + 1)
        am[b, :n] = True
        vm[b, prompt: prompt + nv] = True
        tm[b, prompt + nv: n] = True
    w = torch.randn(hs, ht, device=device, generator=g) / ht
    bias = torch.randn(hs, device=device, generator=g) * 0.01
    return dict(q_t=q_t, k_t=k_t, q_s=q_s, k_s=k_s, text_mask=tm, vision_mask=vm, attention_mask=am, weight=w,
                bias=bias)


# --------------------------------------------------------------------------------------------------------------------
# the best plain-PyTorch alternative


def _compact(mask):
    """[B, L] bool -> positions [B, N] (padded with 0) and valid [B, N]."""
    n = mask.sum(1)
    nmax = max(int(n.max()), 1)
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :nmax]
    valid = torch.arange(nmax, device=mask.device)[None, :] < n[:, None]
    return order, valid


def _right_padded(am):
    """True when every sample's valid keys are a prefix (then causal LSE == causal + padding LSE on valid rows)."""
    return bool((am.long().cumsum(1) == torch.arange(1, am.shape[1] + 1, device=am.device)[None, :]
                 .clamp(max=am.sum(1, keepdim=True))).all())


def teacher_lse(q, k, am, rows):
    """Natural-log LSE [B, H, N] of the rows `rows` [B, N]: the SDPA flash op's LSE (private op, causal, no mask) when
    the batch is right-padded and the op is there and agrees with an explicit check; else an explicit chunked one."""
    B, H, L, Dh = q.shape
    idx = rows[:, None, :].expand(B, H, rows.shape[1])
    if q.is_cuda and (am is None or _right_padded(am)):
        try:
            out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, k, 0.0, True, False,
                                                                     scale=1.0 / math.sqrt(Dh))
            lse = out[1].float()
            i = rows[0, -1:]  # one row, explicit check (guards a changed private op)
            s = (q[:1, :, i].float() @ k[:1, :, : int(i) + 1].float().transpose(-1, -2)) / math.sqrt(Dh)
            if torch.allclose(lse[:1, :, i], torch.logsumexp(s, -1), rtol=1e-3, atol=1e-3):
                return lse.gather(2, idx)
        except (RuntimeError, AttributeError, TypeError):
            pass
    out = []
    for h0 in range(0, H, 4):  # chunk over heads to bound the memory
        qh = q[:, h0: h0 + 4].float().gather(2, idx[:, h0: h0 + 4, :, None].expand(-1, -1, -1, Dh))
        s = qh @ k[:, h0: h0 + 4].float().transpose(-1, -2) / math.sqrt(Dh)
        keep = torch.arange(L, device=q.device)[None, None, None, :] <= rows[:, None, :, None]
        if am is not None:
            keep = keep & am[:, None, None, :]
        out.append(torch.logsumexp(s.masked_fill(~keep, float("-inf")), -1))
    return torch.cat(out, 1)


def torch_alternative(q_t, k_t, q_s, k_s, text_mask, vision_mask, weight, bias, attention_mask=None):
    """L_attn in plain PyTorch: layer 0 only, text rows only, materialized text x vision slices."""
    B, Ht, L, Dt = q_t.shape
    Hs, Ds = q_s.shape[1], q_s.shape[3]
    trow, tval = _compact(text_mask)
    vcol, vval = _compact(vision_mask)
    e = tval[:, :, None] & vval[:, None, :] & (vcol[:, None, :] < trow[:, :, None])  # [B, NT, NV]
    key_ok = None if attention_mask is None else attention_mask.gather(1, vcol)  # [B, NV]
    with torch.no_grad():
        lse_t = teacher_lse(q_t, k_t, attention_mask, trow)  # [B, Ht, NT]
        qt = q_t.gather(2, trow[:, None, :, None].expand(B, Ht, -1, Dt)).float()
        kt = k_t.gather(2, vcol[:, None, :, None].expand(B, Ht, -1, Dt)).float()
        p_t = torch.exp(qt @ kt.transpose(-1, -2) / math.sqrt(Dt) - lse_t[..., None])  # [B, Ht, NT, NV]
        ok = e if key_ok is None else e & key_ok[:, None, :]
        p_t = torch.where(ok[:, None], p_t, torch.zeros_like(p_t))  # padded rows may have lse = -inf
    qs = q_s.gather(2, trow[:, None, :, None].expand(B, Hs, -1, Ds)).float()
    s = qs @ k_s.float().transpose(-1, -2) / math.sqrt(Ds)  # [B, Hs, NT, L]
    keep = torch.arange(L, device=q_s.device)[None, :] <= trow[:, :, None]
    if attention_mask is not None:
        keep = keep & attention_mask[:, None, :]
    s = s.masked_fill(~keep[:, None], float("-inf"))
    lse_s = torch.logsumexp(s, -1, keepdim=True)
    lse_s = torch.where(torch.isfinite(lse_s), lse_s, torch.zeros_like(lse_s))
    p_s = torch.exp(s.gather(3, vcol[:, None, None, :].expand(B, Hs, s.shape[2], -1)) - lse_s)
    p_s = torch.where(ok[:, None], p_s, torch.zeros_like(p_s))
    mix = torch.einsum("st,btij->bsij", weight.float(), p_t) + bias.float()[None, :, None, None]
    n = e.sum() * Hs
    return ((mix - p_s) ** 2 * e[:, None]).sum() / n.clamp(min=1)


# --------------------------------------------------------------------------------------------------------------------
# measuring


def measure(fn, leaves, iters, warmup=3):
    """fn() -> loss (or tuple of losses); returns (median ms, peak extra bytes, grad bytes) or an error string."""
    def step():
        for x in leaves:
            x.grad = None
        out = fn()
        loss = sum(out) if isinstance(out, (tuple, list)) else out
        loss.backward()

    try:
        for _ in range(warmup):
            step()
        torch.cuda.synchronize()
        for x in leaves:
            x.grad = None
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        grad_bytes = sum(x.grad.numel() * x.grad.element_size() for x in leaves if x.grad is not None)
        times = []
        for _ in range(iters):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        for x in leaves:
            x.grad = None
        return statistics.median(times), peak, grad_bytes
    except torch.cuda.OutOfMemoryError:
        for x in leaves:
            x.grad = None
        torch.cuda.empty_cache()
        return "OOM"


def bench_attention(B, L, iters, methods):
    inp = make_inputs(B, L, "cuda")
    leaves = {k: inp[k].detach().clone().requires_grad_(True) for k in ("q_s", "k_s", "weight", "bias")}
    args = {**inp, **leaves}
    rows = {}
    for name, fn in methods.items():
        res = measure(lambda fn=fn: fn(**args), list(leaves.values()), iters)
        rows[name] = res
    return rows


def bench_projection(B, iters):
    import kernels.reference as ref
    from kernels.projection_kd import projection_kd_triton

    g = torch.Generator(device="cuda").manual_seed(B)
    f_t = torch.randn(B, NV, 4096, device="cuda", generator=g).to(torch.bfloat16)
    f_s = torch.randn(B, NV, 2048, device="cuda", generator=g).to(torch.bfloat16).requires_grad_(True)
    w = (torch.randn(2048, 4096, device="cuda", generator=g) / 64).requires_grad_(True)
    bias = torch.zeros(2048, device="cuda").requires_grad_(True)
    idx = torch.randint(0, NV, (B, 16), device="cuda", generator=g)
    leaves = [f_s, w, bias]
    return {
        "fused": measure(lambda: projection_kd_triton(f_t, f_s, w, bias, idx), leaves, iters),
        "reference": measure(lambda: ref.projection_kd_loss(f_t, f_s, w, bias, focus_idx=idx), leaves, iters),
    }


def _fmt(res):
    if isinstance(res, str):
        return f"{res:>9s} {'':>9s} {'':>11s}"
    ms, peak, grads = res
    return f"{ms:9.3f} {peak / 2 ** 20:9.1f} {(peak - grads) / 2 ** 20:11.1f}"


def _ratio(a, b):
    if isinstance(a, str) or isinstance(b, str):
        return "   -  "
    return f"{a[0] / b[0]:6.2f}x"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "kernels.json"))
    ap.add_argument("--sweep", action="store_true", help="also time alternative block configs of the fused kernels")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/kernels.py needs a CUDA GPU and none is visible (torch.cuda.is_available() is False); "
                 "it measures GPU kernels and reports nothing without one.")
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("bench/kernels.py: unset TRITON_INTERPRET; the interpreter's timings mean nothing")

    import triton

    import kernels.reference as ref
    from kernels import _lse
    from kernels.attention_alignment import attention_alignment_triton

    def fused(**a):
        return attention_alignment_triton(a["q_t"], a["k_t"], a["q_s"], a["k_s"], a["text_mask"], a["vision_mask"],
                                          a["weight"], a["bias"], a["attention_mask"])[0]

    def fused_focus(**a):
        return attention_alignment_triton(a["q_t"], a["k_t"], a["q_s"], a["k_s"], a["text_mask"], a["vision_mask"],
                                          a["weight"], a["bias"], a["attention_mask"], need_focus=True)[0]

    def reference(**a):
        return ref.attention_alignment_loss(a["q_t"], a["k_t"], a["q_s"], a["k_s"], a["text_mask"],
                                            a["vision_mask"], a["weight"], a["bias"],
                                            attention_mask=a["attention_mask"])

    def alternative(**a):
        return torch_alternative(**a)

    methods = {"fused": fused, "fused+focus": fused_focus, "reference": reference, "torch-alt": alternative}
    dev = torch.cuda.get_device_properties(0)
    meta = {
        "device": torch.cuda.get_device_name(0),
        "sm": f"{dev.major}.{dev.minor}",
        "memory_gib": round(dev.total_memory / 2 ** 30, 1),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "shapes": dict(Ht=HT, Hs=HS, D=D, vision=NV, prompt=PROMPT, dtype="bfloat16"),
        "iters": args.iters,
    }
    print(f"# {meta['device']} (sm {meta['sm']}, {meta['memory_gib']} GiB), torch {meta['torch']}, "
          f"triton {meta['triton']}, CUDA {meta['cuda']}, {meta['date']}")

    # sanity: the three implementations agree on one small batch before anything is timed
    chk = make_inputs(2, 512, "cuda")
    l_f, l_r, l_a = fused(**chk).item(), reference(**chk).item(), alternative(**chk).item()
    assert abs(l_f - l_r) <= 1e-3 * abs(l_r) and abs(l_a - l_r) <= 1e-3 * abs(l_r), (l_f, l_r, l_a)

    results = {"meta": meta, "attention_alignment": [], "projection_kd": [], "sweep": []}
    print("\nattention alignment, forward + backward")
    print(f"{'L':>5} {'B':>2} {'method':<12} {'ms':>9} {'extra MB':>9} {'extra-grads':>11} {'vs fused':>8}")
    for L in args.lengths:
        for B in args.batches:
            rows = bench_attention(B, L, args.iters, methods)
            for name, res in rows.items():
                print(f"{L:5d} {B:2d} {name:<12} {_fmt(res)} {_ratio(res, rows['fused']):>8}")
                results["attention_alignment"].append(dict(
                    L=L, B=B, method=name,
                    ms=None if isinstance(res, str) else res[0],
                    peak_extra_mb=None if isinstance(res, str) else res[1] / 2 ** 20,
                    peak_extra_minus_grads_mb=None if isinstance(res, str) else (res[1] - res[2]) / 2 ** 20,
                    error=res if isinstance(res, str) else None,
                    ratio_vs_fused=None if isinstance(res, str) or isinstance(rows["fused"], str)
                    else res[0] / rows["fused"][0]))
            torch.cuda.empty_cache()

    print("\nprojection KD (144 tokens, 4096 -> 2048, K=16), forward + backward")
    print(f"{'B':>2} {'method':<12} {'ms':>9} {'extra MB':>9} {'extra-grads':>11} {'vs fused':>8}")
    for B in args.batches:
        rows = bench_projection(B, args.iters)
        for name, res in rows.items():
            print(f"{B:2d} {name:<12} {_fmt(res)} {_ratio(res, rows['fused']):>8}")
            results["projection_kd"].append(dict(
                B=B, method=name, ms=None if isinstance(res, str) else res[0],
                peak_extra_mb=None if isinstance(res, str) else res[1] / 2 ** 20,
                error=res if isinstance(res, str) else None))

    if args.sweep:
        # each variant was compiled offline for sm_86 (python -m kernels._offline_compile style): <= 66.5 KB shared
        print("\nblock-config sweep of the fused kernels (L = max length, B = max batch); every config fits 99 KB")
        L, B = max(args.lengths), max(args.batches)
        base = _lse.pick_config(D, D, HS, torch.bfloat16)
        for over in ({}, {"al_n": 32}, {"al_m": 32, "hs_group": 4}, {"hs_group": 16}, {"hs_group": 4, "al_warps": 4},
                     {"lse_m": 128, "lse_warps": 8}, {"dk_n": 128, "dk_warps": 8}, {"dk_m": 128}, {"al_kn": 128}):
            cfg = _lse.Cfg(**{**base.__dict__, **over})
            if max(_lse.smem_estimate(cfg, D, D, 2).values()) > _lse.SMEM_LIMIT:
                continue
            _lse.CONFIG_OVERRIDE.clear()
            _lse.CONFIG_OVERRIDE.update(over)
            res = bench_attention(B, L, args.iters, {"fused": fused})["fused"]
            print(f"  {str(over):<40} {_fmt(res)}")
            results["sweep"].append(dict(override=over, ms=None if isinstance(res, str) else res[0]))
        _lse.CONFIG_OVERRIDE.clear()

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
