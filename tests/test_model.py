"""MobileVLM on transformers: splicing, masks, q/k capture, checkpoint layout."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

from data.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX as IMG, NUM_IMAGE_TOKENS as NV
from model import MobileVLM
from model.checkpoint import official_state_dict


@pytest.fixture(scope="module")
def tiny() -> MobileVLM:
    return MobileVLM.tiny(seed=1).eval()


def test_state_dict_uses_official_names(tiny):
    keys = set(official_state_dict(tiny))
    for k in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.norm.weight",
              "lm_head.weight", "model.mm_projector.mlp.mlp.0.weight", "model.mm_projector.mlp.mlp.2.bias",
              "model.mm_projector.peg.peg.0.weight",
              "model.vision_tower.vision_tower.vision_model.embeddings.class_embedding",
              "model.vision_tower.vision_tower.vision_model.pre_layrnorm.weight",
              "model.vision_tower.vision_tower.vision_model.encoder.layers.0.self_attn.out_proj.weight",
              "model.vision_tower.vision_tower.vision_model.post_layernorm.bias"):
        assert k in keys, k
    assert tiny.state_dict()["model.mm_projector.peg.peg.0.weight"].shape == (64, 1, 3, 3)


def test_splice_records_real_image_position(tiny):
    # image after a 5-token prefix (v1 style), image first (plain), and a text-only sample
    ids = [[1, 7, 8, 9, 10, IMG, 11, 12], [1, IMG, 20, 21, 22, 23], [1, 30, 31]]
    labels = [[IGNORE_INDEX] * 6 + [11, 12], [IGNORE_INDEX, IGNORE_INDEX, 20, 21, 22, 23], [IGNORE_INDEX, 30, 31]]
    images = torch.randn(3, 3, 336, 336)
    mm = tiny.prepare_multimodal(ids, images=images, labels=labels)
    L = 8 - 1 + NV
    assert mm.inputs_embeds.shape[:2] == (3, L)
    assert mm.vision_start.tolist() == [5, 1, -1]
    assert mm.has_image.tolist() == [True, True, False]
    for b, (start, n_text) in enumerate([(5, 2), (1, 4)]):
        assert mm.vision_mask[b].nonzero().flatten().tolist() == list(range(start, start + NV))
        assert mm.text_mask[b].nonzero().flatten().tolist() == list(range(start + NV, start + NV + n_text))
        assert (mm.labels[b, start:start + NV] == IGNORE_INDEX).all()
    assert not mm.vision_mask[2].any() and not mm.text_mask[2].any()
    assert mm.attention_mask.sum(1).tolist() == [L, 5 + NV, 3]
    assert mm.labels[0, -2:].tolist() == [11, 12] and mm.labels[1, NV + 1:NV + 5].tolist() == [20, 21, 22, 23]
    # the image rows hold the projector output of that sample's image, the text rows the token embeddings
    with torch.no_grad():
        v0 = tiny.project(tiny.encode_images(images[:1]))[0]
        torch.testing.assert_close(mm.inputs_embeds[0, 5:5 + NV], v0)
        torch.testing.assert_close(mm.inputs_embeds[0, :5], tiny.model.embed_tokens.weight[[1, 7, 8, 9, 10]])
        torch.testing.assert_close(mm.inputs_embeds[0, 5 + NV:], tiny.model.embed_tokens.weight[[11, 12]])


def test_two_images_in_one_sample_is_an_error(tiny):
    with pytest.raises(ValueError, match="image placeholders"):
        tiny.prepare_multimodal([[1, IMG, 5, IMG]], images=torch.zeros(1, 3, 336, 336))


def test_left_padding_matches_batch_size_one(tiny):
    ids = [[1, 7, IMG, 8, 9], [1, 3, 4, 5, 6, 7, 8, 9, 10], [1, IMG, 5]]
    images = torch.randn(3, 3, 336, 336)
    with torch.no_grad():
        mm = tiny.prepare_multimodal(ids, images=images, padding_side="left")
        batched = tiny.model(inputs_embeds=mm.inputs_embeds, attention_mask=mm.attention_mask,
                             position_ids=mm.position_ids).last_hidden_state
        for b, r in enumerate(ids):
            single = tiny([r], images=images[b:b + 1]).hidden_states[0]
            n = single.shape[0]
            torch.testing.assert_close(batched[b, -n:], single, atol=1e-5, rtol=1e-4)


def test_forward_loss_is_mean_ce_over_supervised_tokens(tiny):
    ids = torch.tensor([[1, IMG, 5, 6, 7, 0], [1, 8, 9, 10, 11, 12]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]).bool()
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 5, 6, 7, IGNORE_INDEX], [IGNORE_INDEX] * 3 + [10, 11, 12]])
    with torch.no_grad():
        out = tiny(ids, mask, torch.randn(2, 3, 336, 336), labels)
    # naive: every (position, next-label) pair written out
    terms = []
    for b in range(2):
        lab = out.mm.labels[b]
        for t in range(lab.shape[0] - 1):
            if lab[t + 1] != IGNORE_INDEX:
                terms.append(-F.log_softmax(out.logits[b, t].float(), -1)[lab[t + 1]])
    assert len(terms) == 6
    torch.testing.assert_close(out.loss, torch.stack(terms).mean())


def _eager_layer0_attention(model: MobileVLM, mm) -> torch.Tensor:
    """Layer-0 attention probabilities from transformers' own eager path (test-only reference)."""
    model.model.config._attn_implementation = "eager"
    try:
        out = model.model(inputs_embeds=mm.inputs_embeds, attention_mask=mm.attention_mask,
                          position_ids=mm.position_ids, output_attentions=True)
    finally:
        model.model.config._attn_implementation = "alignkd_sdpa"
    return out.attentions[0]


