"""What the loss terms read: each model's tensors (`KDSide`) and the batch's layout (`KDBatch`)."""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class KDSide:
    """One model's tensors for the losses. The teacher's, read from a teacher cache, has None for a field that the
    cache does not hold (no term registered when it was built read it) or that no sample of the batch stores
    (q0/k0/lse0 without text after an image, vision_tokens without an image)."""

    hidden: torch.Tensor  # [B, L, H] final normed hidden states (lm_head input)
    lm_head_weight: torch.Tensor  # [V, H]
    q0: torch.Tensor | None  # [B, heads, L, D] layer-0 post-RoPE queries
    k0: torch.Tensor | None  # [B, heads, L, D] layer-0 post-RoPE keys, repeated to the query heads
    vision_tokens: torch.Tensor | None  # [B, 144, H] projector outputs (rows of text-only samples are ignored)
    lse0: torch.Tensor | None = None  # [B, heads, L] layer-0 row LSEs (teacher cache: k0 then only at vision columns)


SIDE_FIELDS = tuple(f.name for f in fields(KDSide))


@dataclass
class KDBatch:
    """Per-sample layout of the spliced sequence (shared by teacher and student)."""

    labels: torch.Tensor  # [B, L] long, -100 on unsupervised positions (already expanded to the spliced sequence)
    attention_mask: torch.Tensor  # [B, L] bool, valid tokens
    vision_mask: torch.Tensor  # [B, L] bool, the image positions
    text_mask: torch.Tensor  # [B, L] bool, text positions after the image
    has_image: torch.Tensor  # [B] bool
    vision_start: torch.Tensor  # [B] long, first image position, -1 for text-only samples
