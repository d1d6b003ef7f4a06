"""The 4-bit teacher on CPU (bitsandbytes NF4 runs there): layers, skip list, freezing, memory, accuracy, keys."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")

from data.constants import IMAGE_TOKEN_INDEX as IMG  # noqa: E402
from model import MobileVLM  # noqa: E402
from model.quantize import SKIP_MODULES, load_teacher, model_bytes, quantize_model, teacher_bnb_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
IDS = torch.tensor([[1, 5, 9, IMG, 6, 7, 8, 11, 12, 13], [1, IMG, 20, 21, 22, 23, 24, 25, 26, 27]])


def _tiny_bf16() -> MobileVLM:
    # hidden 128 / FFN 256: layers big enough that 4-bit error is measurable, small enough to run in milliseconds
    return MobileVLM.tiny(seed=3, hidden_size=128, num_heads=4, num_layers=2, vocab_size=512).to(torch.bfloat16)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("teacher")
    _tiny_bf16().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 336, 336, generator=torch.Generator().manual_seed(0))


def _decoder_linears(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if n.startswith("model.layers.") and n.endswith(DECODER_LINEARS)]


def test_decoder_linears_are_nf4_double_quant_and_skip_list_holds(ckpt):
    t = load_teacher(ckpt, "nf4", device="cpu")
    linears = _decoder_linears(t)
    assert len(linears) == 2 * 7
    for name, m in linears:
        assert isinstance(m, bnb.nn.Linear4bit), name
        w = m.weight
        assert w.dtype == torch.uint8 and w.quant_type == "nf4" and w.compress_statistics, name
        qs = w.quant_state  # before any CPU forward (which repacks): nested absmax in uint8, fp32 second level
        assert qs.quant_type == "nf4" and qs.nested and qs.state2 is not None and qs.absmax.dtype == torch.uint8
        assert qs.blocksize == 64 and qs.dtype == torch.bfloat16 and m.compute_dtype == torch.bfloat16
        assert tuple(qs.shape) == (m.out_features, m.in_features)
    # the skip list: exactly the modules the trainer needs in bf16, none of them quantized
    assert type(t.lm_head) is nn.Linear and t.lm_head.weight.dtype == torch.bfloat16
    for prefix, module in (("model.mm_projector", t.mm_projector), ("model.vision_tower", t.vision_tower)):
        subs = list(module.modules())
        assert not any(isinstance(m, bnb.nn.Linear4bit) for m in subs), prefix
        lin = [m for m in subs if type(m) is nn.Linear]
        assert lin and all(m.weight.dtype == torch.bfloat16 for m in lin), prefix
    assert t.mm_projector.peg.peg[0].weight.dtype == torch.bfloat16  # the depthwise conv
    assert t.vision_tower.vision_tower.embeddings.patch_embedding.weight.dtype == torch.bfloat16
    assert t.model.embed_tokens.weight.dtype == torch.bfloat16 and t.model.norm.weight.dtype == torch.bfloat16
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in t.modules()) == len(linears)


def test_config_is_the_documented_one():
    c = teacher_bnb_config()
    assert c.load_in_4bit and c.bnb_4bit_quant_type == "nf4" and c.bnb_4bit_use_double_quant
    assert c.bnb_4bit_compute_dtype == torch.bfloat16
    assert c.llm_int8_skip_modules == ["lm_head", "model.mm_projector", "model.vision_tower"] == SKIP_MODULES


@pytest.mark.parametrize("skip, quantized", [
    (["model.mm_projector", "model.vision_tower"], "lm_head"),       # a user list replaces the default lm_head skip
    (["lm_head", "mm_projector", "model.vision_tower"], "model.mm_projector.mlp.mlp.0"),  # bare name: no match
])
def test_the_skip_list_traps_are_real(skip, quantized):
    """Why SKIP_MODULES reads as it does: transformers' swap with a list missing lm_head, or naming the projector by
    its bare name, quantizes them (if this ever stops failing the other way, the list can be relaxed)."""
    from transformers import BitsAndBytesConfig
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear

    with torch.device("meta"):
        m = MobileVLM.tiny()
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", llm_int8_skip_modules=skip)
    replace_with_bnb_linear(m, modules_to_not_convert=skip, quantization_config=cfg)
    assert isinstance(m.get_submodule(quantized), bnb.nn.Linear4bit)


def test_frozen_eval_and_smaller(ckpt):
    t = load_teacher(ckpt, "nf4", device="cpu")
    ref = load_teacher(ckpt, "bf16", device="cpu")
    assert not t.training and not any(p.requires_grad for p in t.parameters())
    nf4, bf16 = model_bytes(t), model_bytes(ref)
    assert nf4 < 0.8 * bf16
    lin_nf4 = sum(model_bytes(m) for _, m in _decoder_linears(t))
    lin_bf16 = sum(model_bytes(m) for _, m in _decoder_linears(ref))
    assert lin_bf16 == sum(m.weight.numel() * 2 for _, m in _decoder_linears(ref))
    assert lin_nf4 < 0.3 * lin_bf16  # 4 bits + nested absmax + per-layer code tables on 128-wide layers
    # quant state is counted: the packed weights alone would be exactly a quarter of bf16
    assert lin_nf4 > sum(m.weight.numel() for _, m in _decoder_linears(t))


def _dequantized_reference(teacher: MobileVLM, ckpt: Path) -> MobileVLM:
    """The bf16 model whose decoder linears hold dequantize_4bit of the teacher's own 4-bit weights."""
    ref = MobileVLM.from_pretrained(ckpt, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        for (name, q), (name_r, r) in zip(_decoder_linears(teacher), _decoder_linears(ref)):
            assert name == name_r
            w = bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state)
            assert w.shape == r.weight.shape and w.dtype == torch.bfloat16
            r.weight.copy_(w)
    return ref


