"""The frozen teacher: MobileVLM V2-7B in 4-bit NF4 with double quantization (or bf16), loaded tensor by tensor.

How it is built (`load_teacher`):
1. The module tree is built on the meta device (no weights allocated).
2. For NF4, transformers' own bitsandbytes integration (`replace_with_bnb_linear`, the function `from_pretrained`
   uses for `quantization_config=BitsAndBytesConfig(...)`) swaps every `nn.Linear` that is not on the skip list for
   a `bnb.nn.Linear4bit` (nf4, double quant, compute dtype bf16), still on meta. The skip list is
   `["lm_head", "model.mm_projector", "model.vision_tower"]`: a user list *replaces* transformers' defaults, so
   `lm_head` must be named, and patterns match by module path, so the projector and CLIP are named by their full
   prefix. The swap is verified afterwards (every decoder linear quantized, nothing under a skipped prefix).
3. The checkpoint's keys are checked first (strict: missing/unexpected keys raise `KeyError` naming them, as in
   `MobileVLM.from_pretrained`), then tensors are streamed one at a time: a decoder linear weight becomes a
   `bnb.nn.Params4bit` that is quantized on the target device as it is moved there (on CUDA the bf16 copy goes to the
   GPU and is quantized there); everything else (lm_head, embeddings, norms, projector, CLIP) is cast to
   `compute_dtype` (bf16) and placed. The trainer passes `lm_head.weight` (a plain bf16 tensor) to the logit-KD loss.

Host memory: the model is never materialized in bf16 on the host. With device="cuda" the host holds one checkpoint
tensor at a time (`.bin` and safetensors files are memory-mapped, so their pages are reclaimable page cache, not
process memory) and nothing else of the model; with device="cpu" it also holds the result. `quant="bf16"` streams the
same way. `model_bytes` counts parameters plus quantization state; README, 'Measured', has the sizes of the 7B
teacher. On a CPU with AVX512-bf16 only, bitsandbytes repacks each Linear4bit for its CPU kernel at the first
forward, which changes `model_bytes` slightly.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator, Literal

import torch
from torch import nn

from .checkpoint import (
    IGNORED_SUFFIXES,
    check_keys,
    clip_nested,
    restore_buffers,
    from_official,
    iter_tensors,
    weight_files,
)
from .config import MobileVLMConfig
from .mobilevlm import MobileVLM

SKIP_MODULES = ["lm_head", "model.mm_projector", "model.vision_tower"]
DECODER_PREFIX = "model.layers."


def teacher_bnb_config(compute_dtype: torch.dtype = torch.bfloat16):
    """The teacher's BitsAndBytesConfig: NF4, double quantization, lm_head/projector/CLIP kept unquantized."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=list(SKIP_MODULES))


def _skipped(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in SKIP_MODULES)


def swap_to_4bit(model: nn.Module, compute_dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Replace the decoder's nn.Linear layers by bnb Linear4bit (on meta; weights are placed later) and verify it."""
    import bitsandbytes as bnb
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear

    config = teacher_bnb_config(compute_dtype)
    # keywords only: the positional order differs between transformers 4.x and 5.x
    model = replace_with_bnb_linear(model, modules_to_not_convert=config.llm_int8_skip_modules,
                                    quantization_config=config)
    wrong, kept = [], []
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            if _skipped(name) or not name.startswith(DECODER_PREFIX):
                wrong.append(name)
        elif type(module) is nn.Linear and name.startswith(DECODER_PREFIX):
            kept.append(name)
    if wrong or kept:
        raise RuntimeError("4-bit swap did not follow the skip list "
                           f"{SKIP_MODULES}: quantized {wrong[:5]}, left unquantized {kept[:5]}")
    return model


def _checkpoint_keys(files: list[Path]) -> list[str]:
    """Key names without reading tensor data (safetensors header; memory-mapped torch .bin)."""
    keys = []
    for f in files:
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(f), framework="pt") as sf:
                keys.extend(sf.keys())
        else:
            keys.extend(torch.load(f, map_location="cpu", weights_only=True, mmap=True).keys())
    return keys


def _place(model: nn.Module, name: str, value: torch.Tensor, device: torch.device, dtype: torch.dtype,
           copy: bool = False) -> None:
    """Put one checkpoint tensor into the meta-built model; a Params4bit is quantized as it moves to `device`.
    copy=True never aliases `value` (an in-memory source model); otherwise a tensor already on `device` in `dtype`
    (a memory-mapped bf16 checkpoint on CPU) is used as is."""
    import bitsandbytes as bnb

    mod_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(mod_name)
    if leaf in module._parameters:
        old = module._parameters[leaf]
        if tuple(old.shape) != tuple(value.shape):
            raise ValueError(f"{name}: checkpoint shape {tuple(value.shape)} != model shape {tuple(old.shape)}")
        if isinstance(old, bnb.nn.Params4bit):
            kw = {k: v for k, v in old.__dict__.items() if k not in ("quant_state", "bnb_quantized")}
            # .to(device) on a not-yet-quantized Params4bit quantizes it there (on the GPU for device='cuda')
            new = bnb.nn.Params4bit(value.to(device=device, dtype=dtype), requires_grad=False, **kw).to(device)
        else:
            t = value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype, copy=copy)
            new = nn.Parameter(t, requires_grad=False)
        module._parameters[leaf] = new
    elif leaf in module._buffers:
        module._buffers[leaf] = value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype,
                                         copy=copy)
    else:
        raise KeyError(f"{name} is neither a parameter nor a buffer of the model")


