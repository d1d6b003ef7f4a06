"""Arguments of a small, fast training run for the tests: synthetic shapes records, a tiny random teacher and
student in the official checkpoint layout (made once under ROOT/demo_assets)."""
from __future__ import annotations

from pathlib import Path

from data import load_tokenizer, make_demo_tokenizer, make_synthetic_dataset
from model import MobileVLM


# the paper's objective, every term on: these runs test the trainer's mechanics on all of them
PAPER = ["--attn-form", "mse", "--w-attn", "1", "--w-proj-all", "1", "--w-proj-focus", "1"]


def tiny_args(root: str | Path, steps: int | str) -> list[str]:
    """--data/--image-folder/--student/--teacher and the small-run settings (output dir not included)."""
    assets = Path(root) / "demo_assets"
    tok_dir = assets / "tokenizer"
    if not (tok_dir / "tokenizer.model").exists():
        make_demo_tokenizer(tok_dir)
    if not (assets / "synthetic_mixed.json").exists():
        make_synthetic_dataset(assets, n=96, seed=0, kind="mixed")
    if not (assets / "student" / "config.json").exists():
        vocab = load_tokenizer(tok_dir).vocab_size
        student = MobileVLM.tiny(seed=2, vocab_size=vocab, hidden_size=64, num_heads=4, num_layers=2)
        teacher = MobileVLM.tiny(seed=1, vocab_size=vocab, hidden_size=128, num_heads=8, num_layers=3)
        teacher.vision_tower.load_state_dict(student.vision_tower.state_dict())  # one shared frozen CLIP
        teacher.save_pretrained(assets / "teacher", tokenizer_dir=tok_dir)
        student.save_pretrained(assets / "student", tokenizer_dir=tok_dir)
    return ["--data", str(assets / "synthetic_mixed.json"), "--image-folder", str(assets), "--template", "v1",
            "--student", str(assets / "student"), "--teacher", str(assets / "teacher"), "--max-steps", str(steps),
            "--lr", "3e-3", "--batch-size", "4", "--max-len", "512", "--save-every", str(steps), *PAPER]
