"""--cache-teacher DIR: a run from the cache equals a live-teacher run, refusals name what differs, an interrupted
build resumes, and `sample_bytes` against the files."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

import train_alignkd
from losses import logged_terms
from tiny_run import PAPER, tiny_args
from data import LLaVADataset, load_tokenizer, make_demo_tokenizer
from losses import AlignKDLoss, KDBatch, KDSide
from model import MobileVLM
from training import teacher_cache
from model.quantize import load_teacher, model_bytes
from training.teacher_cache import (CacheMismatch, IndexedCollator, IndexedDataset, TeacherCache, compare_manifests,
                                 sample_bytes, shard_path)

FAST = ["--num-workers", "0", "--save-every", "1000"]
STEPS = 3
SHARD = 16  # the demo's 96 samples in 6 shards


def _same_terms(a: list[dict], b: list[dict], rel: float = 1e-5) -> None:
    assert [h["step"] for h in a] == [h["step"] for h in b]
    for x, y in zip(a, b):
        for k in logged_terms():
            assert y[k] == pytest.approx(x[k], rel=rel, abs=1e-12), (x["step"], k, x[k], y[k])


def _as_user(root, out, *extra) -> list[str]:
    """The demo's settings spelled out for a non-demo run on the demo's assets under `root` (same data, template
    v1 / pad, max_len 512, batch 4, lr 3e-3): its first step equals the demo's first step."""
    assets = root / "demo_assets"
    return ["--subset", "mix2m", "--data", str(assets / "synthetic_mixed.json"), "--image-folder", str(assets),
            "--student", str(assets / "student"), "--output-dir", str(out), "--max-len", "512", "--batch-size", "4",
            "--lr", "3e-3", "--max-steps", "1", *FAST, *PAPER, *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A live-teacher demo run and a demo run with --cache-teacher (which builds the cache first), same seed."""
    live, cached = tmp_path_factory.mktemp("live"), tmp_path_factory.mktemp("cached")
    a = train_alignkd.main(["--output-dir", str(live), *tiny_args(live, str(STEPS)), *FAST])["history"]
    b = train_alignkd.main(["--output-dir", str(cached), *tiny_args(cached, str(STEPS)), "--cache-teacher",
                            str(cached / "tc"), "--cache-shard-size", str(SHARD), *FAST])["history"]
    return {"live": live, "cached": cached, "cache": cached / "tc", "live_hist": a, "cached_hist": b}


def test_run_from_the_cache_gives_the_live_teachers_losses(runs, monkeypatch):
    # first run: the build pass, then training from the cache (fp32 on CPU: the same values up to summation order)
    _same_terms(runs["live_hist"], runs["cached_hist"])
    assert all(h["attn"] > 0 and h["proj_focus"] > 0 and h["logit"] > 0 for h in runs["cached_hist"])
    # second run on the complete cache: the teacher is not loaded at all
    def no_teacher(*a, **k):
        raise AssertionError("the teacher was loaded although the cache is complete")
    monkeypatch.setattr(train_alignkd, "load_teacher", no_teacher)
    again = train_alignkd.main(["--output-dir", str(runs["cached"]), *tiny_args(runs["cached"], str(STEPS)), "--cache-teacher",
                                str(runs["cache"]), "--overwrite", *FAST])["history"]
    _same_terms(runs["cached_hist"], again, rel=1e-7)


def test_complete_cache_trains_without_teacher_argument(runs, tmp_path, monkeypatch):
    monkeypatch.setattr(train_alignkd, "load_teacher", None)  # would fail if called
    hist = train_alignkd.main(_as_user(runs["cached"], tmp_path / "out", "--cache-teacher",
                                       str(runs["cache"])))["history"]
    _same_terms(runs["live_hist"][:1], hist)


def test_cached_kdside_equals_the_live_teachers_in_the_loss(runs):
    """One batch by hand: the KDSide rebuilt from the cache (zeros off the rows the loss reads) gives the same terms
    as the live teacher's full tensors, for image and text-only samples."""
    assets = runs["cached"] / "demo_assets"
    tok = load_tokenizer(assets / "tokenizer")
    ds = LLaVADataset(assets / "synthetic_mixed.json", assets, tok, "v1", "pad", 512)
    texts = [i for i in range(len(ds)) if ds[i]["image"] is None]
    indices = [0, texts[0], 5, 17]
    batch = IndexedCollator(tok.pad_token_id)([IndexedDataset(ds)[i] for i in indices])
    assert batch["index"] == indices and not bool(batch["has_image"][1])
    student = MobileVLM.from_pretrained(assets / "student").eval()
    student.enable_qk_capture()
    teacher = load_teacher(assets / "teacher", "bf16", device="cpu", compute_dtype=torch.float32)
    teacher.enable_qk_capture()
    args = (batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        s = student(*args, images=batch["images"], labels=batch["labels"], compute_logits=False)
        t = teacher(*args, images=batch["images"], compute_logits=False)
    kd = KDBatch(s.mm.labels, s.mm.attention_mask, s.mm.vision_mask, s.mm.text_mask, s.mm.has_image,
                 s.mm.vision_start)
    s_side = KDSide(s.hidden_states, student.lm_head.weight, s.q0, s.k0, s.mm.vision_tokens)
    live = KDSide(t.hidden_states, teacher.lm_head.weight, t.q0, t.k0, t.mm.vision_tokens)
    cache = TeacherCache(runs["cache"])
    cached = cache.teacher_side(batch["index"], kd, torch.device("cpu"), torch.float32)
    torch.testing.assert_close(cached.lm_head_weight, live.lm_head_weight, rtol=0, atol=0)
    loss = AlignKDLoss(teacher.num_heads, student.num_heads, teacher.hidden_size, student.hidden_size,
                       backend="reference")
    with torch.no_grad():
        a, b = loss(s_side, live, kd), loss(s_side, cached, kd)
    for k in logged_terms():
        assert float(b[k]) == pytest.approx(float(a[k]), rel=1e-5, abs=1e-12), k
    # the layout check: another sample's entry does not fit this batch row
    with pytest.raises(CacheMismatch, match="sample"):
        cache.teacher_side([indices[1], indices[0], 5, 17], kd, torch.device("cpu"), torch.float32)


def test_cache_made_with_another_teacher_tokenizer_or_data_is_refused(runs, tmp_path):
    root, cache = runs["cached"], str(runs["cache"])
    base = _as_user(root, tmp_path / "out", "--cache-teacher", cache)
    # another teacher: same config, other weights
    other = MobileVLM.tiny(seed=7, vocab_size=load_tokenizer(root / "demo_assets" / "tokenizer").vocab_size,
                           hidden_size=128, num_heads=8, num_layers=3)
    other.save_pretrained(tmp_path / "teacher2", tokenizer_dir=root / "demo_assets" / "tokenizer")
    with pytest.raises(SystemExit, match=r"another teacher weights .*pytorch_model.bin content differs"):
        train_alignkd.main(base + ["--teacher", str(tmp_path / "teacher2")])
    # the right teacher is accepted (and checked without being loaded: the run trains from the cache)
    train_alignkd.main(_as_user(root, tmp_path / "ok", "--cache-teacher", cache,
                                "--teacher", str(root / "demo_assets" / "teacher")))
    # another tokenizer
    make_demo_tokenizer(tmp_path / "tok2", vocab_size=400)
    with pytest.raises(SystemExit, match="another tokenizer"):
        train_alignkd.main(base + ["--tokenizer", str(tmp_path / "tok2")])
    # another data file (one record fewer)
    records = json.loads((root / "demo_assets" / "synthetic_mixed.json").read_text())
    (tmp_path / "other.json").write_text(json.dumps(records[:-1]))
    with pytest.raises(SystemExit, match=r"another data file \(path .*other.json.*another number of samples 96 -> 95"):
        train_alignkd.main(base + ["--data", str(tmp_path / "other.json")])
    # a copy of the data file elsewhere (same size and content): the path is part of the identity
    shutil.copytree(root / "demo_assets", tmp_path / "assets2")
    data2 = tmp_path / "assets2" / "synthetic_mixed.json"
    moved = _as_user(root, tmp_path / "out2", "--cache-teacher", cache)
    moved[moved.index("--data") + 1] = str(data2)
    with pytest.raises(SystemExit, match=r"another data file \(path"):
        train_alignkd.main(moved)
    # other settings
    with pytest.raises(SystemExit, match="another max_len 512 -> 400"):
        train_alignkd.main(base + ["--max-len", "400"])
    with pytest.raises(SystemExit, match="another teacher quantization bf16 -> nf4"):
        train_alignkd.main(base + ["--teacher", str(root / "demo_assets" / "teacher"), "--teacher-dtype", "nf4"])


def test_manifest_differences_are_named():
    m = {"format": teacher_cache.FORMAT, "version": teacher_cache.VERSION,
         "teacher": {"path": "/t", "config": {"hidden_size": 4096, "num_attention_heads": 32},
                     "weights": [{"name": "a.bin", "size": 10, "sha256_sampled": "x"}], "quant": "nf4",
                     "vision_tower_config": None},
         "tokenizer": "ab" * 32, "data": {"path": "/d.json", "size": 5, "mtime_ns": 1}, "image_folder": "/i",
         "template": "v1", "image_mode": "pad", "max_len": 2048, "num_samples": 9}
    assert compare_manifests(m, m) == []
    other = json.loads(json.dumps(m))
    other["teacher"]["config"]["hidden_size"] = 2048
    other["teacher"]["weights"][0]["size"] = 11
    other["data"]["mtime_ns"] = 2
    other["template"] = "plain"
    diffs = compare_manifests(m, other)
    assert diffs == ["teacher config (hidden_size 4096 -> 2048)", "teacher weights /t -> /t: a.bin size 10 -> 11 B",
                     "data file (modification time)", "template 'v1' -> 'plain'"]
    no_teacher = {**m, "teacher": None}  # no --teacher: the cache's teacher is used as is
    assert compare_manifests(m, no_teacher) == []
    bf16 = json.loads(json.dumps(m))
    bf16["teacher"]["quant"] = "bf16"
    assert compare_manifests(m, bf16, check_quant=False) == []
    assert compare_manifests({**m, "version": 0}, m)[0].startswith("cache format")


def test_interrupted_build_resumes_at_the_first_missing_shard(runs, tmp_path, monkeypatch):
    out, cache = tmp_path / "run", tmp_path / "run" / "tc"
    argv = ["--output-dir", str(out), *tiny_args(out, "1"), "--cache-teacher", str(cache), "--cache-shard-size",
            str(SHARD), *FAST]
    real, written = teacher_cache.write_shard, []

    def crash_after_two(folder, shard, records):
        if len(written) == 2:
            raise RuntimeError("simulated crash")
        real(folder, shard, records)
        written.append(shard)

    monkeypatch.setattr(teacher_cache, "write_shard", crash_after_two)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_alignkd.main(argv)
    assert written == [0, 1] and not (cache / "index.json").exists()
    kept = {s: shard_path(cache, s).stat().st_mtime_ns for s in written}
    # without --teacher an incomplete cache cannot be used
    with pytest.raises(SystemExit, match="is partial: pass --teacher"):
        train_alignkd.main(_as_user(out, tmp_path / "x", "--cache-teacher", str(cache)))
    resumed = []
    monkeypatch.setattr(teacher_cache, "write_shard", lambda f, s, r: (real(f, s, r), resumed.append(s)))
    train_alignkd.main(argv)
    assert resumed == [2, 3, 4, 5]
    assert {s: shard_path(cache, s).stat().st_mtime_ns for s in written} == kept
    assert (cache / "index.json").exists() and not list(cache.rglob(".*tmp*"))
    # the same content as the uninterrupted build of the fixture (same data, same micro-batches)
    a, b = TeacherCache(runs["cache"]), TeacherCache(cache)
    assert a.index["cached"] == b.index["cached"] == 96
    for i in range(96):
        (ma, ta), (mb, tb) = a.sample(i), b.sample(i)
        assert ma == mb and ta.keys() == tb.keys()
        for k in ta:
            assert torch.equal(ta[k], tb[k]), (i, k)


def test_folder_that_is_not_a_cache_and_no_distill_are_refused(runs, tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="no manifest.json: not a teacher cache"):
        train_alignkd.main(_as_user(runs["cached"], tmp_path / "o", "--cache-teacher", str(tmp_path / "junk")))
    with pytest.raises(SystemExit, match="--no-distill"):
        train_alignkd.main(_as_user(runs["cached"], tmp_path / "o", "--cache-teacher", str(tmp_path / "c"),
                                    "--no-distill"))


def test_sizes(runs, capsys):
    """`sample_bytes` at real shapes (what bench/cache_size.py prints); the demo cache's files are the formula plus
    small headers; the teacher data a step reads from the cache is far smaller than the teacher weights it replaces on the
    device. (On disk the whole cache is larger than the teacher: it trades disk for GPU memory and compute.)"""
    for args, expected in (((197, 18, 3, True), 2_533_632), ((445, 300, 300, True), 7_312_896),
                           ((2048, 1869, 1000, True), 26_101_376), ((512, 0, 256, False), 2_097_152)):
        assert sample_bytes(*args) == expected

    cache = TeacherCache(runs["cache"])
    teacher_dir = runs["cached"] / "demo_assets" / "teacher"
    cfg = json.loads((teacher_dir / "config.json").read_text())
    shape = dict(hidden=cfg["hidden_size"], heads=cfg["num_attention_heads"], kv_heads=cfg["num_key_value_heads"],
                 head_dim=cfg["hidden_size"] // cfg["num_attention_heads"], element_size=4)  # fp32 on CPU
    per_sample = []
    for i in range(len(cache)):
        meta, tensors = cache.sample(i)
        n = sample_bytes(meta["n"], meta["n_text"], meta["n_sup"], meta["vision_start"] >= 0, **shape)
        assert n == sum(t.numel() * t.element_size() for t in tensors.values())
        per_sample.append(n)
    files = cache.index["shard_bytes"]
    headers = files - sum(per_sample)
    assert 0 < headers < 8 * 2**10 * cache.index["num_shards"]
    teacher = load_teacher(teacher_dir, "bf16", device="cpu", compute_dtype=torch.float32)
    weights = model_bytes(teacher)
    step = cache.index["lm_head_bytes"] + 4 * max(per_sample)  # lm_head + the largest micro-batch of 4
    assert step < weights
    with capsys.disabled():
        print(f"\ndemo teacher cache: {files / len(per_sample):,.0f} B/sample on disk "
              f"({sum(per_sample) / len(per_sample):,.0f} B of tensors), "
              f"{files + cache.index['lm_head_bytes']:,} B in all for {len(per_sample)} samples; "
              f"teacher weights {weights:,} B; per step from the cache at most {step:,} B")
