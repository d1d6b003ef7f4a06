"""The official metric of each benchmark, answer parsers included.

A scorer takes the questions in question-file order (all of them, or the first N of a --limit run) and the answers
as {answer key: text}, and returns a dict whose "score" is the number MobileVLM V2 reports. A question without an
answer counts as wrong (POPE: left out of the counts, since it has no yes/no) and is counted in "missing".
"""
from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

from evaluation.benchmarks import (CIRCULAR_STRIDE, GROUND_TRUTH, POPE_CATEGORIES, SHORT_ANSWER, Question, check_data,
                             data_file)
from evaluation.textvqa_normalizer import vqa_accuracy

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
                  "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


# ---- GQA -----------------------------------------------------------------------------------------------------------
def gqa_prediction(text: str) -> str:
    """convert_gqa_for_eval: strip trailing periods only, lowercase."""
    return text.rstrip(".").lower()


def score_gqa(questions: list[Question], answers: dict[str, str], gt: dict[str, dict]) -> dict:
    """Official GQA accuracy: exact match over the balanced questions. `gt` is testdev_balanced_questions.json."""
    correct = total = missing = 0
    for q in questions:
        if str(q.question_id) not in gt:
            raise KeyError(f"GQA question {q.question_id} is not in the ground-truth file (wrong questions json?)")
        g = gt[str(q.question_id)]
        if not g.get("isBalanced", True):
            continue
        total += 1
        text = answers.get(q.key)
        missing += text is None
        correct += text is not None and gqa_prediction(text) == g["answer"]
    return {"score": 100 * correct / max(total, 1), "n": total, "missing": missing}


# ---- ScienceQA-IMG -------------------------------------------------------------------------------------------------
_SQA_LETTERS = ("A", "B", "C", "D", "E")
_SQA_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def sqa_letter(text: str) -> str:
    """eval_science_qa's parse: exact letter, "X. ...", or exactly one "The answer is X." match; else FAILED."""
    if text in _SQA_LETTERS:
        return text
    if len(text) >= 3 and text[0] in _SQA_LETTERS and text[1:3] == ". ":
        return text[0]
    found = _SQA_ANSWER_IS.findall(text)
    return found[0] if len(found) == 1 else "FAILED"


def score_sqa(questions: list[Question], answers: dict[str, str]) -> dict:
    """IMG accuracy over questions with an image (the reported number), plus accuracy over all questions."""
    correct = total = img_correct = img_total = failed = missing = 0
    for q in questions:
        text = answers.get(q.key)
        missing += text is None
        letter = "FAILED" if text is None else sqa_letter(text)
        failed += text is not None and letter == "FAILED"
        hit = letter == q.answer
        correct += hit
        total += 1
        if q.has_image:
            img_correct += hit
            img_total += 1
    return {"score": 100 * img_correct / max(img_total, 1), "overall": 100 * correct / max(total, 1),
            "n": img_total, "n_all": total, "failed": failed, "missing": missing}


# ---- TextVQA -------------------------------------------------------------------------------------------------------
def textvqa_question(prompt: str) -> str:
    """eval_textvqa's prompt_processor: recover the (lowercased) question that keys the ground truth."""
    lines = prompt.split("\n")
    if "Reference OCR token: " in prompt and len(lines) == 3:
        return (lines[1] if prompt.startswith("Reference OCR token:") else lines[0]).lower()
    if len(lines) == 2:
        return lines[0].lower()
    raise ValueError(f"cannot find the question in TextVQA prompt {prompt!r}")


def score_textvqa(questions: list[Question], answers: dict[str, str], annotations: list[dict]) -> dict:
    """VQA accuracy against the 10 answers; `annotations` is the `data` list of TextVQA_0.5.1_val.json."""
    gt = {(a["image_id"], a["question"].lower()): a["answers"] for a in annotations}
    total = missing = 0
    acc = 0.0
    for q in questions:
        key = (q.question_id, textvqa_question(q.prompt))
        if key not in gt:
            raise KeyError(f"TextVQA question {key} is not in the ground-truth file")
        text = answers.get(q.key)
        missing += text is None
        acc += 0.0 if text is None else vqa_accuracy(text, gt[key])
        total += 1
    return {"score": 100 * acc / max(total, 1), "n": total, "missing": missing}


