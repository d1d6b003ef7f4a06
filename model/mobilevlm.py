"""MobileVLM V2 on top of transformers' LLaMA and CLIP: vision tower, LDPv2 projector, splicing, decoder, lm_head.

The module tree reproduces the official state-dict names (model.layers.*, model.vision_tower.vision_tower.*,
model.mm_projector.*, lm_head.*), so checkpoints load and save without renaming beyond CLIP's own layout.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaModel

from .constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX, NUM_IMAGE_TOKENS

from .capture import ATTN_IMPLEMENTATION, QKCapture
from .config import MobileVLMConfig, tiny_config
from .projector import LDPNetV2Projector
from .vision import CLIPVisionTower


@dataclass
class MultimodalInputs:
    """A spliced batch: 144 image tokens in place of each -200, with where they went."""

    inputs_embeds: torch.Tensor  # [B, L, H]
    attention_mask: torch.Tensor  # [B, L] bool, True on real tokens
    position_ids: torch.Tensor  # [B, L]; left padding keeps batch-size-1 positions
    labels: torch.Tensor | None  # [B, L], IGNORE_INDEX on image positions and padding
    vision_mask: torch.Tensor  # [B, L] bool: the 144 image positions
    text_mask: torch.Tensor  # [B, L] bool: real tokens after the image
    vision_start: torch.Tensor  # [B] long, first image position or -1
    has_image: torch.Tensor  # [B] bool
    vision_tokens: torch.Tensor  # [B, 144, H] projector outputs (zeros for text-only samples)


@dataclass
class MobileVLMOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor | None
    hidden_states: torch.Tensor  # [B, L, H] final normed states (lm_head input)
    mm: MultimodalInputs
    q0: torch.Tensor | None = None  # layer-0 post-RoPE q [B, H, L, D] when capture is on
    k0: torch.Tensor | None = None


def _rows(x: torch.Tensor | list, mask: torch.Tensor | None) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        if x.dim() == 1:
            x = x[None]
        return [r[m.bool()] if mask is not None else r for r, m in zip(x, mask if mask is not None else x)]
    return [torch.as_tensor(r, dtype=torch.long) for r in x]


class MobileVLM(nn.Module):
    def __init__(self, config: MobileVLMConfig, vision_tower: str | Path | None = None):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config.llama_config(ATTN_IMPLEMENTATION))
        self.model.vision_tower = CLIPVisionTower(config.vision_config(vision_tower), config.mm_vision_select_layer)
        self.model.mm_projector = LDPNetV2Projector(config.mm_hidden_size, config.hidden_size, NUM_IMAGE_TOKENS)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.qk_capture: QKCapture | None = None

    # ---- construction -------------------------------------------------------------------------------------------
    @classmethod
    def tiny(cls, seed: int = 0, **kw) -> "MobileVLM":
        """A randomly initialized tiny model of the same structure (tests and the demo)."""
        torch.manual_seed(seed)
        model = cls(tiny_config(**kw))
        model.apply(_init_tiny)
        return model

    @classmethod
    def from_pretrained(cls, path: str | Path, **kw) -> "MobileVLM":
        from .checkpoint import load_mobilevlm

        return load_mobilevlm(cls, path, **kw)

    @classmethod
    def from_llm(cls, llm_path: str | Path, vision_tower: str | Path, **kw) -> "MobileVLM":
        """A LLaMA folder + a CLIP folder + a fresh LDPv2 projector (the paper's stage-1 initialization)."""
        from .checkpoint import init_from_llm

        return init_from_llm(cls, llm_path, vision_tower, **kw)

    def save_pretrained(self, path: str | Path, **kw) -> None:
        from .checkpoint import save_mobilevlm

        save_mobilevlm(self, path, **kw)

    # ---- parts and sizes that the trainer and the losses read ----------------------------------------------------
    vision_tower = property(lambda self: self.model.vision_tower)  # CLIPVisionTower
    mm_projector = property(lambda self: self.model.mm_projector)  # LDPNetV2Projector
    num_heads = property(lambda self: self.config.num_attention_heads)
    hidden_size = property(lambda self: self.config.hidden_size)
    device = property(lambda self: self.lm_head.weight.device)

    def enable_qk_capture(self) -> QKCapture:
        """Keep layer-0 post-RoPE q/k of every forward (returned in the output as q0, k0)."""
        self.qk_capture = QKCapture()
        self.model.layers[0].self_attn.qk_capture = self.qk_capture
        return self.qk_capture

    def disable_qk_capture(self) -> None:
        self.qk_capture = None
        self.model.layers[0].self_attn.qk_capture = None

    def enable_activation_checkpointing(self) -> None:
        m = self.model
        if hasattr(m, "activation_checkpointing_enable"):  # transformers >= 5.23
            m.activation_checkpointing_enable()
        else:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    # ---- vision -----------------------------------------------------------------------------------------------------
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """CLIP patch features [N, 576, C] of N images (frozen, no grad); shareable between teacher and student."""
        return self.vision_tower(images)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        w = self.mm_projector.mlp.mlp[0].weight
        return self.mm_projector(features.to(device=w.device, dtype=w.dtype))

    # ---- splicing ---------------------------------------------------------------------------------------------------
    def prepare_multimodal(self, input_ids: torch.Tensor | list, attention_mask: torch.Tensor | None = None,
                           images: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                           image_features: torch.Tensor | None = None,
                           padding_side: str = "right") -> MultimodalInputs:
        """Replace each sample's single -200 by its 144 projected image tokens and record where they went.

        `images` has one row per sample (zeros for text-only samples, as the collator makes them); alternatively
        `image_features` holds CLIP features of only the samples that have an image, in batch order.
        """
        device = self.device
        rows = [r.to(device) for r in _rows(input_ids, attention_mask)]
        label_rows = [r.to(device) for r in _rows(labels, attention_mask)] if labels is not None else None
        image_pos = []
        for b, r in enumerate(rows):
            pos = (r == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist()
            if len(pos) > 1:
                raise ValueError(f"sample {b} has {len(pos)} image placeholders; MobileVLM takes one image per sample")
            image_pos.append(pos[0] if pos else -1)
        has_image = torch.tensor([p >= 0 for p in image_pos], device=device)
        n_img = int(has_image.sum())
        H = self.hidden_size
        vision_tokens = self.lm_head.weight.new_zeros(len(rows), NUM_IMAGE_TOKENS, H)
        if n_img:
            if image_features is None:
                if images is None:
                    raise ValueError("input_ids contain an image placeholder (-200) but no images were given")
                image_features = self.encode_images(images.to(device)[has_image])
            if image_features.shape[0] != n_img:
                raise ValueError(f"image_features has {image_features.shape[0]} rows for {n_img} samples with an image")
            vision_tokens[has_image] = self.project(image_features).to(vision_tokens.dtype)

        lengths = [len(r) + (NUM_IMAGE_TOKENS - 1 if p >= 0 else 0) for r, p in zip(rows, image_pos)]
        B, L = len(rows), max(lengths)
        embed = self.model.embed_tokens
        embeds = vision_tokens.new_zeros(B, L, H)
        new_mask = torch.zeros(B, L, dtype=torch.bool, device=device)
        new_labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long, device=device) if labels is not None else None
        position_ids = torch.zeros(B, L, dtype=torch.long, device=device)
        vision_mask = torch.zeros(B, L, dtype=torch.bool, device=device)
        text_mask = torch.zeros(B, L, dtype=torch.bool, device=device)
        vision_start = torch.full((B,), -1, dtype=torch.long, device=device)
        for b, (r, p, n) in enumerate(zip(rows, image_pos, lengths)):
            o = L - n if padding_side == "left" else 0
            tok = embed(r.clamp(min=0))
            if p >= 0:
                tok = torch.cat([tok[:p], vision_tokens[b], tok[p + 1:]])
                vision_mask[b, o + p: o + p + NUM_IMAGE_TOKENS] = True
                text_mask[b, o + p + NUM_IMAGE_TOKENS: o + n] = True
                vision_start[b] = o + p
            embeds[b, o: o + n] = tok
            new_mask[b, o: o + n] = True
            position_ids[b, o: o + n] = torch.arange(n, device=device)
            if new_labels is not None:
                lab = label_rows[b]
                if p >= 0:
                    lab = torch.cat([lab[:p], lab.new_full((NUM_IMAGE_TOKENS,), IGNORE_INDEX), lab[p + 1:]])
                new_labels[b, o: o + n] = lab
        return MultimodalInputs(embeds, new_mask, position_ids, new_labels, vision_mask, text_mask, vision_start,
                                has_image, vision_tokens)

    # ---- forward ----------------------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor | list, attention_mask: torch.Tensor | None = None,
                images: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                image_features: torch.Tensor | None = None, compute_logits: bool = True) -> MobileVLMOutput:
        """Like the original forward (logits, mean CE over labels != -100), plus what distillation needs.

        With compute_logits=False no [B, L, V] tensor is built: the losses work from `hidden_states` and lm_head.
        """
        mm = self.prepare_multimodal(input_ids, attention_mask, images, labels, image_features)
        mask = None if bool(mm.attention_mask.all()) else mm.attention_mask
        cap = self.qk_capture
        if cap is not None:
            cap.clear()
            cap.armed = True
        try:
            hidden = self.model(inputs_embeds=mm.inputs_embeds, attention_mask=mask, position_ids=mm.position_ids,
                                use_cache=False).last_hidden_state
        finally:
            if cap is not None:
                cap.armed = False
        logits = loss = None
        if compute_logits:
            logits = self.lm_head(hidden)
            if mm.labels is not None:
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), mm.labels[:, 1:].flatten(),
                                       ignore_index=IGNORE_INDEX)
        q0, k0 = (cap.q, cap.k) if cap is not None else (None, None)
        return MobileVLMOutput(loss, logits, hidden, mm, q0, k0)


def _init_tiny(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