def test_qk_capture_is_post_rope_layer0():
    tiny = MobileVLM.tiny(seed=4).eval()  # own model: the eager switch below must not leak into other tests
    tiny.enable_qk_capture()
    ids = torch.tensor([[1, 5, IMG, 6, 7, 8], [1, IMG, 9, 10, 0, 0]])
    mask = torch.tensor([[1] * 6, [1, 1, 1, 1, 0, 0]]).bool()
    with torch.no_grad():
        out = tiny(ids, mask, torch.randn(2, 3, 336, 336), compute_logits=False)
        probs = _eager_layer0_attention(tiny, out.mm)
    q, k = out.q0.float(), out.k0.float()
    B, H, L, D = q.shape
    assert (B, H, D) == (2, tiny.num_heads, tiny.hidden_size // tiny.num_heads)
    scores = q @ k.transpose(-1, -2) / D**0.5
    allowed = torch.ones(L, L).tril().bool()[None, None] & out.mm.attention_mask[:, None, None, :]
    mine = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    valid = out.mm.attention_mask  # padded query rows are meaningless in both
    torch.testing.assert_close(mine[0], probs[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(mine[1][:, valid[1]], probs[1][:, valid[1]], atol=1e-5, rtol=1e-4)


def test_qk_capture_under_activation_checkpointing_stores_once_and_backpropagates():
    model = MobileVLM.tiny(seed=2).train()
    model.enable_activation_checkpointing()
    cap = model.enable_qk_capture()
    stores = []
    original = cap.store

    def counting_store(q, k):
        if cap.armed and cap.q is None:
            stores.append(q.shape)
        original(q, k)

    cap.store = counting_store
    ids = [[1, 5, IMG, 6, 7, 8, 9]]
    out = model(ids, images=torch.randn(1, 3, 336, 336), compute_logits=False)
    assert out.q0.requires_grad and out.k0.requires_grad
    # a loss on layer-0 attention alone (text rows 146.., vision cols 2..145)
    p = (out.q0 @ out.k0.transpose(-1, -2) / out.q0.shape[-1] ** 0.5).softmax(-1)
    (p[:, :, 146:, 2:146] ** 2).sum().backward()
    assert len(stores) == 1  # the recompute in backward did not store again
    g = model.model.layers[0].self_attn.q_proj.weight.grad
    assert g is not None and g.abs().sum() > 0
    assert model.model.layers[0].self_attn.k_proj.weight.grad.abs().sum() > 0
    assert model.model.layers[1].self_attn.q_proj.weight.grad is None or \
        model.model.layers[1].self_attn.q_proj.weight.grad.abs().sum() == 0


def test_checkpointing_gives_the_same_gradients():
    ids = [[1, 5, IMG, 6, 7]]
    labels = [[IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 6, 7]]
    img = torch.randn(1, 3, 336, 336)
    grads = []
    for ckpt in (False, True):
        model = MobileVLM.tiny(seed=3).train()
        if ckpt:
            model.enable_activation_checkpointing()
        model(ids, images=img, labels=labels).loss.backward()
        grads.append(model.model.layers[0].mlp.up_proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("safetensors", [False, True])
def test_checkpoint_round_trip(tmp_path, tiny, safetensors):
    tiny.save_pretrained(tmp_path, safetensors=safetensors)
    name = "model.safetensors" if safetensors else "pytorch_model.bin"
    assert (tmp_path / name).exists()
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "mobilevlm" and cfg["mm_projector_type"] == "ldpnetv2"
    loaded = MobileVLM.from_pretrained(tmp_path)
    a, b = official_state_dict(tiny), official_state_dict(loaded)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ids, img = [[1, 5, IMG, 6]], torch.randn(1, 3, 336, 336)
    with torch.no_grad():
        assert torch.equal(tiny(ids, images=img).logits, loaded.eval()(ids, images=img).logits)


def test_sharded_checkpoint_with_index_and_ignored_buffers(tmp_path, tiny, monkeypatch):
    import model.checkpoint as ck

    monkeypatch.setattr(ck, "SHARD_BYTES", 200_000)
    tiny.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "pytorch_model.bin.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((tmp_path / s).exists() for s in shards)
    # some transformers versions saved non-persistent buffers: they must be ignored, not reported
    first = sorted(shards)[0]
    sd = torch.load(tmp_path / first)
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    torch.save(sd, tmp_path / first)
    loaded = MobileVLM.from_pretrained(tmp_path)
    assert torch.equal(loaded.lm_head.weight, tiny.lm_head.weight)


def test_missing_and_unexpected_keys_are_named(tmp_path, tiny):
    tiny.save_pretrained(tmp_path)
    sd = torch.load(tmp_path / "pytorch_model.bin")
    del sd["model.mm_projector.peg.peg.0.bias"]
    sd["model.mm_projector.extra.weight"] = torch.zeros(2)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(KeyError) as e:
        MobileVLM.from_pretrained(tmp_path)
    assert "model.mm_projector.peg.peg.0.bias" in str(e.value) and "model.mm_projector.extra.weight" in str(e.value)


def test_missing_folder_and_unknown_vision_tower(tmp_path, tiny):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        MobileVLM.from_pretrained(tmp_path / "nope")
    tiny.save_pretrained(tmp_path)
    shutil.rmtree(tmp_path / "vision_tower")  # a checkpoint without its own CLIP folder
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["mm_vision_config"]
    cfg["mm_vision_tower"] = "some/unknown-tower"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FileNotFoundError, match="--vision-tower"):
        MobileVLM.from_pretrained(tmp_path)


def test_official_clip_id_maps_to_builtin_config():
    from model.vision import resolve_vision_config

    cfg = resolve_vision_config("openai/clip-vit-large-patch14-336")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.image_size, cfg.patch_size, cfg.hidden_act) == \
        (1024, 24, 336, 14, "quick_gelu")


def test_student_from_llama_and_clip_folders(tmp_path):
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4))
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=2, image_size=336, patch_size=14))
    llm.save_pretrained(tmp_path / "llm")
    clip.save_pretrained(tmp_path / "clip")
    model = MobileVLM.from_llm(tmp_path / "llm", tmp_path / "clip")
    assert torch.equal(model.lm_head.weight, llm.lm_head.weight)
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, llm.model.layers[1].mlp.down_proj.weight)
    img = torch.randn(1, 3, 336, 336)
    with torch.no_grad():
        ref = clip(img, output_hidden_states=True).hidden_states[-2][:, 1:]
        torch.testing.assert_close(model.encode_images(img), ref)
        # text-only input runs the plain LLaMA path
        torch.testing.assert_close(model([[1, 5, 6]]).logits, llm(torch.tensor([[1, 5, 6]])).logits)
