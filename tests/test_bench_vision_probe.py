"""bench/vision_probe.py: its linear probe against data whose answer is known, and its command line."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

_spec = importlib.util.spec_from_file_location("alignkd_bench_vision_probe",
                                               Path(__file__).resolve().parents[1] / "bench" / "vision_probe.py")
vision_probe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(vision_probe)


def test_probe_finds_a_linear_rule_and_not_a_random_one():
    g = torch.Generator().manual_seed(0)
    x, xt = torch.randn(600, 8, generator=g), torch.randn(200, 8, generator=g)
    w = torch.randn(8, 3, generator=g)
    assert vision_probe.probe(x, (x @ w).argmax(-1), xt, (xt @ w).argmax(-1)) > 0.9
    noise = torch.randint(0, 3, (600,), generator=g), torch.randint(0, 3, (200,), generator=g)
    assert vision_probe.probe(x, noise[0], xt, noise[1]) < 0.5  # chance is 1/3


def test_command_line_on_a_tiny_model(tmp_path):
    from data import load_tokenizer
    from data.world import make_world_tokenizer
    from model import MobileVLM

    tok = make_world_tokenizer(tmp_path / "tok")
    MobileVLM.tiny(seed=0, vocab_size=load_tokenizer(tok).vocab_size).save_pretrained(tmp_path / "m",
                                                                                     tokenizer_dir=tok)
    result = vision_probe.main(["--model", str(tmp_path / "m"), "--train-scenes", "16", "--test-scenes", "16"])
    # a random CLIP still carries its (small) position embeddings: the cell is well above chance (1/9)
    assert result["cell, every token"] > 0.25
    assert all(0.0 <= v <= 1.0 for v in result.values())
    with pytest.raises(SystemExit, match="no model in"):
        vision_probe.main(["--model", str(tmp_path / "none")])
