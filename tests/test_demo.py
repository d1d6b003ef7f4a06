"""The demo, shortened: it builds the world, trains and caches a teacher, distills a student beside a CE-only one,
and prints held-out numbers before and after."""
from __future__ import annotations

import json

import demo


def test_shortened_demo_trains_a_cached_teacher_and_reports_before_and_after(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "WORLD", (24, 12, 8))
    monkeypatch.setattr(demo, "VISION_STAGE", (4, 4, 3e-3))
    monkeypatch.setattr(demo, "CAPTION_STAGE", (3, 4, 2e-3))
    monkeypatch.setattr(demo, "TEACHER_STAGES", ((3, 4, 2e-3), (2, 4, 1e-3)))
    monkeypatch.setattr(demo, "STUDENT_CAPTION_STAGE", (2, 4, 3e-3))
    monkeypatch.setattr(demo, "STUDENT_STAGE", (3, 4, 3e-3))
    out = tmp_path / "run"
    result = demo.run_demo(str(out))
    printed = capsys.readouterr().out
    for line in ("teacher", "student before (captions only)", "student, CE only, 3 steps", "student, Align-KD, 3 steps"):
        assert line in printed
    distill, ce_only = result["distill"], result["ce_only"]
    assert [e["step"] for e in distill["evals"]] == [0, 3] and [e["step"] for e in ce_only["evals"]] == [0, 3]
    assert distill["evals"][0] == ce_only["evals"][0]  # one initialization for both students
    assert all(h["logit"] > 0 for h in distill["history"]) and all(h["logit"] == 0 for h in ce_only["history"])
    teacher = out / "demo_assets" / "teacher"
    assert json.loads((teacher / "config.json").read_text())["hidden_size"] == demo.TEACHER["hidden_size"]
    stamp = (teacher / "pytorch_model.bin").stat().st_mtime_ns
    demo.run_demo(str(out))  # a second run reuses the world and the teacher
    assert (teacher / "pytorch_model.bin").stat().st_mtime_ns == stamp
