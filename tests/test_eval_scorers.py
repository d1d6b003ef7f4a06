"""Benchmark scorers: golden numbers from LLaVA-1.5-13B's published answers, and every parse rule of section 5."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from evaluation.benchmarks import Question, read_answers, read_llava_jsonl, read_sqa
from evaluation.scorers import (gqa_prediction, mme_yes_no, mmbench_letter, mmbench_option_letter, mmbench_text_letter,
                          pope_yes_no, read_mme_gt, read_pope_labels, score_gqa, score_mme, score_pope, score_sqa,
                          score_textvqa, sqa_letter, textvqa_question)
from evaluation.textvqa_normalizer import CONTRACTIONS, normalize_answer, vqa_accuracy

SUFFIX = "\nAnswer the question using a single word or phrase."


# ---- golden numbers (fixtures/README.md) ---------------------------------------------------------------------------
def _pope(llava_eval_dir: Path):
    questions = read_llava_jsonl("pope", llava_eval_dir / "pope/llava_pope_test.jsonl", "val2014")
    answers = read_answers(llava_eval_dir / "pope/answers_llava-v1.5-13b.jsonl", "pope")
    return questions, answers, read_pope_labels(llava_eval_dir / "pope")


def test_pope_golden(llava_eval_dir):
    questions, answers, labels = _pope(llava_eval_dir)
    r = score_pope(questions, answers, labels)
    assert round(r["score"], 2) == 85.95
    assert {k: round(v["f1"], 2) for k, v in r["splits"].items()} == {
        "adversarial": 84.46, "popular": 86.25, "random": 87.14}
    assert [r["splits"][k]["n"] for k in ("adversarial", "popular", "random")] == [3000, 3000, 2910]
    assert round(r["accuracy"], 2) == 86.98 and r["missing"] == 0


def test_pope_answer_order_does_not_matter(llava_eval_dir):
    # Batched generation appends answers out of question order; pairing goes by the question file.
    questions, answers, labels = _pope(llava_eval_dir)
    items = list(answers.items())
    random.Random(0).shuffle(items)
    assert round(score_pope(questions, dict(items), labels)["score"], 2) == 85.95


def test_pope_rejects_labels_that_do_not_line_up(llava_eval_dir):
    questions, answers, labels = _pope(llava_eval_dir)
    labels["random"] = labels["random"][1:]  # as with a label file of another POPE commit
    with pytest.raises(ValueError, match="e3e39262"):
        score_pope(questions, answers, labels)


def test_sqa_golden(llava_eval_dir):
    questions = read_sqa(llava_eval_dir / "scienceqa/llava_test_CQM-A.json", "images/test")
    answers = read_answers(llava_eval_dir / "scienceqa/answers_llava-v1.5-13b.jsonl", "sqa")
    r = score_sqa(questions, answers)
    assert round(r["score"], 2) == 71.64
    assert round(r["overall"], 2) == 74.39
    assert (r["n"], r["n_all"], r["missing"]) == (2017, 4241, 0)


@pytest.mark.parametrize("bench,questions_file,answers_file", [
    ("gqa", "gqa/llava_gqa_testdev_balanced.jsonl", "gqa/answers_llava-v1.5-13b.jsonl"),
    ("textvqa", "textvqa/llava_textvqa_val_v051_ocr.jsonl", "textvqa/answers_llava-v1.5-13b.jsonl"),
    ("mme", "mme/llava_mme.jsonl", "mme/answers_llava-v1.5-13b.jsonl"),
])
def test_reference_answer_files_match_every_question(llava_eval_dir, bench, questions_file, answers_file):
    # TextVQA and MME ids name the image: the key must tell the two questions of one image apart.
    questions = read_llava_jsonl(bench, llava_eval_dir / questions_file, "images")
    answers = read_answers(llava_eval_dir / answers_file, bench)
    assert len(answers) == len(questions) == len({q.key for q in questions})
    assert all(q.key in answers for q in questions)


def test_textvqa_prompts_of_the_question_file_parse(llava_eval_dir):
    questions = read_llava_jsonl("textvqa", llava_eval_dir / "textvqa/llava_textvqa_val_v051_ocr.jsonl", "x")
    assert textvqa_question(questions[0].prompt) == "what is the brand of this camera?"
    assert all(textvqa_question(q.prompt) for q in questions)


# ---- GQA -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,expected", [
    ("Yes.", "yes"), ("Left..", "left"), ("Yes!", "yes!"), ("the man", "the man"), ("U.S.", "u.s"), ("No", "no"),
])
def test_gqa_prediction(text, expected):
    assert gqa_prediction(text) == expected


def test_gqa_score(tmp_path):
    gt = {"1": {"answer": "yes", "isBalanced": True}, "2": {"answer": "man", "isBalanced": True},
          "3": {"answer": "left", "isBalanced": True}, "4": {"answer": "no", "isBalanced": False}}
    qs = [Question("gqa", qid, f"q{qid}{SUFFIX}", "") for qid in "1234"]
    answers = {"1": "Yes.", "2": "the man", "4": "No"}  # 2 is wrong (no article removal), 3 missing, 4 unbalanced
    r = score_gqa(qs, answers, gt)
    assert r["score"] == pytest.approx(100 / 3) and r["n"] == 3 and r["missing"] == 1
    with pytest.raises(KeyError):
        score_gqa([Question("gqa", "9", "q", "")], {}, gt)


# ---- ScienceQA -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,expected", [
    ("B", "B"), ("E", "E"), ("B. apostrophe", "B"), ("A.", "FAILED"), ("(A)", "FAILED"),
    ("B is the run-on sentence.", "FAILED"), ("The answer is C.", "C"), ("The answer is Cx", "C"),
    ("The answer is A. The answer is B.", "FAILED"), ("F", "FAILED"), ("b", "FAILED"), ("", "FAILED"),
])
def test_sqa_letter(text, expected):
    assert sqa_letter(text) == expected


def test_sqa_score_counts_images_only_and_missing_as_wrong():
    qs = [Question("sqa", "1", "p", "", image=Path("1/image.png"), answer="A"),
          Question("sqa", "2", "p", "", image=Path("2/image.png"), answer="B"),
          Question("sqa", "3", "p", "", answer="C"),
          Question("sqa", "4", "p", "", image=Path("4/image.png"), answer="A")]
    r = score_sqa(qs, {"1": "A", "2": "B.", "3": "C"})  # 2 fails to parse, 4 is missing
    assert r["score"] == pytest.approx(100 / 3) and r["overall"] == 50.0
    assert (r["n"], r["failed"], r["missing"]) == (3, 1, 1)


# ---- TextVQA -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,expected", [
    ("The Beatles", "beatles"), ("two", "2"), ("None", "0"), ("1,000", "1000"), ("Coca-Cola", "coca cola"),
    ("a-b c", "b c"), ("a - b", "b"), ("U.S.A.", "usa"), ("x.y", "xy"), ("3.14 and 2.0.", "3.14 and 2.0"),
    ("it's", "it 's"), ("Hello, World!", "hello world"), ("c++", "c"), ("a/b", "b"), ("12:30", "12:30"),
    ("$3.99", "$3.99"), ("one-way", "1 way"), ("Im fine", "im fine"), ("." * 40 + "x", "." * 8 + "x"),
    ("dont", "don't"), ("whats up", "what's up"), ("somebody'd", "somebodyd"), ("she's", "she 's"),
    ("Wont\tstop\n", "won't stop"), ("a&b #1", "a&b #1"),
])
def test_textvqa_normalizer(text, expected):
    assert normalize_answer(text) == expected


def test_contractions_table():
    assert len(CONTRACTIONS) == 120
    assert {k: CONTRACTIONS[k] for k in ("cant", "isnt", "youre", "twas", "weve", "y'allll", "ow's'at")} == {
        "cant": "can't", "isnt": "isn't", "youre": "you're", "twas": "'twas", "weve": "we've",
        "y'allll": "y'all'll", "ow's'at": "'ow's'at"}
    assert all(v.replace("'", "") == k.replace("'", "") for k, v in CONTRACTIONS.items())
    assert sum(k != k.lower() for k in CONTRACTIONS) == 4  # Id've, I'dve, Im, Ive: never match lowercased words


@pytest.mark.parametrize("n,expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy(n, expected):
    assert vqa_accuracy("Two", ["2"] * n + ["three"] * (10 - n)) == pytest.approx(expected)


@pytest.mark.parametrize("prompt,expected", [
    ("What is it?\nReference OCR token: A, B\nAnswer the question using a single word or phrase.", "what is it?"),
    ("Reference OCR token: A\nWhat Is It?\nAnswer briefly.", "what is it?"),
    ("What is it?\nReference OCR token: \nAnswer the question using a single word or phrase.", "what is it?"),
    ("What Is It?\nAnswer the question using a single word or phrase.", "what is it?"),
])
def test_textvqa_question(prompt, expected):
    assert textvqa_question(prompt) == expected


def test_textvqa_question_fails_on_other_prompts():
    with pytest.raises(ValueError):
        textvqa_question("one\ntwo\nthree\nfour")


def test_textvqa_score_with_fake_val_json(tmp_path):
    val = {"data": [
        {"image_id": "img1", "question": "What brand?", "answers": ["Coca-Cola"] * 2 + ["pepsi"] * 8},
        {"image_id": "img1", "question": "What number?", "answers": ["two"] * 10},
        {"image_id": "img2", "question": "What color?", "answers": ["red"] * 10},
    ]}
    (tmp_path / "val.json").write_text(json.dumps(val))
    ocr = "\nReference OCR token: COCA, COLA" + SUFFIX
    qs = [Question("textvqa", "img1", "What brand?" + ocr, ""), Question("textvqa", "img1", "what number?" + ocr, ""),
          Question("textvqa", "img2", "What color?" + ocr, "")]
    answers = {qs[0].key: "coca cola", qs[1].key: "2"}  # img2 missing
    r = score_textvqa(qs, answers, json.loads((tmp_path / "val.json").read_text())["data"])
    assert r["score"] == pytest.approx(100 * (0.6 + 1.0 + 0.0) / 3) and r["missing"] == 1


# ---- POPE ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,expected", [
    ("No", "no"), ("Yes", "yes"), ("NO", "yes"), ("Nope", "yes"), ("", "yes"), ("no.", "no"),
    ("There is no dog.", "no"), ("Yes. There is no dog.", "yes"), ("It is not,", "no"), ("No, there is.", "no"),
    ("I see nothing", "yes"), ("not\nsure", "yes"),
])
def test_pope_yes_no(text, expected):
    assert pope_yes_no(text) == expected


def test_pope_counts():
    labels = {"random": [{"image": f"{i}.jpg", "text": f"q{i}", "label": lab} for i, lab in
                         enumerate(["yes", "yes", "no", "no", "yes"])]}
    qs = [Question("pope", i, f"q{i}{SUFFIX}", "", image=Path(f"val2014/{i}.jpg"), category="random")
          for i in range(5)]
    answers = {"0": "Yes", "1": "No", "2": "Yes", "3": "No"}  # TP FN FP TN; 4 missing
    r = score_pope(qs, answers, labels)
    s = r["splits"]["random"]
    assert (s["precision"], s["recall"], s["f1"], s["accuracy"], s["yes_ratio"]) == (50.0, 50.0, 50.0, 50.0, 50.0)
    assert r["missing"] == 1 and s["n"] == 4


# ---- MME -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,expected", [
    ("Yes", "yes"), ("no", "no"), ("Not sure", "no"), ("None", "no"), ("Unknown", "other"),
    ("Answer: yes", "other"), ("Yes, it is", "yes"), ("yes\n", "yes"), ("", "other"), ("I think no", "other"),
])
def test_mme_yes_no(text, expected):
    assert mme_yes_no(text) == expected


def _fake_mme_release(root: Path) -> Path:
    rel = root / "MME_Benchmark_release_version"
    (rel / "artwork/images").mkdir(parents=True)
    (rel / "artwork/questions_answers_YN").mkdir()
    (rel / "artwork/questions_answers_YN/1.txt").write_text(
        "Is it a painting? Please answer yes or no.\tYes\nIs it a photo? Please answer yes or no.\tNo\n")
    (rel / "artwork/questions_answers_YN/2.txt").write_text(
        "Is it red? Please answer yes or no.\tNo\nIs it blue?  Please answer yes or no.\tYes\n")  # two spaces
    (rel / "count").mkdir()
    (rel / "count/000.txt").write_text("Are there two dogs? Please answer yes or no.\tYes\n"
                                       "Are there three dogs? Please answer yes or no.\tNo\n")
    (rel / "code_reasoning").mkdir()
    (rel / "code_reasoning/0020.txt").write_text("Is it python? Please answer yes or no.\tYes\n"
                                                 "Is it c++? Please answer yes or no.\tNo\n")
    return rel


def test_mme_score_with_fake_release(tmp_path):
    gt = read_mme_gt(_fake_mme_release(tmp_path))
    assert gt[("artwork", "2.txt", "Is it blue?  Please answer yes or no.")] == "Yes"
    rows = [("artwork/images/1.jpg", "Is it a painting?", "Yes"), ("artwork/images/1.jpg", "Is it a photo?", "No"),
            ("artwork/images/2.jpg", "Is it red?", "No"), ("artwork/images/2.jpg", "Is it blue?", "Unknown"),
            ("count/000.jpg", "Are there two dogs?", "Yes"), ("count/000.jpg", "Are there three dogs?", "Yes"),
            ("code_reasoning/0020.png", "Is it python?", "Yes"), ("code_reasoning/0020.png", "Is it c++?", "No")]
    qs = [Question("mme", qid, q + SUFFIX, "", category=qid.split("/")[0]) for qid, q, _ in rows]
    answers = {q.key: a for q, (_, _, a) in zip(qs, rows)}
    r = score_mme(qs, answers, gt)
    # artwork: acc 3/4, acc+ 1/2 -> 125; count: acc 1/2, acc+ 0 -> 50; code_reasoning: 200
    assert r["subtasks"]["artwork"]["score"] == pytest.approx(125.0)
    assert r["subtasks"]["count"]["score"] == pytest.approx(50.0)
    assert r["perception"] == pytest.approx(175.0) and r["score"] == r["perception"]
    assert r["cognition"] == pytest.approx(200.0)
    del answers[qs[0].key]  # a missing answer is wrong
    assert score_mme(qs, answers, gt)["subtasks"]["artwork"]["score"] == pytest.approx(50.0)


def test_mme_unknown_question_names_the_key(tmp_path):
    gt = read_mme_gt(_fake_mme_release(tmp_path))
    with pytest.raises(KeyError, match="Is it green"):
        score_mme([Question("mme", "artwork/images/1.jpg", "Is it green?" + SUFFIX, "")], {}, gt)


# ---- MMBench letter extraction -------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,expected", [
    ("B", "B"), ("The answer is C", "C"), ("B.", "B"), ("(C)", "C"), ("D)", "D"), ("(A).", "A"), ("A:", "A"),
    ("answer:B", None), ("Answer :C.", "C"), ("E", "E"), ("A B", None), ("A cat is here", None),
    ("A cat is here. B.", "B"), ("b", None), ("", None), ("Option A is right", None),
])
def test_mmbench_option_letter(text, expected):
    assert mmbench_option_letter(text) == expected


def test_mmbench_text_letter():
    choices = {"A": "Red", "B": "Blue", "C": "Light blue"}
    assert mmbench_text_letter("It is red.", choices) == "A"
    assert mmbench_text_letter("light blue", choices) is None  # "blue" and "light blue" both occur
    assert mmbench_letter("Red", choices) == "A" and mmbench_letter("B. Blue", choices) == "B"
    assert mmbench_letter("green", choices) is None


def test_mmbench_letters_of_published_answers(llava_eval_dir):
    # LLaVA-1.5-13B answers MMBench with bare letters: every copy must be inferable without an LLM.
    rows = [json.loads(x) for x in
            (llava_eval_dir / "mmbench/answers_llava-v1.5-13b_dev_20230712.jsonl").read_text().splitlines()]
    letters = [mmbench_letter(r["text"], dict(zip(r["option_char"], r["options"]))) for r in rows]
    assert len(rows) == 4377 and letters == [r["text"] for r in rows]
