"""MobileVLM config.json: the LLaMA fields plus the mm_* fields of the official checkpoints, kept verbatim."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import CLIPVisionConfig, LlamaConfig

from .vision import OFFICIAL_CLIP_336, resolve_vision_config

_LLAMA_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
    "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings", "attention_bias", "mlp_bias", "head_dim",
)

MOBILEVLM_DEFAULTS: dict[str, Any] = {
    "architectures": ["MobileLlamaForCausalLM"],
    "model_type": "mobilevlm",
    "hidden_act": "silu",
    "vocab_size": 32000,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "torch_dtype": "bfloat16",
    "mm_projector_type": "ldpnetv2",
    "mm_hidden_size": 1024,
    "mm_vision_tower": OFFICIAL_CLIP_336,
    "vision_tower_type": "clip",
    "mm_vision_select_layer": -2,
    "mm_vision_select_feature": "patch",
    "image_aspect_ratio": "pad",
    "image_grid_pinpoints": None,
    "mm_use_im_start_end": False,
    "mm_use_im_patch_token": False,
    "use_mm_proj": True,
    "tune_mm_mlp_adapter": False,
    "freeze_mm_mlp_adapter": False,
    "mm_projector_lr": None,
}


class MobileVLMConfig:
    """A thin view over the config dict; unknown fields survive a load/save round trip."""

    def __init__(self, **fields: Any):
        self.fields = {**MOBILEVLM_DEFAULTS, **fields}
        if not str(self.fields["mm_projector_type"]).startswith("ldpnetv2"):
            raise ValueError(f"mm_projector_type {self.fields['mm_projector_type']!r}: only ldpnetv2 (MobileVLM V2) is supported")

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["fields"][name]
        except KeyError:
            raise AttributeError(name) from None

    @classmethod
    def from_file(cls, path: str | Path) -> "MobileVLMConfig":
        config = cls(**json.loads(Path(path).read_text()))
        config.__dict__["checkpoint_dir"] = Path(path).parent  # where its own vision_tower/ folder would be
        return config

    def to_dict(self) -> dict[str, Any]:
        return dict(self.fields)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.fields, indent=2, sort_keys=True) + "\n")

    @property
    def head_dim(self) -> int:
        return self.fields.get("head_dim") or self.hidden_size // self.num_attention_heads

    def llama_config(self, attn_implementation: str) -> LlamaConfig:
        kw = {k: self.fields[k] for k in _LLAMA_FIELDS if self.fields.get(k) is not None}
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": float(self.fields.get("rope_theta", 10000.0))}
        if self.fields.get("rope_scaling"):
            raise ValueError("rope_scaling is not used by MobileVLM V2 and is not supported")
        cfg = LlamaConfig(**kw)
        cfg._attn_implementation = attn_implementation
        return cfg

    def vision_config(self, override_dir: str | Path | None = None) -> CLIPVisionConfig:
        return resolve_vision_config(self.fields.get("mm_vision_tower"), override_dir,
                                     self.fields.get("mm_vision_config"), self.__dict__.get("checkpoint_dir"))


def tiny_config(hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4, vocab_size: int = 512,
                intermediate_size: int | None = None, vision_hidden: int = 32, vision_layers: int = 2) -> MobileVLMConfig:
    """Same structure as MobileVLM V2 (CLIP-336 patch 14, LDPv2 to 144 tokens, LLaMA), tiny widths: tests and demo."""
    return MobileVLMConfig(
        hidden_size=hidden_size, intermediate_size=intermediate_size or 2 * hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_heads, max_position_embeddings=1024,
        rms_norm_eps=1e-6, vocab_size=vocab_size, mm_hidden_size=vision_hidden, mm_vision_tower="tiny-clip",
        mm_vision_config={
            "hidden_size": vision_hidden, "intermediate_size": 2 * vision_hidden, "num_hidden_layers": vision_layers,
            "num_attention_heads": 2, "image_size": 336, "patch_size": 14, "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
        },
        torch_dtype="float32",
    )
