"""Ablation of the Align-KD terms in the shapes world: which term helps a student on held-out questions?

    python bench/ablate.py                      # every arm, 2 seeds
    python bench/ablate.py --quick              # 4 arms, 1 seed, fewer steps and held-out records
    python bench/ablate.py --arms ce_only,logit,paper_full --seeds 5

Each seed fixes one student initialization (the world teacher's frozen CLIP + a fresh projector and LLaMA,
pre-trained on the captions) and one data order; every arm trains from it for the same number of steps with
`train_alignkd.main`, then the held-out exact match, answer CE and grounding (the share of the first layer's
text->image attention on the image tokens the question is about: what the attention term aligns) are read from its
last evaluation. Reported: mean +- sd over seeds, and the paired difference of each arm against CE + logit KD per
seed (mean, sd, and how many seeds it is better in), plus each term's value and its gradient-norm share on the
student's parameters at the probe steps (from log.jsonl). Writes OUT/ablation.json, OUT/ablation.md and
OUT/ablation.png. The world and teacher are the demo's (made on first use under --assets).
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import demo  # noqa: E402
from losses import TERMS, flag, logged_terms  # noqa: E402
from train_alignkd import main  # noqa: E402

WEIGHTS_1 = ["--w-attn", "1", "--w-proj-all", "1", "--w-proj-focus", "1"]
PAPER = ["--attn-form", "mse", "--proj-side", "teacher", *WEIGHTS_1]
NORMALIZED = ["--attn-form", "kl", "--proj-side", "student", *WEIGHTS_1]
# arm -> trainer flags (on top of the world's data, student, teacher, steps and seed)
ARMS: dict[str, list[str]] = {
    "ce_only": ["--no-distill"],
    "logit": ["--w-attn", "0", "--w-proj-all", "0", "--w-proj-focus", "0"],
    "paper_full": PAPER,
    "paper_-attn": PAPER + ["--w-attn", "0"],
    "paper_-proj_all": PAPER + ["--w-proj-all", "0"],
    "paper_-proj_focus": PAPER + ["--w-proj-focus", "0"],
    "logit+kl_attn": NORMALIZED + ["--w-proj-all", "0", "--w-proj-focus", "0"],
    "logit+student_proj": NORMALIZED + ["--w-attn", "0"],
    "new_full": NORMALIZED,
}
DEFAULT_ARMS = tuple(ARMS)
ARMS |= {  # lighter weights for the variants (not in the default run; pick them with --arms)
    "logit+kl_attn_w0.1": NORMALIZED + ["--w-attn", "0.1", "--w-proj-all", "0", "--w-proj-focus", "0"],
    "logit+student_proj_w0.1": NORMALIZED + ["--w-attn", "0", "--w-proj-all", "0.1", "--w-proj-focus", "0.1"],
    # the paper's text-focused projector term alone, and with attention KL
    "logit+proj_focus": PAPER + ["--w-attn", "0", "--w-proj-all", "0"],
    "logit+kl_attn+proj_focus": PAPER + ["--attn-form", "kl", "--w-proj-all", "0"],
}
QUICK_ARMS = ("ce_only", "logit", "paper_full", "new_full")
METRICS = {"acc": True, "ce": False, "grounding": True}  # what is read from the last evaluation; higher is better?
BASELINE = "logit"


def all_arms() -> dict[str, list[str]]:
    """ARMS, plus two arms per registered loss term on top of the trainer's defaults: +NAME (at weight 1) and -NAME
    (at weight 0)."""
    return ARMS | {f"{sign}{name}": [flag(name), w] for name in TERMS for sign, w in (("+", "1"), ("-", "0"))}


def run_arm(assets: dict, out: Path, arm: str, seed: int, steps: int, batch: int, lr: float, eval_limit: int | None,
            probe: str) -> dict:
    student = demo.make_student(out / f"student_init_seed{seed}", assets, seed=100 + seed)
    run_dir = out / "runs" / f"{arm}_seed{seed}"
    result_file = run_dir / "result.json"
    if result_file.exists():  # an interrupted ablation resumes arm by arm
        return json.loads(result_file.read_text())
    t0 = time.time()
    argv = demo.student_argv(assets, student, run_dir, seed, steps, batch, lr, eval_limit=eval_limit)
    run = main(argv + all_arms()[arm] + ["--probe-grads", probe, "--log-every", str(steps), "--no-eval-at-start", "--overwrite"])
    last = run["evals"][-1]
    probes = {r["step"]: {"terms": {k: r[k] for k in logged_terms()[1:]}, "grad_norms": r["grad_norms"]}
              for r in run["history"] if "grad_norms" in r}
    result = {"arm": arm, "seed": seed, "acc": last["eval_acc"], "ce": last["eval_ce"],
              "grounding": last["eval_grounding"], "n": last["eval_n"], "probes": probes, "seconds": time.time() - t0}
    result_file.write_text(json.dumps(result))
    return result


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(results: list[dict], arms: list[str], seeds: list[int]) -> dict:
    by = {(r["arm"], r["seed"]): r for r in results}
    summary = {}
    for arm in arms:
        row = {}
        for key, higher_is_better in METRICS.items():
            values = [by[arm, s][key] for s in seeds]
            row |= {f"{key}_mean": statistics.fmean(values), f"{key}_sd": _sd(values)}
            if BASELINE in arms and arm != BASELINE:
                d = [by[arm, s][key] - by[BASELINE, s][key] for s in seeds]
                row |= {f"d_{key}_mean": statistics.fmean(d), f"d_{key}_sd": _sd(d),
                        f"better_{key}": sum(x > 0 if higher_is_better else x < 0 for x in d)}
        summary[arm] = row
    return summary


def term_shares(results: list[dict], arm: str) -> dict:
    """Per probe step: mean over seeds of each term's value and of its share of the summed gradient norms."""
    out: dict = {}
    for r in (r for r in results if r["arm"] == arm):
        for step, p in r["probes"].items():
            total = sum(p["grad_norms"].values()) or 1.0
            for k, g in p["grad_norms"].items():
                d = out.setdefault(str(step), {}).setdefault(k, {"value": [], "grad_norm": [], "share": []})
                d["value"].append(p["terms"][k])
                d["grad_norm"].append(g)
                d["share"].append(g / total)
    return {s: {k: {m: statistics.fmean(v) for m, v in d.items()} for k, d in terms.items()} for s, terms in out.items()}


