"""Size of the teacher cache (`train_alignkd.py --cache-teacher`) per sample at MobileVLM V2-7B shapes, bf16.

    python bench/cache_size.py

What a sample stores (training/teacher_cache.py): the supervised rows' hidden states, the projector outputs, and for
text after an image the text rows' layer-0 queries and LSEs plus the keys of the 144 vision positions. The last
column is what storing every key instead of the vision ones would take.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from training.teacher_cache import sample_bytes  # noqa: E402

HIDDEN, KV_HEADS, HEAD_DIM, VOCAB = 4096, 32, 128, 32000
# (what, spliced length n, text rows after the image, supervised rows, has an image)
SAMPLES = [
    ("VQA-style v1 sample (image at 35, 18 text tokens after it, 3 supervised rows)", 197, 18, 3, True),
    ("ShareGPT4V-PT caption, plain (image at 1, 300-token caption, all supervised)", 445, 300, 300, True),
    ("longest v1 image sample (image at 35, 1,869 text rows, 1,000 supervised)", 2048, 1869, 1000, True),
    ("text-only v1 sample (512 tokens, 256 supervised)", 512, 0, 256, False),
]


def main() -> None:
    print(f"{'MB/sample':>10} {'every key':>10}  sample")
    for what, n, n_text, n_sup, image in SAMPLES:
        size = sample_bytes(n, n_text, n_sup, image, hidden=HIDDEN, kv_heads=KV_HEADS, head_dim=HEAD_DIM)
        every_key = size + (KV_HEADS * HEAD_DIM * 2 * (n - 144) if n_text else 0)
        print(f"{size / 1e6:10.2f} {every_key / 1e6:10.2f}  {what}")
    print(f"once per cache: the lm_head, {VOCAB * HIDDEN * 2 / 1e6:.0f} MB")


if __name__ == "__main__":
    main()
