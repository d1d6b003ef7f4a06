"""Evaluate MobileVLM V2 on the six benchmarks it reports: GQA, ScienceQA-IMG, TextVQA, POPE, MME, MMBench-dev.

    python eval.py --bench all --model PATH --data-root DIR [--out DIR] [--limit N] [--batch-size 16]
    python eval.py --bench pope --score-only --answers FILE --data-root DIR [--strict]   # answers made elsewhere
    python eval.py --compare A/metrics.json B/metrics.json [--chart cmp.png]
    python eval.py --bench demo [--model DIR]              # synthetic data, tiny random model (or DIR's model)

Prompts, preprocessing, decoding and metrics follow MobileVLM V2's evaluation scripts. Answers go to
`OUT/<bench>.jsonl` (LLaVA format) as they are produced; a rerun skips the questions already answered (answers of
another model in that file are refused). Every benchmark reports answered / expected questions, on screen and in
metrics.json; a question without an answer counts as wrong and is warned about (an error with --strict), an answer
file that answers none of the questions or holds a line that is not an answer is an error.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm import tqdm

from evaluation.benchmarks import (BENCHMARKS, AnswerFileError, MissingDataError, Question, QuestionFileError,
                                   answer_key, answers_by_key, check_data, limit_questions, load_questions,
                                   read_answer_records)
from data.constants import NUM_IMAGE_TOKENS
from data.images import process_image
from evaluation.scorers import score_benchmark
from data.templates import build_prompt

LABELS = {"gqa": "GQA", "sqa": "SQA-I", "textvqa": "TextVQA", "pope": "POPE", "mme": "MME-P", "mmbench": "MMB-dev"}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class EvalError(Exception):
    """A run that cannot go on or did not meet --strict; the command line prints it as one `error: ...` line."""


# ---- answers on disk -----------------------------------------------------------------------------------------------
def _answered(path: Path, bench: str, model_id: str) -> set[str]:
    """Keys already answered in `path`; drops a line cut short by an interrupted run so appending stays valid."""
    if not path.exists():
        return set()
    raw = path.read_bytes()
    if raw and not raw.endswith(b"\n"):
        path.write_bytes(raw[:raw.rfind(b"\n") + 1])
    records, _ = read_answer_records(path)
    for _, _, r in records:
        owner = r.get("model_id", model_id)
        if owner != model_id:
            raise SystemExit(f"error: {path} holds answers of model {owner!r}, not {model_id!r}: "
                             "pass another --out or remove the file")
    return set(answers_by_key(records, bench))


def _sort_answer_file(path: Path, questions: list[Question], bench: str) -> None:
    """Rewrite the answers in question-file order, as the original scripts write them (their POPE and MME scorers
    pair answers by position); lines for questions outside this run stay at the end."""
    order = {q.key: i for i, q in enumerate(questions)}
    records, _ = read_answer_records(path)
    lines = [line for _, line, _ in records]
    keys = [answer_key(bench, r["question_id"], r["prompt"]) for _, _, r in records]
    ranked = sorted(range(len(lines)), key=lambda i: order.get(keys[i], len(order)))
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(lines[i] + "\n" for i in ranked))
    tmp.replace(path)


def generate_answers(bench: str, questions: list[Question], model, tokenizer, path: Path, batch_size: int,
                     model_id: str, max_new_tokens: int | None = None) -> list[str]:
    """Answer the questions not yet in `path`, appending one JSON line each as batches finish; returns the
    questions skipped because their image could not be read."""
    from model.generation import decode_answer, greedy_generate, length_sorted_batches

    done = _answered(path, bench, model_id)
    todo = [q for q in questions if q.key not in done]
    if not todo:
        return []
    prompts = [build_prompt(q.text, tokenizer, image=q.has_image) for q in todo]
    lengths = [len(ids) + (NUM_IMAGE_TOKENS - 1) * q.has_image for ids, q in zip(prompts, todo)]
    batches = length_sorted_batches(lengths, batch_size)

    def load(batch: list[int]) -> list[tuple[int, torch.Tensor | None | Exception]]:
        out = []
        for i in batch:
            try:
                image = todo[i].load_image()
                out.append((i, None if image is None else process_image(image, todo[i].image_mode)))
            except (OSError, ValueError) as e:  # missing or unreadable image: report, go on
                out.append((i, e))
        return out

    skipped = []
    path.parent.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(1) as pool, path.open("a") as f, \
            tqdm(total=len(todo), desc=bench, unit="q", dynamic_ncols=True) as bar:
        pending = pool.submit(load, batches[0])
        for k in range(len(batches)):
            ready = pending.result()
            if k + 1 < len(batches):  # read the next batch's images while this one generates
                pending = pool.submit(load, batches[k + 1])
            skipped += [f"{todo[i].question_id}: {x}" for i, x in ready if isinstance(x, Exception)]
            ok = [(i, x) for i, x in ready if not isinstance(x, Exception)]
            if ok:
                new = greedy_generate(model, [prompts[i] for i, _ in ok], [x for _, x in ok],
                                      max_new_tokens or todo[ok[0][0]].max_new_tokens, tokenizer.eos_token_id,
                                      tokenizer.pad_token_id)
                for (i, _), ids in zip(ok, new):
                    f.write(json.dumps({"question_id": todo[i].question_id, "prompt": todo[i].prompt,
                                        "text": decode_answer(tokenizer, ids), "model_id": model_id}) + "\n")
                f.flush()
            bar.update(len(ready))
    _sort_answer_file(path, questions, bench)
    return skipped


# ---- report --------------------------------------------------------------------------------------------------------
def average(summary: dict[str, float]) -> float | None:
    """MobileVLM's Avg: the mean of the six numbers with MME-P rescaled to 100 (MME/20); None unless all six."""
    if any(b not in summary for b in BENCHMARKS):
        return None
    return sum(summary[b] / 20 if b == "mme" else summary[b] for b in BENCHMARKS) / len(BENCHMARKS)


