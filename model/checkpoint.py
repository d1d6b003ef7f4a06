"""Load and save the official MobileVLM V2 checkpoint layout (mtgv/MobileVLM_V2-1.7B and -7B).

Accepted weight files: pytorch_model.bin, sharded pytorch_model-*.bin with pytorch_model.bin.index.json,
model.safetensors, or sharded safetensors with model.safetensors.index.json. Keys use the official names; newer
transformers dropped the `vision_model.` level inside CLIPVisionModel, which is bridged here in both directions.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterator

import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from .config import MobileVLMConfig
from .vision import CHECKPOINT_CLIP_FOLDER, is_official_clip

VISION_PREFIX = "model.vision_tower.vision_tower."
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "embeddings.position_ids")  # non-persistent buffers some versions saved
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
SHARD_BYTES = 10 * 1024**3


def weight_files(folder: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [s for s in shards if not (folder / s).exists()]
            if missing:
                raise FileNotFoundError(f"{index} lists shards that are not in {folder}: {missing}")
            return [folder / s for s in shards]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).exists():
            return [folder / name]
    raise FileNotFoundError(
        f"no weights in {folder}: expected pytorch_model.bin, model.safetensors, or a sharded index "
        "(pytorch_model.bin.index.json / model.safetensors.index.json), as in mtgv/MobileVLM_V2-*")


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for f in files:
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(f), framework="pt") as sf:
                for k in sf.keys():
                    yield k, sf.get_tensor(k)
        else:
            yield from torch.load(f, map_location="cpu", weights_only=True, mmap=True).items()


def clip_nested(model: nn.Module) -> bool:
    return hasattr(model.model.vision_tower.vision_tower, "vision_model")


def to_official(key: str, nested: bool) -> str:
    if key.startswith(VISION_PREFIX) and not nested:
        return VISION_PREFIX + "vision_model." + key[len(VISION_PREFIX):]
    return key


def from_official(key: str, nested: bool) -> str:
    if key.startswith(VISION_PREFIX + "vision_model.") and not nested:
        return VISION_PREFIX + key[len(VISION_PREFIX + "vision_model."):]
    return key


def check_keys(expected: set[str], found: set[str], folder: Path) -> None:
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        def show(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f" ... (+{len(keys) - 8} more)" if len(keys) > 8 else "")
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s): {show(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s): {show(unexpected)}")
        raise KeyError(f"checkpoint {folder} does not match the MobileVLM V2 layout: " + "; ".join(parts))


def restore_buffers(model: nn.Module, device: torch.device | str) -> None:
    """Non-persistent buffers are not in checkpoints: rebuild those that were created on the meta device."""
    with torch.device(device):
        model.model.rotary_emb = LlamaRotaryEmbedding(model.model.config)
    for module in model.modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf.is_meta:
                if name == "position_ids":
                    module.register_buffer(name, torch.arange(buf.shape[-1], device=device).expand(buf.shape),
                                           persistent=False)
                else:
                    raise RuntimeError(f"cannot rebuild buffer {name} of {type(module).__name__}")


def _assign(model: nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype | None,
            device: str | torch.device) -> nn.Module:
    """Put checked tensors into a meta-built model, rebuild its non-persistent buffers, move it, freeze CLIP."""
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    restore_buffers(model, "cpu")
    model.to(device)
    model.model.vision_tower.requires_grad_(False)
    return model


def load_mobilevlm(cls, path: str | Path, vision_tower: str | Path | None = None,
                   dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
    """Build a MobileVLM from an official checkpoint folder without materializing random weights first."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} does not exist (expected a MobileVLM V2 checkpoint folder "
                                "with config.json and pytorch_model*.bin or model*.safetensors)")
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder} has no config.json: not a MobileVLM checkpoint folder")
    config = MobileVLMConfig.from_file(folder / "config.json")
    with torch.device("meta"):
        model = cls(config, vision_tower=vision_tower)
    nested = clip_nested(model)
    expected = set(model.state_dict().keys())
    state = {}
    for key, tensor in iter_tensors(weight_files(folder)):
        if key.endswith(IGNORED_SUFFIXES):
            continue
        state[from_official(key, nested)] = tensor
    check_keys(expected, set(state), folder)
    return _assign(model, state, dtype, device)


