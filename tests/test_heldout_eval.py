"""Held-out evaluation in training: equal to a naive computation written here (full logits, greedy decoding without a
KV cache, one record at a time), and reported by the trainer in the progress log."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import train_alignkd
from data import LLaVADataset, load_tokenizer
from data.world import make_world, make_world_tokenizer
from evaluation.heldout import HeldOut, normalize_answer
from model import ATTN_IMPLEMENTATION, MobileVLM


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    tok_dir = make_world_tokenizer(root / "tok")
    paths = make_world(root / "w", n_train=16, n_heldout=10, seed=2)
    return root, tok_dir, paths


def _naive(model, tok, dataset):
    """Answer CE over all supervised tokens and exact match of greedily decoded first answers, the slow way."""
    nll, n, correct, by_kind = 0.0, 0, 0, {}
    for i in range(len(dataset)):
        s = dataset[i]
        ids, labels = s["input_ids"], s["labels"]
        image = s["image"][None]
        out = model(ids[None], images=image, labels=labels[None])
        lab = out.mm.labels[0, 1:]
        keep = lab != -100
        nll += float(F.cross_entropy(out.logits[0, :-1][keep].float(), lab[keep], reduction="sum"))
        n += int(keep.sum())
        sup = (labels != -100).nonzero().squeeze(1)
        start = int(sup[0])
        end = start
        while end < len(labels) and labels[end] != -100:
            end += 1
        prompt, ref = ids[:start].tolist(), ids[start:end].tolist()
        new = []
        for _ in range(len(ref) + 4):  # argmax of the full forward, token by token
            logits = model(torch.tensor([prompt + new]), images=image).logits[0, -1]
            new.append(int(logits.argmax()))
            if new[-1] == tok.eos_token_id:
                break
        answer = tok.decode([t for t in new if t != tok.eos_token_id]).strip()
        ok = normalize_answer(answer) == normalize_answer(tok.decode(ref[:-1]))
        correct += ok
        by_kind.setdefault(dataset.index[i]["kind"], []).append(ok)
    return nll / n, correct / len(dataset), {k: sum(v) / len(v) for k, v in by_kind.items()}


def _naive_grounding(model, dataset) -> float:
    """From the full first-layer attention maps of transformers' eager attention, one question token at a time."""
    model.model.set_attn_implementation("eager")
    try:
        per_record = []
        for i in range(len(dataset)):
            s = dataset[i]
            mm = model.prepare_multimodal(s["input_ids"][None], images=s["image"][None], labels=s["labels"][None])
            att = model.model(inputs_embeds=mm.inputs_embeds, position_ids=mm.position_ids,
                              output_attentions=True).attentions[0][0]  # [H, L, L]
            start = int(mm.vision_mask[0].nonzero()[0])
            answer = int((mm.labels[0] != -100).nonzero()[0])
            targets = [start + t for t in dataset.index[i]["target_tokens"]]
            if not targets:  # "How many squares?" where there are none: nothing to look at
                continue
            heads = []
            for h in range(att.shape[0]):
                shares = [float(att[h, r, targets].sum() / att[h, r, start:start + 144].sum())
                          for r in range(start + 144, answer)]
                heads.append(max(shares))
            per_record.append(sum(heads) / len(heads))
    finally:
        model.model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return sum(per_record) / len(per_record)


@pytest.fixture(scope="module")
def trained(world):
    """A tiny student trained briefly with CE on the world, evaluated by the trainer at steps 0, 20 and 40."""
    root, tok_dir, paths = world
    tok = load_tokenizer(tok_dir)
    MobileVLM.tiny(seed=3, vocab_size=tok.vocab_size, hidden_size=64, num_heads=2, num_layers=2).save_pretrained(
        root / "student", tokenizer_dir=tok_dir)
    out = root / "run"
    result = train_alignkd.main(["--data", str(paths["train_v1"]), "--image-folder", str(root / "w"), "--student",
                                 str(root / "student"), "--no-distill", "--output-dir", str(out), "--max-steps", "40",
                                 "--batch-size", "8", "--lr", "5e-3", "--num-workers", "0", "--eval-data",
                                 str(paths["heldout_v1"]), "--eval-every", "20", "--no-checkpointing"])
    return result, out


def test_trainer_logs_heldout_evaluation(trained):
    result, out = trained
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    evals = [r for r in log if "eval_acc" in r]
    assert [r["step"] for r in evals] == [0, 20, 40]
    assert [r["step"] for r in log] == list(range(0, 41))  # one record per step; step 0 is the untrained student
    assert all(r["eval_n"] == 10 for r in evals)
    assert all(0 < r["eval_grounding"] < 1 for r in evals)  # the world's records name their target tokens
    assert evals[-1]["eval_ce"] < evals[0]["eval_ce"]  # it learned something


def test_heldout_evaluation_equals_a_naive_computation(world, trained):
    root, tok_dir, paths = world
    result, out = trained
    tok = load_tokenizer(tok_dir)
    model = MobileVLM.from_pretrained(out / "checkpoint-40").eval()
    got = HeldOut(paths["heldout_v1"], root / "w", tok, "v1", "pad", 512).evaluate(model, batch_size=4)
    logged = result["evals"][-1]  # what the trainer logged
    assert {k: got[k] for k in ("eval_ce", "eval_acc", "eval_n")} == pytest.approx(
        {k: logged[k] for k in ("eval_ce", "eval_acc", "eval_n")}, rel=1e-5)
    assert got["eval_acc_by_kind"] == logged["eval_acc_by_kind"]
    dataset = LLaVADataset(paths["heldout_v1"], root / "w", tok, "v1", "pad", 512)
    with torch.no_grad():
        ce, acc, by_kind = _naive(model, tok, dataset)
    assert got["eval_ce"] == pytest.approx(ce, rel=1e-4)
    assert got["eval_acc"] == pytest.approx(acc)
    assert got["eval_acc_by_kind"] == pytest.approx(by_kind)
    assert 0 < acc < 1  # the comparison can tell right from wrong answers
    with torch.no_grad():
        grounding = _naive_grounding(model, dataset)
    assert got["eval_grounding"] == pytest.approx(grounding, rel=1e-3)  # batched float32 against one at a time
    assert model.qk_capture is None  # the evaluation captured q and k only while it ran


def test_normalize_answer():
    assert normalize_answer(" Top left.\nmore") == "top left"
    assert normalize_answer("A red circle.") == normalize_answer("a red circle")
    assert normalize_answer("Two.") != normalize_answer("Three.")
