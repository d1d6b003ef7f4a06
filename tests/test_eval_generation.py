"""Batched greedy generation: same tokens as batch size 1 and as a cache-free loop; per-row EOS; decoding."""
from __future__ import annotations

import random

import pytest
import torch

from data.constants import IMAGE_TOKEN_INDEX as IMG
from model import MobileVLM
from model.generation import decode_answer, greedy_generate, length_sorted_batches


@pytest.fixture(scope="module")
def tiny() -> MobileVLM:
    return MobileVLM.tiny(seed=3).eval()


def _prompts(n: int, seed: int = 0):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    prompts, images = [], []
    for i in range(n):
        ids = [1] + [rng.randrange(3, 512) for _ in range(rng.randrange(3, 30))]
        if i % 3 != 2:  # every third prompt is text-only
            ids.insert(rng.randrange(1, len(ids)), IMG)
            images.append(torch.randn(3, 336, 336))
        else:
            images.append(None)
        prompts.append(ids)
    return prompts, images


def _no_cache_greedy(model, ids, image, max_new_tokens, eos):
    """The plain loop: run the whole sequence again for every new token."""
    out = []
    for _ in range(max_new_tokens):
        logits = model([ids + out], images=None if image is None else image[None]).logits[0, -1]
        out.append(int(logits.argmax()))
        if out[-1] == eos:
            break
    return out


def test_batched_matches_batch_size_one(tiny):
    prompts, images = _prompts(7)
    assert len({len(p) for p in prompts}) > 3
    singles = [greedy_generate(tiny, [p], [im], 12)[0] for p, im in zip(prompts, images)]
    assert greedy_generate(tiny, prompts, images, 12) == singles
    assert len({tuple(s) for s in singles}) == len(singles)  # the rows really differ


def test_cache_matches_recomputation(tiny):
    prompts, images = _prompts(3, seed=1)
    with torch.no_grad():
        for p, im in zip(prompts, images):
            assert greedy_generate(tiny, [p], [im], 8)[0] == _no_cache_greedy(tiny, p, im, 8, eos=2)


def test_rows_stop_at_their_own_eos(tiny):
    prompts, images = _prompts(6, seed=2)
    free = [greedy_generate(tiny, [p], [im], 10)[0] for p, im in zip(prompts, images)]
    eos = free[0][3]  # a token that row 0 produces at step 3 plays EOS
    singles = [greedy_generate(tiny, [p], [im], 10, eos_token_id=eos)[0] for p, im in zip(prompts, images)]
    assert singles[0] == free[0][:4]
    assert any(len(s) == 10 and eos not in s for s in singles)  # some rows never stop early
    assert greedy_generate(tiny, prompts, images, 10, eos_token_id=eos) == singles


def test_length_sorted_batches():
    assert length_sorted_batches([3, 9, 1, 7, 5], 2) == [[1, 3], [4, 0], [2]]


def test_decode_answer_with_llama_tokenizer(llama_tokenizer_dir):
    from data.tokenizer import load_tokenizer

    tok = load_tokenizer(llama_tokenizer_dir)
    ids = tok.encode("Yes, two dogs.") + [2]
    assert decode_answer(tok, ids) == "Yes, two dogs."
    assert decode_answer(tok, tok.encode(" B ") + tok.encode("</s>")) == "B"


def test_bench_generate_tiny_smoke(tmp_path):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bench_generate", Path(__file__).parents[1] / "bench/generate.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    r = bench.main(["--tiny", "--n", "6", "--batch-sizes", "3", "--max-new-tokens", "4", "--out",
                    str(tmp_path / "g.json")])
    assert [x["batch_size"] for x in r["results"]] == [1, 3]
    assert r["results"][1]["identical"] == r["questions"] == 6
    assert r["cuda"] == torch.cuda.is_available() and "torch" in r and "date" in r
