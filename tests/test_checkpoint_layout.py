"""A saved checkpoint holds what the original MobileVLM code loads, read here with transformers as that code reads
it: `AutoTokenizer.from_pretrained(path, use_fast=False)` for the tokenizer, and `build_vision_tower`'s rule for
config.json's mm_vision_tower (an existing path, relative ones taken from the working directory, or an id that
starts with openai/laion; vision_tower_type "clip"), then `CLIPVisionConfig/CLIPVisionModel/CLIPImageProcessor
.from_pretrained(mm_vision_tower)`. A CLIP other than clip-vit-large-patch14-336 is written as the checkpoint's
`vision_tower/` folder, which our loader uses wherever the checkpoint is; older checkpoints ("tiny-clip" with an
inline config) still load."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data import load_tokenizer, make_demo_tokenizer, process_image
from data.constants import IMAGE_TOKEN_INDEX as IMG
from model import MobileVLM
from model.checkpoint import iter_tensors, weight_files

TEXTS = ["What colour is the square?",
         "A chat between a curious user and an artificial intelligence assistant. USER: What shape is it? "
         "ASSISTANT: a red circle</s>USER: and the blue one? ASSISTANT: square</s>"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    return make_demo_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer_dir) -> tuple[MobileVLM, Path]:
    model = MobileVLM.tiny(seed=3, vocab_size=load_tokenizer(tokenizer_dir).vocab_size).eval()
    folder = tmp_path_factory.mktemp("ckpt") / "checkpoint-7"
    model.save_pretrained(folder, tokenizer_dir=tokenizer_dir)
    return model, folder


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def original_accepts(config: dict) -> bool:
    """MobileVLM's build_vision_tower: which mm_vision_tower values it builds a CLIP tower from."""
    tower = config["mm_vision_tower"]
    return (os.path.exists(tower) or tower.startswith(("openai", "laion"))) and config["vision_tower_type"] == "clip"


def test_tokenizer_loads_with_auto_tokenizer_and_encodes_as_ours(saved, tokenizer_dir, offline):
    from transformers import AutoTokenizer

    _, folder = saved
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        assert (folder / name).is_file(), name
    tok = AutoTokenizer.from_pretrained(str(folder), use_fast=False)
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.pad_token_id) == (1, 2, 0, 0)
    ours = load_tokenizer(folder)
    assert ours.clean_up_tokenization_spaces is False  # the config written keeps our decoding as it was
    for text in TEXTS:  # legacy semantics: the text after "</s>" starts with its own "▁", as MobileVLM trained
        assert tok(text).input_ids == ours.encode(text, bos=True), text
    # a tokenizer folder that has its own tokenizer_config.json keeps it
    other = folder.parent / "own_config"
    (other / "tok").mkdir(parents=True)
    shutil.copy(tokenizer_dir / "tokenizer.model", other / "tok")
    (other / "tok" / "tokenizer_config.json").write_text('{"clean_up_tokenization_spaces": true}')
    MobileVLM.tiny(seed=3, vocab_size=ours.vocab_size).save_pretrained(other / "ckpt", tokenizer_dir=other / "tok")
    assert json.loads((other / "ckpt" / "tokenizer_config.json").read_text()) == {"clean_up_tokenization_spaces": True}


def test_vision_tower_folder_loads_with_transformers_and_gives_our_features(saved, offline):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    model, folder = saved
    config = json.loads((folder / "config.json").read_text())
    assert config["mm_vision_tower"] == str(folder.resolve() / "vision_tower")
    assert original_accepts(config)
    tower = config["mm_vision_tower"]
    assert CLIPVisionConfig.from_pretrained(tower).hidden_size == config["mm_hidden_size"]
    clip = CLIPVisionModel.from_pretrained(tower).eval()
    # the folder's weights are the checkpoint's own vision weights, bit for bit
    prefix = "model.vision_tower.vision_tower.vision_model."
    stored = {k[len(prefix):]: v for k, v in iter_tensors(weight_files(folder)) if k.startswith(prefix)}
    theirs = {k.removeprefix("vision_model."): v for k, v in clip.state_dict().items()}
    assert stored.keys() == theirs.keys()
    for k in stored:
        assert torch.equal(stored[k], theirs[k]), k
    ours = MobileVLM.from_pretrained(folder).eval()
    images = torch.randn(2, 3, 336, 336)
    with torch.no_grad():
        ref = clip(images, output_hidden_states=True).hidden_states[-2][:, 1:]  # what the original's tower returns
        assert torch.equal(ours.vision_tower(images), ref)
        assert torch.equal(model.vision_tower(images), ref)
    # V2's load_pretrained_model reads the image processor from that folder: it is data/images.py's preprocessing
    processor = CLIPImageProcessor.from_pretrained(tower)
    rng = np.random.default_rng(0)
    for shape in ((300, 420, 3), (336, 336, 3), (500, 280, 3)):
        img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
        pixels = torch.as_tensor(np.asarray(processor(img, return_tensors="np")["pixel_values"][0]))
        assert torch.equal(pixels, process_image(img, "square")), shape


def test_a_moved_checkpoint_and_an_older_one_still_load(saved, tmp_path):
    model, folder = saved
    ids, images = [[1, 5, IMG, 6, 7]], torch.randn(1, 3, 336, 336)
    with torch.no_grad():
        ref = model(ids, images=images).logits
    moved = tmp_path / "elsewhere"
    shutil.copytree(folder, moved)
    # the path in config.json no longer exists: the copy's own vision_tower/ folder is what our loader reads
    shutil.move(str(folder / "vision_tower"), str(tmp_path / "gone"))
    try:
        with torch.no_grad():
            assert torch.equal(MobileVLM.from_pretrained(moved).eval()(ids, images=images).logits, ref)
    finally:
        shutil.move(str(tmp_path / "gone"), str(folder / "vision_tower"))
    # saving the loaded model elsewhere points config.json at the new folder's own CLIP
    again = tmp_path / "again"
    MobileVLM.from_pretrained(moved).save_pretrained(again)
    assert json.loads((again / "config.json").read_text())["mm_vision_tower"] == str(again.resolve() / "vision_tower")
    # an older checkpoint: "tiny-clip" with the inline config, no vision_tower/ folder
    old = tmp_path / "old"
    shutil.copytree(folder, old)
    shutil.rmtree(old / "vision_tower")
    cfg = json.loads((old / "config.json").read_text())
    cfg["mm_vision_tower"] = "tiny-clip"
    (old / "config.json").write_text(json.dumps(cfg))
    with torch.no_grad():
        assert torch.equal(MobileVLM.from_pretrained(old).eval()(ids, images=images).logits, ref)


def test_official_clip_is_named_not_copied(tmp_path):
    """A model whose mm_vision_tower names clip-vit-large-patch14-336 (the hub id, or a local folder so named) keeps
    that name; its CLIP weights are in pytorch_model.bin, as in mtgv/MobileVLM_V2-*."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4)).save_pretrained(tmp_path / "llm")
    clip_dir = tmp_path / "clip-vit-large-patch14-336"
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, image_size=336, patch_size=14)).save_pretrained(clip_dir)
    model = MobileVLM.from_llm(tmp_path / "llm", clip_dir)
    model.save_pretrained(tmp_path / "ckpt")
    assert not (tmp_path / "ckpt" / "vision_tower").exists()
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["mm_vision_tower"] == str(clip_dir)