def answer_counts(metrics: dict) -> dict[str, tuple[int, int]]:
    """{bench: (answered, expected)} of a metrics.json (empty for files written before these counts existed)."""
    return {b: (r["answered"], r["expected"]) for b, r in metrics.get("benchmarks", {}).items() if "expected" in r}


def format_table(rows: list[tuple[str, dict[str, float]]],
                 counts: list[dict[str, tuple[int, int]]] | None = None) -> str:
    """One line of scores per model; with `counts`, an `answered` line under it: answers / questions per benchmark."""
    counts = counts or [{} for _ in rows]
    shown = [{b: f"{a}/{e}" for b, (a, e) in c.items()} for c in counts]
    col = max([10] + [len(x) + 2 for c in shown for x in c.values()])
    width = max([len("model"), len("  answered") if any(shown) else 0] + [len(name) for name, _ in rows])
    lines = [f"{'model':<{width}}" + "".join(f"{LABELS[b]:>{col}}" for b in BENCHMARKS) + f"{'Avg':>8}"]
    for (name, summary), answered in zip(rows, shown):
        cells = "".join(f"{summary[b]:>{col}.2f}" if b in summary else f"{'-':>{col}}" for b in BENCHMARKS)
        avg = average(summary)
        lines.append(f"{name:<{width}}" + cells + (f"{avg:>8.2f}" if avg is not None else f"{'-':>8}"))
        if answered:
            lines.append(f"{'  answered':<{width}}" + "".join(f"{answered.get(b, '-'):>{col}}" for b in BENCHMARKS))
    return "\n".join(lines)


