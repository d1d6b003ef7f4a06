"""Layer-0 post-RoPE q/k capture through a registered transformers attention function (SDPA underneath).

Only the layer that owns a `QKCapture` stores anything; every layer still runs SDPA, so no attention map is built.
Under non-reentrant activation checkpointing the attention function runs again during backward: the capture is
armed only for the duration of the model's own forward, so the recompute never stores a second copy.
"""
from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

ATTN_IMPLEMENTATION = "alignkd_sdpa"


class QKCapture:
    """Holds layer-0 q and k ([B, H, L, D], k repeated to q's heads) of the last armed forward."""

    def __init__(self) -> None:
        self.armed = False
        self.q: torch.Tensor | None = None
        self.k: torch.Tensor | None = None

    def store(self, q: torch.Tensor, k: torch.Tensor) -> None:
        if self.armed and self.q is None:
            self.q, self.k = q, k

    def clear(self) -> None:
        self.q = self.k = None


def capture_sdpa_attention(module, query, key, value, attention_mask, **kwargs):
    capture = getattr(module, "qk_capture", None)
    if capture is not None:
        capture.store(query, repeat_kv(key, module.num_key_value_groups))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(ATTN_IMPLEMENTATION, capture_sdpa_attention)
if ATTN_IMPLEMENTATION not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
