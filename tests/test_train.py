"""The training script as a user runs it: the embedded demo, checkpoints, resume, the baseline, bad input."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import train_alignkd
from tiny_run import tiny_args
from losses import head_average_init, logged_terms
from model import MobileVLM
from training.checkpoints import latest_checkpoint, save_checkpoint

FAST = ["--num-workers", "0", "--save-every", "1000"]


def _log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_demo_learns_and_writes_a_loadable_checkpoint(tmp_path):
    result = train_alignkd.main(["--output-dir", str(tmp_path), *tiny_args(tmp_path, "24"), "--warmup-ratio", "0.1",
                                 *FAST])
    hist = result["history"]
    assert [h["step"] for h in hist] == list(range(1, 25))
    # the logged lr is the one for the next step: linear warmup over int(0.1 * 24) = 2 steps from 0, then cosine to 0
    expected = [t / 2 if t < 2 else 0.5 * (1 + math.cos(math.pi * (t - 2) / 22)) for t in range(1, 25)]
    assert [h["lr"] for h in hist] == pytest.approx([3e-3 * e for e in expected], rel=1e-6, abs=1e-12)
    for h in hist:
        for k in logged_terms():
            assert math.isfinite(h[k]), (k, h)
    first = sum(h["loss"] for h in hist[:4]) / 4
    last = sum(h["loss"] for h in hist[-4:]) / 4
    assert last < 0.9 * first, (first, last)
    # every distillation term is active (not the original's constant attention loss)
    assert all(h["attn"] > 0 and h["proj_all"] > 0 and h["proj_focus"] > 0 and h["logit"] > 0 for h in hist)
    ckpt = tmp_path / "checkpoint-24"
    assert (tmp_path / "latest").read_text().strip() == "checkpoint-24"
    assert (ckpt / "pytorch_model.bin").exists() and (ckpt / "tokenizer.model").exists()
    model = MobileVLM.from_pretrained(ckpt)
    start = MobileVLM.from_pretrained(tmp_path / "demo_assets" / "student")
    assert not torch.equal(model.lm_head.weight, start.lm_head.weight)  # the student trained
    assert torch.equal(model.vision_tower.vision_tower.embeddings.patch_embedding.weight,
                       start.vision_tower.vision_tower.embeddings.patch_embedding.weight)  # CLIP is frozen
    adapters = torch.load(ckpt / "alignkd_adapters.pt")
    assert not torch.allclose(adapters["attn_weight"], head_average_init(4, 8))  # the adapters trained
    assert adapters["attn_bias"].abs().sum() > 0
    assert not (tmp_path / ".tmp-checkpoint-24").exists()


def test_resume_continues_at_the_right_step_with_the_same_result(tmp_path):
    full, parts = tmp_path / "full", tmp_path / "parts"
    train_alignkd.main(["--output-dir", str(full), *tiny_args(full, "6"), *FAST])
    train_alignkd.main(["--output-dir", str(parts), *tiny_args(parts, "6"), "--stop-after", "3", *FAST])
    assert (parts / "latest").read_text().strip() == "checkpoint-3"
    train_alignkd.main(["--output-dir", str(parts), *tiny_args(parts, "6"), "--resume", *FAST])
    assert [h["step"] for h in _log(parts)] == [1, 2, 3, 4, 5, 6]
    a, b = MobileVLM.from_pretrained(full / "checkpoint-6"), MobileVLM.from_pretrained(parts / "checkpoint-6")
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5, msg=k)
    for la, lb in zip(_log(full)[3:], _log(parts)[3:]):
        assert la["loss"] == pytest.approx(lb["loss"], rel=1e-5)


def test_no_distill_baseline_is_ce_only(tmp_path):
    result = train_alignkd.main(["--output-dir", str(tmp_path), *tiny_args(tmp_path, "3"), "--no-distill", *FAST])
    for h in result["history"]:
        assert h["logit"] == h["attn"] == h["proj_all"] == h["proj_focus"] == 0
        assert h["loss"] == pytest.approx(h["ce"]) and h["ce"] > 0


def test_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        train_alignkd.main(["--subset", "mix2m", "--data", str(tmp_path / "x.json"), "--image-folder",
                            str(tmp_path), "--student", str(tmp_path / "nope"), "--teacher", str(tmp_path / "no2"),
                            "--output-dir", str(tmp_path / "out")])


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no complete checkpoint"):
        train_alignkd.main(["--output-dir", str(tmp_path), *tiny_args(tmp_path, "2"), "--resume", *FAST])


def test_vision_towers_are_shared_only_when_bit_identical():
    a = MobileVLM.tiny(seed=1)
    b = MobileVLM.tiny(seed=2, hidden_size=128, num_heads=8)
    assert not train_alignkd.same_vision_tower(a, b)
    b.vision_tower.load_state_dict(a.vision_tower.state_dict())
    assert train_alignkd.same_vision_tower(a, b)
    with torch.no_grad():
        b.vision_tower.vision_tower.encoder.layers[0].mlp.fc1.bias[3] += 1e-6
    assert not train_alignkd.same_vision_tower(a, b)


def test_attention_term_trains_the_students_layer0_q_and_k_in_a_real_forward():
    """The original's attention loss had zero gradient. Here, through real tiny models with
    activation checkpointing, the attention term alone moves layer 0's q/k projections (and nothing deeper)."""
    from losses import AlignKDLoss

    student, teacher = MobileVLM.tiny(seed=1).train(), MobileVLM.tiny(seed=2, hidden_size=128, num_heads=8).eval()
    teacher.vision_tower.load_state_dict(student.vision_tower.state_dict())
    student.enable_activation_checkpointing()
    student.enable_qk_capture(), teacher.enable_qk_capture()
    loss_fn = AlignKDLoss(8, 4, 128, 64, weights={"logit": 0.0, "proj_all": 0.0, "proj_focus": 0.0},
                          backend="reference")
    IMG = -200
    ids = torch.tensor([[1, 5, 6, IMG, 7, 8, 9, 10], [1, IMG, 11, 12, 13, 0, 0, 0]])
    mask = ids != 0
    labels = torch.full_like(ids, -100)  # nothing supervised: CE is an exact 0, the loss is the attention term
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, "images": torch.randn(2, 3, 336, 336),
             "has_image": torch.tensor([True, True])}
    models = train_alignkd.Models(student, loss_fn, torch.device("cpu"), torch.float32, teacher)
    terms = train_alignkd.distill_forward(models, batch)
    assert terms["attn"] > 0 and terms["ce"] == 0 and terms["loss"] == terms["attn"]
    terms["loss"].backward()
    attn0 = student.model.layers[0].self_attn
    assert attn0.q_proj.weight.grad.abs().sum() > 0 and attn0.k_proj.weight.grad.abs().sum() > 0
    deeper = student.model.layers[1].self_attn.q_proj.weight.grad
    assert deeper is None or not deeper.any()
    assert loss_fn.attn_weight.grad.abs().sum() > 0


