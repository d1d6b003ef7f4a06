"""LoRA student through peft: what trains, q/k capture through the adapters, merge back to the official layout."""
from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("peft")

from data.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX as IMG  # noqa: E402
from model import MobileVLM  # noqa: E402
from model.checkpoint import official_state_dict  # noqa: E402
from model.lora import DEFAULT_TARGETS, apply_lora, is_lora, lora_parameter_counts, merged_state_dict  # noqa: E402

IDS = torch.tensor([[1, 5, IMG, 6, 7, 8, 9], [1, IMG, 10, 11, 12, 13, 14]])
LABELS = torch.tensor([[IGNORE_INDEX] * 4 + [7, 8, 9], [IGNORE_INDEX] * 3 + [11, 12, 13, 14]])
R = 4


def _student(seed: int = 0) -> MobileVLM:
    return MobileVLM.tiny(seed=seed)  # hidden 64, FFN 128, 2 layers, 4 heads


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 336, 336, generator=torch.Generator().manual_seed(0))


def _lora_names(model: nn.Module) -> set[str]:
    return {n for n, _ in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}


def test_trainable_parameters_are_lora_and_projector_only():
    s = apply_lora(_student(), R)
    trainable = {n for n, p in s.named_parameters() if p.requires_grad}
    projector = {n for n, _ in s.named_parameters() if n.startswith("model.mm_projector.")}
    lora = _lora_names(s)
    assert trainable == lora | projector and projector and lora
    assert len(lora) == 2 * len(DEFAULT_TARGETS) * 2  # layers x targets x (A, B)
    assert all(n.startswith("model.layers.") for n in lora)
    # CLIP has q/k/v_proj too: untouched, frozen
    clip_attn = s.vision_tower.vision_tower.encoder.layers[0].self_attn
    assert type(clip_attn.q_proj) is nn.Linear and not clip_attn.q_proj.weight.requires_grad
    assert not s.lm_head.weight.requires_grad and not s.model.embed_tokens.weight.requires_grad
    counts = lora_parameter_counts(s)
    # r * (in + out) per adapted linear: 4 attention 64->64, gate/up 64->128, down 128->64, in 2 layers
    assert counts["lora"] == 2 * R * (4 * (64 + 64) + 2 * (64 + 128) + (128 + 64)) == 8704
    assert counts["projector"] == sum(p.numel() for p in s.mm_projector.parameters())
    assert counts["other_trainable"] == 0
    assert counts["total"] == counts["lora"] + counts["projector"] + counts["frozen"]


def test_targets_scale_and_errors():
    s = apply_lora(_student(), 8, alpha=4.0, dropout=0.0, target=("q_proj", "v_proj"))
    layer = s.model.layers[1].self_attn
    assert is_lora(s) and layer.q_proj.scaling["default"] == 0.5 and layer.q_proj.r["default"] == 8
    assert type(layer.k_proj) is nn.Linear and type(s.model.layers[0].mlp.down_proj) is nn.Linear
    assert apply_lora(_student(), 8).model.layers[0].mlp.up_proj.scaling["default"] == 2.0  # alpha defaults to 2r
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(s, 8)
    with pytest.raises(ValueError, match=r"\['qproj'\] are not linear layers"):
        apply_lora(_student(), 8, target=("qproj",))
    with pytest.raises(ValueError, match="positive"):
        apply_lora(_student(), 0)


def test_bf16_student_keeps_fp32_adapters(images):
    s = apply_lora(_student().to(torch.bfloat16), R)
    q = s.model.layers[0].self_attn.q_proj
    assert q.base_layer.weight.dtype == torch.bfloat16 and q.lora_A["default"].weight.dtype == torch.float32
    out = s(IDS, images=images, labels=LABELS)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()
    assert q.lora_B["default"].weight.grad.dtype == torch.float32


