"""Readers for the six MobileVLM V2 benchmarks in LLaVA's `playground/data/eval` layout, with their exact prompts.

Every reader returns `Question`s in question-file order. `prompt` is the answer file's `prompt` field exactly as
LLaVA/MobileVLM's scripts write it, so answer files made by the original scripts score here too (and vice versa).
"""
from __future__ import annotations

import base64
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from data.constants import DEFAULT_IMAGE_TOKEN

BENCHMARKS = ("gqa", "sqa", "textvqa", "pope", "mme", "mmbench")
SHORT_ANSWER = "Answer the question using a single word or phrase."
LETTER_ANSWER = "Answer with the option's letter from the given choices directly."
# model_vqa_loader uses 128; model_vqa_science and model_vqa_mmbench use 1024.
MAX_NEW_TOKENS = {"gqa": 128, "sqa": 1024, "textvqa": 128, "pope": 128, "mme": 128, "mmbench": 1024}
POPE_CATEGORIES = ("adversarial", "popular", "random")
MMBENCH_OPTIONS = "ABCD"  # LLaVA's model_vqa_mmbench and OpenCompass' scorer look at these four columns only
CIRCULAR_STRIDE = 1_000_000  # a CircularEval copy of question i has index i + k * 1e6

_LLAVA_EVAL = "LLaVA's eval.zip (haotian-liu/LLaVA, docs/Evaluation.md; playground/data/eval/)"
SOURCES = {
    "gqa/llava_gqa_testdev_balanced.jsonl": _LLAVA_EVAL,
    "gqa/data/testdev_balanced_questions.json": "GQA questions1.2.zip (cs.stanford.edu/people/dorarad/gqa)",
    "gqa/data/images": "GQA images.zip (cs.stanford.edu/people/dorarad/gqa)",
    "scienceqa/llava_test_CQM-A.json": _LLAVA_EVAL,
    "scienceqa/images/test": "ScienceQA test images (lupantech/ScienceQA, test.zip), unzipped to images/test",
    "textvqa/llava_textvqa_val_v051_ocr.jsonl": _LLAVA_EVAL,
    "textvqa/TextVQA_0.5.1_val.json": "TextVQA v0.5.1 val annotations (textvqa.org/dataset)",
    "textvqa/train_images": "TextVQA train_val_images.zip (textvqa.org/dataset)",
    "pope/llava_pope_test.jsonl": _LLAVA_EVAL,
    "pope/coco": "POPE's output/coco/coco_pope_*.json at commit e3e39262 (AoiDragon/POPE; HEAD's random differs)",
    "pope/val2014": "COCO val2014 images (cocodataset.org)",
    "MME/llava_mme.jsonl": _LLAVA_EVAL,
    "MME/MME_Benchmark_release_version": "the MME release from its authors (see BradyFU/"
                                         "Awesome-Multimodal-Large-Language-Models, Evaluation)",
    "mmbench": "MMBench dev TSV (download.openmmlab.com/mmclassification/datasets/mmbench/)",
}
QUESTION_FILES = {
    "gqa": "gqa/llava_gqa_testdev_balanced.jsonl", "sqa": "scienceqa/llava_test_CQM-A.json",
    "textvqa": "textvqa/llava_textvqa_val_v051_ocr.jsonl", "pope": "pope/llava_pope_test.jsonl",
    "mme": "MME/llava_mme.jsonl",
}
IMAGE_DIRS = {"gqa": "gqa/data/images", "sqa": "scienceqa/images/test", "textvqa": "textvqa/train_images",
              "pope": "pope/val2014", "mme": "MME/MME_Benchmark_release_version"}
GROUND_TRUTH = {"gqa": "gqa/data/testdev_balanced_questions.json", "textvqa": "textvqa/TextVQA_0.5.1_val.json",
                "pope": "pope/coco", "mme": "MME/MME_Benchmark_release_version"}
MMBENCH_TSVS = ("mmbench/mmbench_dev_en_20231003.tsv", "mmbench/mmbench_dev_20230712.tsv")


class MissingDataError(FileNotFoundError):
    pass


def data_file(root: str | Path, rel: str) -> Path:
    """`root/rel`, or an error that names the exact path and where that file comes from."""
    path = Path(root) / rel
    if not path.exists():
        source = next((SOURCES[str(p)] for p in [Path(rel), *Path(rel).parents] if str(p) in SOURCES), "?")
        raise MissingDataError(f"missing {path}; it comes from {source}")
    return path


def check_data(bench: str, root: str | Path, images: bool = True) -> None:
    """Fail before a model is loaded, naming the first missing file of a benchmark."""
    if bench == "mmbench":
        mmbench_tsv(root)
        return
    data_file(root, QUESTION_FILES[bench])
    if images:
        data_file(root, IMAGE_DIRS[bench])
    if bench == "pope":
        for cat in POPE_CATEGORIES:
            data_file(root, f"{GROUND_TRUTH['pope']}/coco_pope_{cat}.json")
    elif bench in GROUND_TRUTH:
        data_file(root, GROUND_TRUTH[bench])