def test_sigterm_saves_a_checkpoint_after_the_current_step_and_resume_continues(tmp_path):
    """A preempted run (SIGTERM, as clusters send) keeps its last step: checkpoint, exit status 143, then --resume."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    argv = ["--output-dir", str(out), *tiny_args(out, "1000"), *FAST]
    proc = subprocess.Popen([sys.executable, "train_alignkd.py", *argv], cwd=Path(train_alignkd.__file__).parent,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.time() + 240
        while not ((out / "log.jsonl").exists() and len(_log(out)) >= 2):
            assert proc.poll() is None and time.time() < deadline, "the demo did not start training"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, output[-2000:]
    steps = [h["step"] for h in _log(out)]
    n = steps[-1]
    assert steps == list(range(1, n + 1)) and 2 <= n < 1000
    assert (out / "latest").read_text().strip() == f"checkpoint-{n}"
    assert f"stopped at step {n} (SIGTERM)" in output and "Traceback" not in output
    train_alignkd.main([*argv, "--resume", "--stop-after", "1"])
    assert [h["step"] for h in _log(out)] == list(range(1, n + 2))


def test_a_second_signal_aborts_at_once_and_handlers_are_restored():
    import os
    import signal

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with train_alignkd.StopRequest() as req:
            os.kill(os.getpid(), signal.SIGINT)
            assert req.signum == signal.SIGINT  # the first one only asks for a stop
            os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGINT) is before


class _Payload:
    """Unpickled with arbitrary globals, this touches a marker file (a harmless stand-in for any code)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path(self.marker).touch, ())