def official_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None
                        ) -> dict[str, torch.Tensor]:
    """The model's state dict (or `state_dict`, keyed like it) under the official MobileVLM names."""
    nested = clip_nested(model)
    own = state_dict if state_dict is not None else model.state_dict()
    return {to_official(k, nested): v for k, v in own.items()}


def save_mobilevlm(model: nn.Module, path: str | Path, safetensors: bool = False,
                   tokenizer_dir: str | Path | None = None, state_dict: dict[str, torch.Tensor] | None = None,
                   final_path: str | Path | None = None) -> None:
    """Write config.json + weights in the official layout (pytorch_model.bin by default, sharded above 10 GB).
    `state_dict` replaces the model's own (e.g. LoRA weights merged on the fly).

    As the original code loads a checkpoint: a CLIP other than clip-vit-large-patch14-336 is also written as a
    CLIPVisionModel folder `vision_tower/` (config, weights, image processor config), and config.json's
    mm_vision_tower is that folder's absolute path (`final_path`: where `path` will be renamed to, if it will); a
    tokenizer.model copied from `tokenizer_dir` gets a tokenizer_config.json and special_tokens_map.json (slow
    legacy LlamaTokenizer, pad = <unk>) unless that folder has its own."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    config = dict(model.config.to_dict())
    dtype = model.lm_head.weight.dtype
    config["torch_dtype"] = str(dtype).replace("torch.", "")
    own_clip = not is_official_clip(config.get("mm_vision_tower"))
    if own_clip:  # the original resolves a relative path against its working directory: write an absolute one
        config["mm_vision_tower"] = str(Path(final_path or folder).resolve() / CHECKPOINT_CLIP_FOLDER)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    state = {k: v.detach().contiguous().cpu() for k, v in official_state_dict(model, state_dict).items()}
    shards, current, size = [], {}, 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[k] = v
        size += nbytes
    shards.append(current)
    base, ext = ("model", "safetensors") if safetensors else ("pytorch_model", "bin")
    names = [f"{base}.{ext}"] if len(shards) == 1 else [
        f"{base}-{i + 1:05d}-of-{len(shards):05d}.{ext}" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        tmp = folder / (name + ".tmp")
        if safetensors:
            from safetensors.torch import save_file

            save_file(shard, str(tmp), metadata={"format": "pt"})
        else:
            torch.save(shard, tmp)
        os.replace(tmp, folder / name)
    if len(shards) > 1:
        weight_map = {k: n for n, shard in zip(names, shards) for k in shard}
        total = sum(v.numel() * v.element_size() for v in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / f"{base}.{ext}.index.json").write_text(json.dumps(index, indent=2) + "\n")
    if own_clip:
        vision = {k[len(VISION_PREFIX):]: v for k, v in state.items() if k.startswith(VISION_PREFIX)}
        save_clip_folder(folder / CHECKPOINT_CLIP_FOLDER, model.model.vision_tower.vision_tower.config, vision)
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            src = Path(tokenizer_dir) / name
            if src.exists() and src.resolve() != (folder / name).resolve():
                shutil.copyfile(src, folder / name)
        if (Path(tokenizer_dir) / "tokenizer.model").exists():
            max_len = int(config.get("max_sequence_length") or config.get("max_position_embeddings") or 2048)
            for name, content in (("tokenizer_config.json", llama_tokenizer_config(max_len)),
                                  ("special_tokens_map.json", SPECIAL_TOKENS_MAP)):
                if not (Path(tokenizer_dir) / name).exists():
                    (folder / name).write_text(json.dumps(content, indent=2) + "\n")


# what the slow LlamaTokenizer of transformers 4.33 (MobileVLM's) needs beside tokenizer.model; "legacy": true is
# the behaviour MobileVLM trained with and data/tokenizer.py implements (the text after "</s>" gets its own "▁")
SPECIAL_TOKENS_MAP = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}


def llama_tokenizer_config(model_max_length: int) -> dict:
    return {"tokenizer_class": "LlamaTokenizer", **SPECIAL_TOKENS_MAP, "add_bos_token": True, "add_eos_token": False,
            "legacy": True, "clean_up_tokenization_spaces": False, "model_max_length": model_max_length,
            "padding_side": "right", "sp_model_kwargs": {}}


def save_clip_folder(folder: Path, config, vision_state: dict[str, torch.Tensor]) -> None:
    """A CLIPVisionModel folder as transformers writes one: config.json, model.safetensors (keys `vision_model.*`,
    the layout of the openai CLIP folders, which transformers 4.x and 5.x both load) and the CLIPImageProcessor
    config that data/images.py implements."""
    from safetensors.torch import save_file

    from .constants import CLIP_MEAN, CLIP_STD

    if not vision_state:
        raise ValueError("no vision tower weights to write")
    folder.mkdir(parents=True, exist_ok=True)
    fields = {k: v for k, v in config.to_diff_dict().items() if k not in ("transformers_version", "dtype",
                                                                          "torch_dtype", "architectures")}
    fields.update(architectures=["CLIPVisionModel"], model_type="clip_vision_model")
    (folder / "config.json").write_text(json.dumps(fields, indent=2, sort_keys=True) + "\n")
    size = int(config.image_size)
    processor = {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": size},
                 "resample": 3, "do_center_crop": True, "crop_size": {"height": size, "width": size},
                 "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(CLIP_MEAN),
                 "image_std": list(CLIP_STD), "do_convert_rgb": True}
    (folder / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
    tmp = folder / "model.safetensors.tmp"
    save_file({k: v.contiguous() for k, v in vision_state.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, folder / "model.safetensors")


_CLIP_TOP = ("embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm.")


def _clip_key(key: str) -> str | None:
    """A key of a CLIP folder (CLIPModel or CLIPVisionModel, any transformers version) in the official layout."""
    if key.startswith("vision_model."):
        return VISION_PREFIX + key
    if key.startswith(_CLIP_TOP):
        return VISION_PREFIX + "vision_model." + key
    return None  # text tower, projections, logit_scale: not used


def init_from_llm(cls, llm_path: str | Path, vision_tower: str | Path, dtype: torch.dtype | None = None,
                  device: str | torch.device = "cpu", seed: int = 0):
    """The paper's stage-1 start: a LLaMA language model folder (e.g. MobileLLaMA-1.4B-Chat), a CLIP folder with
    weights (clip-vit-large-patch14-336), and a freshly initialized LDPv2 projector."""
    from .projector import LDPNetV2Projector

    llm, clip = Path(llm_path), Path(vision_tower)
    for folder, what in ((llm, "LLaMA language model"), (clip, "CLIP vision tower")):
        if not (folder / "config.json").exists():
            raise FileNotFoundError(f"{what} folder {folder} has no config.json")
    llm_cfg = json.loads((llm / "config.json").read_text())
    fields = {k: v for k, v in llm_cfg.items() if not k.startswith("_") and k not in ("architectures", "model_type")}
    config = MobileVLMConfig(**fields, mm_vision_tower=str(clip))
    config.fields["mm_hidden_size"] = config.vision_config().hidden_size
    with torch.device("meta"):
        model = cls(config)
    nested = clip_nested(model)
    state = {}
    for key, tensor in iter_tensors(weight_files(llm)):
        if not key.endswith(IGNORED_SUFFIXES):
            state[key] = tensor
    for key, tensor in iter_tensors(weight_files(clip)):
        official = _clip_key(key)
        if official is not None and not key.endswith(IGNORED_SUFFIXES):
            state[from_official(official, nested)] = tensor
    torch.manual_seed(seed)
    projector = LDPNetV2Projector(config.mm_hidden_size, config.hidden_size)
    state.update({"model.mm_projector." + k: v for k, v in projector.state_dict().items()})
    check_keys(set(model.state_dict().keys()), set(state), llm)
    return _assign(model, state, dtype, device)
