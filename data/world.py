"""The shapes world: a small synthetic task where answering needs the right image region, so that a teacher's
cross-modal alignment is worth distilling.

A scene is 2-4 objects (a shape in a colour) in distinct cells of a 3 x 3 grid on a 336 x 336 image; a cell is
112 px, 8 x 8 CLIP patches, 4 x 4 of the 144 image tokens. An object (41-49 px across) sits on its cell's centre, which is
the corner of four image tokens: each of the four sees one quarter of the shape (an arc, a right angle or a slope), so
a small vision tower can tell the shape from one token, and the answer to a question lives in 4 image tokens out of
144 that the text has to find:

    What colour is the triangle?             Red.          (a shape that occurs once)
    What shape is the blue object?           Square.       (a colour that occurs once)
    How many circles are there?              Two.
    Where is the green circle?               Top left.
    What is in the bottom right?             A red square. / Nothing.
    What is left of the red circle?          A blue square. / Nothing.   (the nearest object to its left in its row)

Every question names the image tokens it is about (`target_tokens` of a held-out record): the four tokens of the
object it names or asks for (of every object of the shape, for a count; of the cell, for "What is in ..."), which
is where a grounded model's text looks (evaluation/heldout.py measures it).

Records are LLaVA-format: `plain` captions ("A red circle at the top left and a blue square in the center.") for a
stage-1 style run, and `v1` conversations (eight questions about one image) for training; held-out records have
one question each. The split is by scene: a held-out scene (its set of (cell, shape, colour)) never occurs in the
training data, so every held-out (image, question) pair is unseen. Everything is drawn from one seed.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

from .constants import IMAGE_SIZE
from .synthetic import train_llama_like_tokenizer
from .templates import ROLES_V1, SYSTEM_V1

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30),
           "purple": (140, 60, 170), "orange": (245, 140, 30)}
SHAPES = ("circle", "square", "triangle")
ROWS, COLS = ("top", "middle", "bottom"), ("left", "center", "right")
NUMBERS = ("None", "One", "Two", "Three", "Four")
QUESTION_KINDS = ("colour", "shape", "count", "where", "what_at", "left_of")
BACKGROUND = (250, 250, 250)
CELL = IMAGE_SIZE // 3
TOKEN = IMAGE_SIZE // 12  # the square one image token covers after LDPv2's 2 x 2 pooling of 14 px patches


def cell_name(cell: int) -> str:
    r, c = divmod(cell, 3)
    if (r, c) == (1, 1):
        return "center"
    if r == 1:
        return f"middle {COLS[c]}"
    if c == 1:
        return f"{ROWS[r]} center"
    return f"{ROWS[r]} {COLS[c]}"


def scene_key(scene: list[dict]) -> str:
    """The scene's identity (the split is made on it): its objects, in cell order."""
    return ";".join(f"{o['cell']}:{o['colour']}:{o['shape']}" for o in sorted(scene, key=lambda o: o["cell"]))


def _scene(rng: random.Random) -> list[dict]:
    cells = sorted(rng.sample(range(9), rng.randint(2, 4)))
    # r + |offset| < TOKEN: the object stays inside the four tokens around the cell's centre; each token sees a
    # large part of it (a smaller or more shifted object leaves one token a sliver that tells no shape)
    return [{"cell": c, "shape": rng.choice(SHAPES), "colour": rng.choice(list(COLOURS)),
             "dx": rng.randint(-1, 1), "dy": rng.randint(-1, 1), "r": rng.randint(20, 24)} for c in cells]


def centre(o: dict) -> tuple[int, int]:
    """The object's centre in pixels (x, y)."""
    r, c = divmod(o["cell"], 3)
    return c * CELL + CELL // 2 + o["dx"], r * CELL + CELL // 2 + o["dy"]


