"""The teacher cache stores what the registered terms read. A toy term registered in this file alone reads a teacher
field that no other registered term reads: a cache built with it stores that field, and a cache built without it
is refused while the term has a weight (and serves it at weight 0: not computed, logged as 0)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import train_alignkd
from kernels.dispatch import zero_like_graph
from losses import TERMS, Term, register_term, teacher_fields
from tiny_run import PAPER, tiny_args
from training.teacher_cache import shard_path


def vision_norm(ctx) -> torch.Tensor:
    """A toy term: the squared gap between the norms of the student's and the teacher's projector outputs."""
    img = ctx.batch.has_image.bool()
    if not bool(img.any()):
        return zero_like_graph(ctx.student.vision_tokens)
    s = ctx.student.vision_tokens[img].float().norm(dim=-1)
    t = ctx.teacher.vision_tokens[img].detach().float().norm(dim=-1)
    return (s - t).pow(2).mean()


@pytest.fixture
def logit_only():
    """The registry of the logit term alone (the built-in terms read every KDSide field between them, so the toy's
    field has to be one that they are left without here); restored in its order afterwards."""
    saved = dict(TERMS)
    for name in [n for n in TERMS if n != "logit"]:
        del TERMS[name]
    yield
    TERMS.clear()
    TERMS.update(saved)


def run(tmp_path, out: str, *extra: str) -> list[dict]:
    args = tiny_args(tmp_path, 1)[:-len(PAPER)]  # the built-in terms' flags are not registered here
    train_alignkd.main(["--output-dir", str(tmp_path / out), "--num-workers", "0", *args, *extra])
    return [json.loads(line) for line in (tmp_path / out / "log.jsonl").read_text().splitlines()]


def stored(cache) -> tuple[list[str], set[str]]:
    """The manifest's fields and the tensor names (without the sample index) of the cache's first shard."""
    with safe_open(str(shard_path(cache, 0)), framework="pt") as f:
        names = {key.split("/")[1] for key in f.keys()}
    return json.loads((cache / "manifest.json").read_text())["fields"], names


def test_the_cache_stores_the_fields_of_the_registered_terms(logit_only, tmp_path):
    run(tmp_path, "logit", "--cache-teacher", str(tmp_path / "logit_cache"))
    assert stored(tmp_path / "logit_cache") == (["hidden", "lm_head_weight"], {"hidden"})

    register_term(Term("vision_norm", vision_norm, weight=1.0, teacher=("vision_tokens",),
                       help="gap of the projector outputs' norms"))
    assert teacher_fields() == ("hidden", "lm_head_weight", "vision_tokens")
    with pytest.raises(SystemExit, match=r"holds the teacher's hidden, lm_head_weight, but vision_norm "
                                         r"\(--w-vision-norm 1\) reads vision_tokens\. Build the cache anew"):
        run(tmp_path, "refused", "--cache-teacher", str(tmp_path / "logit_cache"))
    off = run(tmp_path, "off", "--cache-teacher", str(tmp_path / "logit_cache"), "--w-vision-norm", "0")
    assert off[0]["vision_norm"] == 0.0 and off[0]["logit"] > 0  # not computed at weight 0

    cached = run(tmp_path, "cached", "--cache-teacher", str(tmp_path / "cache"))
    assert stored(tmp_path / "cache") == (["hidden", "lm_head_weight", "vision_tokens"], {"hidden", "vision"})
    live = run(tmp_path, "live")
    assert cached[0]["vision_norm"] > 0
    for k in ("loss", "ce", "logit", "vision_norm"):
        assert cached[0][k] == pytest.approx(live[0][k], rel=1e-5), k