# ---- POPE ----------------------------------------------------------------------------------------------------------
def pope_yes_no(text: str) -> str:
    """eval_pope: first sentence, commas removed, "no" iff a space-separated word is No, not or no."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if "No" in words or "not" in words or "no" in words else "yes"


def _binary_metrics(pairs: list[tuple[str, str]]) -> dict:
    tp = sum(p == "yes" and g == "yes" for p, g in pairs)
    fp = sum(p == "yes" and g == "no" for p, g in pairs)
    tn = sum(p == "no" and g == "no" for p, g in pairs)
    fn = sum(p == "no" and g == "yes" for p, g in pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    n = len(pairs)
    return {"f1": 100 * f1, "accuracy": 100 * (tp + tn) / max(n, 1), "precision": 100 * precision,
            "recall": 100 * recall, "yes_ratio": 100 * (tp + fp) / max(n, 1), "n": n}


def read_pope_labels(label_dir: str | Path) -> dict[str, list[dict]]:
    """coco_pope_{category}.json label files (JSON lines, in question order) of POPE commit e3e39262."""
    out = {}
    for cat in POPE_CATEGORIES:
        path = Path(label_dir) / f"coco_pope_{cat}.json"
        out[cat] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return out


def score_pope(questions: list[Question], answers: dict[str, str], labels: dict[str, list[dict]]) -> dict:
    """Mean F1 over the three splits. The reference pairs each split's answers with its label lines by position;
    here the position is the question's place within its split in the question file, and every pair is checked."""
    pairs: dict[str, list[tuple[str, str]]] = defaultdict(list)
    position: dict[str, int] = defaultdict(int)
    missing = 0
    for q in questions:
        cat = q.category
        i = position[cat]
        position[cat] += 1
        lab = labels[cat][i] if i < len(labels[cat]) else None
        if lab is None or lab["image"] != q.image.name or lab["text"] != q.prompt.split("\n")[0]:
            raise ValueError(f"POPE {cat} label {i} does not line up with question {q.question_id}: the labels "
                             "must be output/coco/coco_pope_*.json of POPE commit e3e39262, in question order")
        text = answers.get(q.key)
        if text is None:
            missing += 1
            continue
        pairs[cat].append((pope_yes_no(text), lab["label"]))
    splits = {cat: _binary_metrics(pairs[cat]) for cat in POPE_CATEGORIES if cat in pairs}
    means = {k: sum(s[k] for s in splits.values()) / max(len(splits), 1)
             for k in ("f1", "accuracy", "precision", "recall", "yes_ratio")}
    return {"score": means.pop("f1"), **means, "splits": splits, "n": sum(s["n"] for s in splits.values()),
            "missing": missing}


# ---- MME -----------------------------------------------------------------------------------------------------------
def read_mme_gt(release_dir: str | Path) -> dict[tuple[str, str, str], str]:
    """{(category, txt name, question): Yes|No} from the official release, as LLaVA's convert_answer_to_mme reads it:
    `<cat>/questions_answers_YN/*.txt` where the category has an images/ folder, else `<cat>/*.txt`."""
    gt = {}
    for cat_dir in sorted(p for p in Path(release_dir).iterdir() if p.is_dir()):
        qa_dir = cat_dir / "questions_answers_YN" if (cat_dir / "images").is_dir() else cat_dir
        for txt in sorted(qa_dir.glob("*.txt")):
            for line in txt.read_text().splitlines():
                if line.strip():
                    question, answer = line.strip().split("\t")
                    gt[(cat_dir.name, txt.name, question)] = answer
    return gt


def mme_gt_key(question: Question, gt: dict[tuple[str, str, str], str]) -> tuple[str, str, str]:
    """convert_answer_to_mme: category, `<image stem>.txt`, and the question with MME's own yes/no suffix (with
    two spaces before it where the release has them)."""
    qid = str(question.question_id)
    txt = qid.split("/")[-1].split(".")[0] + ".txt"
    prompt = question.prompt
    if SHORT_ANSWER in prompt:
        prompt = prompt.replace(SHORT_ANSWER, "").strip()
    if "Please answer yes or no." not in prompt:
        prompt = prompt + " Please answer yes or no."
        if (qid.split("/")[0], txt, prompt) not in gt:
            prompt = prompt.replace(" Please answer yes or no.", "  Please answer yes or no.")
    key = (qid.split("/")[0], txt, prompt)
    if key not in gt:
        raise KeyError(f"MME question {key} is not in the ground truth (wrong release folder?)")
    return key


def mme_yes_no(text: str) -> str:
    """calculation.py's parse: exact yes/no, else "yes" / "no" within the first 4 characters, else "other"."""
    text = text.lower()
    if text in ("yes", "no"):
        return text
    if "yes" in text[:4]:
        return "yes"
    return "no" if "no" in text[:4] else "other"


