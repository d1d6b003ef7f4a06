"""Helpers shared by the benchmarks: real MobileVLM V2 shapes with seeded random weights, synthetic batches, versions.

Nothing here downloads anything: the models are built from their configs directly on the target device.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from data import Collator  # noqa: E402
from data.constants import BOS_TOKEN_ID, IGNORE_INDEX, IMAGE_SIZE, IMAGE_TOKEN_INDEX, NUM_IMAGE_TOKENS  # noqa: E402
from model import MobileVLM, MobileVLMConfig, tiny_config  # noqa: E402
from model.vision import OFFICIAL_CLIP_336  # noqa: E402

# v1-like sample layout (tokens): BOS + system prompt + " USER:" before the image, then turns of a question
# (unsupervised, ends with " ASSISTANT:") and an answer (supervised) until the sequence is full.
PROMPT, QUESTION, ANSWER = 35, 32, 96


def student_config() -> MobileVLMConfig:
    """MobileVLM V2-1.7B: MobileLLaMA-1.4B (24 layers, d 2048, 16 heads, FFN 5632, eps 1e-6) + CLIP-336 + LDPv2."""
    return MobileVLMConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
                           num_key_value_heads=16, max_position_embeddings=2048, rms_norm_eps=1e-6, vocab_size=32000,
                           mm_hidden_size=1024, mm_vision_tower=OFFICIAL_CLIP_336, torch_dtype="bfloat16")


def teacher_config() -> MobileVLMConfig:
    """MobileVLM V2-7B: Vicuna-7B v1.5 (32 layers, d 4096, 32 heads, FFN 11008, eps 1e-5) + CLIP-336 + LDPv2."""
    return MobileVLMConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5, vocab_size=32000,
                           mm_hidden_size=1024, mm_vision_tower=OFFICIAL_CLIP_336, torch_dtype="bfloat16")


def tiny_configs() -> tuple[MobileVLMConfig, MobileVLMConfig]:
    """(student, teacher) of the same structure with tiny widths and one tiny CLIP config. The teacher's widths are
    multiples of 64 (bitsandbytes' NF4 block size), which its CPU 4-bit kernel needs; head dim 16 in both."""
    return (tiny_config(hidden_size=64, num_layers=2, num_heads=4, vocab_size=512),
            tiny_config(hidden_size=128, num_layers=3, num_heads=8, vocab_size=512))


@torch.no_grad()
def random_model(config: MobileVLMConfig, device: str | torch.device, seed: int = 0,
                 dtype: torch.dtype = torch.bfloat16) -> MobileVLM:
    """Seeded N(0, 0.02) weights (the LLaMA initializer range; biases 0, norms 1), built directly on `device` in
    `dtype` (no full-precision copy is ever made). Returned frozen and in eval mode; callers unfreeze what trains."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = MobileVLM(config)
    finally:
        torch.set_default_dtype(old)
    g = torch.Generator(device=device).manual_seed(seed)
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv2d)):
            module.weight.normal_(0.0, 0.02, generator=g)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
    return model.requires_grad_(False).eval()


def v1_like_sample(L: int, vocab_size: int, g: torch.Generator) -> dict:
    """One dataset sample whose spliced length is exactly L: PROMPT tokens, the image placeholder (144 tokens once
    spliced), then question/answer turns (QUESTION unsupervised + ANSWER supervised tokens) up to L."""
    n_ids = L - NUM_IMAGE_TOKENS + 1
    if n_ids < PROMPT + 1 + QUESTION + 1:
        raise ValueError(f"length {L} is too short: needs at least {PROMPT + NUM_IMAGE_TOKENS + QUESTION + 1} tokens "
                         f"({PROMPT} prompt + {NUM_IMAGE_TOKENS} image + a {QUESTION}-token question + an answer)")
    ids = torch.randint(3, vocab_size, (n_ids,), generator=g)
    ids[0] = BOS_TOKEN_ID
    ids[PROMPT] = IMAGE_TOKEN_INDEX
    labels = torch.full_like(ids, IGNORE_INDEX)
    pos = PROMPT + 1
    while pos < n_ids:
        a0 = min(pos + QUESTION, n_ids)
        a1 = min(a0 + ANSWER, n_ids)
        labels[a0:a1] = ids[a0:a1]
        pos = a1
    image = torch.randn(3, IMAGE_SIZE, IMAGE_SIZE, generator=g).clamp_(-2.0, 2.0)
    return {"input_ids": ids, "labels": labels, "image": image, "id": f"synthetic-{L}"}


def make_batch(B: int, L: int, vocab_size: int, seed: int = 0) -> dict:
    """A collated batch as the trainer's DataLoader yields it (CPU tensors; the step moves them to the device)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + L * 31 + B)
    return Collator()([v1_like_sample(L, vocab_size, g) for _ in range(B)])


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"torch": torch.__version__, "cuda": torch.version.cuda}
    for name, dist in (("transformers", "transformers"), ("bitsandbytes", "bitsandbytes"), ("triton", "triton"),
                       ("liger_kernel", "liger-kernel"), ("peft", "peft")):
        try:
            out[name] = version(dist)
        except PackageNotFoundError:
            out[name] = None
    return out


def gib(n: float | int | None) -> float | None:
    return None if n is None else n / 2**30


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# bf16 dense tensor-core peaks (TFLOP/s, no sparsity), by device name; anything else needs --peak-tflops
PEAK_BF16_TFLOPS = (
    (("H100",), ("HBM3", "SXM"), ("PCIE", "NVL"), 989.0),  # H100 SXM5 ("NVIDIA H100 80GB HBM3")
    (("H200",), (), ("NVL",), 989.0),                      # H200 SXM: the same GH100 tensor cores as H100 SXM
    (("RTX 4090",), (), ("LAPTOP",), 165.0),
    (("RTX 3090",), (), ("LAPTOP",), 71.0),
)


def peak_tflops_for(name: str) -> float | None:
    """The bf16 dense peak of a known GPU name, or None (then the caller must be given --peak-tflops)."""
    up = name.upper()
    for must, any_of, none_of, tflops in PEAK_BF16_TFLOPS:
        if all(m in up for m in must) and (not any_of or any(a in up for a in any_of)) \
                and not any(n in up for n in none_of):
            return tflops
    return None


def write_report(path: Path, report: dict) -> None:
    """A benchmark's JSON (its folder made first)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
