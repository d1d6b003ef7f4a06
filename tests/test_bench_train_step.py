"""bench/train_step.py: the --tiny smoke path end to end on CPU (all three configurations), its JSON, the OOM report,
and the refusal to measure without CUDA. The benchmark itself needs a GPU; these only check its code path."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench" / "train_step.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("alignkd_bench_train_step", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")
def test_tiny_run_writes_every_number_and_reports_an_oom(bench, tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # "auto" on CPU: the reference kernels (fast)
    monkeypatch.delenv("ALIGNKD_BACKEND", raising=False)
    real_step = bench.project_micro_step

    def step(models, *args, **kw):  # (c) runs out of memory; (a) and (b) run normally
        if models.loss_fn.backend == "reference":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return real_step(models, *args, **kw)

    monkeypatch.setattr(bench, "project_micro_step", step)
    out = tmp_path / "train_step.json"
    report = bench.main(["--tiny", "--lengths", "224", "--batches", "1", "--warmup", "0", "--iters", "1",
                         "--master-weights", "fp32",  # the chunked master step (fp32 students are their own masters)
                         "--out", str(out)])
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(report))
    meta = data["meta"]
    assert meta["smoke"] is True and meta["configs"] == ["a", "b", "c"]
    assert meta["device"] == ("cpu" if not torch.cuda.is_available() else meta["device"])
    for k in ("torch", "transformers", "bitsandbytes", "triton", "liger_kernel"):
        assert meta["versions"][k], k
    assert meta["date"] and "FLOPs(a)" in meta["flop_formula"]
    by = {r["config"]: r for r in data["results"]}
    assert set(by) == {"a", "b", "c"} and all(r["L"] == 224 and r["B"] == 1 for r in by.values())
    for c in ("a", "b"):
        r = by[c]
        assert r["status"] == "ok" and r["finite"], r
        for k in ("step_s", "fwd_bwd_s", "optim_s", "tokens_per_s", "optimizer_state_gib"):
            assert math.isfinite(r[k]) and r[k] > 0, (c, k, r[k])
        assert set(r["last_terms"]) == {"loss", "ce", "logit", "attn", "proj_all", "proj_focus"}
        assert r["tokens"] == 224 and 0 < r["supervised_rows"] < 224 and r["images"] == 1
    assert by["a"]["flops"] > by["a"]["flops_excl_recompute"] > 0
    assert by["b"]["skipped_timed_steps"] == 0
    assert by["c"]["status"] == "OOM" and "out of memory" in by["c"]["error"]
    (ratio,) = data["ratios"]
    assert ratio["mem_a_over_c"] == ratio["tokens_per_s_a_over_c"] == "OOM"
    assert math.isfinite(ratio["tokens_per_s_a_over_b"]) and ratio["tokens_per_s_a_over_b"] > 0
    assert {"a_c", "b"} <= set(data["setup"]) and data["setup"]["a_c"]["teacher_nf4_bytes"] > 0
    assert data["setup"]["a_c"]["master_weights"] is True


def test_flops_of_the_real_shapes(bench):
    from bench._common import student_config, teacher_config
    from model.vision import clip_vit_l14_336_config

    s, t = student_config(), teacher_config()
    assert bench.decoder_linear_params(s) == 1_233_125_376 and bench.decoder_linear_params(t) == 6_476_005_376
    f = bench.step_flops(s, t, clip_vit_l14_336_config(), B=1, L=2048, n_sup=1400, n_img=1, recompute=True)
    f0 = bench.step_flops(s, t, clip_vit_l14_336_config(), B=1, L=2048, n_sup=1400, n_img=1, recompute=False)
    # 8 * 1.23e9 * 2048 (student) + 2 * 6.48e9 * 2048 (teacher) dominate: ~4.7e13
    assert 4.5e13 < f < 5.5e13 and f - f0 == pytest.approx(2 * 1_233_125_376 * 2048 + 24 * 2 * 2048**2 * 2048)


def test_peak_table(bench):
    from bench._common import peak_tflops_for

    assert peak_tflops_for("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops_for("NVIDIA H100 PCIe") is None
    assert peak_tflops_for("NVIDIA GeForce RTX 4090") == 165.0
    assert peak_tflops_for("NVIDIA GeForce RTX 3090") == 71.0
    assert peak_tflops_for("NVIDIA A100-SXM4-80GB") is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_refuses_without_cuda(bench, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--out", str(tmp_path / "x.json")])
    assert exc.value.code == 2
    assert "needs CUDA" in capsys.readouterr().err and not (tmp_path / "x.json").exists()
