"""eval.py end to end: score-only golden numbers, a perfect answer set on the synthetic data root, generation with
resume and missing images, --compare with a chart, and the demo."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import eval as ev
from evaluation.benchmarks import BENCHMARKS, QUESTION_FILES, AnswerFileError, MissingDataError, load_questions
from eval import EvalError
from evaluation.synthetic_benchmarks import make_synthetic_benchmarks

ROOT = Path(__file__).resolve().parents[1]


def _layout(fixtures: Path, root: Path) -> Path:
    """The LLaVA layout the CLI expects, linked to the fixture files."""
    (root / "pope/coco").mkdir(parents=True)
    (root / "scienceqa").mkdir()
    (root / "pope/llava_pope_test.jsonl").symlink_to(fixtures / "pope/llava_pope_test.jsonl")
    for cat in ("adversarial", "popular", "random"):
        (root / f"pope/coco/coco_pope_{cat}.json").symlink_to(fixtures / f"pope/coco_pope_{cat}.json")
    (root / "scienceqa/llava_test_CQM-A.json").symlink_to(fixtures / "scienceqa/llava_test_CQM-A.json")
    return root


@pytest.mark.parametrize("bench,folder,score,detail", [
    ("pope", "pope", 85.95, ("accuracy", 86.98)), ("sqa", "scienceqa", 71.64, ("overall", 74.39))])
def test_score_only_golden(llava_eval_dir, tmp_path, bench, folder, score, detail):
    root = _layout(llava_eval_dir, tmp_path / "data")
    answers = llava_eval_dir / folder / "answers_llava-v1.5-13b.jsonl"
    m = ev.main(["--bench", bench, "--score-only", "--answers", str(answers), "--data-root", str(root),
                 "--out", str(tmp_path / "out")])
    assert round(m["summary"][bench], 2) == score
    assert round(m["benchmarks"][bench][detail[0]], 2) == detail[1]
    assert json.loads((tmp_path / "out/metrics.json").read_text())["summary"] == m["summary"]


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> Path:
    return make_synthetic_benchmarks(tmp_path_factory.mktemp("synthetic") / "data", n=4, seed=1)


def _perfect_answers(root: Path, bench: str) -> list[dict]:
    """Right answers read straight from the synthetic ground-truth files."""
    qs = [json.loads(x) for x in (root / QUESTION_FILES[bench]).read_text().splitlines()] \
        if bench in ("gqa", "textvqa", "pope", "mme") else []
    if bench == "gqa":
        gt = json.loads((root / "gqa/data/testdev_balanced_questions.json").read_text())
        return [{"question_id": q["question_id"], "prompt": q["text"], "text": gt[q["question_id"]]["answer"] + "."}
                for q in qs]
    if bench == "textvqa":
        gt = {d["image_id"]: d["answers"][0] for d in
              json.loads((root / "textvqa/TextVQA_0.5.1_val.json").read_text())["data"]}
        return [{"question_id": q["question_id"], "prompt": q["text"], "text": gt[q["question_id"]].upper()}
                for q in qs]
    if bench == "pope":
        labels = {}
        for cat in ("adversarial", "popular", "random"):
            for line in (root / f"pope/coco/coco_pope_{cat}.json").read_text().splitlines():
                labels[json.loads(line)["question_id"]] = json.loads(line)["label"]
        return [{"question_id": q["question_id"], "prompt": q["text"], "text": labels[q["question_id"]].capitalize()}
                for q in qs]
    if bench == "mme":
        out = []
        for q in qs:
            cat, name = q["question_id"].split("/")[0], Path(q["question_id"]).stem + ".txt"
            txt = root / "MME/MME_Benchmark_release_version" / cat / ("" if cat == "color" else "questions_answers_YN")
            truth = dict(line.split("\t") for line in (txt / name).read_text().splitlines())
            question = q["text"].split("\n")[0] + " Please answer yes or no."
            out.append({"question_id": q["question_id"], "prompt": q["text"], "text": truth[question]})
        return out
    if bench == "sqa":
        return [{"question_id": r["id"], "prompt": ("<image>\n" if "image" in r else "")
                 + r["conversations"][0]["value"].replace("<image>\n", "")
                 + "\nAnswer with the option's letter from the given choices directly.",
                 "text": r["conversations"][1]["value"]}
                for r in json.loads((root / "scienceqa/llava_test_CQM-A.json").read_text())]
    import pandas as pd

    return [{"question_id": int(r["index"]), "prompt": "", "text": f"({r['answer']})"}
            for _, r in pd.read_table(root / "mmbench/mmbench_dev_20230712.tsv").iterrows()]


def test_perfect_answers_score_full_marks(synthetic_root, tmp_path):
    for bench in BENCHMARKS:
        lines = _perfect_answers(synthetic_root, bench)
        (tmp_path / f"{bench}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    m = ev.main(["--bench", "all", "--score-only", "--out", str(tmp_path), "--data-root", str(synthetic_root)])
    assert m["summary"] == {"gqa": 100.0, "sqa": 100.0, "textvqa": 100.0, "pope": 100.0,
                            "mme": 400.0, "mmbench": 100.0}  # the synthetic MME has two perception subtasks
    assert all(m["benchmarks"][b]["missing"] == 0 for b in BENCHMARKS)
    assert {b: (r["answered"], r["expected"]) for b, r in m["benchmarks"].items()} == \
        {b: (len(load_questions(b, synthetic_root)),) * 2 for b in BENCHMARKS}


def _pope_answers(tmp_path: Path, lines: list) -> Path:
    """A POPE answer file: the given lines (dicts are JSON-encoded, str / bytes written as they are)."""
    out = b""
    for x in lines:
        out += (x if isinstance(x, bytes) else (x if isinstance(x, str) else json.dumps(x)).encode()) + b"\n"
    (tmp_path / "answers.jsonl").write_bytes(out)
    return tmp_path / "answers.jsonl"


def _score_pope(root: Path, path: Path, *extra: str) -> list[str]:
    return ["--bench", "pope", "--score-only", "--answers", str(path), "--data-root", str(root),
            "--out", str(path.parent / "out"), *extra]


OK_LINE = {"question_id": 1, "prompt": "p", "text": "Yes"}


@pytest.mark.parametrize("bad,message", [
    ("this is not json", r"not a JSON line \(Expecting value at column 1\): 'this is not json'"),
    ({"question_id": 2, "text": "No"}, r"missing field 'prompt' \(an answer line holds question_id, prompt, text\)"),
    ({"prompt": "p", "text": "No"}, "missing field 'question_id'"),
    ({"question_id": 2, "prompt": "p", "text": 7}, "'text' must be a string, found a number 7"),
    ({"question_id": 2, "prompt": "p", "text": None}, "'text' must be a string, found null"),
    ({"question_id": [2], "prompt": "p", "text": "No"},
     "'question_id' must be a number or a string, found a JSON list"),
    ([2, "p", "No"], "expected a JSON object with question_id, prompt, text; found a JSON list"),
    (b'{"question_id": 2, "prompt": "p", "text": "caf\xe9"}', r"not UTF-8 text \(byte b'\\xe9' at column 47\)"),
], ids=["garbage", "no-prompt", "no-question_id", "text-number", "text-null", "id-list", "list-line", "latin-1"])
def test_malformed_answer_file_names_file_and_line(synthetic_root, tmp_path, bad, message):
    path = _pope_answers(tmp_path, [OK_LINE, "", bad, OK_LINE])
    with pytest.raises(AnswerFileError, match=f"^{path}:3: {message}"):
        ev.main(_score_pope(synthetic_root, path))
    with pytest.raises(SystemExit, match=f"^error: {path}:3: ") as exc:
        ev.cli(_score_pope(synthetic_root, path))
    assert exc.value.code != 0


def test_answer_file_without_any_answer_for_the_questions_is_an_error(synthetic_root, tmp_path):
    empty = _pope_answers(tmp_path, [])
    with pytest.raises(AnswerFileError, match=f"^{empty}: no answers in the file$"):
        ev.main(_score_pope(synthetic_root, empty))
    cut = _pope_answers(tmp_path, [])
    cut.write_text('{"question_id": 1, "prompt": "p", "te')
    with pytest.raises(AnswerFileError, match=r"no answers in the file \(its only line, 1, is cut short\)"):
        ev.main(_score_pope(synthetic_root, cut))
    wrong = _pope_answers(tmp_path, [{"question_id": f"x{i}", "prompt": "p", "text": "Yes"} for i in range(5)])
    with pytest.raises(AnswerFileError, match=rf"^{wrong}: none of its answers \(5\) is for a question of pope "
                                              r"\(matched by question_id; the file has 'x0', .*"
                                              r"the questions are '1', '2'"):
        ev.main(_score_pope(synthetic_root, wrong))
    assert not (tmp_path / "out/metrics.json").exists()
    with pytest.raises(SystemExit, match=r"^error: .*none of its answers \(5\)"):
        ev.cli(_score_pope(synthetic_root, wrong))


def test_partial_answers_are_counted_warned_and_strict(synthetic_root, tmp_path, capsys):
    full = _perfect_answers(synthetic_root, "pope")
    n = len(full)
    path = _pope_answers(tmp_path, full[: n // 2] + [{"question_id": "x", "prompt": "", "text": "No"}])
    m = ev.main(_score_pope(synthetic_root, path))
    r = m["benchmarks"]["pope"]
    assert (r["answered"], r["expected"], r["missing"]) == (n // 2, n, n - n // 2)
    saved = json.loads((tmp_path / "out/metrics.json").read_text())["benchmarks"]["pope"]
    assert (saved["answered"], saved["expected"]) == (n // 2, n)
    out, err = capsys.readouterr()
    assert f"[answered {n // 2}/{n}]" in out
    answered_row = next(line for line in out.splitlines() if line.startswith("  answered"))
    assert answered_row.split() == ["answered", "-", "-", "-", f"{n // 2}/{n}", "-", "-"]
    assert err.startswith(f"warning: pope: {n - n // 2} of {n} questions have no answer in {path}") and \
        "1 of its answers are for no question of pope" in err
    with pytest.raises(EvalError, match=f"questions without an answer \\(--strict\\): answered pope {n // 2}/{n}"):
        ev.main(_score_pope(synthetic_root, path, "--strict"))
    # complete answers pass --strict; --compare shows the counts too
    path = _pope_answers(tmp_path, full)
    assert ev.main(_score_pope(synthetic_root, path, "--strict"))["benchmarks"]["pope"]["answered"] == n
    capsys.readouterr()
    ev.main(["--compare", str(tmp_path / "out/metrics.json")])
    assert capsys.readouterr().out.splitlines()[2].split() == ["answered", "-", "-", "-", f"{n}/{n}", "-", "-"]


@pytest.fixture(scope="module")
def tiny_and_tokenizer(tmp_path_factory):
    from data.synthetic import make_demo_tokenizer
    from data.tokenizer import load_tokenizer
    from model import MobileVLM

    tok = load_tokenizer(make_demo_tokenizer(tmp_path_factory.mktemp("tok")))
    return MobileVLM.tiny(seed=0, vocab_size=tok.vocab_size).eval(), tok


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_generation_resume_and_batch_size(synthetic_root, tiny_and_tokenizer, tmp_path):
    model, tok = tiny_and_tokenizer
    run = dict(model=model, tokenizer=tok, max_new_tokens=6)
    ev.evaluate(["sqa", "mme"], synthetic_root, tmp_path / "a", "tiny", batch_size=1, **run)
    ev.evaluate(["sqa", "mme"], synthetic_root, tmp_path / "b", "tiny", batch_size=5, **run)
    for bench in ("sqa", "mme"):
        a, b = _lines(tmp_path / f"a/{bench}.jsonl"), _lines(tmp_path / f"b/{bench}.jsonl")
        questions = load_questions(bench, synthetic_root)
        assert a == b  # batch size 5 gives the answers of batch size 1, in question-file order
        assert [(r["question_id"], r["prompt"]) for r in a] == [(q.question_id, q.prompt) for q in questions]
        assert {"question_id", "prompt", "text"} <= set(a[0])
    # interrupt: keep 3 answers and half of a fourth line, then rerun
    path = tmp_path / "b/sqa.jsonl"
    text = path.read_text().splitlines(keepends=True)
    path.write_text("".join(text[:3]) + text[3][:20])
    m = ev.evaluate(["sqa"], synthetic_root, tmp_path / "b", "tiny", batch_size=5, **run)
    assert _lines(path) == _lines(tmp_path / "a/sqa.jsonl")
    assert m["benchmarks"]["sqa"]["missing"] == 0 and set(m["summary"]) == {"sqa", "mme"}
    with pytest.raises(SystemExit, match="holds answers of model 'tiny'"):
        ev.evaluate(["sqa"], synthetic_root, tmp_path / "b", "another-model", batch_size=5, **run)
    # another model's metrics never merge into this table
    m = ev.evaluate(["gqa"], synthetic_root, tmp_path / "b", "another-model", batch_size=5, **run)
    assert set(m["summary"]) == {"gqa"} and m["model"] == "another-model"


def test_missing_image_is_reported_not_fatal(synthetic_root, tiny_and_tokenizer, tmp_path, capsys):
    model, tok = tiny_and_tokenizer
    root = tmp_path / "data"
    shutil.copytree(synthetic_root / "gqa", root / "gqa")
    (root / "gqa/data/images/n1.png").unlink()
    m = ev.evaluate(["gqa"], root, tmp_path / "out", "tiny", model, tok, batch_size=2, max_new_tokens=4)
    r = m["benchmarks"]["gqa"]
    assert r["images_unreadable"] == 1 and r["missing"] == 1 and r["n"] == 4
    assert "n1.png" in capsys.readouterr().out
    assert len(_lines(tmp_path / "out/gqa.jsonl")) == 3


def test_missing_data_file_names_path(tmp_path):
    with pytest.raises(MissingDataError, match=r"gqa/llava_gqa_testdev_balanced\.jsonl.*eval\.zip"):
        ev.main(["--bench", "gqa", "--score-only", "--out", str(tmp_path), "--data-root", str(tmp_path / "none")])
    # with a model to run, the data is checked before the (here nonexistent) model is loaded, and one error names
    # the missing file of every benchmark
    with pytest.raises(MissingDataError, match=r"gqa/llava_gqa_testdev_balanced\.jsonl") as err:
        ev.main(["--bench", "all", "--model", str(tmp_path / "no-model"), "--data-root", str(tmp_path)])
    for bench, rel in QUESTION_FILES.items():
        assert f"{bench}: missing {tmp_path / rel}" in str(err.value)
    assert "mmbench: missing" in str(err.value)
    # from the command line: one clean error, no traceback
    proc = subprocess.run([sys.executable, "eval.py", "--bench", "pope", "--model", str(tmp_path / "m"),
                           "--data-root", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: benchmark data not found") and "pope/llava_pope_test.jsonl" in proc.stderr


def test_wrong_model_path_and_missing_arguments_are_one_line_errors(synthetic_root, tmp_path):
    def error(*argv: str) -> str:
        with pytest.raises(SystemExit) as exc:
            ev.cli(list(argv))
        assert exc.value.code != 0 and isinstance(exc.value.code, str) and "\n" not in exc.value.code
        return exc.value.code

    nope = tmp_path / "nope"
    assert error("--bench", "pope", "--model", str(nope), "--data-root", str(synthetic_root)).startswith(
        f"error: model folder {nope} does not exist (--model takes a MobileVLM V2 checkpoint folder")
    (tmp_path / "empty").mkdir()
    assert error("--bench", "pope", "--model", str(tmp_path / "empty"), "--data-root", str(synthetic_root)) \
        .startswith(f"error: cannot load the model in {tmp_path / 'empty'}: no tokenizer.model or tokenizer.json")
    assert error("--bench", "demo", "--model", str(nope), "--out", str(tmp_path / "d")).startswith(
        f"error: model folder {nope} does not exist")
    assert error("--bench", "all") == ("error: --bench all needs --model PATH (a MobileVLM V2 checkpoint folder; or "
                                       "--score-only to score answer files) and --data-root DIR (LLaVA's "
                                       "playground/data/eval layout)")
    assert error("--bench", "all", "--data-root", str(synthetic_root)).startswith("error: --bench all needs --model")
    assert error("--bench", "gqa", "--score-only", "--answers", "a.jsonl") == \
        "error: --bench gqa needs --data-root DIR (LLaVA's playground/data/eval layout)"
    assert error().startswith("error: pass --bench (gqa, sqa, textvqa, pope, mme, mmbench, all, demo) or --compare")


def test_command_line_errors_have_no_traceback(synthetic_root, tmp_path):
    path = _pope_answers(tmp_path, [OK_LINE, [1, 2]])
    runs = [_score_pope(synthetic_root, path),
            ["--bench", "pope", "--model", str(tmp_path / "nope"), "--data-root", str(synthetic_root)]]
    for argv, first in zip(runs, [f"error: {path}:2: expected a JSON object", "error: model folder"]):
        proc = subprocess.run([sys.executable, "eval.py", *argv], cwd=ROOT, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 1 and proc.stderr.startswith(first) and len(proc.stderr.splitlines()) == 1


def test_compare_and_chart(tmp_path, capsys):
    a = {"model": "/m/MobileVLM_V2-1.7B", "summary": {"gqa": 59.3, "sqa": 66.7, "textvqa": 52.1, "pope": 84.3,
                                                      "mme": 1302.8, "mmbench": 57.7}}
    b = {"model": "/m/student", "summary": {"gqa": 50.0, "pope": 80.0}}
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    ev.main(["--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--chart", str(tmp_path / "c.png")])
    out = capsys.readouterr().out.splitlines()
    # Avg = (59.3 + 66.7 + 52.1 + 84.3 + 1302.8 / 20 + 57.7) / 6 = 385.24 / 6
    assert out[1].split() == ["MobileVLM_V2-1.7B", "59.30", "66.70", "52.10", "84.30", "1302.80", "57.70", "64.21"]
    assert out[2].split() == ["student", "50.00", "-", "-", "80.00", "-", "-", "-"]
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_average_is_mobilevlm_avg():
    # MobileVLM's model zoo: 1.7B row averages to 64.2, 3B to 68.1 (MobileVLM V2's published table)
    s17 = {"gqa": 59.3, "sqa": 66.7, "textvqa": 52.1, "pope": 84.3, "mme": 1302.8, "mmbench": 57.7}
    s3 = {"gqa": 61.1, "sqa": 70.0, "textvqa": 57.5, "pope": 84.7, "mme": 1440.5, "mmbench": 63.2}
    assert (round(ev.average(s17), 1), round(ev.average(s3), 1)) == (64.2, 68.1)


def test_demo(tmp_path, monkeypatch):
    m = ev.main(["--bench", "demo", "--out", str(tmp_path)])
    assert set(m["summary"]) == set(BENCHMARKS) and m["average"] is not None
    assert all(len(_lines(tmp_path / f"{b}.jsonl")) == len(load_questions(b, tmp_path / "data")) for b in BENCHMARKS)
    answers = {b: (tmp_path / f"{b}.jsonl").read_bytes() for b in BENCHMARKS}
    # a rerun resumes: it keeps every answer and generates nothing ...
    import model.generation

    def no_generation(*a, **k):
        raise AssertionError("generated again")

    monkeypatch.setattr(model.generation, "greedy_generate", no_generation)
    again = ev.main(["--bench", "demo", "--out", str(tmp_path), "--strict"])
    assert again["summary"] == m["summary"]
    assert {b: (tmp_path / f"{b}.jsonl").read_bytes() for b in BENCHMARKS} == answers
    # ... and after an interruption answers only what is missing
    monkeypatch.undo()
    lines = answers["gqa"].splitlines(keepends=True)
    (tmp_path / "gqa.jsonl").write_bytes(b"".join(lines[:-1]) + lines[-1][:10])
    ev.main(["--bench", "demo", "--out", str(tmp_path)])
    assert (tmp_path / "gqa.jsonl").read_bytes() == answers["gqa"]


def test_cli_runs_a_saved_checkpoint(synthetic_root, tiny_and_tokenizer, tmp_path):
    model, tok = tiny_and_tokenizer
    model.save_pretrained(tmp_path / "ckpt")
    shutil.copy(tok.path, tmp_path / "ckpt/tokenizer.model")
    m = ev.main(["--bench", "pope", "--model", str(tmp_path / "ckpt"), "--data-root", str(synthetic_root),
                 "--out", str(tmp_path / "out"), "--limit", "5", "--batch-size", "2", "--max-new-tokens", "3"])
    lines = _lines(tmp_path / "out/pope.jsonl")
    assert len(lines) == 5 and m["benchmarks"]["pope"]["n"] == 5 and m["benchmarks"]["pope"]["limit"] == 5
    # the loaded checkpoint answers as the in-memory model does
    ev.evaluate(["pope"], synthetic_root, tmp_path / "mem", "tiny", model, tok, limit=5, max_new_tokens=3)
    assert [r["text"] for r in lines] == [r["text"] for r in _lines(tmp_path / "mem/pope.jsonl")]


def test_demo_with_a_trained_checkpoint(tiny_and_tokenizer, tmp_path, monkeypatch):
    """`--bench demo --model DIR` evaluates that checkpoint (e.g. the training demo's) instead of a random model."""
    from model import MobileVLM

    _, tok = tiny_and_tokenizer
    model = MobileVLM.tiny(seed=5, vocab_size=tok.vocab_size)  # not the demo's random model (seed 0)
    model.save_pretrained(tmp_path / "ckpt", tokenizer_dir=tok.path.parent)
    monkeypatch.chdir(tmp_path)  # the default --out of each: runs/eval/demo-ckpt and runs/eval/demo
    m = ev.main(["--bench", "demo", "--model", str(tmp_path / "ckpt")])
    r = ev.main(["--bench", "demo"])
    a, b = tmp_path / "runs/eval/demo-ckpt", tmp_path / "runs/eval/demo"
    assert set(m["summary"]) == set(BENCHMARKS)
    ours = [x["text"] for bench in BENCHMARKS for x in _lines(a / f"{bench}.jsonl")]
    random = [x["text"] for bench in BENCHMARKS for x in _lines(b / f"{bench}.jsonl")]
    assert ours != random and r["summary"].keys() == m["summary"].keys()
    # the random model does not take over the checkpoint's answers
    with pytest.raises(SystemExit, match=f"holds answers of model '{tmp_path / 'ckpt'}', not 'tiny-demo'"):
        ev.main(["--bench", "demo", "--out", str(a)])


def test_compare_refuses_a_file_that_is_not_metrics_json(tmp_path):
    def error(path):
        with pytest.raises(SystemExit) as exc:
            ev.main(["--compare", str(path)])
        return exc.value.code

    (tmp_path / "bad.json").write_text('{"model": "m", "summ')
    (tmp_path / "other.json").write_text('{"model": "m", "scores": {}}')
    assert error(tmp_path / "missing.json").startswith(f"error: cannot read {tmp_path / 'missing.json'}")
    assert error(tmp_path / "bad.json").startswith(f"error: {tmp_path / 'bad.json'} is not JSON")
    assert error(tmp_path / "other.json") == (f"error: {tmp_path / 'other.json'} is not a metrics.json written by "
                                              "eval.py (no \"summary\" table)")


def test_a_damaged_question_file_is_one_error_line(synthetic_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    pope = root / QUESTION_FILES["pope"]
    lines = pope.read_text().splitlines()
    pope.write_text("\n".join([lines[0], '{"question_id": 7, "image": "x.jpg"}', *lines[1:]]) + "\n")
    sqa = root / QUESTION_FILES["sqa"]
    sqa.write_text(sqa.read_text()[:-5])
    for bench, first in (("pope", f"error: {pope}:2: missing field 'text'"), ("sqa", f"error: {sqa}: not JSON")):
        proc = subprocess.run([sys.executable, "eval.py", "--bench", bench, "--score-only", "--answers",
                               str(tmp_path / "none.jsonl"), "--data-root", str(root), "--out", str(tmp_path / "o")],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 1 and proc.stderr.startswith(first), proc.stderr[-2000:]
        assert len(proc.stderr.splitlines()) == 1
