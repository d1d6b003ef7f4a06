"""CLIP vision tower: hidden_states[select_layer] without the CLS token; frozen (no_grad, eval) unless made
trainable, as the shapes world does for its teacher's first stage."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

OFFICIAL_CLIP_336 = "openai/clip-vit-large-patch14-336"


def clip_vit_l14_336_config() -> CLIPVisionConfig:
    """The config of openai/clip-vit-large-patch14-336's vision model (its weights live in MobileVLM checkpoints)."""
    return CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768,
    )


CHECKPOINT_CLIP_FOLDER = "vision_tower"  # a checkpoint's own CLIP folder (model/checkpoint.py writes it)
_CONFIG_METADATA = ("model_type", "architectures", "transformers_version", "torch_dtype", "dtype")


def is_official_clip(mm_vision_tower: str | None) -> bool:
    """Whether a config's mm_vision_tower names clip-vit-large-patch14-336 (the hub id or a local folder so named)."""
    return mm_vision_tower is not None and str(mm_vision_tower).rstrip("/").endswith(OFFICIAL_CLIP_336.split("/")[1])


def read_clip_config(folder: str | Path) -> CLIPVisionConfig:
    """The vision config of a CLIP folder (CLIPVisionModel or CLIPModel); file metadata (architectures, versions,
    dtype) is dropped, so the same tower gives the same config from any folder or an inline dict."""
    cfg_file = Path(folder) / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"vision tower folder {folder} has no config.json (a CLIP ViT folder is expected)")
    raw = json.loads(cfg_file.read_text())
    raw = raw.get("vision_config", raw)  # a full CLIPModel config nests the vision part
    return CLIPVisionConfig(**{k: v for k, v in raw.items() if not k.startswith("_") and k not in _CONFIG_METADATA})


def resolve_vision_config(mm_vision_tower: str | None, override_dir: str | Path | None = None,
                          inline: dict | None = None, checkpoint_dir: str | Path | None = None) -> CLIPVisionConfig:
    """Find the CLIP config without the network, first found: --vision-tower DIR; the checkpoint's own
    `vision_tower/` folder; mm_vision_tower as a local folder; the inline dict of older tiny checkpoints
    (mm_vision_config); the official id's built-in config."""
    if override_dir is not None:
        if not Path(override_dir).is_dir():
            raise FileNotFoundError(f"--vision-tower {override_dir} is not a folder")
        return read_clip_config(override_dir)
    if checkpoint_dir is not None and (Path(checkpoint_dir) / CHECKPOINT_CLIP_FOLDER / "config.json").is_file():
        return read_clip_config(Path(checkpoint_dir) / CHECKPOINT_CLIP_FOLDER)
    if mm_vision_tower is not None and Path(mm_vision_tower).is_dir():
        return read_clip_config(mm_vision_tower)
    if inline is not None:
        return CLIPVisionConfig(**inline)
    if is_official_clip(mm_vision_tower):
        return clip_vit_l14_336_config()
    raise FileNotFoundError(
        f"mm_vision_tower {mm_vision_tower!r} is neither a local CLIP folder nor {OFFICIAL_CLIP_336!r}; "
        "pass --vision-tower DIR with the CLIP config.json")


class CLIPVisionTower(nn.Module):
    """Wrapper whose attribute `.vision_tower` is the HF CLIPVisionModel, as in the original module tree."""

    def __init__(self, config: CLIPVisionConfig, select_layer: int = -2):
        super().__init__()
        self.vision_tower = CLIPVisionModel(config)
        self.vision_tower.requires_grad_(False)
        self.select_layer = select_layer
        self.trainable = False

    def set_trainable(self, trainable: bool = True) -> None:
        self.trainable = trainable
        self.vision_tower.requires_grad_(trainable)

    def train(self, mode: bool = True) -> "CLIPVisionTower":
        return super().train(mode and self.trainable)  # frozen: always eval, never activation-checkpointed

    @property
    def hidden_size(self) -> int:
        return self.vision_tower.config.hidden_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        dtype = next(self.vision_tower.parameters()).dtype
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            out = self.vision_tower(images.to(dtype), output_hidden_states=True)
        return out.hidden_states[self.select_layer][:, 1:].to(images.dtype)