def score_mme(questions: list[Question], answers: dict[str, str], gt: dict[tuple[str, str, str], str]) -> dict:
    """Per subtask 100*acc + 100*acc+ (both questions of an image right); perception and cognition are sums."""
    per_image: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    missing = 0
    for q in questions:
        key = mme_gt_key(q, gt)
        truth = gt[key].lower()
        if truth not in ("yes", "no"):
            raise ValueError(f"MME ground truth {truth!r} for {key} is not yes/no")
        text = answers.get(q.key)
        missing += text is None
        per_image[key[0]][str(q.question_id)].append(text is not None and mme_yes_no(text) == truth)
    subtasks = {}
    for cat, images in per_image.items():
        results = [r for rs in images.values() for r in rs]
        acc = sum(results) / len(results)
        acc_plus = sum(all(rs) for rs in images.values()) / len(images)
        subtasks[cat] = {"acc": 100 * acc, "acc_plus": 100 * acc_plus, "score": 100 * acc + 100 * acc_plus}
    perception = sum(subtasks[c]["score"] for c in MME_PERCEPTION if c in subtasks)
    cognition = sum(subtasks[c]["score"] for c in MME_COGNITION if c in subtasks)
    return {"score": perception, "perception": perception, "cognition": cognition, "subtasks": subtasks,
            "n": len(questions), "missing": missing}


# ---- MMBench -------------------------------------------------------------------------------------------------------
_MMB_WRAPS = (("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"), ("(", ")."), (":", ""), (":", ","),
              (":", "."), (":", ")"), (":", ")."))


def mmbench_option_letter(text: str, letters: str = "ABCDE") -> str | None:
    """OpenCompass can_infer_option: one bare letter among the words (unless "A" may be an article), else the
    first wrapped form (X. X, X: X) X). (X) (X). :X :X, :X. :X) :X).) that matches exactly one letter."""
    words = [w.strip() for w in text.split()]
    bare = [c for c in letters if c in words]
    if len(bare) == 1 and not ("A" in words and len(words) > 3):
        return bare[0]
    for pre, post in _MMB_WRAPS:
        hits = [c for c in letters if pre + c + post in words]
        if len(hits) == 1:
            return hits[0]
    return None


def mmbench_text_letter(text: str, choices: dict[str, str]) -> str | None:
    """OpenCompass can_infer_text: exactly one option text (lowercased) occurs in the lowercased answer."""
    found = [k for k, v in choices.items() if v.lower() in text.lower()]
    return found[0] if len(found) == 1 else None


def mmbench_letter(text: str, choices: dict[str, str]) -> str | None:
    """The letter a prediction names, or None when it cannot be inferred without an LLM."""
    return mmbench_option_letter(text) or mmbench_text_letter(text, choices)


def score_mmbench(questions: list[Question], answers: dict[str, str]) -> dict:
    """CircularEval: a question is a hit only if every rotated copy names its own ground-truth letter. A copy whose
    letter cannot be inferred (the official script asks GPT-3.5) counts as wrong, VLMEvalKit's exact_matching."""
    copies: dict[int, list[Question]] = defaultdict(list)
    for q in questions:
        copies[q.question_id % CIRCULAR_STRIDE].append(q)
    mains = [q for q in questions if q.question_id < CIRCULAR_STRIDE]
    hits = 0
    not_inferred = undecided = missing = 0
    per_category: dict[str, list[int]] = defaultdict(list)
    for main in mains:
        letters = []
        for q in copies[main.question_id]:
            text = answers.get(q.key)
            missing += text is None
            letter = None if text is None else mmbench_letter(text, q.choices)
            not_inferred += letter is None
            letters.append((letter, q.answer))
        mismatch = any(p is not None and p != g for p, g in letters)
        hit = all(p == g for p, g in letters)
        undecided += not mismatch and not hit  # only un-inferred copies stand between this question and a hit
        hits += hit
        per_category[str(main.category)].append(hit)
    return {"score": 100 * hits / max(len(mains), 1), "n": len(mains), "copies": len(questions),
            "copies_not_inferred": not_inferred, "questions_undecided": undecided, "missing": missing,
            "categories": {c: 100 * sum(v) / len(v) for c, v in sorted(per_category.items())}}


# ---- dispatch ------------------------------------------------------------------------------------------------------
def score_benchmark(bench: str, questions: list[Question], answers: dict[str, str], root: str | Path) -> dict:
    """Score one benchmark, reading its ground truth from the data root (LLaVA layout)."""
    if bench == "gqa":
        return score_gqa(questions, answers, json.loads(data_file(root, GROUND_TRUTH["gqa"]).read_text()))
    if bench == "sqa":
        return score_sqa(questions, answers)
    if bench == "textvqa":
        gt = json.loads(data_file(root, GROUND_TRUTH["textvqa"]).read_text())["data"]
        return score_textvqa(questions, answers, gt)
    if bench == "pope":
        check_data("pope", root, images=False)  # names a missing label file
        return score_pope(questions, answers, read_pope_labels(Path(root) / GROUND_TRUTH["pope"]))
    if bench == "mme":
        return score_mme(questions, answers, read_mme_gt(data_file(root, GROUND_TRUTH["mme"])))
    if bench == "mmbench":
        return score_mmbench(questions, answers)
    raise ValueError(f"unknown benchmark {bench!r}")
