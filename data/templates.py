"""Conversation templates `plain` and `v1` with their label masks, as MobileVLM builds them.

The original renders a whole prompt string, tokenizes it, and recovers the answer spans by re-tokenizing pieces and
counting; any tokenizer difference silently zeroes a sample. Here ids and labels are built segment by segment, each
segment encoded on its own with legacy sentencepiece semantics, which gives the same ids: the original's chunks
end at `<image>` and `</s>`, and the only other boundary, between "ASSISTANT:" and the answer, falls where
sentencepiece starts a new word anyway (the answer's dummy-prefix "▁" is the space after the colon).
"""
from __future__ import annotations

from typing import Any

from .constants import BOS_TOKEN_ID, DEFAULT_IMAGE_TOKEN, EOS_TOKEN_ID, IGNORE_INDEX, IMAGE_TOKEN_INDEX
from .tokenizer import Tokenizer

TEMPLATES = ("plain", "v1")
SYSTEM_V1 = ("A chat between a curious user and an artificial intelligence assistant. "
             "The assistant gives helpful, detailed, and polite answers to the user's questions.")
ROLES_V1 = ("USER", "ASSISTANT")


class BadRecord(ValueError):
    """A record the templates cannot turn into a training sample; `reason` is the dataset's skip reason."""

    def __init__(self, message: str, reason: str = "bad_record"):
        super().__init__(message)
        self.reason = reason


def encode_image_text(text: str, tokenizer: Tokenizer) -> list[int]:
    """`tokenizer_image_token` without its BOS: chunks split at "<image>", each encoded alone, -200 between."""
    ids: list[int] = []
    for i, chunk in enumerate(text.split(DEFAULT_IMAGE_TOKEN)):
        if i:
            ids.append(IMAGE_TOKEN_INDEX)
        ids.extend(tokenizer.encode(chunk))
    return ids


def _turns(record: Any) -> list[tuple[str, str]]:
    """(from, value) of every turn, after checking the record's shape."""
    if not isinstance(record, dict):
        raise BadRecord(f"a record must be a JSON object, got {type(record).__name__}")
    convs = record.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise BadRecord("'conversations' must be a non-empty list")
    turns = []
    for k, turn in enumerate(convs):
        if not isinstance(turn, dict) or turn.get("from") not in ("human", "gpt") \
                or not isinstance(turn.get("value"), str):
            raise BadRecord(f"turn {k} must be {{'from': 'human'|'gpt', 'value': str}}, got {turn!r:.120}")
        turns.append((turn["from"], turn["value"]))
    n_images = sum(v.count(DEFAULT_IMAGE_TOKEN) for _, v in turns)
    if n_images > 1:
        raise BadRecord(f"{n_images} '<image>' tags; MobileVLM takes one image per sample", reason="two_images")
    image = record.get("image")
    if image is not None and not isinstance(image, str):
        raise BadRecord(f"'image' must be a relative path string, got {image!r:.120}")
    if n_images and image is None:
        raise BadRecord("'<image>' in the text but the record has no 'image'")
    if any(from_ == "gpt" and DEFAULT_IMAGE_TOKEN in v for from_, v in turns):
        raise BadRecord("'<image>' in a gpt turn")
    if any(from_ == "gpt" and not v.strip() for from_, v in turns):
        raise BadRecord("empty gpt answer")
    return turns


def _move_image_to_front(value: str) -> str:
    # LLaVA's preprocess_multimodal: drop the tag, strip, put "<image>\n" in front, strip again
    if DEFAULT_IMAGE_TOKEN not in value:
        return value
    return (DEFAULT_IMAGE_TOKEN + "\n" + value.replace(DEFAULT_IMAGE_TOKEN, "").strip()).strip()


def _segments_plain(turns: list[tuple[str, str]], tokenizer: Tokenizer) -> list[tuple[list[int], bool]]:
    if len(turns) != 2 or [f for f, _ in turns] != ["human", "gpt"]:
        raise BadRecord(f"the plain template needs exactly one human and one gpt turn, got {[f for f, _ in turns]}")
    if DEFAULT_IMAGE_TOKEN not in turns[0][1]:
        raise BadRecord("the plain template needs '<image>' in the human turn")
    # the human turn is replaced by the bare image; the caption and its final "\n" are supervised
    return [([BOS_TOKEN_ID, IMAGE_TOKEN_INDEX], False), (tokenizer.encode(turns[1][1] + "\n"), True)]


def _segments_v1(turns: list[tuple[str, str]], tokenizer: Tokenizer) -> list[tuple[list[int], bool]]:
    if turns[0][0] != "human":  # the original drops a leading non-human turn
        turns = turns[1:]
    roles = [f for f, _ in turns]
    if not turns or len(turns) % 2 or roles != ["human", "gpt"] * (len(turns) // 2):
        raise BadRecord(f"v1 needs alternating human/gpt turns ending with gpt, got {roles}")
    segments: list[tuple[list[int], bool]] = [([BOS_TOKEN_ID], False)]
    for k in range(0, len(turns), 2):
        question, answer = _move_image_to_front(turns[k][1]), turns[k + 1][1]
        if not question:  # the original renders an empty message as "USER:" without a separator
            raise BadRecord(f"empty human turn {k}")
        if "</s>" in question + answer:  # the original would split the rounds there and mask the whole sample
            raise BadRecord(f"'</s>' inside turn {k} or {k + 1}")
        prefix = SYSTEM_V1 + " " if k == 0 else ""
        instruction = f"{prefix}{ROLES_V1[0]}: {question} {ROLES_V1[1]}:"
        segments.append((encode_image_text(instruction, tokenizer), False))
        segments.append((tokenizer.encode(answer) + [EOS_TOKEN_ID], True))
    return segments


def preprocess(record: dict, tokenizer: Tokenizer, template: str) -> dict[str, list[int]]:
    """`input_ids` (with one -200 for the image, before its expansion to 144 tokens) and `labels` (-100 except on
    the answer tokens: plain: the caption + final "\\n"; v1: every answer + its "</s>") of one LLaVA record."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose one of {TEMPLATES}")
    turns = _turns(record)
    segments = (_segments_plain if template == "plain" else _segments_v1)(turns, tokenizer)
    input_ids: list[int] = []
    labels: list[int] = []
    for ids, supervised in segments:
        input_ids += ids
        labels += ids if supervised else [IGNORE_INDEX] * len(ids)
    return {"input_ids": input_ids, "labels": labels}


def build_prompt(question: str, tokenizer: Tokenizer, template: str = "v1", image: bool = True) -> list[int]:
    """Eval prompt ids `SYS USER: <image>\\n{question} ASSISTANT:` (no trailing space: generation starts after the
    colon), as `tokenizer_image_token` makes them; `image=False` leaves out "<image>\\n" (text-only questions)."""
    if template != "v1":
        raise ValueError(f"eval prompts use the v1 template, as MobileVLM's evaluation does, got {template!r}")
    if DEFAULT_IMAGE_TOKEN in question:
        raise ValueError("pass the question without '<image>': build_prompt puts it in front")
    human = DEFAULT_IMAGE_TOKEN + "\n" + question if image else question
    prompt = f"{SYSTEM_V1} {ROLES_V1[0]}: {human} {ROLES_V1[1]}:"
    return [BOS_TOKEN_ID] + encode_image_text(prompt, tokenizer)
