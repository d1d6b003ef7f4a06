"""Questions/s of batched greedy generation against batch size 1, same model and questions; checks the answers match.

    python bench/generate.py --model ckpt/MobileVLM_V2-1.7B --data-root DATA --bench pope --n 128   # GPU
    python bench/generate.py --tiny                                # random tiny model, synthetic questions, any device

Times generation only (vision tower, projector, prefill, decoding); images are read and preprocessed beforehand.
Prints a table and writes JSON with the device, versions and date. Without CUDA only the --tiny run is allowed,
and its numbers are labelled as CPU numbers.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import write_report  # noqa: E402
from data.constants import NUM_IMAGE_TOKENS  # noqa: E402
from data.images import process_image  # noqa: E402
from data.templates import build_prompt  # noqa: E402
from eval import DTYPES, load_eval_model  # noqa: E402
from evaluation.benchmarks import BENCHMARKS, limit_questions, load_questions  # noqa: E402
from model.generation import greedy_generate, length_sorted_batches  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(model, prompts, images, batch_size: int, max_new_tokens: int, lengths) -> tuple[list[list[int]], float]:
    """All questions in length-sorted batches; returns the new tokens in question order and the seconds taken."""
    out: list[list[int] | None] = [None] * len(prompts)
    device = model.device
    _sync(device)
    t0 = time.perf_counter()
    for batch in length_sorted_batches(lengths, batch_size):
        new = greedy_generate(model, [prompts[i] for i in batch], [images[i] for i in batch], max_new_tokens)
        for i, ids in zip(batch, new):
            out[i] = ids
    _sync(device)
    return out, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="MobileVLM V2 checkpoint folder")
    p.add_argument("--data-root", type=Path, help="benchmark data in LLaVA's layout")
    p.add_argument("--bench", choices=BENCHMARKS, default="pope")
    p.add_argument("--tiny", action="store_true", help="random tiny model on synthetic questions (no files needed)")
    p.add_argument("--n", type=int, default=64, help="number of questions")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[16])
    p.add_argument("--max-new-tokens", type=int, help="default: the benchmark's own limit")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], help="default fp16 on a GPU, fp32 on CPU")
    p.add_argument("--vision-tower")
    p.add_argument("--out", type=Path, default=Path("runs/bench/generate.json"))
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        raise SystemExit("no CUDA device: this benchmark reports GPU numbers only; --tiny runs a CPU smoke test")
    dtype = args.dtype or ("fp16" if cuda else "fp32")
    if args.tiny:
        from data.synthetic import make_demo_tokenizer
        from evaluation.synthetic_benchmarks import make_synthetic_benchmarks
        from data.tokenizer import load_tokenizer
        from model import MobileVLM

        tmp = Path(tempfile.mkdtemp())
        root = make_synthetic_benchmarks(tmp / "data", n=max(args.n // 6 + 1, 2))
        tokenizer = load_tokenizer(make_demo_tokenizer(tmp / "tok"))
        model = MobileVLM.tiny(seed=0, vocab_size=tokenizer.vocab_size)
        model = model.to(device="cuda" if cuda else "cpu", dtype=DTYPES[dtype]).eval()
        model_name = "tiny (random weights)"
    else:
        if args.model is None or args.data_root is None:
            raise SystemExit("pass --model and --data-root (or --tiny)")
        model, tokenizer = load_eval_model(args.model, dtype, args.vision_tower)
        root, model_name = args.data_root, str(args.model)

    questions = limit_questions(load_questions(args.bench, root), args.n)
    prompts = [build_prompt(q.text, tokenizer, image=q.has_image) for q in questions]
    images = [process_image(im, q.image_mode) if (im := q.load_image()) is not None else None for q in questions]
    lengths = [len(ids) + (NUM_IMAGE_TOKENS - 1) * q.has_image for ids, q in zip(prompts, questions)]
    max_new = args.max_new_tokens or questions[0].max_new_tokens

    run(model, prompts[:2], images[:2], 2, 4, lengths[:2])  # warm-up: kernels, allocator
    base, t1 = run(model, prompts, images, 1, max_new, lengths)
    rows = [{"batch_size": 1, "questions_per_s": len(questions) / t1, "seconds": t1, "speedup": 1.0,
             "identical": len(questions)}]
    for bs in args.batch_sizes:
        got, t = run(model, prompts, images, bs, max_new, lengths)
        rows.append({"batch_size": bs, "questions_per_s": len(questions) / t, "seconds": t, "speedup": t1 / t,
                     "identical": sum(a == b for a, b in zip(got, base))})

    device = torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()})"
    report = {"bench": args.bench, "model": model_name, "questions": len(questions), "max_new_tokens": max_new,
              "dtype": dtype, "device": device, "cuda": cuda, "torch": torch.__version__,
              "transformers": transformers.__version__, "date": datetime.date.today().isoformat(),
              "tokens_generated": sum(len(x) for x in base), "results": rows}
    print(f"{args.bench}, {len(questions)} questions, {model_name}, {dtype}, {device}"
          + ("" if cuda else "  [CPU: not a GPU number]"))
    print(f"{'batch':>6}{'q/s':>10}{'speedup':>9}{'identical':>11}")
    for r in rows:
        print(f"{r['batch_size']:>6}{r['questions_per_s']:>10.2f}{r['speedup']:>8.2f}x"
              f"{r['identical']:>7}/{len(questions)}")
    write_report(args.out, report)
    return report


if __name__ == "__main__":
    main()