def object_tokens(o: dict) -> list[int]:
    """Indices, in raster order of the 12 x 12 image tokens, of the four tokens that hold the object (or that an
    object in its cell would hold: only "cell" is read)."""
    r, c = divmod(o["cell"], 3)
    top, left = (r * CELL + CELL // 2) // TOKEN - 1, (c * CELL + CELL // 2) // TOKEN - 1
    n = IMAGE_SIZE // TOKEN
    return [(top + i) * n + left + j for i in (0, 1) for j in (0, 1)]


def _phrase(o: dict) -> str:
    return f"a {o['colour']} {o['shape']}"


def caption(scene: list[dict]) -> str:
    parts = [f"{_phrase(o)} {'in the' if cell_name(o['cell']) == 'center' else 'at the'} {cell_name(o['cell'])}"
             for o in sorted(scene, key=lambda o: o["cell"])]
    text = ", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0]
    return text[0].upper() + text[1:] + "."


def _left_of(scene: list[dict], o: dict) -> dict | None:
    row = [p for p in scene if p["cell"] // 3 == o["cell"] // 3 and p["cell"] < o["cell"]]
    return max(row, key=lambda p: p["cell"]) if row else None


def questions(scene: list[dict]) -> list[tuple[str, str, str, list[int]]]:
    """Every (kind, question, answer, target tokens) this scene supports; answers are short and unique. The target
    tokens are the image tokens the question is about: those of the object it names (for left_of, the named object:
    the answer is found from it), of every object of the shape it counts, or of the cell it asks about."""
    out = []
    shapes = [o["shape"] for o in scene]
    colours = [o["colour"] for o in scene]
    for o in scene:
        if shapes.count(o["shape"]) == 1:
            out.append(("colour", f"What colour is the {o['shape']}?", f"{o['colour'].capitalize()}.",
                        object_tokens(o)))
        if colours.count(o["colour"]) == 1:
            out.append(("shape", f"What shape is the {o['colour']} object?", f"{o['shape'].capitalize()}.",
                        object_tokens(o)))
        if sum(p["shape"] == o["shape"] and p["colour"] == o["colour"] for p in scene) == 1:
            out.append(("where", f"Where is the {o['colour']} {o['shape']}?", f"{cell_name(o['cell']).capitalize()}.",
                        object_tokens(o)))
            left = _left_of(scene, o)
            out.append(("left_of", f"What is left of the {o['colour']} {o['shape']}?",
                        f"{_phrase(left).capitalize()}." if left else "Nothing.", object_tokens(o)))
    for s in SHAPES:
        out.append(("count", f"How many {s}s are there?", f"{NUMBERS[shapes.count(s)]}.",
                    sorted(t for o in scene if o["shape"] == s for t in object_tokens(o))))
    by_cell = {o["cell"]: o for o in scene}
    for c in range(9):
        answer = f"{_phrase(by_cell[c]).capitalize()}." if c in by_cell else "Nothing."
        out.append(("what_at", f"What is in the {cell_name(c)}?", answer, object_tokens({"cell": c})))
    return out


def draw(scene: list[dict]) -> Image.Image:
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    d = ImageDraw.Draw(img)
    for o in scene:
        (cx, cy), rad = centre(o), o["r"]
        fill = COLOURS[o["colour"]]
        if o["shape"] == "circle":
            d.ellipse([cx - rad, cy - rad, cx + rad, cy + rad], fill=fill)
        elif o["shape"] == "square":
            d.rectangle([cx - rad, cy - rad, cx + rad, cy + rad], fill=fill)
        else:
            d.polygon([(cx, cy - rad), (cx - rad, cy + rad), (cx + rad, cy + rad)], fill=fill)
    return img


def _pick(rng: random.Random, scene: list[dict], k: int) -> list[tuple[str, str, str, list[int]]]:
    """k questions, of different kinds first (a kind, then one of its questions), so that rare kinds are not drowned
    by the nine `what_at` questions every scene has; then any others."""
    by_kind: dict[str, list] = {}
    for q in questions(scene):
        by_kind.setdefault(q[0], []).append(q)
    kinds = rng.sample(sorted(by_kind), min(k, len(by_kind)))
    picked = [rng.choice(by_kind[kind]) for kind in kinds]
    rest = [q for q in questions(scene) if q not in picked]  # then any other questions, up to k
    return picked + rng.sample(rest, min(k - len(picked), len(rest)))


def _turn(human: str, gpt: str) -> list[dict]:
    return [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]


def make_world(folder: str | Path, n_train: int = 2000, n_heldout: int = 300, seed: int = 0,
               questions_per_image: int = 8) -> dict[str, Path]:
    """Write the world under `folder`: `train_v1.json` (n_train images, `questions_per_image` questions each),
    `train_plain.json` (the same images, captions), `heldout_v1.json` (n_heldout unseen scenes, one question
    each, kinds in turn, with the question's `target_tokens`), `heldout_plain.json`, and the PNGs under `images/` (the image folder is `folder`).
    Deterministic for a seed. Returns the paths by name."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    seen: set[str] = set()
    train_v1, train_plain, held_v1, held_plain = [], [], [], []
    while len(train_v1) < n_train:
        scene = _scene(rng)
        seen.add(scene_key(scene))
        i = len(train_v1)
        image = f"images/train_{i:05d}.png"
        draw(scene).save(folder / image)
        conv = []
        for k, (_, q, a, _) in enumerate(_pick(rng, scene, questions_per_image)):
            conv += _turn(f"<image>\n{q}" if k == 0 else q, a)
        train_v1.append({"id": f"train-{i:05d}", "image": image, "conversations": conv})
        train_plain.append({"id": f"train-{i:05d}", "image": image, "conversations": _turn("<image>", caption(scene))})
    while len(held_v1) < n_heldout:
        scene = _scene(rng)
        if scene_key(scene) in seen:  # held out means never seen in training
            continue
        seen.add(scene_key(scene))
        i = len(held_v1)
        kind = QUESTION_KINDS[i % len(QUESTION_KINDS)]
        options = [q for q in questions(scene) if q[0] == kind] or questions(scene)
        kind, q, a, target = rng.choice(options)  # the kind asked, where the scene has none of the turn's
        image = f"images/heldout_{i:05d}.png"
        draw(scene).save(folder / image)
        held_v1.append({"id": f"heldout-{i:05d}", "image": image, "kind": kind, "target_tokens": target,
                        "conversations": _turn(f"<image>\n{q}", a)})
        held_plain.append({"id": f"heldout-{i:05d}", "image": image,
                           "conversations": _turn("<image>", caption(scene))})
    paths = {}
    for name, records in (("train_v1", train_v1), ("train_plain", train_plain), ("heldout_v1", held_v1),
                          ("heldout_plain", held_plain)):
        paths[name] = folder / f"{name}.json"
        paths[name].write_text(json.dumps(records, indent=1))
    return paths


def world_texts(n_scenes: int = 3000, seed: int = 12345) -> list[str]:
    """Every phrase the world uses (all questions, answers and captions of many scenes) plus the v1 template."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n_scenes):
        scene = _scene(rng)
        # the template's words once per scene, as often as in training text, so BPE learns them as whole pieces
        texts += [SYSTEM_V1, f"{ROLES_V1[0]}: {ROLES_V1[1]}:", caption(scene)]
        for _, q, a, _ in questions(scene):
            texts += [q, a]
    return texts


def make_world_tokenizer(folder: str | Path, vocab_size: int = 800) -> Path:
    """A small BPE SentencePiece model of the world's text with LLaMA's settings (byte fallback, dummy prefix,
    <unk>=0 <s>=1 </s>=2): `folder/tokenizer.model`, ready for `load_tokenizer`. Deterministic."""
    return train_llama_like_tokenizer(world_texts(), folder, vocab_size)
