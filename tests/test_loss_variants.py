"""The Align-KD variants beside the paper's form: the student-side projection adapter (vs a naive loop), the
attention-KL form inside AlignKDLoss, the clipping rule, and the CLI that picks them."""
from __future__ import annotations

import json

import pytest
import torch

import train_alignkd
from kernels import reference
from losses import AlignKDLoss, KDBatch, KDSide, head_average_init
from model import MobileVLM
from tiny_run import tiny_args


def test_student_projection_kd_equals_a_naive_loop():
    g = torch.Generator().manual_seed(0)
    B, N, ds, dt = 3, 5, 4, 6
    f_t = torch.randn(B, N, dt, generator=g, dtype=torch.float64)
    f_s = torch.randn(B, N, ds, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(dt, ds, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(dt, generator=g, dtype=torch.float64, requires_grad=True)
    rows = torch.tensor([True, False, True])
    idx = torch.tensor([[0, 4], [2, 2]])  # focus tokens of samples 0 and 2 (a repeated index counts twice)
    loss_all, loss_focus = reference.student_projection_kd_loss(f_t, f_s, w, b, idx, rows)

    def sq(bi, n):  # ||W f_s + b - f_t||^2 of one token, by explicit sums
        return sum((sum(w[o, i] * f_s[bi, n, i] for i in range(ds)) + b[o] - f_t[bi, n, o]) ** 2 for o in range(dt))

    naive_all = sum(sq(bi, n) for bi in range(B) for n in range(N)) / (B * N * dt)
    naive_focus = (sq(0, 0) + sq(0, 4) + 2 * sq(2, 2)) / (4 * dt)
    torch.testing.assert_close(loss_all, naive_all.float(), rtol=1e-6, atol=0)
    torch.testing.assert_close(loss_focus, naive_focus.float(), rtol=1e-6, atol=0)
    got = torch.autograd.grad(loss_all + 2 * loss_focus, (f_s, w, b))
    want = torch.autograd.grad(naive_all + 2 * naive_focus, (f_s, w, b))
    for x, y in zip(got, want):
        torch.testing.assert_close(x.double(), y, rtol=1e-5, atol=1e-7)
    assert reference.student_projection_kd_loss(f_t, f_s, w, b)[1] == 0


def _sides(student_heads=2, teacher_heads=4, L=12, d=8):
    g = torch.Generator().manual_seed(1)
    q_s = torch.randn(2, student_heads, L, d, generator=g, requires_grad=True)
    k_s = torch.randn(2, student_heads, L, d, generator=g, requires_grad=True)
    q_t, k_t = torch.randn(2, teacher_heads, L, d, generator=g), torch.randn(2, teacher_heads, L, d, generator=g)
    v_s = torch.randn(2, 3, 16, generator=g, requires_grad=True)
    v_t = torch.randn(2, 3, 32, generator=g)
    hid_s, hid_t = torch.randn(2, L, 16, generator=g, requires_grad=True), torch.randn(2, L, 32, generator=g)
    w_s, w_t = torch.randn(20, 16, generator=g), torch.randn(20, 32, generator=g)
    vision = torch.zeros(2, L, dtype=torch.bool)
    vision[:, 2:5] = True
    text = torch.zeros(2, L, dtype=torch.bool)
    text[:, 5:] = True
    labels = torch.full((2, L), -100)
    labels[:, 8:] = 3
    batch = KDBatch(labels=labels, attention_mask=torch.ones(2, L, dtype=torch.bool), vision_mask=vision,
                    text_mask=text, has_image=torch.tensor([True, True]), vision_start=torch.tensor([2, 2]))
    return KDSide(hid_s, w_s, q_s, k_s, v_s), KDSide(hid_t, w_t, q_t, k_t, v_t), batch


def test_kl_form_and_student_side_adapter_in_the_objective():
    s, t, batch = _sides()
    loss_fn = AlignKDLoss(4, 2, 32, 16, attn_form="kl", proj_side="student", topk=2, backend="reference")
    assert not hasattr(loss_fn, "attn_weight") and tuple(loss_fn.proj.weight.shape) == (32, 16)
    torch.testing.assert_close(loss_fn.mix(), head_average_init(2, 4), atol=5e-3, rtol=0)  # starts at the mean
    out = loss_fn(s, t, batch)
    rows = batch.text_mask
    want = reference.attention_kl_loss(t.q0, t.k0, s.q0, s.k0, rows, batch.vision_mask, loss_fn.mix())
    torch.testing.assert_close(out["attn"], want.detach())
    assert 1e-3 < float(out["attn"]) < 10  # O(1), unlike the MSE of probabilities
    out["loss"].backward()
    assert s.q0.grad.abs().sum() > 0 and s.k0.grad.abs().sum() > 0 and loss_fn.attn_mix.grad.abs().sum() > 0
    assert s.vision_tokens.grad.abs().sum() > 0 and loss_fn.proj.weight.grad.abs().sum() > 0
    separate = AlignKDLoss(4, 2, 32, 16, attn_form="kl", proj_side="student", topk=2, backend="reference")
    separate.load_state_dict(loss_fn.state_dict())
    terms = separate(*_sides(), separate=True)
    total = sum(terms[k] for k in ("ce", "logit", "attn", "proj_all", "proj_focus"))
    torch.testing.assert_close(terms["loss"], total)
    torch.testing.assert_close(terms["loss"].detach(), out["loss"].detach(), rtol=1e-5, atol=1e-6)


def test_clipping_keeps_the_students_update_whatever_the_adapters_gradients():
    student = [torch.nn.Parameter(torch.zeros(3))]
    adapters = [torch.nn.Parameter(torch.zeros(2))]
    student[0].grad = torch.tensor([0.3, 0.0, 0.4])  # norm 0.5: under the limit
    adapters[0].grad = torch.tensor([600.0, 800.0])  # norm 1000
    s_norm, a_norm = train_alignkd.clip_gradients(student, adapters, 1.0)
    assert s_norm == pytest.approx(0.5) and a_norm == pytest.approx(1000.0)
    torch.testing.assert_close(student[0].grad, torch.tensor([0.3, 0.0, 0.4]))  # untouched by the adapters
    torch.testing.assert_close(adapters[0].grad.norm(), torch.tensor(1.0))
    student[0].grad = torch.tensor([3.0, 0.0, 4.0])
    train_alignkd.clip_gradients(student, [], 1.0)
    torch.testing.assert_close(student[0].grad.norm(), torch.tensor(1.0))


def test_data_without_subset_trains_the_given_student_and_teacher(tmp_path):
    """--data with no --subset runs on the given models and data (it once silently ran the demo instead)."""
    args = tiny_args(tmp_path, 2)
    assets = tmp_path / "demo_assets"
    # a student of another width than any demo model, and a teacher of another depth
    tok = assets / "tokenizer"
    from data import load_tokenizer

    vocab = load_tokenizer(tok).vocab_size
    student = MobileVLM.tiny(seed=5, vocab_size=vocab, hidden_size=32, num_heads=2, num_layers=1)
    teacher = MobileVLM.tiny(seed=6, vocab_size=vocab, hidden_size=64, num_heads=4, num_layers=1)
    teacher.vision_tower.load_state_dict(student.vision_tower.state_dict())
    student.save_pretrained(tmp_path / "s", tokenizer_dir=tok)
    teacher.save_pretrained(tmp_path / "t", tokenizer_dir=tok)
    args[args.index("--student") + 1] = str(tmp_path / "s")
    args[args.index("--teacher") + 1] = str(tmp_path / "t")
    out = tmp_path / "out"
    result = train_alignkd.main(args + ["--output-dir", str(out), "--num-workers", "0", "--lr", "1e-3"])
    assert json.loads((out / "checkpoint-2" / "config.json").read_text())["hidden_size"] == 32
    adapters = torch.load(out / "checkpoint-2" / "alignkd_adapters.pt", weights_only=True)
    assert tuple(adapters["attn_weight"].shape) == (2, 4) and tuple(adapters["proj.weight"].shape) == (32, 64)
    assert all(h["logit"] > 0 for h in result["history"])
    trained = MobileVLM.from_pretrained(out / "checkpoint-2")
    assert not torch.equal(trained.lm_head.weight, student.lm_head.weight)


def test_cli_refuses_what_it_cannot_do(tmp_path):
    args = tiny_args(tmp_path, 1)
    models = ["--student", args[args.index("--student") + 1], "--teacher", args[args.index("--teacher") + 1]]
    with pytest.raises(SystemExit, match="--image-folder"):
        train_alignkd.main(["--data", args[1], *models, "--output-dir", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="--template/--image-mode are for --data without --subset"):
        train_alignkd.main(["--subset", "mix2m", "--template", "plain", "--data", args[1], "--image-folder",
                            args[3], *models, "--output-dir", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="give --subset NAME"):
        train_alignkd.main(["--student", "x", "--teacher", "y"])
    with pytest.raises(SystemExit, match="--train-vision-tower needs --no-distill"):
        train_alignkd.main(args + ["--output-dir", str(tmp_path / "o"), "--train-vision-tower"])


def test_no_distill_checkpoint_carries_no_adapters(tmp_path):
    out = tmp_path / "out"
    train_alignkd.main(tiny_args(tmp_path, 1) + ["--output-dir", str(out), "--num-workers", "0", "--no-distill"])
    assert (out / "checkpoint-1" / "pytorch_model.bin").exists()
    assert not (out / "checkpoint-1" / "alignkd_adapters.pt").exists()
