"""Lazy LLaVA-format dataset and its collator, as MobileVLM's training reads them.

A bad sample (missing or corrupt image, an image path that leads out of the image folder, malformed record, two
images, too long, nothing to supervise) comes back as
a sentinel `{"skip": reason, "id", "detail"}` instead of an exception, so one bad record never ends an epoch; the
collator drops sentinels, counts them per reason, and logs the first of each reason.
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageFile

from .constants import IGNORE_INDEX, IMAGE_SIZE, IMAGE_TOKEN_INDEX, NUM_IMAGE_TOKENS, PAD_TOKEN_ID
from .images import IMAGE_MODES, process_image
from .json_index import JsonListIndex
from .templates import TEMPLATES, BadRecord, preprocess
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

SKIP_REASONS = ("missing_image", "corrupt_image", "image_outside_folder", "bad_record", "two_images", "too_long",
                "no_supervised_tokens")
LAYOUT_HINT = ("MobileVLM's layout under --data-root: pretrain_data/share-captioner_coco_lcs_sam_1246k_1107.json "
               "with its images under pretrain_data/, and finetune_data/MobileVLM_V2_FT_Mix2M.json with its images "
               "under finetune_data/")


def _skip(reason: str, record_id: str, detail: str) -> dict[str, str]:
    return {"skip": reason, "id": record_id, "detail": detail}


class LLaVADataset(torch.utils.data.Dataset):
    """Samples `{"input_ids", "labels"` (LongTensor), `"image"` (FloatTensor [3,336,336] or None), `"id"}` of a
    LLaVA-format JSON list, or a skip sentinel. `max_len` counts the image as its 144 tokens."""

    def __init__(self, json_path: str | Path, image_folder: str | Path, tokenizer: Tokenizer, template: str,
                 image_mode: str, max_len: int, cache_dir: str | Path | None = None):
        json_path, image_folder = Path(json_path), Path(image_folder)
        if not json_path.is_file():
            raise FileNotFoundError(f"dataset JSON not found: {json_path}; expected a JSON list of LLaVA records "
                                    f"{{'id', 'image', 'conversations'}} ({LAYOUT_HINT})")
        if not image_folder.is_dir():
            raise FileNotFoundError(f"image folder not found: {image_folder}; the records' 'image' paths are "
                                    f"relative to it ({LAYOUT_HINT})")
        if template not in TEMPLATES:
            raise ValueError(f"unknown template {template!r}; choose one of {TEMPLATES}")
        if image_mode not in IMAGE_MODES:
            raise ValueError(f"unknown image mode {image_mode!r}; choose one of {IMAGE_MODES}")
        self.image_folder, self.tokenizer, self.template = image_folder, tokenizer, template
        self._real_folder = os.path.realpath(image_folder)
        self.image_mode, self.max_len = image_mode, max_len
        self.index = JsonListIndex(json_path, cache_dir)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, Any]:
        record_id = f"#{i}"
        try:
            record = self.index[i]
            if isinstance(record, dict) and "id" in record:
                record_id = str(record["id"])
            sample = preprocess(record, self.tokenizer, self.template)
        except BadRecord as e:
            return _skip(e.reason, record_id, str(e))
        ids, labels = sample["input_ids"], sample["labels"]
        has_image = IMAGE_TOKEN_INDEX in ids  # a record whose text has no <image> is text-only, as in the original
        length = len(ids) - 1 + NUM_IMAGE_TOKENS if has_image else len(ids)
        if length > self.max_len:
            return _skip("too_long", record_id, f"{length} tokens (image counted as {NUM_IMAGE_TOKENS}) > "
                                                f"max_len {self.max_len}")
        if all(t == IGNORE_INDEX for t in labels):
            return _skip("no_supervised_tokens", record_id, "every label is -100")
        image = None
        if has_image:
            path = self.image_folder / record["image"]
            # an absolute path, "..", or a symlink may lead anywhere: only files inside the folder are opened
            try:
                real = os.path.realpath(path)
            except ValueError as e:  # a NUL character
                return _skip("bad_record", record_id, f"'image' {record['image']!r:.120}: {e}")
            if os.path.commonpath([real, self._real_folder]) != self._real_folder:
                return _skip("image_outside_folder", record_id, f"{record['image']!r:.120} resolves to {real}, "
                                                                f"outside the image folder {self._real_folder}")
            if not os.path.isfile(real):
                return _skip("missing_image", record_id, str(path))
            # as MobileVLM's train.py: a truncated file yields its decodable part (set here, not at import, so
            # that only training processes get this global PIL setting)
            ImageFile.LOAD_TRUNCATED_IMAGES = True
            try:
                with Image.open(real) as img:
                    image = process_image(img, self.image_mode)
            except Exception as e:  # PIL raises many types for bad files (OSError, SyntaxError, ValueError...)
                return _skip("corrupt_image", record_id, f"{path}: {type(e).__name__}: {e}")
        return {"input_ids": torch.tensor(ids, dtype=torch.long), "labels": torch.tensor(labels, dtype=torch.long),
                "image": image, "id": record_id}


class Collator:
    """Right-pads a list of samples into a batch, dropping skip sentinels.

    Returns `input_ids` [B,L] (pad `pad_id`), `labels` [B,L] (pad -100), `attention_mask` [B,L] bool, `images`
    [B,3,336,336] (zeros for text-only samples), `has_image` [B] bool, `ids` (record ids) and `skipped` (a Counter
    of the reasons of the dropped sentinels). When every sample was dropped, the dict holds only `skipped`.
    """

    def __init__(self, pad_id: int = PAD_TOKEN_ID):
        self.pad_id = pad_id
        self._warned: set[str] = set()

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
        skipped: Counter = Counter()
        samples = []
        for s in batch:
            if "skip" not in s:
                samples.append(s)
                continue
            skipped[s["skip"]] += 1
            if s["skip"] not in self._warned:
                self._warned.add(s["skip"])
                log.warning("skipping sample %s (%s): %s; later ones are only counted", s["id"], s["skip"],
                            s["detail"])
        if not samples:
            return {"skipped": skipped}
        lengths = [len(s["input_ids"]) for s in samples]
        b, L = len(samples), max(lengths)
        input_ids = torch.full((b, L), self.pad_id, dtype=torch.long)
        labels = torch.full((b, L), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros(b, L, dtype=torch.bool)
        images = torch.zeros(b, 3, IMAGE_SIZE, IMAGE_SIZE)
        for j, (s, n) in enumerate(zip(samples, lengths)):
            input_ids[j, :n], labels[j, :n], attention_mask[j, :n] = s["input_ids"], s["labels"], True
            if s["image"] is not None:
                images[j] = s["image"]
        has_image = torch.tensor([s["image"] is not None for s in samples])
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask, "images": images,
                "has_image": has_image, "ids": [s["id"] for s in samples], "skipped": skipped}