@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_step_changes_only_lora_and_projector(images, checkpointing):
    s = apply_lora(_student(seed=2), R)
    if checkpointing:
        s.enable_activation_checkpointing()
    s.train()
    before = {n: p.detach().clone() for n, p in s.named_parameters()}
    trainable = {n for n, p in s.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(s.parameters(), lr=1e-2, weight_decay=0.0)  # all of them: frozen ones must get no grad
    for _ in range(2):  # lora_B starts at zero, so lora_A first receives a gradient on the second step
        opt.zero_grad(set_to_none=True)
        loss = s(IDS, images=images, labels=LABELS).loss
        loss.backward()
        assert all(p.grad is None for n, p in s.named_parameters() if n not in trainable)
        opt.step()
    changed = {n for n, p in s.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed == trainable


@pytest.mark.parametrize("capture_first", [True, False])
def test_qk_capture_through_lora_reaches_layer0_adapters(images, capture_first):
    s = _student(seed=3)
    if capture_first:
        cap = s.enable_qk_capture()
        apply_lora(s, R)
    else:
        apply_lora(s, R)
        cap = s.enable_qk_capture()
    attn0 = s.model.layers[0].self_attn
    assert attn0.qk_capture is cap and type(attn0).__name__ == "LlamaAttention"
    with torch.no_grad():  # give the adapters a non-zero B so q/k depend on A as well
        for n, p in s.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.05)
    s.train()
    out = s(IDS, images=images, compute_logits=False)
    assert out.q0 is not None and out.q0.shape == (2, 4, IDS.shape[1] - 1 + 144, 16) and out.k0.shape == out.q0.shape
    assert out.q0.requires_grad and out.k0.requires_grad
    (out.q0.float().square().mean() + out.k0.float().square().mean()).backward()
    grads = {n: p.grad for n, p in s.named_parameters() if p.requires_grad}
    for proj in ("q_proj", "k_proj"):
        for ab in ("lora_A", "lora_B"):
            g = grads[f"model.layers.0.self_attn.{proj}.{ab}.default.weight"]
            assert g is not None and g.abs().sum() > 0, (proj, ab)
    # q/k of layer 0 depend on nothing of v/o/mlp nor of layer 1
    assert grads["model.layers.0.self_attn.v_proj.lora_B.default.weight"] is None
    assert grads["model.layers.1.self_attn.q_proj.lora_B.default.weight"] is None
    assert grads["model.mm_projector.mlp.mlp.0.weight"].abs().sum() > 0  # image rows feed layer-0 q/k


def test_merge_gives_official_keys_and_same_logits(images, tmp_path):
    base = _student(seed=4).eval()
    official_keys = set(official_state_dict(base))
    with torch.no_grad():
        base_logits = base(IDS, images=images).logits
    s = apply_lora(base, R)
    with torch.no_grad():
        for n, p in s.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.05)
        unmerged = s.eval()(IDS, images=images).logits
    assert (unmerged - base_logits).abs().max() > 1e-3  # the adapters change the model
    assert set(official_state_dict(s)) != official_keys  # with LoRA the keys are not the official ones
    merged = merged_state_dict(s)
    assert is_lora(s) and set(official_state_dict(base, merged)) == official_keys  # the training model is untouched
    s.save_pretrained(tmp_path, state_dict=merged)  # as the trainer's checkpoints
    reloaded = MobileVLM.from_pretrained(tmp_path).eval()  # strict key check of the official layout
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS, images=images).logits, unmerged, atol=2e-5, rtol=1e-4)


def test_merge_in_bf16(images):
    s = apply_lora(_student(seed=5).to(torch.bfloat16), R).eval()
    with torch.no_grad():
        for n, p in s.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.05)
        unmerged = s(IDS, images=images).logits.float()
        plain = _student(seed=5).to(torch.bfloat16).eval()
        plain.load_state_dict(merged_state_dict(s))
        merged = plain(IDS, images=images).logits.float()
    assert {p.dtype for p in plain.parameters()} == {torch.bfloat16}
    # bf16 rounding of W + BA vs W x + B A x: a few bf16 ulps of the logit scale
    assert (merged - unmerged).abs().max() <= 0.03 * unmerged.abs().max()
