"""A data root in LLaVA's eval layout holding all six benchmarks, made from the synthetic shape images: question
files, images and ground truth in the official formats, so `eval.py --bench demo` runs the real readers, generation
and scorers without any download."""
from __future__ import annotations

import base64
import json
import random
import re
import shutil
import tempfile
from pathlib import Path

from evaluation.benchmarks import POPE_CATEGORIES, SHORT_ANSWER
from data.synthetic import COLOURS, SHAPES, make_synthetic_dataset

_CAPTION = re.compile(r"^A (\w+) (\w+) (\w+) (.+) of a (\w+) background\.$")
_SIDES = {"triangle": "3", "square": "4"}


def _scenes(folder: Path, n: int, seed: int) -> list[dict]:
    records = json.loads(make_synthetic_dataset(folder, n=n, seed=seed, kind="caption").read_text())
    out = []
    for r in records:
        size, colour, shape, where, bg = _CAPTION.match(r["conversations"][1]["value"]).groups()
        out.append({"path": folder / r["image"], "colour": colour, "shape": shape, "bg": bg})
    return out


def _copy(src: Path, dst: Path) -> str:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, dst)
    return dst.name


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _other(rng: random.Random, choices, not_this: str) -> str:
    return rng.choice([c for c in choices if c != not_this])


def _gqa(root: Path, scenes: list[dict]) -> None:
    rows, gt = [], {}
    for i, s in enumerate(scenes):
        name = _copy(s["path"], root / f"gqa/data/images/n{i}.png")
        rows.append({"question_id": str(i), "image": name, "text": f"What color is the {s['shape']}?\n{SHORT_ANSWER}",
                     "category": "default"})
        gt[str(i)] = {"answer": s["colour"], "isBalanced": True}
    _jsonl(root / "gqa/llava_gqa_testdev_balanced.jsonl", rows)
    (root / "gqa/data/testdev_balanced_questions.json").write_text(json.dumps(gt))


def _sqa(root: Path, scenes: list[dict], rng: random.Random) -> None:
    records = []
    for i, s in enumerate(scenes):
        options = [s["colour"], _other(rng, COLOURS, s["colour"])]
        rng.shuffle(options)
        body = f"What color is the {s['shape']}?\nA. {options[0]}\nB. {options[1]}"
        _copy(s["path"], root / f"scienceqa/images/test/{i}/image.png")
        answer = "AB"[options.index(s["colour"])]
        records.append({"id": str(i), "image": f"{i}/image.png", "conversations": [
            {"from": "human", "value": "<image>\n" + body}, {"from": "gpt", "value": answer}]})
        if i % 3 == 0:  # a text-only question, as ScienceQA has
            shape = rng.choice(list(_SIDES))
            records.append({"id": f"t{i}", "conversations": [
                {"from": "human", "value": f"How many sides does a {shape} have?\nA. 3\nB. 4"},
                {"from": "gpt", "value": "A" if _SIDES[shape] == "3" else "B"}]})
    (root / "scienceqa").mkdir(parents=True, exist_ok=True)
    (root / "scienceqa/llava_test_CQM-A.json").write_text(json.dumps(records))


def _textvqa(root: Path, scenes: list[dict]) -> None:
    rows, data = [], []
    for i, s in enumerate(scenes):
        image_id = f"{i:016x}"
        name = _copy(s["path"], root / f"textvqa/train_images/{image_id}.png")
        question = "What color is the background?"
        rows.append({"question_id": image_id, "image": name, "category": "default",
                     "text": f"{question}\nReference OCR token: \n{SHORT_ANSWER}"})
        data.append({"image_id": image_id, "question": question, "answers": [s["bg"]] * 10})
    _jsonl(root / "textvqa/llava_textvqa_val_v051_ocr.jsonl", rows)
    (root / "textvqa/TextVQA_0.5.1_val.json").write_text(json.dumps({"data": data}))


def _pope(root: Path, scenes: list[dict], rng: random.Random) -> None:
    rows, qid = [], 0
    for cat in POPE_CATEGORIES:
        labels = []
        for i, s in enumerate(scenes):
            name = _copy(s["path"], root / f"pope/val2014/COCO_val2014_{i:012d}.png")
            for shape, label in ((s["shape"], "yes"), (_other(rng, SHAPES, s["shape"]), "no")):
                qid += 1
                text = f"Is there a {shape} in the image?"
                rows.append({"question_id": qid, "image": name, "text": f"{text}\n{SHORT_ANSWER}", "category": cat})
                labels.append({"question_id": qid, "image": name, "text": text, "label": label})
        _jsonl(root / f"pope/coco/coco_pope_{cat}.json", labels)
    _jsonl(root / "pope/llava_pope_test.jsonl", rows)


def _mme(root: Path, scenes: list[dict], rng: random.Random) -> None:
    release, rows = root / "MME/MME_Benchmark_release_version", []
    for i, s in enumerate(scenes):
        # "color" keeps images and answers side by side; "scene" uses images/ + questions_answers_YN/
        cat = "color" if i % 2 else "scene"
        image = f"{cat}/{i:04d}.png" if cat == "color" else f"{cat}/images/{i:04d}.png"
        _copy(s["path"], release / image)
        qa_dir = release / (cat if cat == "color" else f"{cat}/questions_answers_YN")
        lines = []
        for colour, truth in ((s["colour"], "Yes"), (_other(rng, COLOURS, s["colour"]), "No")):
            question = f"Is the {s['shape']} {colour}?"
            lines.append(f"{question} Please answer yes or no.\t{truth}\n")
            rows.append({"question_id": image, "image": image, "text": f"{question}\n{SHORT_ANSWER}", "category": cat})
        qa_dir.mkdir(parents=True, exist_ok=True)
        (qa_dir / f"{i:04d}.txt").write_text("".join(lines))
    _jsonl(root / "MME/llava_mme.jsonl", rows)


def _mmbench(root: Path, scenes: list[dict], rng: random.Random) -> None:
    import pandas as pd

    rows = []
    for i, s in enumerate(scenes):
        options = [s["colour"]] + rng.sample([c for c in COLOURS if c != s["colour"]], 3)
        rng.shuffle(options)
        image = base64.b64encode(s["path"].read_bytes()).decode()
        for k in range(2):  # the question and one CircularEval copy with the options rotated
            opts = options[k:] + options[:k]
            rows.append({"index": i + k * 1_000_000, "question": f"What color is the {s['shape']}?",
                         "hint": "NA" if i % 2 else "Look at the shape.", **dict(zip("ABCD", opts)),
                         "answer": "ABCD"[opts.index(s["colour"])], "category": "attribute_recognition",
                         "image": image, "split": "dev"})
    (root / "mmbench").mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(root / "mmbench/mmbench_dev_20230712.tsv", sep="\t", index=False)


def make_synthetic_benchmarks(root: str | Path, n: int = 8, seed: int = 0) -> Path:
    """Write the six benchmarks (n images each, in LLaVA's layout) under `root`; returns `root`."""
    root = Path(root)
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        scenes = _scenes(Path(tmp), n, seed)
        _gqa(root, scenes)
        _sqa(root, scenes, rng)
        _textvqa(root, scenes)
        _pope(root, scenes, rng)
        _mme(root, scenes, rng)
        _mmbench(root, scenes, rng)
    return root
