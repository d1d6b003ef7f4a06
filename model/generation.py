"""Batched greedy decoding for MobileVLM with a KV cache and left padding.

The reference decodes one question at a time (batch size 1, greedy, stop at EOS). Left padding keeps every row's
last prompt token in the last column, and `prepare_multimodal` gives each row the positions it would have alone,
so a batch produces the same tokens as batch size 1 up to floating-point reduction order.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache

from .constants import EOS_TOKEN_ID, IMAGE_SIZE, PAD_TOKEN_ID


def _stack_images(images: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
    """[B, 3, 336, 336] with zeros for text-only rows (prepare_multimodal encodes only rows that have an image)."""
    if all(im is None for im in images):
        return None
    zeros = torch.zeros(3, IMAGE_SIZE, IMAGE_SIZE)
    return torch.stack([zeros if im is None else im for im in images])


@torch.no_grad()
def greedy_generate(model, input_ids: Sequence[Sequence[int]], images: Sequence[torch.Tensor | None],
                    max_new_tokens: int, eos_token_id: int = EOS_TOKEN_ID,
                    pad_token_id: int = PAD_TOKEN_ID) -> list[list[int]]:
    """New token ids of each prompt, ending at (and including) its first EOS or after max_new_tokens.

    `input_ids` are prompt ids with -200 where the image goes; `images[i]` is the preprocessed image of prompt i
    (None for a text-only prompt).
    """
    mm = model.prepare_multimodal([list(r) for r in input_ids], images=_stack_images(images), padding_side="left")
    llm, batch = model.model, len(input_ids)
    mask = mm.attention_mask.long()
    position = mm.position_ids[:, -1:]
    cache = DynamicCache()
    hidden = llm(inputs_embeds=mm.inputs_embeds, attention_mask=mask, position_ids=mm.position_ids,
                 past_key_values=cache, use_cache=True).last_hidden_state[:, -1]
    done = torch.zeros(batch, dtype=torch.bool, device=mask.device)
    steps = []
    for step in range(max_new_tokens):
        token = model.lm_head(hidden).argmax(-1)
        token = torch.where(done, torch.full_like(token, pad_token_id), token)  # finished rows idle on pad
        steps.append(token)
        done |= token == eos_token_id
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        position = position + 1
        mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
        hidden = llm(inputs_embeds=llm.embed_tokens(token[:, None]), attention_mask=mask, position_ids=position,
                     past_key_values=cache, use_cache=True).last_hidden_state[:, -1]
    out = []
    for row in torch.stack(steps, dim=1).tolist():
        out.append(row[:row.index(eos_token_id) + 1] if eos_token_id in row else row)
    return out


def decode_answer(tokenizer, ids: Sequence[int]) -> str:
    """As the reference: batch_decode(skip_special_tokens=True), strip, drop a trailing "</s>", strip."""
    text = tokenizer.batch_decode([list(ids)], skip_special_tokens=True)[0].strip()
    if text.endswith("</s>"):
        text = text[:-len("</s>")]
    return text.strip()


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices in batches of similar length, longest first (so an out-of-memory batch shows up at once)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