def update_metrics(path: Path, model_id: str, results: dict[str, dict]) -> dict:
    """Merge this run's results into metrics.json (benchmarks run separately build up one table of one model)."""
    metrics = json.loads(path.read_text()) if path.exists() else {}
    if metrics.get("model") != model_id:
        metrics = {"model": model_id, "benchmarks": {}}
    metrics["benchmarks"].update(results)
    metrics["summary"] = {b: metrics["benchmarks"][b]["score"] for b in BENCHMARKS if b in metrics["benchmarks"]}
    metrics["average"] = average(metrics["summary"])
    metrics["date"] = datetime.datetime.now().isoformat(timespec="seconds")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def _details(bench: str, r: dict) -> str:
    extra = {"sqa": f"overall {r.get('overall', 0):.2f}, parse failures {r.get('failed')}",
             "pope": ", ".join(f"{k} F1 {v['f1']:.2f}" for k, v in r.get("splits", {}).items())
             + f"; acc {r.get('accuracy', 0):.2f}",
             "mme": f"cognition {r.get('cognition', 0):.1f}",
             "mmbench": f"copies not inferred {r.get('copies_not_inferred')}, "
                        f"questions undecided {r.get('questions_undecided')}"}.get(bench, "")
    return f"{LABELS[bench]:>8}: {r['score']:.2f} over {r['n']}" + (f" ({extra})" if extra else "") + \
        f"  [answered {r['answered']}/{r['expected']}]"


def read_metrics(path: Path) -> dict:
    """A metrics.json written by this script, or a clear exit naming what is wrong with it."""
    try:
        m = json.loads(path.read_text())
    except OSError as e:
        raise SystemExit(f"error: cannot read {path}: {e.strerror}")
    except json.JSONDecodeError as e:
        raise SystemExit(f"error: {path} is not JSON ({e})")
    if not isinstance(m, dict) or not isinstance(m.get("summary"), dict):
        raise SystemExit(f"error: {path} is not a metrics.json written by eval.py (no \"summary\" table)")
    return m


def compare(files: list[str], chart: str | None) -> str:
    rows, counts = [], []
    for f in files:
        m = read_metrics(Path(f))
        rows.append((Path(m.get("model", f)).name or f, m["summary"]))
        counts.append(answer_counts(m))
    table = format_table(rows, counts)
    if chart:
        plot_chart(rows, chart)
    return table


