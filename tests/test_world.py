"""The shapes world: deterministic, held-out scenes disjoint from training, answers true to the drawn image."""
from __future__ import annotations

import hashlib
import json

import numpy as np
from PIL import Image

from data import LLaVADataset, load_tokenizer, preprocess
from data.world import CELL, COLOURS, QUESTION_KINDS, caption, make_world, make_world_tokenizer, questions


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cells_from_pixels(path) -> dict[int, str]:
    """Colour name of each non-empty grid cell, read from the image's pixels (independent of the generator)."""
    img = np.asarray(Image.open(path).convert("RGB")).astype(int)
    found = {}
    for cell in range(9):
        r, c = divmod(cell, 3)
        block = img[r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL].reshape(-1, 3)
        for name, rgb in COLOURS.items():
            if (np.abs(block - np.array(rgb)).sum(1) < 10).sum() > 100:
                found[cell] = name
    return found


def test_world_is_deterministic_and_split_by_scene(tmp_path):
    a = make_world(tmp_path / "a", n_train=40, n_heldout=24, seed=3)
    b = make_world(tmp_path / "b", n_train=40, n_heldout=24, seed=3)
    c = make_world(tmp_path / "c", n_train=40, n_heldout=24, seed=4)
    for name in a:
        assert a[name].read_text() == b[name].read_text()
    assert a["train_v1"].read_text() != c["train_v1"].read_text()
    assert _sha(tmp_path / "a" / "images" / "heldout_00005.png") == _sha(tmp_path / "b" / "images" / "heldout_00005.png")
    train = json.loads(a["train_plain"].read_text())
    held = json.loads(a["heldout_plain"].read_text())
    # a caption names every object with its cell: equal captions <=> equal scenes; none is shared
    assert not {r["conversations"][1]["value"] for r in train} & {r["conversations"][1]["value"] for r in held}
    held_v1 = json.loads(a["heldout_v1"].read_text())
    assert [r["kind"] for r in held_v1[:len(QUESTION_KINDS)]] == list(QUESTION_KINDS)
    assert all(len(r["conversations"]) == 2 for r in held_v1)
    for r in json.loads(a["train_v1"].read_text()):  # eight different questions per image, every kind it supports
        questions_asked = [t["value"].replace("<image>\n", "") for t in r["conversations"][::2]]
        assert len(questions_asked) == len(set(questions_asked)) == 8


def test_answers_match_the_pixels(tmp_path):
    paths = make_world(tmp_path, n_train=30, n_heldout=12, seed=0)
    for rec in json.loads(paths["train_plain"].read_text()):
        colours = _cells_from_pixels(tmp_path / rec["image"])
        cap = rec["conversations"][1]["value"].lower()
        assert sorted(colours.values()) == sorted(w for w in cap.replace(",", " ").split() if w in COLOURS)
    for rec in json.loads(paths["train_v1"].read_text()):
        colours = _cells_from_pixels(tmp_path / rec["image"])
        for human, gpt in zip(rec["conversations"][::2], rec["conversations"][1::2]):
            q, a = human["value"].replace("<image>\n", ""), gpt["value"].lower().rstrip(".")
            if q.startswith("What colour is the"):
                assert a in colours.values()
            if q.startswith("How many"):
                assert a in ("none", "one", "two", "three", "four")


def test_questions_and_caption_of_a_known_scene():
    scene = [{"cell": 0, "shape": "circle", "colour": "red", "dx": 0, "dy": 0, "r": 35},
             {"cell": 2, "shape": "square", "colour": "blue", "dx": 0, "dy": 0, "r": 35},
             {"cell": 4, "shape": "circle", "colour": "green", "dx": 0, "dy": 0, "r": 35}]
    qa = {q: a for _, q, a, _ in questions(scene)}
    assert qa["What colour is the square?"] == "Blue."
    assert "What colour is the circle?" not in qa  # two circles: ambiguous, never asked
    assert qa["What shape is the green object?"] == "Circle."
    assert qa["How many circles are there?"] == "Two."
    assert qa["How many triangles are there?"] == "None."
    assert qa["Where is the blue square?"] == "Top right."
    assert qa["What is in the center?"] == "A green circle."
    assert qa["What is in the bottom left?"] == "Nothing."
    assert qa["What is left of the blue square?"] == "A red circle."
    assert qa["What is left of the red circle?"] == "Nothing."
    assert caption(scene) == "A red circle at the top left, a blue square at the top right and a green circle in the center."


def test_world_records_are_short_training_samples(tmp_path):
    tok = load_tokenizer(make_world_tokenizer(tmp_path / "tok"))
    paths = make_world(tmp_path / "w", n_train=8, n_heldout=6, seed=1)
    rec = json.loads(paths["train_v1"].read_text())[0]
    ids = preprocess(rec, tok, "v1")["input_ids"]
    assert len(ids) < 150  # eight rounds: the template and the world's words are whole pieces
    ds = LLaVADataset(paths["heldout_v1"], tmp_path / "w", tok, "v1", "pad", 512)
    assert all("skip" not in ds[i] for i in range(len(ds)))


def test_each_object_lies_in_its_four_image_tokens():
    """The four image tokens (28 px squares of the 12 x 12 grid) around the cell's centre hold the whole object, and
    each holds part of it: read from the pixels."""
    import random

    from data.world import TOKEN, _scene, draw, object_tokens

    rng = random.Random(7)
    for _ in range(40):
        scene = _scene(rng)
        img = np.asarray(draw(scene)).astype(int)
        for o in scene:
            ys, xs = np.nonzero(np.abs(img - np.array(COLOURS[o["colour"]])).sum(-1) < 10)
            r, c = divmod(o["cell"], 3)
            inside = (ys // CELL == r) & (xs // CELL == c)  # this object's pixels (one object per cell)
            tokens = {int(y) // TOKEN * 12 + int(x) // TOKEN for y, x in zip(ys[inside], xs[inside])}
            assert tokens == set(object_tokens(o))


def test_held_out_questions_name_the_image_tokens_they_are_about(tmp_path):
    """A held-out record's target tokens, read back from the pixels: the named (or counted) object's tokens hold its
    colour; a "What is in ..." question's four tokens hold the answer's colour, or only background."""
    from data.world import TOKEN

    paths = make_world(tmp_path, n_train=4, n_heldout=60, seed=3)
    held = json.loads(paths["heldout_v1"].read_text())
    assert {r["kind"] for r in held} == set(QUESTION_KINDS)
    for rec in held:
        img = np.asarray(Image.open(tmp_path / rec["image"]).convert("RGB")).astype(int)
        q, a = rec["conversations"][0]["value"].lower(), rec["conversations"][1]["value"].lower()
        tokens = rec["target_tokens"]
        assert all(0 <= t < 144 for t in tokens) and len(tokens) % 4 == 0
        blocks = [img[t // 12 * TOKEN:(t // 12 + 1) * TOKEN, t % 12 * TOKEN:(t % 12 + 1) * TOKEN].reshape(-1, 3)
                  for t in tokens]
        named = [c for c in COLOURS if c in (a if rec["kind"] in ("colour", "what_at") else q)]
        if rec["kind"] == "count":
            assert len(tokens) == 4 * ["none", "one", "two", "three", "four"].index(a.rstrip(".")), rec
        elif rec["kind"] == "what_at" and a == "nothing.":
            assert all((np.abs(b - 250).sum(1) < 10).all() for b in blocks), rec  # background only
        else:
            assert len(tokens) == 4 and len(named) == 1, rec
            rgb = np.array(COLOURS[named[0]])
            assert all((np.abs(b - rgb).sum(1) < 10).any() for b in blocks), rec
