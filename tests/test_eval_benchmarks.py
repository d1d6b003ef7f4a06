"""Benchmark readers: the reference prompts, the data-root layout and its errors, MMBench's TSV and CircularEval."""
from __future__ import annotations

import base64
import io
import json

import pandas as pd
import pytest
from PIL import Image

from evaluation.benchmarks import (LETTER_ANSWER, AnswerFileError, MissingDataError, check_data, limit_questions,
                             load_questions, read_answers, read_llava_jsonl, read_mmbench, read_sqa)
from evaluation.scorers import score_mmbench


def _reference_prompts(path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        out.setdefault(str(r["question_id"]), []).append(r["prompt"])
    return out


@pytest.mark.parametrize("bench,folder,questions_file", [
    ("gqa", "gqa", "llava_gqa_testdev_balanced.jsonl"), ("textvqa", "textvqa", "llava_textvqa_val_v051_ocr.jsonl"),
    ("pope", "pope", "llava_pope_test.jsonl"), ("mme", "mme", "llava_mme.jsonl"),
])
def test_loader_prompts_match_the_reference_answer_files(llava_eval_dir, bench, folder, questions_file):
    questions = read_llava_jsonl(bench, llava_eval_dir / folder / questions_file, "imgs")
    ref = _reference_prompts(llava_eval_dir / folder / "answers_llava-v1.5-13b.jsonl")
    assert [q.prompt for q in questions if q.question_id == questions[0].question_id] == \
        ref[str(questions[0].question_id)]
    assert all(q.prompt in ref[str(q.question_id)] for q in questions)
    assert all(q.text == q.prompt and q.image_mode == "pad" and q.max_new_tokens == 128
               for q in questions)
    assert str(questions[0].image).startswith("imgs/")


def test_sqa_prompts_match_the_reference_answer_file(llava_eval_dir):
    questions = read_sqa(llava_eval_dir / "scienceqa/llava_test_CQM-A.json", "images/test")
    ref = _reference_prompts(llava_eval_dir / "scienceqa/answers_llava-v1.5-13b.jsonl")
    assert all([q.prompt] == ref[str(q.question_id)] for q in questions)
    with_image = [q for q in questions if q.has_image]
    assert len(with_image) == 2017 and all(q.prompt == "<image>\n" + q.text for q in with_image)
    assert all(q.text.endswith("\n" + LETTER_ANSWER) and q.image_mode == "square" and q.max_new_tokens == 1024
               for q in questions)
    text_only = next(q for q in questions if not q.has_image)
    assert text_only.prompt == text_only.text and "<image>" not in text_only.text
    assert text_only.load_image() is None
    assert str(with_image[0].image) == f"images/test/{with_image[0].question_id}/image.png"


def test_missing_files_name_path_and_source(tmp_path):
    with pytest.raises(MissingDataError, match=r"pope/llava_pope_test\.jsonl.*eval\.zip"):
        load_questions("pope", tmp_path)
    (tmp_path / "pope").mkdir()
    (tmp_path / "pope/llava_pope_test.jsonl").write_text("")
    with pytest.raises(MissingDataError, match=r"pope/val2014.*COCO val2014"):
        load_questions("pope", tmp_path)
    assert load_questions("pope", tmp_path, need_images=False) == []
    with pytest.raises(MissingDataError, match=r"mmbench_dev_en_20231003\.tsv or .*mmbench_dev_20230712\.tsv"):
        load_questions("mmbench", tmp_path)
    (tmp_path / "pope/val2014").mkdir()
    (tmp_path / "pope/coco").mkdir()
    (tmp_path / "pope/coco/coco_pope_adversarial.json").write_text("")
    with pytest.raises(MissingDataError, match=r"pope/coco/coco_pope_popular\.json.*e3e39262"):
        check_data("pope", tmp_path)


def test_answer_file_with_a_cut_last_line(tmp_path):
    good = '{"question_id": 1, "prompt": "p", "text": "Yes"}\n'
    (tmp_path / "a.jsonl").write_text(good + '{"question_id": 2, "pro')
    assert read_answers(tmp_path / "a.jsonl", "pope") == {"1": "Yes"}
    (tmp_path / "b.jsonl").write_text('{"question_id": 2, "pro\n' + good)
    with pytest.raises(AnswerFileError, match=r"b\.jsonl:1: not a JSON line"):  # damage anywhere else is an error
        read_answers(tmp_path / "b.jsonl", "pope")


def _png_b64(mode: str) -> str:
    buf = io.BytesIO()
    Image.new(mode, (20, 10)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _write_mmbench(tmp_path):
    rows = [
        # index, hint, question, A, B, C, D, answer
        (0, "NA", "What color?", "red", "blue", "None", "green", "A"),  # "NA" and "None" read as NaN
        (1, "Look closely.", "How many?", "1", "2", "3", "4", "C"),
        (2, "", "Which one?", "cat", "dog", "none", "", "A"),  # lowercase "none": not NaN, still ends the prompt
        (1000000, "NA", "What color?", "blue", "red", "None", "green", "B"),
        (1000001, "Look closely.", "How many?", "2", "3", "4", "1", "B"),
        (1000002, "", "Which one?", "dog", "cat", "none", "", "B"),
    ]
    df = pd.DataFrame(rows, columns=["index", "hint", "question", "A", "B", "C", "D", "answer"])
    df["category"] = ["color", "count", "animal"] * 2
    # the copy of question 2 points at its image by index, as VLMEvalKit's TSVs do
    df["image"] = [_png_b64("RGBA"), _png_b64("L"), _png_b64("RGB"), _png_b64("RGBA"), _png_b64("L"), "2"]
    path = tmp_path / "mmbench" / "mmbench_dev_20230712.tsv"
    path.parent.mkdir()
    df.to_csv(path, sep="\t", index=False)
    return path


def test_mmbench_reader(tmp_path):
    _write_mmbench(tmp_path)
    questions = load_questions("mmbench", tmp_path)
    assert [q.question_id for q in questions] == [0, 1, 2, 1000000, 1000001, 1000002]
    q0, q1, q2 = questions[:3]
    assert q0.prompt == "What color?\nA. red\nB. blue"
    assert q0.text == "What color?\nA. red\nB. blue\n" + LETTER_ANSWER
    assert q0.choices == {"A": "red", "B": "blue", "D": "green"}  # the scorer's build_choices skips NaN only
    assert q1.prompt == "Look closely.\nHow many?\nA. 1\nB. 2\nC. 3\nD. 4"
    assert q2.prompt == "Which one?\nA. cat\nB. dog" and q2.choices == {"A": "cat", "B": "dog", "C": "none"}
    assert (q0.answer, q0.category, q0.max_new_tokens, q0.image_mode) == ("A", "color", 1024, "pad")
    assert all(q.load_image().mode == "RGB" and q.load_image().size == (20, 10) for q in questions)
    assert questions[5].image_b64 == q2.image_b64
    assert [q.question_id for q in limit_questions(questions, 2)] == [0, 1, 1000000, 1000001]


def test_mmbench_circular_rule(tmp_path):
    questions = read_mmbench(_write_mmbench(tmp_path))
    answers = {"0": "A", "1000000": "B",  # both copies right: hit
               "1": "C", "1000001": "A",  # one copy names a wrong letter: miss
               "2": "A", "1000002": "I am not sure"}  # one copy not inferable: miss, reported
    r = score_mmbench(questions, answers)
    assert r["score"] == pytest.approx(100 / 3)
    assert (r["n"], r["copies"], r["copies_not_inferred"], r["questions_undecided"]) == (3, 6, 1, 1)
    assert r["categories"] == {"animal": 0.0, "color": 100.0, "count": 0.0}
    answers["1000002"] = "The cat."  # text match on the copy's own options: B is cat there
    assert score_mmbench(questions, answers)["score"] == pytest.approx(200 / 3)
    del answers["1000000"]
    r = score_mmbench(questions, answers)
    assert r["score"] == pytest.approx(100 / 3) and r["missing"] == 1