def test_outputs_match_dequantized_reference_much_closer_than_bf16(ckpt, images):
    teacher = load_teacher(ckpt, "nf4", device="cpu")
    deq = _dequantized_reference(teacher, ckpt)  # read the 4-bit state before a CPU forward repacks it
    raw = MobileVLM.from_pretrained(ckpt, dtype=torch.bfloat16).eval()
    for m in (teacher, deq, raw):
        m.enable_qk_capture()
    with torch.no_grad():
        o_t, o_d, o_r = (m(IDS, images=images) for m in (teacher, deq, raw))

    def err(a, b):
        return float((a.float() - b.float()).abs().max())

    scale = float(o_r.logits.float().abs().max())
    # Tolerance: the 4-bit matmul and the bf16 matmul of the dequantized weights differ only by bf16 rounding and
    # accumulation order, a few bf16 ulps of the logit scale; quantization itself moves logits by ~10% of it.
    assert err(o_t.logits, o_d.logits) <= 0.02 * scale
    assert err(o_t.hidden_states, o_d.hidden_states) <= 0.05 * float(o_d.hidden_states.float().abs().max())
    assert err(o_t.logits, o_d.logits) < 0.2 * err(o_t.logits, o_r.logits)
    assert err(o_t.logits, o_r.logits) > 0  # the 4-bit path really ran
    assert err(o_t.q0, o_d.q0) < 0.2 * err(o_t.q0, o_r.q0)
    assert o_t.q0.shape == o_r.q0.shape == (2, 4, IDS.shape[1] - 1 + 144, 32)
    # and the NF4 model is still a faithful teacher of the unquantized one on this tiny model
    p_t, p_r = o_t.logits.float().log_softmax(-1), o_r.logits.float().log_softmax(-1)
    kl = torch.nn.functional.kl_div(p_t, p_r, log_target=True, reduction="none").sum(-1).mean()
    assert float(kl) < 1e-3  # measured 6.7e-5


