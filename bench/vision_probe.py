"""What the shapes world's frozen CLIP tells per image token: linear probes on its features (CPU, a minute).

The features are the CLIP's output pooled 2 x 2 as LDPv2 pools it (one per image token, 12 x 12). A linear softmax
probe is fitted on the tokens of 256 fresh scenes and scored on 64 others, for the token's grid cell (9 classes, every
token), its exact position (144 classes, every token) and the object it holds (colour x shape, the object tokens).
High accuracies mean the place and the object are in the features the LLaMA reads.

    python bench/vision_probe.py [--model runs/alignkd/demo_assets/teacher]
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from data.world import _scene  # noqa: E402
from demo import TOKEN_CELL, _tokens, token_labels  # noqa: E402
from model import MobileVLM  # noqa: E402


def features(tower, seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, 144, C] token features and [n, 144] object labels (0: none) of n scenes drawn from `seed`."""
    rng = random.Random(seed)
    scenes = [_scene(rng) for _ in range(n)]
    with torch.no_grad():
        f = torch.cat([_tokens(tower, scenes[i:i + 16]) for i in range(0, n, 16)])
    return f, torch.tensor([token_labels(s) for s in scenes])


def probe(x: torch.Tensor, y: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor, steps: int = 500) -> float:
    """Test accuracy of a linear softmax classifier fitted with Adam on standardized features."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    linear = torch.nn.Linear(x.shape[1], int(max(y.max(), y_test.max())) + 1)
    opt = torch.optim.Adam(linear.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = F.cross_entropy(linear((x - mu) / sd), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float((linear((x_test - mu) / sd).argmax(-1) == y_test).float().mean())


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="runs/alignkd/demo_assets/teacher",
                   help="a shapes-world MobileVLM folder (the demo's teacher; its students share its CLIP)")
    p.add_argument("--train-scenes", type=int, default=256)
    p.add_argument("--test-scenes", type=int, default=64)
    args = p.parse_args(argv)
    if not (Path(args.model) / "config.json").exists():
        raise SystemExit(f"error: no model in {args.model} (run `python train_alignkd.py` once to make the demo's "
                         "teacher, or pass --model)")
    torch.manual_seed(0)
    tower = MobileVLM.from_pretrained(args.model).vision_tower.eval()
    f, obj = features(tower, 100, args.train_scenes)
    ft, objt = features(tower, 200, args.test_scenes)
    x, xt = f.flatten(0, 1), ft.flatten(0, 1)
    has, hast = obj.flatten() > 0, objt.flatten() > 0
    n, nt = args.train_scenes, args.test_scenes
    result = {
        "cell, every token": probe(x, TOKEN_CELL.repeat(n), xt, TOKEN_CELL.repeat(nt)),
        "position (of 144), every token": probe(x, torch.arange(144).repeat(n), xt, torch.arange(144).repeat(nt)),
        "object (colour x shape), object tokens": probe(x[has], obj.flatten()[has], xt[hast], objt.flatten()[hast]),
    }
    for what, acc in result.items():
        print(f"{acc:7.4f}  {what}")
    meta = {"model": args.model, "date": date.today().isoformat(), "machine": platform.machine(),
            "torch": torch.__version__}
    print(json.dumps(meta))
    return result


if __name__ == "__main__":
    main()
