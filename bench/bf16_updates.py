"""How much of an AdamW update survives in bf16 weights without fp32 master copies (CPU; no GPU needed).

Same weights (N(0, 0.02), LLaMA-style init scale), same random gradients, torch AdamW for N steps: once on fp32
weights (the master-weights reference) and once on bf16 weights (each step rounded to bf16). Reports, per learning
rate, the fraction of elements the bf16 run never moved and the size of its total update relative to fp32's.

    python bench/bf16_updates.py [--steps 100] [--numel 1000000]
"""
from __future__ import annotations

import argparse
import json
import platform
from datetime import date

import torch


def run(lr: float, steps: int, numel: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(numel, generator=g) * 0.02
    masters = torch.nn.Parameter(w0.clone())
    bf16 = torch.nn.Parameter(w0.to(torch.bfloat16))
    opt32 = torch.optim.AdamW([masters], lr=lr, weight_decay=0.0)
    opt16 = torch.optim.AdamW([bf16], lr=lr, weight_decay=0.0)
    for _ in range(steps):
        grad = torch.randn(numel, generator=g) * 1e-3 + 2e-4  # noisy gradient with a consistent drift
        masters.grad, bf16.grad = grad.clone(), grad.to(torch.bfloat16)
        opt32.step(), opt16.step()
    d32 = masters.detach() - w0
    d16 = bf16.detach().float() - w0.to(torch.bfloat16).float()
    return {"lr": lr, "unchanged_fraction": float((d16 == 0).float().mean()),
            "update_norm_ratio": float(d16.norm() / d32.norm()),
            "update_direction_cosine": float(torch.nn.functional.cosine_similarity(d16, d32, dim=0))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--numel", type=int, default=1_000_000)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    rows = [run(lr, args.steps, args.numel) for lr in (2e-5, 4e-5, 2e-4, 1e-3)]
    print(f"{'lr':>8} {'bf16 never moved':>17} {'|update| bf16/fp32':>19} {'cosine':>7}")
    for r in rows:
        print(f"{r['lr']:>8.0e} {r['unchanged_fraction']:>17.3f} {r['update_norm_ratio']:>19.3f} "
              f"{r['update_direction_cosine']:>7.3f}")
    meta = {"date": date.today().isoformat(), "torch": torch.__version__, "machine": platform.processor() or
            platform.machine(), "steps": args.steps, "numel": args.numel}
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