def test_bf16_mode_is_a_plain_bf16_model(ckpt, images):
    t = load_teacher(ckpt, "bf16", device="cpu")
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in t.modules())
    assert {p.dtype for p in t.parameters()} == {torch.bfloat16}
    assert not t.training and not any(p.requires_grad for p in t.parameters())
    ref = MobileVLM.from_pretrained(ckpt, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        torch.testing.assert_close(t(IDS, images=images).logits, ref(IDS, images=images).logits, rtol=0, atol=0)


def test_safetensors_and_in_memory_paths_agree(ckpt, tmp_path, images):
    src = MobileVLM.from_pretrained(ckpt, dtype=torch.bfloat16)
    src.save_pretrained(tmp_path, safetensors=True)
    a = load_teacher(ckpt, "nf4", device="cpu")
    b = load_teacher(tmp_path, "nf4", device="cpu")
    c = quantize_model(src, "nf4", device="cpu")
    for (n, x), (_, y), (_, z) in zip(_decoder_linears(a), _decoder_linears(b), _decoder_linears(c)):
        assert torch.equal(x.weight.data, y.weight.data) and torch.equal(x.weight.data, z.weight.data), n
    assert c.lm_head.weight.data_ptr() != src.lm_head.weight.data_ptr()  # a copy, not an alias of the source
    with torch.no_grad():
        torch.testing.assert_close(a(IDS, images=images).logits, c(IDS, images=images).logits, rtol=0, atol=0)


def test_missing_and_unexpected_keys_are_named(ckpt, tmp_path):
    state = torch.load(ckpt / "pytorch_model.bin", weights_only=True)
    del state["model.layers.1.mlp.down_proj.weight"]
    state["model.layers.1.mlp.extra.weight"] = torch.zeros(2)
    (tmp_path / "config.json").write_bytes((ckpt / "config.json").read_bytes())
    torch.save(state, tmp_path / "pytorch_model.bin")
    for quant in ("nf4", "bf16"):
        with pytest.raises(KeyError, match=r"missing 1 key\(s\): model\.layers\.1\.mlp\.down_proj\.weight") as e:
            load_teacher(tmp_path, quant, device="cpu")
        assert "unexpected 1 key(s): model.layers.1.mlp.extra.weight" in str(e.value)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_teacher(tmp_path / "nowhere", device="cpu")
    with pytest.raises(ValueError, match="quant must be"):
        load_teacher(ckpt, "int8", device="cpu")
    if not torch.cuda.is_available():  # the default device is cuda: a clear error, not a silent CPU teacher
        with pytest.raises(RuntimeError, match="device='cpu'"):
            load_teacher(ckpt)


def test_shape_mismatch_is_an_error(ckpt, tmp_path):
    state = torch.load(ckpt / "pytorch_model.bin", weights_only=True)
    state["model.layers.0.self_attn.q_proj.weight"] = state["model.layers.0.self_attn.q_proj.weight"][:64]
    (tmp_path / "config.json").write_bytes((ckpt / "config.json").read_bytes())
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="q_proj.weight: checkpoint shape"):
        load_teacher(tmp_path, "nf4", device="cpu")


def _bench():
    spec = importlib.util.spec_from_file_location("teacher_fidelity", ROOT / "bench" / "teacher_fidelity.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_fidelity_bench_metrics_on_tiny_models(ckpt):
    tf = _bench()
    bf16 = MobileVLM.from_pretrained(ckpt, dtype=torch.bfloat16).eval()
    nf4 = quantize_model(bf16, "nf4")
    ids, images = tf.make_batch(bf16.config.vocab_size, B=2, L=200, seed=1)
    ref = tf.run_teacher(bf16, ids, images)
    assert ref["logp"].shape == (2, 200, 512)
    assert ref["vision_mask"].sum(1).tolist() == [144, 144] and ref["text_mask"].sum(1).tolist() == [200 - 144 - 35] * 2
    same = tf.compare(ref, tf.run_teacher(bf16, ids, images))
    assert same["kl_mean"] == 0 and same["attn_tv_rel_err"] == 0 and same["top1_agreement"] == 1
    diff = tf.compare(ref, tf.run_teacher(nf4, ids, images))
    assert 0 < diff["kl_mean"] < 1e-2 and 0 < diff["attn_tv_rel_err"] < 0.5
    assert 0 < diff["attn_tv_mass_ref"] <= 1
    # the attention block rows are probabilities restricted to the image columns: check one against a direct softmax
    blocks = tf.text_vision_attention(ref["q0"], ref["k0"], ref["vision_mask"], ref["text_mask"])
    q, k = ref["q0"][0].float(), ref["k0"][0].float()
    t0 = 35 + 144  # first text row
    row = (q[:, t0:t0 + 1] @ k[:, : t0 + 1].transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)[:, 0]
    torch.testing.assert_close(blocks[0][:, 0], row[:, 35:35 + 144])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_fidelity_bench_refuses_without_cuda(tmp_path):
    tf = _bench()
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        tf.main(["--out", str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists()


@pytest.mark.gpu
def test_cuda_teacher_matches_cpu_teacher(ckpt, images):
    gpu = load_teacher(ckpt, "nf4", device="cuda")
    cpu = load_teacher(ckpt, "nf4", device="cpu")
    for (n, a), (_, b) in zip(_decoder_linears(gpu), _decoder_linears(cpu)):
        assert a.weight.device.type == "cuda"
        assert torch.equal(a.weight.data.cpu(), b.weight.data), n  # same quantization on both devices
    with torch.no_grad():
        lg, lc = gpu(IDS, images=images).logits.float().cpu(), cpu(IDS, images=images).logits.float()
    assert float((lg - lc).abs().max()) <= 0.02 * float(lc.abs().max())
