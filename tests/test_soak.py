"""bench/soak.py's core on a small schedule: one SIGKILL to the main process and one SIGTERM to the process group
of an 8-step run with DataLoader workers, each followed by --resume; the result must equal the uninterrupted run
bit for bit, with no broken checkpoint. (`bench/soak.py --quick` takes longer than a test should.)"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "soak.py"


@pytest.fixture(scope="module")
def soak():
    spec = importlib.util.spec_from_file_location("alignkd_bench_soak", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_two_interruptions_resume_to_the_uninterrupted_result(soak, tmp_path):
    summary = soak.soak(tmp_path, steps=8, save_every=2, interruptions=2, seed=0, workers=2, verbose=False)
    report = soak.report(summary)
    assert summary["ok"], report
    assert (summary["interruptions"], summary["sigkill_to_main"], summary["sigterm_to_group"]) == (2, 1, 1), report
    assert summary["exit_codes"] == {"-9": 1, "143": 1}, report
    assert summary["broken_checkpoints"] == 0 and summary["equal_bitwise"], report
    cmp = summary["comparison"]
    assert cmp["log_steps"] == list(range(1, 9)) and cmp["max_abs_diff"] == 0.0
    assert json.loads((tmp_path / "soak.json").read_text())["equal_bitwise"] is True
    for line in ("SIGKILL to the main process   1", "SIGTERM to the process group  1", "broken checkpoints            0",
                 "bitwise equal", "verdict                       OK", "torch "):
        assert line in report, report


def test_a_checkpoint_that_does_not_load_is_counted_as_broken(soak, tmp_path):
    """The broken-checkpoint count is not vacuous: a `latest` whose files are cut short is reported."""
    import shutil

    from model import MobileVLM

    assert soak.check_latest(tmp_path) == ("none", "no latest")
    ckpt = tmp_path / "checkpoint-3"
    MobileVLM.tiny(seed=0).save_pretrained(ckpt)
    (tmp_path / "latest").write_text("checkpoint-3\n")
    assert soak.check_latest(tmp_path)[0] == "broken"  # no adapters, no trainer state
    shutil.copy(ckpt / "pytorch_model.bin", tmp_path / "weights")
    (ckpt / "pytorch_model.bin").write_bytes((tmp_path / "weights").read_bytes()[:1000])
    state, detail = soak.check_latest(tmp_path)
    assert state == "broken" and detail.startswith("checkpoint-3: ")
