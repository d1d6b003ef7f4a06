"""Synthetic shapes data and the demo tokenizer: determinism, content, and a round trip through the real pipeline."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from data import LLaVADataset, build_prompt, load_tokenizer, make_demo_tokenizer, make_synthetic_dataset, preprocess
from data.synthetic import COLOURS


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_demo_tokenizer_is_deterministic_and_llama_like(tmp_path):
    a = make_demo_tokenizer(tmp_path / "a")
    b = make_demo_tokenizer(tmp_path / "b")
    assert _sha(a / "tokenizer.model") == _sha(b / "tokenizer.model")
    tok = load_tokenizer(a)
    assert 300 <= tok.vocab_size <= 512
    assert tok.sp.piece_to_id("<0x0A>") == 13  # byte fallback at LLaMA's ids
    # the template words are whole pieces, so demo sequences stay short
    assert tok.encode("USER: ASSISTANT:")[:1] == [tok.sp.piece_to_id("▁USER")]
    for text in ["A small red circle on the left of a white background.", "Zebra? 12 é 日本\n", "a  b"]:
        assert tok.decode(tok.encode(text)) == text  # byte fallback: any text round-trips
    assert tok.encode("A.</s>USER: ")[2] == 2 and tok.encode("A.</s>USER: ")[3] == tok.encode("USER: ")[0]


@pytest.mark.parametrize("kind", ["caption", "qa", "mixed"])
def test_synthetic_dataset_is_deterministic(tmp_path, kind):
    p1 = make_synthetic_dataset(tmp_path / "1", n=20, seed=5, kind=kind)
    p2 = make_synthetic_dataset(tmp_path / "2", n=20, seed=5, kind=kind)
    p3 = make_synthetic_dataset(tmp_path / "3", n=20, seed=6, kind=kind)
    assert p1.read_text() == p2.read_text() != p3.read_text()
    records = json.loads(p1.read_text())
    assert len(records) == 20
    for r in records:
        if "image" in r:
            assert _sha(p1.parent / r["image"]) == _sha(p2.parent / r["image"])


def test_synthetic_content(tmp_path):
    path = make_synthetic_dataset(tmp_path, n=200, seed=0, kind="mixed")
    records = json.loads(path.read_text())
    with_image = [r for r in records if "image" in r]
    text_only = [r for r in records if "image" not in r]
    assert text_only and len(with_image) > 150
    assert any(len(r["conversations"]) == 4 for r in records)  # some two-round conversations
    assert any(r["conversations"][0]["value"].endswith("<image>") for r in with_image)  # tag to be moved
    sizes = {Image.open(tmp_path / r["image"]).size for r in with_image}
    assert len(sizes) > 5 and any(w != h for w, h in sizes)
    # the answer to "What color is the X?" is the colour actually drawn: the image holds that colour
    for r in with_image:
        q, a = r["conversations"][0]["value"], r["conversations"][1]["value"]
        if "What color is the" in q and "background" not in q:
            colour = a.rstrip(".").lower()
            arr = np.asarray(Image.open(tmp_path / r["image"]))
            assert (np.abs(arr.astype(int) - COLOURS[colour]).sum(-1) == 0).sum() > 10, r
    with pytest.raises(ValueError, match="unknown kind"):
        make_synthetic_dataset(tmp_path, n=2, seed=0, kind="video")


@pytest.mark.parametrize("kind,template,mode", [("caption", "plain", "square"), ("mixed", "v1", "pad"),
                                                ("qa", "v1", "pad")])
def test_round_trip_through_the_dataset(tmp_path, kind, template, mode):
    tok = load_tokenizer(make_demo_tokenizer(tmp_path / "tok"))
    path = make_synthetic_dataset(tmp_path / "data", n=24, seed=0, kind=kind)
    ds = LLaVADataset(path, path.parent, tok, template, mode, max_len=512, cache_dir=tmp_path / "cache")
    records = json.loads(path.read_text())
    for i in range(len(ds)):
        s = ds[i]
        assert "skip" not in s, s
        answers = [t["value"] for t in records[i]["conversations"] if t["from"] == "gpt"]
        supervised = s["labels"][s["labels"] != -100].tolist()
        decoded = tok.decode(supervised, skip_special_tokens=True)
        assert decoded == ("\n" if template == "plain" else " ").join(answers) + ("\n" if template == "plain" else "")
        assert (s["image"] is not None) == ("image" in records[i])
    assert len(preprocess(records[0], tok, template)["input_ids"]) < 100
    assert -200 in build_prompt("What color is the circle?", tok)
