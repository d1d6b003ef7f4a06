"""A loss term registered here, in this file alone: it gets its --w- flag, is weighted into the loss, logged in
log.jsonl, shown in the progress bar and switchable in the ablation runner."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import train_alignkd
from losses import TERMS, Term, register_term, teacher_fields
from test_alignkd_loss import make_batch, make_loss
from tiny_run import tiny_args


def hidden_l2(ctx) -> torch.Tensor:
    """A toy term: the mean square of the student's final hidden states."""
    return ctx.student.hidden.float().pow(2).mean()


@pytest.fixture
def toy():
    term = register_term(Term("hidden_l2", hidden_l2, weight=0.0, help="the student's mean square hidden state",
                              teacher=("hidden",)))
    yield term
    del TERMS[term.name]  # the registry as it was, for the other tests


def test_the_term_gets_a_weight_flag(toy):
    assert train_alignkd.parse_args([]).w_hidden_l2 == 0.0  # the registered default
    assert train_alignkd.parse_args(["--w-hidden-l2", "0.25"]).w_hidden_l2 == 0.25
    assert list(TERMS)[-1] == "hidden_l2" and teacher_fields() == ("hidden", "lm_head_weight", "q0", "k0",
                                                                     "vision_tokens", "lse0")
    with pytest.raises(ValueError, match="exists already"):
        register_term(toy)


def test_the_term_is_weighted_into_the_loss(toy):
    outs = {}
    for w in (0.0, 0.5):
        s, t, batch = make_batch([(3, 20), (-1, 18)], seed=3)
        fn = make_loss({"hidden_l2": w}, backend="reference")
        out = fn(s, t, batch)
        out["loss"].backward()
        outs[w] = (out, s.hidden.grad.clone())
    (off, g_off), (on, g_on) = outs[0.0], outs[0.5]
    assert on["hidden_l2"] == off["hidden_l2"] > 0  # computed and reported at any weight
    assert float((on["loss"] - off["loss"]).detach()) == pytest.approx(0.5 * float(on["hidden_l2"]), rel=1e-5)
    h = s.hidden.detach().float()
    torch.testing.assert_close(g_on - g_off, 0.5 * 2 * h / h.numel(), rtol=1e-4, atol=1e-7)


def test_the_trainer_logs_it_and_shows_it_in_the_progress_bar(toy, tmp_path, monkeypatch):
    shown = []

    class Bar(train_alignkd.tqdm):
        def set_postfix(self, ordered_dict=None, refresh=True, **kw):
            shown.append(dict(ordered_dict or {}, **kw))
            super().set_postfix(ordered_dict, refresh, **kw)

    monkeypatch.setattr(train_alignkd, "tqdm", Bar)
    out = tmp_path / "run"
    train_alignkd.main(["--output-dir", str(out), *tiny_args(tmp_path, 2), "--w-hidden-l2", "0.5",
                        "--num-workers", "0"])
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    for r in records:  # tiny_args turns every built-in term on at weight 1
        assert r["hidden_l2"] > 0
        parts = r["ce"] + r["logit"] + r["attn"] + r["proj_all"] + r["proj_focus"]
        assert r["loss"] == pytest.approx(parts + 0.5 * r["hidden_l2"], rel=1e-5)
    assert len(shown) == 2 and all("hidden_l2" in p for p in shown)


def test_the_ablation_runner_switches_it(toy):
    spec = importlib.util.spec_from_file_location("alignkd_bench_ablate",
                                                  Path(__file__).resolve().parents[1] / "bench" / "ablate.py")
    ablate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ablate)
    arms = ablate.all_arms()
    assert arms["+hidden_l2"] == ["--w-hidden-l2", "1"] and arms["-hidden_l2"] == ["--w-hidden-l2", "0"]
    assert ablate.parse_args(["--arms", "logit,+hidden_l2"]).arms == ["logit", "+hidden_l2"]
    assert train_alignkd.parse_args(arms["+hidden_l2"]).w_hidden_l2 == 1.0
    # the report has a column for it
    shares = {"1": {k: {"value": 1.0, "grad_norm": 1.0, "share": 0.2} for k in ("ce", *TERMS)}}
    assert "hidden_l2" in ablate.shares_table(shares, "+hidden_l2").splitlines()[2]