def plot_chart(rows: list[tuple[str, dict[str, float]]], out: str) -> None:
    """Grouped bars of the six benchmarks (MME-P / 20 so every axis is 0-100) and the average."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [LABELS[b] + (" /20" if b == "mme" else "") for b in BENCHMARKS] + ["Avg"]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    w = 0.8 / len(rows)
    for i, (model, s) in enumerate(rows):
        vals = [s.get(b, 0) / (20 if b == "mme" else 1) for b in BENCHMARKS] + [average(s) or 0]
        bars = ax.bar([x + (i - (len(rows) - 1) / 2) * w for x in range(len(names))], vals, w, label=model)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("score")
    ax.set_ylim(0, 100)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


# ---- main ----------------------------------------------------------------------------------------------------------
def evaluate(benches: list[str], root: Path, out: Path, model_id: str, model=None, tokenizer=None,
             limit: int | None = None, batch_size: int = 16, answers: Path | None = None,
             max_new_tokens: int | None = None) -> dict:
    """Generate (unless model is None: score only) and score each benchmark; returns the merged metrics."""
    results = {}
    for bench in benches:
        questions = limit_questions(load_questions(bench, root, need_images=model is not None), limit)
        path = answers or out / f"{bench}.jsonl"
        skipped = []
        if model is not None:
            t0 = time.perf_counter()
            skipped = generate_answers(bench, questions, model, tokenizer, path, batch_size, model_id,
                                       max_new_tokens)
            print(f"{bench}: answers in {path} ({time.perf_counter() - t0:.0f}s)")
            if skipped:
                print(f"{bench}: {len(skipped)} questions skipped, image not readable; first: {skipped[:3]}")
        elif not path.is_file():
            raise SystemExit(f"error: no answer file {path} to score")
        records, cut = read_answer_records(path)
        given = answers_by_key(records, bench)
        answered, expected = sum(q.key in given for q in questions), len(questions)
        if expected and not answered:
            raise AnswerFileError(_no_answers(bench, path, questions, given, cut, skipped))
        r = score_benchmark(bench, questions, given, root)
        results[bench] = {**r, "answered": answered, "expected": expected, "answers": str(path), "limit": limit,
                          "images_unreadable": len(skipped)}
        print(_details(bench, results[bench]))
        if answered < expected:
            keys = {q.key for q in questions}
            unmatched = sum(k not in keys for k in given) if limit is None else 0
            print(f"warning: {bench}: {expected - answered} of {expected} questions have no answer in {path}; "
                  + ("they are left out of the F1" if bench == "pope" else "they count as wrong")
                  + (f"; {unmatched} of its answers are for no question of {bench}" if unmatched else "")
                  + (f"; its last line ({cut}) is cut short and was ignored" if cut else "")
                  + " (--strict makes this an error)", file=sys.stderr)
    return update_metrics(out / "metrics.json", model_id, results)


def _no_answers(bench: str, path: Path, questions: list[Question], given: dict[str, str], cut: int | None,
                skipped: list[str]) -> str:
    """Why not one question of a benchmark has an answer (a score of 0 from that would mean nothing)."""
    if skipped:
        return f"{bench}: no question answered: {len(skipped)} images unreadable; first: {skipped[:3]}"
    if not given:
        return f"{path}: no answers in the file" + (f" (its only line, {cut}, is cut short)" if cut else "")

    def examples(keys) -> str:
        return ", ".join(repr(k)[:40] for k in list(keys)[:3])

    by = "question_id and prompt" if bench in ("textvqa", "mme") else "question_id"
    return (f"{path}: none of its answers ({len(given)}) is for a question of {bench} (matched by {by}; the file "
            f"has {examples(given)}, the questions are {examples(q.key for q in questions)}): an answer file of "
            "another benchmark?")


def load_eval_model(path: str, dtype: str, vision_tower: str | None):
    """The model and tokenizer of a checkpoint folder; EvalError (one line) when they cannot be loaded."""
    from data.tokenizer import load_tokenizer
    from model import MobileVLM

    if not Path(path).is_dir():
        raise EvalError(f"model folder {path} does not exist (--model takes a MobileVLM V2 checkpoint folder: "
                        "config.json, pytorch_model*.bin or model*.safetensors, tokenizer.model)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        tokenizer = load_tokenizer(path)  # the small file first: a missing one fails before the model loads
        model = MobileVLM.from_pretrained(path, vision_tower=vision_tower, dtype=DTYPES[dtype], device=device)
    except (OSError, KeyError, ValueError, RuntimeError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        raise EvalError(f"cannot load the model in {path}: {msg}") from None
    return model.eval(), tokenizer


def demo(out: Path, batch_size: int, model_path: str | None = None) -> dict:
    """All six benchmarks on synthetic data, downloads nothing: with a random tiny model, or with `model_path`
    (e.g. the checkpoint `python train_alignkd.py` wrote)."""
    from data.synthetic import make_demo_tokenizer
    from evaluation.synthetic_benchmarks import make_synthetic_benchmarks
    from data.tokenizer import load_tokenizer
    from model import MobileVLM

    if model_path is None:
        tokenizer = load_tokenizer(make_demo_tokenizer(out / "tokenizer"))
        model, model_id = MobileVLM.tiny(seed=0, vocab_size=tokenizer.vocab_size).eval(), "tiny-demo"
    else:  # before the data is made: a wrong path fails at once
        model, tokenizer = load_eval_model(model_path, "fp32", None)
        model_id = str(Path(model_path).resolve())
    root = make_synthetic_benchmarks(out / "data", n=8)
    # answers already in `out` are kept (a rerun resumes); those of another model are refused by generate_answers
    return evaluate(list(BENCHMARKS), root, out, model_id, model, tokenizer, batch_size=batch_size,
                    max_new_tokens=16)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", choices=[*BENCHMARKS, "all", "demo"])
    p.add_argument("--model", help="MobileVLM V2 checkpoint folder (config.json, weights, tokenizer.model)")
    p.add_argument("--data-root", type=Path, help="LLaVA's playground/data/eval layout (gqa/, scienceqa/, ...)")
    p.add_argument("--out", type=Path, help="answers and metrics.json (default runs/eval/<model folder name>)")
    p.add_argument("--limit", type=int, help="first N questions of each benchmark (MMBench: N questions + copies)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--dtype", choices=list(DTYPES), help="default fp16 on a GPU (as the reference), fp32 on CPU")
    p.add_argument("--vision-tower", help="local CLIP ViT-L/14-336 folder, if config.json names a hub id")
    p.add_argument("--max-new-tokens", type=int, help="override the per-benchmark limit (quick looks only)")
    p.add_argument("--score-only", action="store_true", help="score existing answers, load no model")
    p.add_argument("--strict", action="store_true",
                   help="exit non-zero when a question has no answer (else a warning; answered/expected is printed)")
    p.add_argument("--answers", type=Path, help="with --score-only and one benchmark: the answer file to score")
    p.add_argument("--compare", nargs="+", metavar="METRICS_JSON", help="print several metrics.json side by side")
    p.add_argument("--chart", help="with --compare: write a bar chart PNG")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    if args.compare:
        print(compare(args.compare, args.chart))
        return None
    if args.bench is None:
        raise SystemExit(f"error: pass --bench ({', '.join([*BENCHMARKS, 'all', 'demo'])}) or --compare")
    if args.bench == "demo":
        # one folder per model, as a rerun resumes the answers in it and refuses another model's
        out = args.out or Path("runs/eval") / ("demo" + (f"-{Path(args.model).resolve().name}" if args.model else ""))
        metrics = demo(out, args.batch_size, args.model)
        name = Path(args.model).name if args.model else "tiny-demo (random weights)"
        print(format_table([(name, metrics["summary"])], [answer_counts(metrics)]))
        print(f"metrics: {out / 'metrics.json'}")
        _check_strict(args, metrics, list(BENCHMARKS))
        return metrics
    needs = []
    if args.model is None and not args.score_only:
        needs.append("--model PATH (a MobileVLM V2 checkpoint folder; or --score-only to score answer files)")
    if args.data_root is None:
        needs.append("--data-root DIR (LLaVA's playground/data/eval layout)")
    if needs:
        raise SystemExit(f"error: --bench {args.bench} needs " + " and ".join(needs))
    benches = list(BENCHMARKS) if args.bench == "all" else [args.bench]
    if args.answers and (not args.score_only or len(benches) > 1):
        raise SystemExit("error: --answers goes with --score-only and a single --bench")
    if args.score_only:
        if args.answers is None and args.out is None:
            raise SystemExit("error: --score-only needs --answers FILE or --out DIR (holding <bench>.jsonl)")
        out = args.out or Path("runs/eval") / args.answers.stem
        model_id = args.model or str(args.answers or args.out)
        metrics = evaluate(benches, args.data_root, out, model_id, limit=args.limit, answers=args.answers)
    else:
        missing = []  # every missing file, before the model loads
        for bench in benches:
            try:
                check_data(bench, args.data_root)
            except MissingDataError as e:
                missing.append(f"{bench}: {e}")
        if missing:
            raise MissingDataError("benchmark data not found under --data-root:\n  " + "\n  ".join(missing))
        dtype = args.dtype or ("fp16" if torch.cuda.is_available() else "fp32")
        model, tokenizer = load_eval_model(args.model, dtype, args.vision_tower)
        model_id = str(Path(args.model).resolve())
        out = args.out or Path("runs/eval") / Path(model_id).name
        metrics = evaluate(benches, args.data_root, out, model_id, model, tokenizer, args.limit,
                           args.batch_size, max_new_tokens=args.max_new_tokens)
    print(format_table([(Path(metrics["model"]).name, metrics["summary"])], [answer_counts(metrics)]))
    print(f"metrics: {out / 'metrics.json'}")
    _check_strict(args, metrics, benches)
    return metrics


def _check_strict(args: argparse.Namespace, metrics: dict, benches: list[str]) -> None:
    short = [f"{b} {r['answered']}/{r['expected']}" for b in benches
             if (r := metrics["benchmarks"][b])["answered"] < r["expected"]]
    if args.strict and short:
        raise EvalError(f"questions without an answer (--strict): answered {', '.join(short)}")


def cli(argv: list[str] | None = None) -> None:
    """main() as the command line runs it: an expected failure is one `error: ...` line and exit status 1."""
    try:
        main(argv)
    except (MissingDataError, AnswerFileError, QuestionFileError, EvalError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    cli()