def _materialize(model: MobileVLM, items: Iterable[tuple[str, torch.Tensor]], device: torch.device,
                 dtype: torch.dtype, copy: bool = False) -> MobileVLM:
    for name, tensor in items:
        _place(model, name, tensor, device, dtype, copy)
        del tensor
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise RuntimeError(f"parameters left unloaded: {still_meta[:8]}")
    restore_buffers(model, device)
    model.requires_grad_(False)
    return model.eval()


def _build_meta(config: MobileVLMConfig, vision_tower, quant: str, compute_dtype: torch.dtype) -> MobileVLM:
    if quant not in ("nf4", "bf16"):
        raise ValueError(f"quant must be 'nf4' or 'bf16', not {quant!r}")
    with torch.device("meta"):
        model = MobileVLM(config, vision_tower=vision_tower)
    if quant == "nf4":
        swap_to_4bit(model, compute_dtype)
    return model


def load_teacher(path: str | Path, quant: Literal["nf4", "bf16"] = "nf4", vision_tower: str | Path | None = None,
                 device: str | torch.device = "cuda", compute_dtype: torch.dtype = torch.bfloat16) -> MobileVLM:
    """The frozen, eval-mode teacher from an official MobileVLM V2 checkpoint folder.

    quant="nf4": decoder linears in 4-bit NF4 with double quantization, computing in `compute_dtype`; lm_head,
    embeddings, norms, LDPv2 projector and CLIP in `compute_dtype`. quant="bf16": every floating tensor in
    `compute_dtype` (bf16 by default; pass torch.float16 on GPUs without bf16). See the module docstring for memory.
    """
    folder = Path(path)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder} has no config.json: not a MobileVLM V2 checkpoint folder")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("load_teacher(device='cuda') but CUDA is not available; pass device='cpu'")
    config = MobileVLMConfig.from_file(folder / "config.json")
    with torch.device("meta"):
        expected = set(MobileVLM(config, vision_tower=vision_tower).state_dict())  # the official tree, before the swap
    model = _build_meta(config, vision_tower, quant, compute_dtype)
    nested = clip_nested(model)
    files = weight_files(folder)
    found = {from_official(k, nested) for k in _checkpoint_keys(files) if not k.endswith(IGNORED_SUFFIXES)}
    check_keys(expected, found, folder)

    def stream() -> Iterator[tuple[str, torch.Tensor]]:
        for key, tensor in iter_tensors(files):
            if not key.endswith(IGNORED_SUFFIXES):
                yield from_official(key, nested), tensor

    return _materialize(model, stream(), device, compute_dtype)


def quantize_model(source: MobileVLM, quant: Literal["nf4", "bf16"] = "nf4", vision_tower: str | Path | None = None,
                   device: str | torch.device | None = None,
                   compute_dtype: torch.dtype = torch.bfloat16) -> MobileVLM:
    """A frozen teacher copy of an in-memory MobileVLM, built exactly as `load_teacher` builds it from files (the
    source is left untouched). Used by the fidelity benchmark and tests; needs the source's config to resolve its
    CLIP config (pass `vision_tower` if it was built from a CLIP folder). Nothing is shared with the source: the
    unquantized tensors are copied, so both can be measured and used independently."""
    device = torch.device(device) if device is not None else source.device
    model = _build_meta(source.config, vision_tower, quant, compute_dtype)
    state = source.state_dict()
    with torch.device("meta"):
        expected = set(MobileVLM(source.config, vision_tower=vision_tower).state_dict())
    check_keys(expected, set(state), Path("<in-memory model>"))
    return _materialize(model, ((k, v.detach()) for k, v in state.items()), device, compute_dtype, copy=True)


def _quant_state_tensors(qs, out: list[torch.Tensor]) -> None:
    for v in vars(qs).values():
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif type(v).__name__ == "QuantState":
            _quant_state_tensors(v, out)


def model_bytes(model: nn.Module) -> int:
    """Bytes of parameters plus bitsandbytes quant state (absmax, nested absmax, code tables, offsets); buffers
    (rotary inv_freq, position ids) are not counted. Each tensor is counted once."""
    seen: set[int] = set()
    tensors: list[torch.Tensor] = []
    for p in model.parameters():
        tensors.append(p)
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            _quant_state_tensors(qs, tensors)
    total = 0
    for t in tensors:
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


__all__ = ["SKIP_MODULES", "load_teacher", "model_bytes", "quantize_model", "swap_to_4bit", "teacher_bnb_config"]
