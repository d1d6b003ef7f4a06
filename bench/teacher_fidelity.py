"""Fidelity of the 4-bit teacher: NF4 (+ double quant) vs bf16 on the same weights and inputs (not a test).

    python bench/teacher_fidelity.py                      # random-weight MobileVLM V2-7B shapes, no download
    python bench/teacher_fidelity.py --checkpoint DIR     # a real MobileVLM V2-7B folder instead (fits on 24 GB:
                                                          # the bf16 run is done and freed before the NF4 load)

Random mode builds the real 7B shapes directly on the GPU (Vicuna-7B decoder: 32 layers, d 4096, 32 heads, FFN
11008, vocab 32000; CLIP ViT-L/14-336; LDPv2 1024 -> 4096) with seeded N(0, 0.02) weights in bf16, and derives the
NF4 teacher from it with `model.quantize.quantize_model` (the same skip list and Params4bit path as `load_teacher`).
Inputs: B samples of L tokens (default 2 x 1024), a 35-token prompt, 144 image tokens, text after the image.

Reported, NF4 against bf16 (the reference):
- KL(p_bf16 || p_nf4) of the next-token distributions, logits computed in fp32 from the final hidden states and the
  (shared, bf16) lm_head weight: mean over all positions and over the text positions after the image, max; top-1
  agreement; relative error of the final hidden states.
- the layer-0 text -> vision attention block (rows: text after the image, columns: the 144 image tokens) from the
  captured post-RoPE q/k (`enable_qk_capture`): causal softmax over each full row in fp32, then the block;
  relative Frobenius error, max abs error, and the error of the attention mass each text row puts on the image.
- weight memory: `model_bytes` (parameters + quant state) and the CUDA allocation of each model.
Caveat: random Gaussian weights are NF4's best case (its levels are normal quantiles); real checkpoints have outlier
channels, so use --checkpoint for the number that matters. Refuses to run without CUDA: no numbers are made up.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from data.constants import IMAGE_TOKEN_INDEX, NUM_IMAGE_TOKENS  # noqa: E402
from model import MobileVLM, MobileVLMConfig  # noqa: E402
from model.quantize import load_teacher, model_bytes, quantize_model  # noqa: E402
from model.vision import OFFICIAL_CLIP_336  # noqa: E402
from bench._common import random_model, write_report  # noqa: E402

PROMPT = 35


def vicuna7b_config() -> MobileVLMConfig:
    return MobileVLMConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5, vocab_size=32000,
                           mm_hidden_size=1024, mm_vision_tower=OFFICIAL_CLIP_336, torch_dtype="bfloat16")


def make_batch(vocab_size: int, B: int, L: int, seed: int = 0, prompt: int = PROMPT):
    """input_ids with one image placeholder after `prompt` tokens (spliced length exactly L), and images."""
    g = torch.Generator().manual_seed(seed)
    n_ids = L - NUM_IMAGE_TOKENS + 1
    ids = torch.randint(3, vocab_size, (B, n_ids), generator=g)
    ids[:, 0] = 1
    ids[:, prompt] = IMAGE_TOKEN_INDEX
    images = torch.randn(B, 3, 336, 336, generator=g)
    return ids, images


@torch.no_grad()
def run_teacher(model: MobileVLM, ids: torch.Tensor, images: torch.Tensor) -> dict:
    """Forward with layer-0 q/k capture; returns fp32 log-probs, hidden states, q0/k0 and the masks."""
    model.enable_qk_capture()
    dev = model.device
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    out = model(ids.to(dev), images=images.to(dev), compute_logits=False)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0
    w = model.lm_head.weight.float()
    logp = F.log_softmax(F.linear(out.hidden_states.float(), w), dim=-1)
    model.qk_capture = None
    model.model.layers[0].self_attn.qk_capture = None
    return {"logp": logp, "hidden": out.hidden_states.float(), "q0": out.q0, "k0": out.k0,
            "vision_mask": out.mm.vision_mask, "text_mask": out.mm.text_mask, "seconds": seconds}


def text_vision_attention(q: torch.Tensor, k: torch.Tensor, vision_mask: torch.Tensor,
                          text_mask: torch.Tensor) -> list[torch.Tensor]:
    """Per sample [H, |text|, |vision|]: causal softmax over each full query row in fp32, then the block."""
    blocks = []
    D = q.shape[-1]
    for b in range(q.shape[0]):
        t, v = text_mask[b].nonzero().flatten(), vision_mask[b].nonzero().flatten()
        qt = q[b][:, t].float()  # [H, T, D]
        scores = qt @ k[b].float().transpose(-1, -2) / math.sqrt(D)  # [H, T, L]
        L = k.shape[2]
        allowed = torch.arange(L, device=q.device)[None, :] <= t[:, None]
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        blocks.append(probs[:, :, v])
    return blocks


def compare(ref: dict, test: dict) -> dict:
    """Fidelity of `test` against `ref` (outputs of `run_teacher` on the same inputs)."""
    kl = F.kl_div(test["logp"], ref["logp"], log_target=True, reduction="none").sum(-1)  # [B, L]: KL(ref || test)
    text = ref["text_mask"]
    top1 = (ref["logp"].argmax(-1) == test["logp"].argmax(-1)).float()
    hid_err = (test["hidden"] - ref["hidden"]).norm() / ref["hidden"].norm()
    a_ref = text_vision_attention(ref["q0"], ref["k0"], ref["vision_mask"], ref["text_mask"])
    a_test = text_vision_attention(test["q0"], test["k0"], test["vision_mask"], test["text_mask"])
    num = sum(((x - y) ** 2).sum() for x, y in zip(a_test, a_ref))
    den = sum((y ** 2).sum() for y in a_ref)
    mass_err = max(float((x.sum(-1) - y.sum(-1)).abs().max()) for x, y in zip(a_test, a_ref))
    mass = sum(float(y.sum(-1).mean()) for y in a_ref) / len(a_ref)
    q_err = (test["q0"].float() - ref["q0"].float()).norm() / ref["q0"].float().norm()
    k_err = (test["k0"].float() - ref["k0"].float()).norm() / ref["k0"].float().norm()
    return {
        "kl_mean": float(kl.mean()), "kl_mean_text": float(kl[text].mean()), "kl_max": float(kl.max()),
        "top1_agreement": float(top1.mean()), "hidden_rel_err": float(hid_err),
        "attn_tv_rel_err": float((num / den).sqrt()),
        "attn_tv_max_abs_err": max(float((x - y).abs().max()) for x, y in zip(a_test, a_ref)),
        "attn_tv_mass_ref": mass, "attn_tv_mass_max_abs_err": mass_err,
        "q0_rel_err": float(q_err), "k0_rel_err": float(k_err),
    }


def _versions() -> dict:
    import bitsandbytes
    import transformers

    return {"torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
            "bitsandbytes": bitsandbytes.__version__}


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=None,
                    help="a MobileVLM V2 folder (official layout) instead of random weights of the 7B shapes")
    ap.add_argument("--vision-tower", type=Path, default=None, help="CLIP folder for --checkpoint (offline config)")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "teacher_fidelity.json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench/teacher_fidelity.py needs a CUDA GPU and none is visible (torch.cuda.is_available() is "
                 "False); it reports nothing without one. The CPU tests (tests/test_quantize.py) cover correctness.")
    if args.seq_len <= NUM_IMAGE_TOKENS + PROMPT:
        sys.exit(f"--seq-len must exceed {NUM_IMAGE_TOKENS + PROMPT} (prompt + image tokens)")
    dev = torch.device("cuda")
    t_start = time.perf_counter()

    mem = {}
    if args.checkpoint is None:
        source = "random N(0, 0.02) weights, MobileVLM V2-7B shapes"
        base = torch.cuda.memory_allocated(dev)
        bf16 = random_model(vicuna7b_config(), dev, args.seed)
        mem["bf16_cuda_alloc"] = torch.cuda.memory_allocated(dev) - base
        ids, images = make_batch(bf16.config.vocab_size, args.batch, args.seq_len, args.seed)
        ref = run_teacher(bf16, ids, images)
        base = torch.cuda.memory_allocated(dev)
        nf4 = quantize_model(bf16, "nf4", device=dev)
        mem["nf4_cuda_alloc"] = torch.cuda.memory_allocated(dev) - base
        mem["bf16_model_bytes"], mem["nf4_model_bytes"] = model_bytes(bf16), model_bytes(nf4)
        test = run_teacher(nf4, ids, images)
        config = bf16.config
    else:
        source = f"checkpoint {args.checkpoint}"
        base = torch.cuda.memory_allocated(dev)
        bf16 = load_teacher(args.checkpoint, "bf16", vision_tower=args.vision_tower, device=dev)
        mem["bf16_cuda_alloc"] = torch.cuda.memory_allocated(dev) - base
        mem["bf16_model_bytes"] = model_bytes(bf16)
        config = bf16.config
        ids, images = make_batch(config.vocab_size, args.batch, args.seq_len, args.seed)
        ref = run_teacher(bf16, ids, images)
        del bf16
        gc.collect()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(dev)
        nf4 = load_teacher(args.checkpoint, "nf4", vision_tower=args.vision_tower, device=dev)
        mem["nf4_cuda_alloc"] = torch.cuda.memory_allocated(dev) - base
        mem["nf4_model_bytes"] = model_bytes(nf4)
        test = run_teacher(nf4, ids, images)

    result = compare(ref, test)
    report = {
        "meta": {"bench": "teacher_fidelity", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                 "device": torch.cuda.get_device_name(dev), "capability": list(torch.cuda.get_device_capability(dev)),
                 **_versions(), "source": source, "seq_len": args.seq_len, "batch": args.batch, "seed": args.seed,
                 "vision_tokens": NUM_IMAGE_TOKENS, "prompt_tokens": PROMPT,
                 "shapes": {k: config.fields.get(k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                               "num_attention_heads", "vocab_size")},
                 "quant": "nf4 + double quant, blocksize 64, compute bf16; lm_head, projector, CLIP in bf16"},
        "fidelity": result,
        "memory": mem,
        "forward_seconds": {"bf16": ref["seconds"], "nf4": test["seconds"]},
        "wall_seconds": time.perf_counter() - t_start,
    }
    rows = [
        ("KL(bf16 || nf4), mean over positions", f"{result['kl_mean']:.3e}"),
        ("  ... text positions after the image", f"{result['kl_mean_text']:.3e}"),
        ("  ... max", f"{result['kl_max']:.3e}"),
        ("top-1 agreement", f"{result['top1_agreement']:.4f}"),
        ("final hidden states rel. error", f"{result['hidden_rel_err']:.3e}"),
        ("layer-0 q / k rel. error", f"{result['q0_rel_err']:.3e} / {result['k0_rel_err']:.3e}"),
        ("layer-0 text->vision attention rel. error", f"{result['attn_tv_rel_err']:.3e}"),
        ("  ... max abs error", f"{result['attn_tv_max_abs_err']:.3e}"),
        ("  ... image mass per text row (ref) / max abs err",
         f"{result['attn_tv_mass_ref']:.4f} / {result['attn_tv_mass_max_abs_err']:.3e}"),
        ("weights bf16: model_bytes / CUDA alloc", f"{_gib(mem['bf16_model_bytes'])} / {_gib(mem['bf16_cuda_alloc'])}"),
        ("weights nf4:  model_bytes / CUDA alloc", f"{_gib(mem['nf4_model_bytes'])} / {_gib(mem['nf4_cuda_alloc'])}"),
        ("forward s (bf16 / nf4)", f"{ref['seconds']:.3f} / {test['seconds']:.3f}"),
    ]
    m = report["meta"]
    print(f"teacher fidelity, {source}; B={args.batch}, L={args.seq_len} ({NUM_IMAGE_TOKENS} image tokens)")
    print(f"{m['device']}, torch {m['torch']} (CUDA {m['cuda']}), transformers {m['transformers']}, "
          f"bitsandbytes {m['bitsandbytes']}, {m['date']}")
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    write_report(args.out, report)
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
