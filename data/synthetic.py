"""Synthetic data for the demo and tests: coloured shapes with captions and question/answer conversations, written
as a LLaVA-format JSON list + image folder (so the demo runs the real dataset path), and a tiny SentencePiece
tokenizer trained on their text with the LLaMA tokenizer's settings."""
from __future__ import annotations

import io
import json
import random
from pathlib import Path

import sentencepiece as spm
from PIL import Image, ImageDraw

from .templates import ROLES_V1, SYSTEM_V1

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30),
           "purple": (140, 60, 170), "orange": (245, 140, 30)}
BACKGROUNDS = {"white": (250, 250, 250), "black": (15, 15, 15), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {"on the left": (0.25, 0.5), "on the right": (0.75, 0.5), "at the top": (0.5, 0.25),
             "at the bottom": (0.5, 0.75), "in the center": (0.5, 0.5)}
SIZES = {"small": 0.1, "large": 0.2}  # radius as a fraction of the shorter side
SIDES = (64, 96, 128, 160, 200)  # image widths and heights: various sizes and aspect ratios
MIXES = {("red", "blue"): "purple", ("red", "yellow"): "orange", ("blue", "yellow"): "green"}
KINDS = ("caption", "qa", "mixed")
CAPTION_PROMPTS = ("<image>\nDescribe the image briefly.", "Write a short caption for this picture.\n<image>",
                   "<image>\nWhat is in the image?")


def _scene(rng: random.Random) -> dict:
    return {"shape": rng.choice(SHAPES), "colour": rng.choice(list(COLOURS)), "bg": rng.choice(list(BACKGROUNDS)),
            "where": rng.choice(list(POSITIONS)), "size": rng.choice(list(SIZES)),
            "wh": (rng.choice(SIDES), rng.choice(SIDES))}


def _caption(s: dict) -> str:
    return f"A {s['size']} {s['colour']} {s['shape']} {s['where']} of a {s['bg']} background."


def _image_qa(s: dict, rng: random.Random) -> tuple[str, str]:
    other = rng.choice(list(COLOURS))
    return rng.choice([
        (f"What color is the {s['shape']}?", f"{s['colour'].capitalize()}."),
        ("What shape is shown in the image?", f"A {s['colour']} {s['shape']}."),
        (f"Where is the {s['colour']} {s['shape']}?", f"It is {s['where']}."),
        ("What color is the background?", f"{s['bg'].capitalize()}."),
        (f"Is the {s['shape']} {other}?", "Yes." if other == s["colour"] else f"No, it is {s['colour']}."),
        ("Is the shape small or large?", f"It is {s['size']}."),
    ])


def _text_qa(rng: random.Random) -> tuple[str, str]:
    if rng.random() < 0.5:
        shape = rng.choice(SHAPES)
        sides = {"circle": "A circle has no sides.", "square": "A square has 4 sides.",
                 "triangle": "A triangle has 3 sides."}
        return f"How many sides does a {shape} have?", sides[shape]
    (a, b), c = rng.choice(list(MIXES.items()))
    return f"What color do you get by mixing {a} and {b}?", f"{c.capitalize()}."


def _turn(human: str, gpt: str) -> list[dict]:
    return [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]


def _records(n: int, seed: int, kind: str) -> list[tuple[dict, dict | None]]:
    """(record, scene) pairs; the scene (None for text-only records) says what image to draw."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose one of {KINDS}")
    rng = random.Random(seed)
    out = []
    for i in range(n):
        rec = {"id": f"{kind}-{i:05d}"}
        u = rng.random()
        if kind == "qa" and u < 0.1 or kind == "mixed" and u < 0.08:  # a few text-only records
            rec["conversations"] = _turn(*_text_qa(rng))
            out.append((rec, None))
            continue
        scene = _scene(rng)
        rec["image"] = f"images/{kind}_{i:05d}.png"
        if kind == "caption" or kind == "mixed" and u < 0.4:
            rec["conversations"] = _turn(rng.choice(CAPTION_PROMPTS), _caption(scene))
        else:
            q, a = _image_qa(scene, rng)
            q = f"<image>\n{q}" if rng.random() < 0.7 else f"{q}\n<image>"  # exercise moving the tag to the front
            rec["conversations"] = _turn(q, a)
            if rng.random() < 0.3:  # a second round
                rec["conversations"] += _turn(*_image_qa(scene, rng))
        out.append((rec, scene))
    return out


def _draw(scene: dict) -> Image.Image:
    w, h = scene["wh"]
    img = Image.new("RGB", (w, h), BACKGROUNDS[scene["bg"]])
    fx, fy = POSITIONS[scene["where"]]
    cx, cy, r = fx * w, fy * h, SIZES[scene["size"]] * min(w, h)
    draw, fill = ImageDraw.Draw(img), COLOURS[scene["colour"]]
    if scene["shape"] == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:  # a circle or a square in the same box
        (draw.ellipse if scene["shape"] == "circle" else draw.rectangle)([cx - r, cy - r, cx + r, cy + r], fill=fill)
    return img


def make_synthetic_dataset(folder: str | Path, n: int = 64, seed: int = 0, kind: str = "mixed") -> Path:
    """Write `folder/synthetic_{kind}.json` (a LLaVA JSON list) and its PNGs under `folder/images/`; the image
    folder of the dataset is `folder`. `caption` suits the plain template; `qa` and `mixed` (captions asked as
    questions, questions, a few two-round and text-only records) suit v1. Deterministic for a seed."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for rec, scene in _records(n, seed, kind):
        if scene is not None:
            _draw(scene).save(folder / rec["image"])
        records.append(rec)
    path = folder / f"synthetic_{kind}.json"
    path.write_text(json.dumps(records, indent=1))
    return path


def make_demo_tokenizer(folder: str | Path, vocab_size: int = 500) -> Path:
    """Train a tiny BPE SentencePiece model on the synthetic texts and the v1 template words, with LLaMA's settings
    (byte fallback, dummy prefix, no normalisation, <unk>=0 <s>=1 </s>=2), as `folder/tokenizer.model`; returns
    `folder`, ready for `load_tokenizer`. Deterministic."""
    texts = []
    for rec, _ in _records(2000, 0, "mixed"):
        # the template's words once per record, as in the training text, so BPE learns them as whole pieces
        texts += [SYSTEM_V1, f"{ROLES_V1[0]}: {ROLES_V1[1]}:"]
        texts += [t["value"].replace("<image>", "").strip() for t in rec["conversations"]]
    return train_llama_like_tokenizer(texts, folder, vocab_size)


def train_llama_like_tokenizer(texts: list[str], folder: str | Path, vocab_size: int) -> Path:
    """A BPE SentencePiece model of `texts` with the LLaMA tokenizer's settings (byte fallback, dummy prefix, no
    normalisation, <unk>=0 <s>=1 </s>=2) written as `folder/tokenizer.model`; returns `folder`. Deterministic."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        character_coverage=1.0, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity", add_dummy_prefix=True, remove_extra_whitespaces=False,
        split_digits=True, allow_whitespace_only_pieces=True, num_threads=1, shuffle_input_sentence=False,
        input_sentence_size=0, minloglevel=2)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    return folder
