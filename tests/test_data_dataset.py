"""LLaVA dataset: the on-disk JSON index, skipping bad samples, the collator, subsets."""
from __future__ import annotations

import json
import logging
import os
import pickle
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

import data.json_index as json_index
from data import (SUBSETS, Collator, DataFileError, JsonListIndex, LLaVADataset, load_tokenizer,
                  make_demo_tokenizer, make_synthetic_dataset, resolve_subset)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(make_demo_tokenizer(tmp_path_factory.mktemp("tok")))


def _conv(q, a):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


@pytest.fixture()
def bad_data(tmp_path):
    """A JSON with one good record of each kind and one record per skip reason."""
    root = tmp_path / "root"
    (root / "img").mkdir(parents=True)
    Image.new("RGB", (40, 30), (200, 10, 10)).save(root / "img" / "good.png")
    (root / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(root / "img" / "full.png")
    full = (root / "img" / "full.png").read_bytes()
    # cut inside the pixel data: PIL fails on it unless LOAD_TRUNCATED_IMAGES, which MobileVLM's training sets
    (root / "img" / "truncated.png").write_bytes(full[: len(full) // 2])
    long_answer = " ".join(["red circle"] * 80)
    records = [
        {"id": "good", "image": "img/good.png", "conversations": _conv("<image>\nWhat color?", "Red.")},
        {"id": "text", "conversations": _conv("What is 2 plus 3?", "5.")},
        {"id": "truncated", "image": "img/truncated.png", "conversations": _conv("Q?\n<image>", "A.")},
        {"id": "missing", "image": "img/nope.png", "conversations": _conv("<image>\nQ?", "A.")},
        {"id": "missing2", "image": "img/nope2.png", "conversations": _conv("<image>\nQ?", "A.")},
        {"id": "corrupt", "image": "img/corrupt.png", "conversations": _conv("<image>\nQ?", "A.")},
        {"id": "malformed", "image": "img/good.png", "conversations": [{"from": "gpt", "value": "A."}]},
        {"id": "two", "image": "img/good.png", "conversations": _conv("<image>\nQ?<image>", "A.")},
        {"id": "long", "image": "img/good.png", "conversations": _conv("<image>\nQ?", long_answer)},
        "not a record",
    ]
    path = root / "data.json"
    path.write_text(json.dumps(records))
    return path, root


EXPECTED_SKIPS = {"missing": "missing_image", "missing2": "missing_image", "corrupt": "corrupt_image",
                  "malformed": "bad_record", "two": "two_images", "long": "too_long", "#9": "bad_record"}


def test_bad_samples_are_skipped_and_counted_never_raised(tok, bad_data, tmp_path, caplog):
    path, root = bad_data
    ds = LLaVADataset(path, root, tok, "v1", "pad", max_len=300, cache_dir=tmp_path / "cache")
    assert len(ds) == 10
    items = [ds[i] for i in range(len(ds))]
    assert {it["id"]: it["skip"] for it in items if "skip" in it} == EXPECTED_SKIPS
    assert "nope.png" in items[3]["detail"] and "300" in items[8]["detail"]
    good, text = items[0], items[1]
    assert good["image"].shape == (3, 336, 336) and text["image"] is None
    assert (good["input_ids"] == -200).sum() == 1 and (text["input_ids"] == -200).sum() == 0
    with caplog.at_level(logging.WARNING, logger="data.dataset"):
        batch = Collator()(items)
    assert batch["skipped"] == Counter(EXPECTED_SKIPS.values())
    assert batch["ids"] == ["good", "text", "truncated"]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == len(set(EXPECTED_SKIPS.values()))  # one line per reason, the first occurrence
    assert any("missing" in w and "nope.png" in w for w in warnings)
    assert not any("missing2" in w for w in warnings)


def test_image_paths_must_stay_inside_the_image_folder(tok, tmp_path, caplog):
    """An absolute path, "..", or a symlink that leads out of the image folder is skipped and counted, never opened;
    a symlink or ".." that stays inside still loads."""
    root, outside = tmp_path / "root", tmp_path / "elsewhere"
    (root / "img").mkdir(parents=True)
    outside.mkdir()
    Image.new("RGB", (20, 20), (0, 0, 255)).save(outside / "secret.png")
    Image.new("RGB", (20, 20), (0, 255, 0)).save(root / "img" / "real.png")
    (root / "img" / "out.png").symlink_to(outside / "secret.png")
    (root / "img" / "in.png").symlink_to(root / "img" / "real.png")
    (root / "linked").symlink_to(outside)  # a linked folder that leads out
    cases = {"absolute": str(outside / "secret.png"), "dotdot": "../elsewhere/secret.png",
             "symlink-out": "img/out.png", "folder-link-out": "linked/secret.png",
             "absolute-missing": "/nonexistent.png", "symlink-in": "img/in.png", "dotdot-in": "img/../img/real.png",
             "absolute-in": str(root / "img/real.png")}
    records = [{"id": k, "image": v, "conversations": _conv("<image>\nWhat color?", "Green.")}
               for k, v in cases.items()]
    (tmp_path / "data.json").write_text(json.dumps(records))
    ds = LLaVADataset(tmp_path / "data.json", root, tok, "v1", "pad", 300, cache_dir=tmp_path / "cache")
    items = {it["id"]: it for it in (ds[i] for i in range(len(ds)))}
    out = ["absolute", "dotdot", "symlink-out", "folder-link-out", "absolute-missing"]
    assert {k: items[k].get("skip") for k in out} == dict.fromkeys(out, "image_outside_folder")
    assert str(outside / "secret.png") in items["symlink-out"]["detail"]
    assert f"outside the image folder {root.resolve()}" in items["dotdot"]["detail"]
    for k in ("symlink-in", "dotdot-in", "absolute-in"):
        assert "skip" not in items[k] and items[k]["image"].shape == (3, 336, 336)
    with caplog.at_level(logging.WARNING, logger="data.dataset"):
        batch = Collator()(list(items.values()))
    assert batch["skipped"] == Counter({"image_outside_folder": 5}) and len(batch["ids"]) == 3
    assert any("image_outside_folder" in r.getMessage() for r in caplog.records)


def test_image_path_with_a_nul_character_is_a_bad_record(tok, tmp_path):
    (tmp_path / "img").mkdir()
    rec = {"id": "nul", "image": "img/a\u0000.png", "conversations": _conv("<image>\nQ?", "A.")}
    (tmp_path / "data.json").write_text(json.dumps([rec]))
    ds = LLaVADataset(tmp_path / "data.json", tmp_path, tok, "v1", "pad", 300, cache_dir=tmp_path / "cache")
    assert ds[0]["skip"] == "bad_record"


def test_too_long_counts_the_144_image_tokens(tok, bad_data, tmp_path):
    path, root = bad_data
    n = len(LLaVADataset(path, root, tok, "v1", "pad", 10_000, tmp_path)[0]["input_ids"])
    fits = LLaVADataset(path, root, tok, "v1", "pad", max_len=n - 1 + 144, cache_dir=tmp_path)
    assert "skip" not in fits[0]
    short = LLaVADataset(path, root, tok, "v1", "pad", max_len=n - 1 + 143, cache_dir=tmp_path)
    assert short[0]["skip"] == "too_long"


def test_no_supervised_tokens_is_skipped(tok, bad_data, tmp_path, monkeypatch):
    path, root = bad_data
    monkeypatch.setattr("data.dataset.preprocess", lambda r, t, tpl: {"input_ids": [1, 5], "labels": [-100, -100]})
    ds = LLaVADataset(path, root, tok, "v1", "pad", 300, tmp_path)
    assert ds[1]["skip"] == "no_supervised_tokens"


def test_all_skipped_batch_returns_only_the_counter():
    out = Collator()([{"skip": "missing_image", "id": "a", "detail": "x"}])
    assert out == {"skipped": Counter({"missing_image": 1})}


def test_collator_pads_right(tok, tmp_path):
    path = make_synthetic_dataset(tmp_path / "syn", n=40, seed=1, kind="mixed")
    ds = LLaVADataset(path, path.parent, tok, "v1", "pad", 2048, tmp_path / "cache")
    samples = [ds[i] for i in range(len(ds))]
    text_only = [s for s in samples if s["image"] is None]
    with_image = [s for s in samples if s["image"] is not None]
    assert text_only and with_image
    batch_in = [with_image[0], text_only[0], with_image[1]]
    b = Collator()(batch_in)
    lengths = [len(s["input_ids"]) for s in batch_in]
    L = max(lengths)
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape == (3, L)
    assert b["attention_mask"].dtype == torch.bool and b["has_image"].tolist() == [True, False, True]
    assert b["images"].shape == (3, 3, 336, 336)
    assert b["images"][1].abs().sum() == 0 and b["images"][0].abs().sum() > 0
    torch.testing.assert_close(b["images"][2], with_image[1]["image"])
    for j, (s, n) in enumerate(zip(batch_in, lengths)):
        assert b["attention_mask"][j].sum() == n and b["attention_mask"][j, :n].all()
        assert b["input_ids"][j, :n].tolist() == s["input_ids"].tolist() and (b["input_ids"][j, n:] == 0).all()
        assert b["labels"][j, :n].tolist() == s["labels"].tolist() and (b["labels"][j, n:] == -100).all()
    assert not b["skipped"]


def test_dataloader_with_workers(tok, tmp_path):
    path = make_synthetic_dataset(tmp_path, n=12, seed=2, kind="qa")
    ds = LLaVADataset(path, tmp_path, tok, "v1", "pad", 2048, tmp_path / "cache")
    loader = torch.utils.data.DataLoader(ds, batch_size=5, num_workers=2, collate_fn=Collator())
    batches = list(loader)
    assert sum(len(b["ids"]) for b in batches) == 12
    assert [i for b in batches for i in b["ids"]] == [f"qa-{i:05d}" for i in range(12)]


def test_missing_json_or_image_folder_is_a_clear_error(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"dataset JSON not found: {tmp_path / 'x.json'}.*JSON list.*"
                                                "MobileVLM_V2_FT_Mix2M.json"):
        LLaVADataset(tmp_path / "x.json", tmp_path, tok, "v1", "pad", 2048)
    (tmp_path / "x.json").write_text("[]")
    with pytest.raises(FileNotFoundError, match=f"image folder not found: {tmp_path / 'imgs'}"):
        LLaVADataset(tmp_path / "x.json", tmp_path / "imgs", tok, "v1", "pad", 2048)
    with pytest.raises(ValueError, match="unknown template"):
        LLaVADataset(tmp_path / "x.json", tmp_path, tok, "llava", "pad", 2048)
    with pytest.raises(ValueError, match="unknown image mode"):
        LLaVADataset(tmp_path / "x.json", tmp_path, tok, "v1", "crop", 2048)


# ---- the JSON index ----

TRICKY = [{"id": "a", "v": "brackets ] } [ { and , commas"}, {"id": "b", "v": "escaped \" quote \\\" and \\\\"},
          {"id": "c", "v": "héllo 日本 😀 ünïcode"}, {"id": 7, "nested": [[1, 2], {"x": [3]}]}, [], 3.5, "s", None,
          {"id": "e", "v": ""}, 12345678]


@pytest.mark.parametrize("indent", [None, 2])
def test_index_reads_back_every_record(tmp_path, monkeypatch, indent):
    monkeypatch.setattr(json_index, "_BLOCK", 7)  # records cross block boundaries, as in a multi-GB file
    path = tmp_path / "t.json"
    path.write_text(" \n" + json.dumps(TRICKY * 3, indent=indent, ensure_ascii=False) + "\n")
    index = JsonListIndex(path, tmp_path / "cache")
    assert len(index) == len(TRICKY) * 3
    assert [index[i] for i in range(len(index))] == TRICKY * 3


def test_index_errors_and_empty_list(tmp_path):
    (tmp_path / "empty.json").write_text("[ ]")
    assert len(JsonListIndex(tmp_path / "empty.json", tmp_path)) == 0
    (tmp_path / "obj.json").write_text('{"id": 1}')
    with pytest.raises(DataFileError, match=r"obj.json: byte offset 0: not a JSON list.*found a JSON object"):
        JsonListIndex(tmp_path / "obj.json", tmp_path)
    (tmp_path / "bad.json").write_text('[{"id": 1}, {"id": 2,}]')
    with pytest.raises(DataFileError, match="bad.json: record 1 / byte offset 21: invalid JSON"):
        JsonListIndex(tmp_path / "bad.json", tmp_path)
    (tmp_path / "cut.json").write_text('[{"id": 1}, {"id": 2}')
    with pytest.raises(ValueError, match="cut.json: record 2 / byte offset 21: .*found the end of the file"):
        JsonListIndex(tmp_path / "cut.json", tmp_path)


def test_index_is_built_once_and_memory_mapped(tok, tmp_path, monkeypatch):
    path = make_synthetic_dataset(tmp_path, n=30, seed=3, kind="mixed")
    cache = tmp_path / "cache"
    first = LLaVADataset(path, tmp_path, tok, "v1", "pad", 2048, cache)
    assert len(first) == 30 and len(list(cache.glob("*.npy"))) == 1

    def no_rebuild(p):
        raise AssertionError("re-indexed")

    monkeypatch.setattr(json_index, "build_offsets", no_rebuild)
    second = LLaVADataset(path, tmp_path, tok, "v1", "pad", 2048, cache)
    assert len(second) == 30 and isinstance(second.index.offsets, np.memmap)
    assert second[5]["id"] == first[5]["id"] == "mixed-00005"
    # what a DataLoader worker receives holds no records, only paths (the offsets are mapped again lazily)
    assert len(pickle.dumps(second.index)) < 1000
    assert pickle.loads(pickle.dumps(second))[5]["id"] == "mixed-00005"
    # a changed file (size or mtime) is indexed again
    monkeypatch.undo()
    records = json.loads(path.read_text())
    path.write_text(json.dumps(records[:10]))
    os.utime(path, ns=(1, 1))
    assert len(LLaVADataset(path, tmp_path, tok, "v1", "pad", 2048, cache)) == 10
    assert len(list(cache.glob("*.npy"))) == 2


# ---- subsets ----

def test_resolve_subset(tmp_path):
    sub = SUBSETS["sharegpt4v"]
    (tmp_path / "pretrain_data").mkdir()
    (tmp_path / sub.json).write_text("[]")
    assert resolve_subset("sharegpt4v", data_root=tmp_path) == (
        tmp_path / "pretrain_data/share-captioner_coco_lcs_sam_1246k_1107.json", tmp_path / "pretrain_data",
        "plain", "square")
    with pytest.raises(FileNotFoundError, match="mix2m JSON not found: .*finetune_data/MobileVLM_V2_FT_Mix2M.json"):
        resolve_subset("mix2m", data_root=tmp_path)
    custom = tmp_path / "mine.json"
    custom.write_text("[]")
    assert resolve_subset("mix2m", data=custom, image_folder=tmp_path) == (custom, tmp_path, "v1", "pad")
    with pytest.raises(ValueError, match="needs --data-root"):
        resolve_subset("mix2m", data=custom)
    with pytest.raises(FileNotFoundError, match="data root not found"):
        resolve_subset("mix2m", data_root=tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        resolve_subset("mix2m", data=custom, image_folder=tmp_path / "nope")
    with pytest.raises(ValueError, match="unknown subset 'coco'.*demo"):
        resolve_subset("coco", data_root=tmp_path)


def test_demo_subset_resolves_to_the_synthetic_data(tok, tmp_path):
    make_synthetic_dataset(tmp_path, n=8, seed=0, kind="mixed")
    json_path, folder, template, mode = resolve_subset("demo", data_root=tmp_path)
    ds = LLaVADataset(json_path, folder, tok, template, mode, 2048, tmp_path / "cache")
    assert len(ds) == 8 and all("skip" not in ds[i] for i in range(8))