def table(summary: dict, seeds: list[int]) -> str:
    lines = [f"| arm | held-out exact match | answer CE (nats/token) | grounding | vs {BASELINE}: d acc (better in) "
             f"| d CE (better in) | d grounding (better in) |", "|---|---|---|---|---|---|---|"]
    digits = {"acc": 3, "ce": 4, "grounding": 3}
    for arm, r in summary.items():
        cells = [f"{r[f'{k}_mean']:.{n}f} +- {r[f'{k}_sd']:.{n}f}" for k, n in digits.items()]
        cells += [f"{r[f'd_{k}_mean']:+.{n}f} +- {r[f'd_{k}_sd']:.{n}f} ({r[f'better_{k}']}/{len(seeds)})"
                  if f"d_{k}_mean" in r else "-" for k, n in digits.items()]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def shares_table(shares: dict, arm: str) -> str:
    names = logged_terms()[1:]
    lines = [f"`{arm}`: term value / gradient norm on the student / share of the summed norms, mean over seeds",
             "", "| step | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for step, terms in sorted(shares.items(), key=lambda kv: int(kv[0])):
        cells = [f"{terms[k]['value']:.3g} / {terms[k]['grad_norm']:.3g} / {100 * terms[k]['share']:.1f}%"
                 for k in names]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def chart(summary: dict, results: list[dict], seeds: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(summary)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for ax, key, label in ((axes[0], "acc", "held-out exact match"), (axes[1], "ce", "answer CE (nats/token)"),
                           (axes[2], "grounding", "grounding: layer-0 attention on the asked-about tokens")):
        means = [summary[a][f"{key}_mean"] for a in arms]
        sds = [summary[a][f"{key}_sd"] for a in arms]
        ax.bar(range(len(arms)), means, yerr=sds, color="#9ab", capsize=3)
        for i, a in enumerate(arms):  # each seed's value, so the spread is visible
            ax.scatter([i] * len(seeds), [r[key] for r in results if r["arm"] == a], s=10, color="k", zorder=3)
        ax.set_xticks(range(len(arms)), arms, rotation=35, ha="right")
        ax.set_title(label)
        if key == "ce":
            lo = min(r["ce"] for r in results)
            ax.set_ylim(lo * 0.9, None)
    fig.suptitle(f"Align-KD terms in the shapes world ({len(seeds)} seeds; bars: mean +- sd, dots: seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/ablate")
    p.add_argument("--assets", default="runs/alignkd/demo_assets", help="the demo's world and teacher (made if absent)")
    p.add_argument("--arms", default=None, help=f"comma-separated, from {', '.join(all_arms())}")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--steps", type=int, default=demo.STUDENT_STAGE[0])
    p.add_argument("--batch-size", type=int, default=demo.STUDENT_STAGE[1])
    p.add_argument("--lr", type=float, default=demo.STUDENT_STAGE[2])
    p.add_argument("--eval-limit", type=int, default=None, help="held-out records (default: all)")
    p.add_argument("--probe", default=None, help="steps at which term gradients are measured (default: 1, mid, last)")
    p.add_argument("--quick", action="store_true", help=f"arms {', '.join(QUICK_ARMS)}, 1 seed, a third of the "
                   "steps, 120 held-out records")
    args = p.parse_args(argv)
    if args.quick:
        args.arms = args.arms or ",".join(QUICK_ARMS)
        args.seeds, args.steps, args.eval_limit = 1, args.steps // 3, args.eval_limit or 120
    args.arms = (args.arms or ",".join(DEFAULT_ARMS)).split(",")
    unknown = [a for a in args.arms if a not in all_arms()]
    if unknown:
        raise SystemExit(f"error: unknown arms {unknown}; choose from {', '.join(all_arms())}")
    args.probe = args.probe or f"1,{args.steps // 2},{args.steps}"
    return args


def run(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    assets = demo.prepare_assets(Path(args.assets))
    seeds = list(range(args.seeds))
    results = []
    for seed in seeds:
        for arm in args.arms:
            r = run_arm(assets, out, arm, seed, args.steps, args.batch_size, args.lr, args.eval_limit, args.probe)
            results.append(r)
            print(f"{arm:<20} seed {seed}: held-out exact match {r['acc']:.3f}, answer CE {r['ce']:.4f}, grounding "
                  f"{r['grounding']:.3f} ({r['seconds']:.0f} s)", flush=True)
    summary = summarize(results, args.arms, seeds)
    shares = {arm: term_shares(results, arm) for arm in args.arms if arm != "ce_only"}
    meta = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()} {platform.processor()}",
            "cpus": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
            "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "seeds": seeds,
            "heldout_records": results[0]["n"], "teacher": json.loads(
                (Path(args.assets) / "teacher_run" / "heldout.json").read_text()),
            "student": demo.STUDENT, "teacher_sizes": demo.TEACHER, "seconds": time.time() - t0}
    report = {"meta": meta, "summary": summary, "term_shares": shares, "runs": results}
    (out / "ablation.json").write_text(json.dumps(report, indent=1))
    text = [f"Shapes world; student {demo.STUDENT}, teacher {demo.TEACHER} (held-out exact match "
            f"{meta['teacher']['eval_acc']:.3f}); {args.steps} steps x batch {args.batch_size}, lr {args.lr}; seeds "
            f"{seeds}; {meta['heldout_records']} held-out questions; {meta['machine']}, torch {meta['torch']}, "
            f"{meta['date']}; {meta['seconds'] / 60:.1f} min", "", table(summary, seeds), ""]
    for arm in shares:
        if shares[arm]:
            text += [shares_table(shares[arm], arm), ""]
    (out / "ablation.md").write_text("\n".join(text))
    chart(summary, results, seeds, out / "ablation.png")
    print("\n".join(text))
    print(f"wrote {out / 'ablation.json'}, {out / 'ablation.md'}, {out / 'ablation.png'}")
    return report


if __name__ == "__main__":
    run()
