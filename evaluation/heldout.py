"""Held-out evaluation during training: answer cross-entropy per supervised token and greedy exact match.

For every record of a LLaVA-format JSON (made into a sample exactly as training makes it: same template, image mode
and length limit):
- answer CE: the teacher-forced next-token cross-entropy summed over the record's supervised tokens, divided by the
  number of supervised tokens of all records (nats per token);
- exact match: the prompt is the sample's tokens before its first supervised token, the reference is that first
  supervised span (the first answer); the model decodes greedily, and the two texts are compared after
  `normalize_answer`. A multi-round record is scored on its first answer.
- grounding, where records name the image tokens their question is about (`target_tokens`, as the shapes world's
  do): in the LLaMA's first layer, for each head, the largest share, over the text tokens between the image and the
  answer, of a token's attention to the image that falls on the target tokens; the mean over heads and records.
  It is what Align-KD's attention term aligns (the first layer's text->image attention); a head that does not
  look scores the target tokens' share of the image, about 4/144. Records without target tokens (a count of
  none) are left out.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

from data import Collator, LLaVADataset, Tokenizer
from data.constants import IGNORE_INDEX, NUM_IMAGE_TOKENS
from model.generation import decode_answer, greedy_generate, length_sorted_batches


def normalize_answer(text: str) -> str:
    """First line, lower case, without surrounding spaces and a final period."""
    return text.split("\n")[0].strip().lower().rstrip(".").strip()


def first_answer(input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[list[int], list[int]]:
    """(prompt ids, reference ids): the tokens before the first supervised one, and that supervised run."""
    sup = (labels != IGNORE_INDEX).tolist()
    start = sup.index(True)
    end = start
    while end < len(sup) and sup[end]:
        end += 1
    return input_ids[:start].tolist(), input_ids[start:end].tolist()


def target_attention_share(q: torch.Tensor, k: torch.Tensor, vision_start: int, answer_start: int,
                           targets: list[int]) -> float:
    """Grounding of one sample from its first layer's post-RoPE q and k ([H, L, D]): per head, the largest share of a
    question token's image attention on the target image tokens, averaged over heads. The question tokens are those
    from the image's end up to the answer's first token (exclusive); only their rows of the attention are built."""
    rows = torch.arange(vision_start + NUM_IMAGE_TOKENS, answer_start, device=q.device)
    scores = (q[:, rows].float() @ k[:, :answer_start].float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    future = torch.arange(answer_start, device=q.device)[None] > rows[:, None]
    image = scores.masked_fill(future, float("-inf")).softmax(-1)[..., vision_start:vision_start + NUM_IMAGE_TOKENS]
    on_target = image[..., targets].sum(-1) / image.sum(-1)  # [H, rows]
    return float(on_target.max(-1).values.mean())


class HeldOut:
    """The held-out records of one JSON, prepared once; `evaluate(model)` scores a model on them."""

    def __init__(self, json_path: str | Path, image_folder: str | Path, tokenizer: Tokenizer, template: str,
                 image_mode: str, max_len: int, limit: int | None = None, cache_dir: str | Path | None = None):
        dataset = LLaVADataset(json_path, image_folder, tokenizer, template, image_mode, max_len, cache_dir=cache_dir)
        n = len(dataset) if limit is None else min(limit, len(dataset))
        samples = [dataset[i] for i in range(n)]
        self.skipped = Counter(s["skip"] for s in samples if "skip" in s)
        kept = [i for i, s in enumerate(samples) if "skip" not in s]
        self.samples = [samples[i] for i in kept]
        records = (dataset.index[i] for i in kept)  # a record's optional "kind" field
        records = [r if isinstance(r, dict) else {} for r in records]
        self.kinds = [r.get("kind") for r in records]
        self.targets = [r.get("target_tokens") for r in records]
        if not self.samples:
            raise ValueError(f"{json_path}: no usable held-out record (skipped: {dict(self.skipped)})")
        self.tokenizer, self.collate = tokenizer, Collator(tokenizer.pad_token_id)

    def __len__(self) -> int:
        return len(self.samples)

    @torch.no_grad()
    def evaluate(self, model, batch_size: int = 32) -> dict[str, float]:
        """{"eval_ce": nats per supervised token, "eval_acc": exact-match fraction, "eval_n": records}, and
        "eval_acc_by_kind" when records carry a "kind" field (the shapes world's question kinds)."""
        was_training = model.training
        model.eval()
        device, dtype = model.device, model.lm_head.weight.dtype
        grounded = any(t for t in self.targets)
        own_capture = grounded and model.qk_capture is None
        if own_capture:
            model.enable_qk_capture()
        try:
            nll, n_tok, shares = 0.0, 0, []
            for i in range(0, len(self.samples), batch_size):
                b = self.collate(self.samples[i:i + batch_size])
                out = model(b["input_ids"].to(device), b["attention_mask"].to(device),
                            images=b["images"].to(device, dtype), labels=b["labels"].to(device),
                            compute_logits=False)
                labels = out.mm.labels[:, 1:]
                rows = labels != IGNORE_INDEX
                logits = model.lm_head(out.hidden_states[:, :-1][rows]).float()
                nll += float(F.cross_entropy(logits, labels[rows], reduction="sum"))
                n_tok += int(rows.sum())
                for j, targets in enumerate(self.targets[i:i + batch_size]):
                    if targets and out.mm.has_image[j]:
                        answer = int((out.mm.labels[j] != IGNORE_INDEX).nonzero()[0])
                        shares.append(target_attention_share(out.q0[j], out.k0[j], int(out.mm.vision_start[j]),
                                                             answer, targets))
            prompts, refs = zip(*(first_answer(s["input_ids"], s["labels"]) for s in self.samples))
            right = [False] * len(self.samples)
            for batch in length_sorted_batches([len(p) for p in prompts], batch_size):
                new = greedy_generate(model, [prompts[j] for j in batch], [self.samples[j]["image"] for j in batch],
                                      max(len(refs[j]) for j in batch) + 4, self.tokenizer.eos_token_id,
                                      self.tokenizer.pad_token_id)
                for j, ids in zip(batch, new):
                    right[j] = normalize_answer(decode_answer(self.tokenizer, ids)) == \
                        normalize_answer(decode_answer(self.tokenizer, refs[j]))
        finally:
            model.train(was_training)
            if own_capture:
                model.disable_qk_capture()
        out = {"eval_ce": nll / max(n_tok, 1), "eval_acc": sum(right) / len(right), "eval_n": len(right)}
        if shares:
            out["eval_grounding"] = sum(shares) / len(shares)
        by_kind: dict[str, list[bool]] = {}
        for k, r in zip(self.kinds, right):
            if k is not None:
                by_kind.setdefault(str(k), []).append(r)
        if by_kind:
            out["eval_acc_by_kind"] = {k: sum(v) / len(v) for k, v in sorted(by_kind.items())}
        return out