def test_resume_refuses_checkpoint_files_that_run_code_when_unpickled(tmp_path):
    import pickle

    probe = tmp_path / "probe"  # the payload does run code when unpickled without restriction
    pickle.loads(pickle.dumps(_Payload(probe)))
    assert probe.exists()
    out = tmp_path / "run"
    argv = ["--output-dir", str(out), *tiny_args(out, "2"), *FAST]
    train_alignkd.main([*argv, "--stop-after", "1"])
    ckpt = out / "checkpoint-1"
    marker = tmp_path / "marker"
    for name in ("trainer_state.pt", "alignkd_adapters.pt"):
        good = (ckpt / name).read_bytes()
        torch.save({"optimizer": _Payload(marker), "attn_weight": _Payload(marker)}, ckpt / name)
        with pytest.raises(SystemExit) as e:
            train_alignkd.main([*argv, "--resume"])
        msg = str(e.value)
        assert msg.startswith(f"error: {ckpt / name} is refused: it holds more than tensors") and "\n" not in msg
        assert not marker.exists()
        (ckpt / name).write_bytes(good)
    assert train_alignkd.main([*argv, "--resume"])["history"][0]["step"] == 2  # the real files still resume


def test_new_run_into_a_folder_that_holds_a_run_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "run"
    argv = ["--output-dir", str(out), *tiny_args(out, "2"), *FAST]
    train_alignkd.main(argv)
    with pytest.raises(SystemExit, match=r"^error: .*run already holds a run \(checkpoint-2, latest\): continue it "
                                         r"with --resume, or start anew with --overwrite"):
        train_alignkd.main([*argv, "--max-steps", "1"])
    assert (out / "latest").read_text().strip() == "checkpoint-2"  # nothing was touched
    result = train_alignkd.main([*argv, "--max-steps", "1", "--save-every", "1", "--overwrite"])
    assert result["checkpoint"] == str(out / "checkpoint-1")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert [h["step"] for h in _log(out)] == [1]
    with pytest.raises(SystemExit, match="give one"):
        train_alignkd.main([*argv, "--resume", "--overwrite"])


def test_pruning_never_removes_the_checkpoint_just_written(tmp_path):
    student = MobileVLM.tiny(seed=1)
    opt = torch.optim.AdamW(student.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    for step in (3, 7, 9):  # 7 and 9: left by a run that this one continues from step 3
        (tmp_path / f"checkpoint-{step}").mkdir()
    state = {"step": 5, "epoch": 0, "offset": 20, "skipped": {}, "args": {"probe_steps": {2, 1}}}
    save_checkpoint(tmp_path, 5, student, None, opt, sched, state, None, keep=2)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-5"]
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-5"
    save_checkpoint(tmp_path, 6, student, None, opt, sched, {**state, "step": 6}, None, keep=1)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-6"]
    assert json.loads((tmp_path / "checkpoint-6" / "trainer_state.json").read_text())["args"]["probe_steps"] == [1, 2]


def test_data_without_a_usable_sample_is_an_error_not_a_hang(tmp_path):
    import subprocess
    import sys

    argv = tiny_args(tmp_path, "2")
    bad = [{"id": f"r{i}", "image": f"missing-{i}.png",
            "conversations": [{"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "A."}]}
           for i in range(6)]
    for name, records, why in (("bad.json", bad, "missing_image 6"),
                               ("empty.json", [], "none; the file holds no records")):
        data = tmp_path / name
        data.write_text(json.dumps(records))
        argv[argv.index("--data") + 1] = str(data)
        proc = subprocess.run([sys.executable, "train_alignkd.py", "--output-dir", str(tmp_path / f"out-{name}"), *argv,
                               *FAST], cwd=Path(train_alignkd.__file__).parent, capture_output=True, text=True,
                              timeout=240)  # a hang fails here
        assert proc.returncode == 1, proc.stderr[-2000:]
        assert proc.stderr.strip().splitlines()[-1] == f"error: no usable sample in {data} (skipped: {why})"
        assert "Traceback" not in proc.stderr


def test_resume_after_a_stop_keeps_one_log_record_per_step(tmp_path):
    out = tmp_path / "run"
    argv = ["--output-dir", str(out), *tiny_args(out, "6"), *FAST]
    train_alignkd.main([*argv, "--stop-after", "3"])
    records = _log(out)
    assert [r["step"] for r in records] == [1, 2, 3]
    # as a run killed after step 4's record (before its checkpoint) leaves it, plus a line cut short by the kill;
    # and a held-out evaluation record at step 0 first
    lines = [json.dumps({"step": 0, "eval_ce": 1.5, "eval_acc": 0.25}),
             *map(json.dumps, records), json.dumps({**records[-1], "step": 4, "loss": 99.0}), '{"step": 5, "lo']
    (out / "log.jsonl").write_text("\n".join(lines))
    train_alignkd.main([*argv, "--resume"])
    log = _log(out)
    assert [r["step"] for r in log] == [0, 1, 2, 3, 4, 5, 6]
    assert log[0] == {"step": 0, "eval_ce": 1.5, "eval_acc": 0.25} and log[1:4] == records
    assert log[4]["loss"] != 99.0
