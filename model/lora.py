"""Optional LoRA student (`--lora-r`) through peft, on the decoder layers only.

`apply_lora` injects peft LoRA layers in place into `student.model` (the LlamaModel): the student stays the same
`MobileVLM` object, so `forward`, `lm_head`, `save_pretrained` and the layer-0 q/k capture keep working (LoRA wraps
`q_proj`/`k_proj`, not the `self_attn` module that holds `qk_capture`). Trainable afterwards: the LoRA A/B matrices
of the targeted decoder linears (kept in fp32 even in a bf16 student, peft's default for `get_peft_model`; the layer
casts its input to fp32 and its output back) and the whole LDPv2 projector; frozen: CLIP, embeddings, norms, lm_head
and the base decoder weights. `merged_state_dict` folds the adapters into the base weights under the plain layer
names, so a checkpoint has exactly the keys of a model that never had LoRA.

Why `inject_adapter_in_model(config, student.model)` and not on `student`: `get_peft_model` would wrap the model in
a `PeftModel` (another forward, other attribute paths), and on the whole `MobileVLM` peft fails anyway: it treats any
module whose `.config` has a `model_type` as a transformers model and asks it for `base_model_prefix`
(AttributeError on the plain nn.Module). `student.model` is a transformers `LlamaModel`, which peft handles
natively. The target regex is anchored at `layers.N.`, so CLIP's own `q_proj/k_proj/v_proj` (under
`vision_tower.`) are never adapted.
"""
from __future__ import annotations

import re

import torch
from torch import nn

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER = "default"


def apply_lora(student: nn.Module, r: int, alpha: float | None = None, dropout: float = 0.05,
               target: tuple[str, ...] | list[str] = DEFAULT_TARGETS) -> nn.Module:
    """Add LoRA (rank r, scale alpha / r) to the decoder linears named in `target`; the projector stays fully
    trainable. alpha defaults to 2r, as in MobileVLM's optional LoRA variant (r 128, alpha 256, merged afterwards).
    Returns the same `student`."""
    from peft import LoraConfig, inject_adapter_in_model

    if r <= 0:
        raise ValueError(f"LoRA rank must be positive, got r={r}")
    if is_lora(student):
        raise ValueError("the student already has LoRA adapters")
    target = tuple(target)
    if not target:
        raise ValueError("no LoRA target modules")
    decoder = student.model
    n_layers = len(decoder.layers)
    names = {n.rsplit(".", 1)[-1] for n, m in decoder.layers.named_modules() if isinstance(m, nn.Linear)}
    unknown = sorted(set(target) - names)
    if unknown:
        raise ValueError(f"LoRA targets {unknown} are not linear layers of the decoder (it has {sorted(names)})")
    pattern = r"layers\.\d+\.(?:self_attn|mlp)\.(?:" + "|".join(map(re.escape, target)) + r")"
    config = LoraConfig(r=r, lora_alpha=2 * r if alpha is None else alpha, lora_dropout=dropout, bias="none",
                        target_modules=pattern)
    student.requires_grad_(False)
    inject_adapter_in_model(config, decoder, adapter_name=ADAPTER)
    # as get_peft_model does by default: adapters of a bf16/fp16 model in fp32 (small; lr-2e-4 updates survive)
    from peft.tuners.tuners_utils import cast_adapter_dtype

    cast_adapter_dtype(decoder, ADAPTER, autocast_adapter_dtype=True)
    # peft marks only adapters trainable inside `decoder`; re-assert the rest explicitly
    for name, p in student.named_parameters():
        p.requires_grad_(_is_lora_param(name))
    student.mm_projector.requires_grad_(True)
    wrapped = [n for n, _ in _lora_layers(student)]
    if len(wrapped) != n_layers * len(target) or not all(n.startswith("model.layers.") for n in wrapped):
        raise RuntimeError(f"LoRA landed on {len(wrapped)} modules, expected {n_layers * len(target)} decoder "
                           f"linears: {wrapped[:4]}")
    return student


def _is_lora_param(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name or ".lora_embedding_" in name or ".lora_magnitude_" in name


def _lora_layers(model: nn.Module):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


def is_lora(model: nn.Module) -> bool:
    return bool(_lora_layers(model))


def lora_parameter_counts(student: nn.Module) -> dict[str, int]:
    """Parameter counts for the trainer's log: lora, projector, other trainable (should be 0), frozen, total."""
    counts = {"lora": 0, "projector": 0, "other_trainable": 0, "frozen": 0, "total": 0}
    for name, p in student.named_parameters():
        n = p.numel()
        counts["total"] += n
        if not p.requires_grad:
            counts["frozen"] += n
        elif _is_lora_param(name):
            counts["lora"] += n
        elif name.startswith("model.mm_projector."):
            counts["projector"] += n
        else:
            counts["other_trainable"] += n
    return counts


__all__ = ["DEFAULT_TARGETS", "apply_lora", "is_lora", "lora_parameter_counts", "merged_state_dict",
           "trainable_state_dict"]


@torch.no_grad()
def merged_state_dict(student: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the student with every adapter folded into its base weight (W + B A * alpha / r) and the
    plain layer names, without touching the training model: what a checkpoint saves in the official layout."""
    state = {}
    lora_modules = dict(_lora_layers(student))
    for name, tensor in student.state_dict().items():
        if _is_lora_param(name):
            continue
        if ".base_layer." in name:
            owner = name.split(".base_layer.")[0]
            name = name.replace(".base_layer.", ".")
            if name.endswith(".weight"):
                tensor = tensor + lora_modules[owner].get_delta_weight(ADAPTER).to(tensor.dtype)
        state[name] = tensor
    return state


def trainable_state_dict(student: nn.Module) -> dict[str, torch.Tensor]:
    """LoRA matrices and the projector: what a LoRA run must keep to resume on top of its base model."""
    return {n: p.detach().cpu() for n, p in student.named_parameters() if p.requires_grad}
