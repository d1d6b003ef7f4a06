"""Arguments of a small, fast training run for the tests: synthetic shapes records, a tiny random teacher and
student in the official checkpoint layout (made once under ROOT/demo_assets)."""
from __future__ import annotations

from pathlib import Path

from bench.soak import make_assets


# the paper's objective, every term on: these runs test the trainer's mechanics on all of them
PAPER = ["--attn-form", "mse", "--w-attn", "1", "--w-proj-all", "1", "--w-proj-focus", "1"]


def tiny_args(root: str | Path, steps: int | str) -> list[str]:
    """--data/--image-folder/--student/--teacher and the small-run settings (output dir not included)."""
    assets = make_assets(Path(root) / "demo_assets")
    return ["--data", str(assets / "synthetic_mixed.json"), "--image-folder", str(assets), "--template", "v1",
            "--student", str(assets / "student"), "--teacher", str(assets / "teacher"), "--max-steps", str(steps),
            "--lr", "3e-3", "--batch-size", "4", "--max-len", "512", "--save-every", str(steps), *PAPER]
