"""A loss term registered here, in this file alone: it gets its --w- flag, is weighted into the loss, logged in
log.jsonl, shown in the progress bar and switchable in the ablation runner; a term with its own adapter, registered
here too, has it trained, clipped, saved and restored on resume."""
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


def hint(ctx) -> torch.Tensor:
    """A toy term with an adapter of its own (a FitNets hint): the student's hidden states at the supervised rows,
    mapped to the teacher's width, against the teacher's."""
    return (ctx.adapter("hint")(ctx.h_s.float()) - ctx.h_t.float()).pow(2).mean()


@pytest.fixture
def hint_term():
    term = register_term(Term("hint", hint, weight=1.0, help="the student's hidden states mapped to the teacher's",
                              teacher=("hidden",),
                              adapter=lambda loss: torch.nn.Linear(loss.student_dim, loss.teacher_dim)))
    yield term
    del TERMS[term.name]


def test_a_terms_own_adapter_is_trained_clipped_saved_and_resumed(hint_term, tmp_path, monkeypatch):
    run, build_optimizer = {}, train_alignkd.build_optimizer

    def spy(args, models, total):  # the first run's adapter and optimizer, and the adapter as it starts
        optim = build_optimizer(args, models, total)
        adapter = models.loss_fn.term_adapters["hint"]
        run.setdefault("built", (adapter, optim, {k: v.clone() for k, v in adapter.state_dict().items()}))
        return optim

    monkeypatch.setattr(train_alignkd, "build_optimizer", spy)
    full, parts = tmp_path / "full", tmp_path / "parts"
    fast = ["--num-workers", "0", "--save-every", "1"]
    train_alignkd.main(["--output-dir", str(full), *tiny_args(tmp_path, 4), *fast])
    adapter, optim, start = run["built"]
    assert {id(p) for p in adapter.parameters()} <= {id(p) for p in optim.adapters}  # stepped and clipped with them
    saved = torch.load(full / "checkpoint-4" / "alignkd_adapters.pt", weights_only=True)
    for k, v in adapter.state_dict().items():
        assert not torch.equal(v, start[k]), k  # trained
        assert torch.equal(saved["term_adapters.hint." + k], v), k  # saved
    train_alignkd.main(["--output-dir", str(parts), *tiny_args(tmp_path, 4), *fast, "--stop-after", "2"])
    train_alignkd.main(["--output-dir", str(parts), *tiny_args(tmp_path, 4), *fast, "--resume"])
    resumed = torch.load(parts / "checkpoint-4" / "alignkd_adapters.pt", weights_only=True)
    for k, v in saved.items():
        torch.testing.assert_close(resumed[k], v, atol=1e-6, rtol=1e-5, msg=k)