def mmbench_tsv(root: str | Path) -> Path:
    for rel in MMBENCH_TSVS:
        if (Path(root) / rel).exists():
            return Path(root) / rel
    raise MissingDataError(f"missing {' or '.join(str(Path(root) / r) for r in MMBENCH_TSVS)}; "
                           f"it comes from {SOURCES['mmbench']}")


def answer_key(bench: str, question_id: int | str, prompt: str) -> str:
    """Identity of a question in answer files: TextVQA and MME ids name the image, which two questions can share."""
    return f"{question_id}\t{prompt}" if bench in ("textvqa", "mme") else str(question_id)


@dataclass
class Question:
    bench: str
    question_id: int | str
    prompt: str  # the answer file's `prompt` field, as the reference scripts write it
    text: str  # the question for the v1 template, without "<image>\n" (build_prompt puts it in front)
    image: Path | None = None
    image_b64: str | None = None  # MMBench keeps its images in the TSV
    image_mode: str = "pad"  # "pad" (expand2square) or "square" (resize + center crop: ScienceQA)
    category: str | None = None
    answer: str | None = None  # ground truth carried by the question file (ScienceQA and MMBench letters)
    choices: dict[str, str] = field(default_factory=dict)  # MMBench options the scorer matches text against

    @property
    def key(self) -> str:
        return answer_key(self.bench, self.question_id, self.prompt)

    @property
    def has_image(self) -> bool:
        return self.image is not None or self.image_b64 is not None

    @property
    def max_new_tokens(self) -> int:
        return MAX_NEW_TOKENS[self.bench]

    def load_image(self) -> Image.Image | None:
        """The PIL image as the reference opens it (FileNotFoundError when the file is missing)."""
        if self.image_b64 is not None:
            # Not converted in the reference before expand2square; converting first only matters for non-RGB.
            return Image.open(io.BytesIO(base64.b64decode(self.image_b64))).convert("RGB")
        if self.image is None:
            return None
        if self.image_mode == "square":
            return Image.open(self.image)  # model_vqa_science leaves RGB conversion to the CLIP processor
        return Image.open(self.image).convert("RGB")


class QuestionFileError(ValueError):
    """A benchmark's question file that cannot be read; the message names the file (and line or record)."""


def _field_problem(e: Exception) -> str:
    return f"missing field {e}" if isinstance(e, KeyError) else f"unexpected layout ({e})"


def read_llava_jsonl(bench: str, path: str | Path, image_dir: str | Path) -> list[Question]:
    """GQA, TextVQA, POPE, MME (model_vqa_loader): the `text` field is the question, suffix included."""
    out = []
    for k, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            out.append(Question(bench, r["question_id"], r["text"], r["text"], image=Path(image_dir) / r["image"],
                                category=r.get("category")))
        except json.JSONDecodeError as e:
            raise QuestionFileError(f"{path}:{k}: not a JSON line ({e.msg} at column {e.colno})") from None
        except (KeyError, TypeError, AttributeError) as e:
            raise QuestionFileError(f"{path}:{k}: {_field_problem(e)}") from None
    return out


def read_sqa(path: str | Path, image_dir: str | Path) -> list[Question]:
    """ScienceQA (model_vqa_science with --single-pred-prompt); questions without an image run text-only."""
    try:
        records = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise QuestionFileError(f"{path}: not JSON ({e})") from None
    out = []
    for k, r in enumerate(records if isinstance(records, list) else [records]):
        try:
            text = r["conversations"][0]["value"].replace(DEFAULT_IMAGE_TOKEN, "").strip() + "\n" + LETTER_ANSWER
            image = Path(image_dir) / r["image"] if "image" in r else None
            prompt = DEFAULT_IMAGE_TOKEN + "\n" + text if image else text  # this script's prompt field keeps the tag
            out.append(Question("sqa", r["id"], prompt, text, image=image, image_mode="square",
                                answer=r["conversations"][1]["value"]))
        except (KeyError, IndexError, TypeError, AttributeError) as e:
            raise QuestionFileError(f"{path}: record {k}: {_field_problem(e)} (expected a list of LLaVA records "
                                    "with id, conversations and optional image)") from None
    return out


def _is_none(value: object) -> bool:
    """model_vqa_mmbench's is_none: NaN, or the strings 'nan' / 'none' in any case."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return True
    return isinstance(value, str) and value.lower() in ("nan", "none")


def read_mmbench(path: str | Path) -> list[Question]:
    """MMBench dev TSV, every row (each CircularEval copy is its own question), as model_vqa_mmbench builds it."""
    import pandas as pd

    table = pd.read_table(path)  # pandas defaults on purpose: "NA", "None" etc. become NaN as in the reference
    missing = [c for c in ("index", "question", "hint", "answer", "image", *MMBENCH_OPTIONS) if c not in table.columns]
    if missing:
        raise QuestionFileError(f"{path}: no column {', '.join(missing)} (an MMBench dev TSV has index, question, "
                                "hint, A-D, answer, image)")
    # VLMEvalKit's repackaged TSVs give a copy, instead of the base64, the index of the row that holds its image
    images = {str(i): im for i, im in zip(table["index"], table["image"]) if isinstance(im, str) and len(im) > 64}
    out = []
    for _, row in table.iterrows():
        options = []
        for letter in MMBENCH_OPTIONS:
            if _is_none(row[letter]):
                break
            options.append(row[letter])
        q = row["question"] if _is_none(row["hint"]) else row["hint"] + "\n" + row["question"]
        for letter, option in zip(MMBENCH_OPTIONS, options):
            q = q + "\n" + letter + ". " + option
        # OpenCompass' scorer matches text against every non-NaN column (its build_choices), not only `options`.
        choices = {c: str(row[c]) for c in MMBENCH_OPTIONS if not pd.isna(row[c])}
        out.append(Question("mmbench", int(row["index"]), q, q + "\n" + LETTER_ANSWER,
                            image_b64=images.get(str(row["image"]), row["image"]), category=row.get("category"),
                            answer=row["answer"],
                            choices=choices))
    return out


def load_questions(bench: str, root: str | Path, need_images: bool = True) -> list[Question]:
    """All questions of one benchmark under the data root, in question-file order."""
    if bench == "mmbench":
        return read_mmbench(mmbench_tsv(root))
    questions = data_file(root, QUESTION_FILES[bench])
    image_dir = data_file(root, IMAGE_DIRS[bench]) if need_images else Path(root) / IMAGE_DIRS[bench]
    if bench == "sqa":
        return read_sqa(questions, image_dir)
    return read_llava_jsonl(bench, questions, image_dir)


def limit_questions(questions: list[Question], n: int | None) -> list[Question]:
    """The first n questions; for MMBench the first n main questions with all their circular copies."""
    if n is None or n >= len(questions):
        return questions
    if questions and questions[0].bench == "mmbench":
        keep = set([q.question_id for q in questions if q.question_id < CIRCULAR_STRIDE][:n])
        return [q for q in questions if q.question_id % CIRCULAR_STRIDE in keep]
    return questions[:n]


class AnswerFileError(ValueError):
    """An answer file that cannot be scored; the message reads "FILE:LINE: what is wrong" (or "FILE: ...")."""


ANSWER_FIELDS = ("question_id", "prompt", "text")


def _kind(value: object) -> str:
    names = {dict: "a JSON object", list: "a JSON list", str: "a string", bool: "a boolean", type(None): "null",
             int: "a number", float: "a number"}
    return names.get(type(value), type(value).__name__)


def _check_answer(r: object) -> str | None:
    """What is wrong with one parsed answer line (LLaVA format), or None."""
    if not isinstance(r, dict):
        return f"expected a JSON object with {', '.join(ANSWER_FIELDS)}; found {_kind(r)}"
    missing = [k for k in ANSWER_FIELDS if k not in r]
    if missing:
        return f"missing field {', '.join(repr(k) for k in missing)} (an answer line holds {', '.join(ANSWER_FIELDS)})"
    qid = r["question_id"]
    if isinstance(qid, bool) or not isinstance(qid, (int, str)):
        return f"'question_id' must be a number or a string, found {_kind(qid)}"
    for k in ("prompt", "text"):
        if not isinstance(r[k], str):
            return f"{k!r} must be a string, found {_kind(r[k])} {json.dumps(r[k])[:60]}"
    return None


def read_answer_records(path: str | Path) -> tuple[list[tuple[int, str, dict]], int | None]:
    """(line number, line, record) of every answer line, each checked, and the number of a last line cut short by an
    interrupted run (no newline after it and not valid: ignored) or None. Any other line that is not an answer is an
    AnswerFileError "FILE:LINE: ..."."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except IsADirectoryError:
        raise AnswerFileError(f"{path}: is a folder, not an answer file") from None
    lines = raw.split(b"\n")
    out = []
    for k, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        cut = k == len(lines)  # no newline after it
        try:
            text = line.decode("utf-8").rstrip("\r")
            r = json.loads(text)
        except UnicodeDecodeError as e:
            if cut:
                return out, k
            raise AnswerFileError(f"{path}:{k}: not UTF-8 text (byte {e.object[e.start:e.start + 1]!r} at column "
                                  f"{e.start + 1})") from None
        except json.JSONDecodeError as e:
            if cut:
                return out, k
            raise AnswerFileError(f"{path}:{k}: not a JSON line ({e.msg.removesuffix(' at')} at column {e.colno}): "
                                  f"{text[:60]!r}") from None
        problem = _check_answer(r)
        if problem:
            raise AnswerFileError(f"{path}:{k}: {problem}")
        out.append((k, text, r))
    return out, None


def answers_by_key(records: list[tuple[int, str, dict]], bench: str) -> dict[str, str]:
    """{answer key: text}; a later line for the same key wins."""
    return {answer_key(bench, r["question_id"], r["prompt"]): r["text"] for _, _, r in records}


def read_answers(path: str | Path, bench: str) -> dict[str, str]:
    """Answer file (JSON lines, LLaVA format) -> {answer key: text}; a later line for the same key wins. A last line
    cut short by an interrupted run is ignored; any other damage is an AnswerFileError naming the line."""
    return answers_by_key(read_answer_records(path)[0], bench)
