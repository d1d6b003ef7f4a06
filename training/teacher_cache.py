"""Teacher cache (`train_alignkd.py --cache-teacher DIR`): what the Align-KD losses need from the teacher, stored once.

One pass runs the frozen teacher over the dataset and stores, per sample (keyed by dataset index), exactly the
tensors `AlignKDLoss` reads from the teacher's `KDSide`: of the fields that the registered terms name in
`Term.teacher` (`losses.teacher_fields()`, recorded in the manifest as "fields"), the positions the terms read.
Later runs (more epochs, ablations of weights/KL/topk/temperature) rebuild that `KDSide` from disk and never load
the teacher. Nothing is approximated: the tensors are
stored in the dtype the teacher produced them in (bf16 on CUDA, fp32 on CPU), so a run from the cache computes the
same losses as a live teacher, up to the summation order of differently composed teacher batches.

What is stored of each field (`STORED`), and why it is enough (H teacher width, Ht heads, Hkv key/value heads,
D head dim, n the sample's spliced length with the image as 144 tokens, right padding so positions do not depend on
the batch):
- logit KD: `hidden` [n_sup, H], the final normed hidden states at the supervised rows (rows i with
  labels[i + 1] != -100, the only rows `AlignKDLoss` reads: `teacher.hidden[:, :-1][rows]`), plus the teacher's
  lm_head weight [V, H] once per cache. Exact: the KD recomputes the full-vocabulary teacher softmax as a live
  teacher does. Full logits would be larger per row (vocabulary vs width); top-k logits would make the
  forward/reverse KL an approximation, so they are not offered.
- attention alignment + text focus: `q` [Ht, n_text, D], the layer-0 post-RoPE queries of the text rows (the text
  after the image, the only query rows of the pair set E), `k` [Hkv, 144, D], the keys of the vision positions (the
  only key columns of E), and `lse` [Ht, n_text] fp32, each text row's log-sum-exp over all its causal keys
  (`kernels.attention_row_lse`, computed at build time from every key). With the LSE the losses rebuild P_t on E
  exactly (`teacher_lse=`), so the other L - 144 keys need not be stored. Keys are stored before the GQA repeat and
  repeated on read. Samples without text after an image have no pairs and store none of the three.
- projection KD: `vision` [144, H], the teacher's projector outputs, for samples with an image.

A run refuses a cache that lacks a field some term with a nonzero weight reads (`check_fields`); terms at weight 0
whose fields it lacks are not computed (logged as 0). A manifest without "fields" is from before they followed the
registry and holds all six (`V2_FIELDS`). A new KDSide field is cached by one `STORED` entry.

On read, `TeacherCache.teacher_side` scatters these into a batch-shaped `KDSide`: hidden [B, L, H] with zeros off the
supervised rows, q0/k0 [B, Ht, L, D] with zeros off the text rows / vision positions and lse0 [B, Ht, L] with -inf off
the text rows (the loss reads only text query rows and vision key columns, and skips samples without pairs), vision
tokens [B, 144, H] (zeros for text-only samples, which the loss ignores); a field that no sample of the batch
stores, or that the cache does not hold, is None. Each sample's layout (length,
supervised-row count, image start, text-row count) is checked against the batch, so a cache that does not fit the
data fails loudly instead of training on garbage.

Size: `python bench/cache_size.py` prints the bytes per sample at MobileVLM V2-7B shapes (`sample_bytes`). The cache
trades disk for GPU memory and teacher compute: it replaces the teacher's weights on the GPU (and its forward) by the
lm_head and one micro-batch of these tensors, but on disk it outgrows the NF4 teacher after a few hundred to a few
thousand samples. Use it for ablations and repeated epochs on subsets, not for a full stage.

Layout of DIR:
    manifest.json          what the cache was made from (`make_manifest`); compared on open (`compare_manifests`)
    lm_head.safetensors    the teacher's lm_head weight (when "lm_head_weight" is a field)
    shards/NNNNNNNN.safetensors   samples [s * shard_size, (s + 1) * shard_size): tensors
                           "{index}/hidden|q|k|lse|vision",
                           metadata "samples" = JSON {index: {n, n_sup, vision_start, n_text} or {skip: reason}}
    index.json             written last: the cache is complete (counts, bytes)
Every file is written to a temporary name and renamed (atomic); a shard is written only when all its samples are
done, so an interrupted build resumes at the first missing shard. Reading is by dataset index (safetensors reads one
tensor without loading the shard), so the trainer's random order costs nothing.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, fields as dataclass_fields
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from data.constants import IGNORE_INDEX, NUM_IMAGE_TOKENS
from data.dataset import Collator
from data.workers import ignore_stop_signals, iterate as iterate_loader
from kernels import attention_row_lse
from losses import TERMS, KDSide, flag, teacher_fields

log = logging.getLogger("alignkd")

FORMAT = "alignkd-teacher-cache"
VERSION = 2  # 2: vision-column keys + text-row LSEs (1 stored every key)
V2_FIELDS = ("hidden", "lm_head_weight", "q0", "k0", "vision_tokens", "lse0")  # a manifest without "fields"
SHARED = "lm_head_weight"  # stored once per cache (lm_head.safetensors), not per sample
DEFAULT_SHARD_SIZE = 64
_WHOLE_FILE_LIMIT = 64 * 2**20  # weight files up to this size are hashed whole
_WINDOWS, _WINDOW = 1024, 4096  # larger ones: 1024 windows of 4 KiB spread evenly, first and last included


class CacheMismatch(Exception):
    """The cache in DIR was made from something else (teacher, tokenizer, data, settings) or is damaged."""


# ---- what a sample stores of each field ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    """One sample's place in the spliced, right-padded sequence, which positions its stored tensors."""

    n: int  # valid length
    vision_start: int  # first image position, -1 without an image
    n_text: int  # text rows after the image: the query rows of the pairs (text row, image key)
    rows: torch.Tensor | None = None  # supervised rows i (labels[i + 1] != -100); None where only `when` is asked

    @classmethod
    def of(cls, meta: dict[str, Any], rows: torch.Tensor | None = None) -> "Layout":
        return cls(meta["n"], meta["vision_start"], meta["n_text"], rows)

    def always(self) -> bool:
        return True

    def has_image(self) -> bool:
        return self.vision_start >= 0

    def has_text(self) -> bool:
        return self.n_text > 0

    def supervised(self) -> torch.Tensor:
        return self.rows

    def text_rows(self) -> slice:
        return slice(self.vision_start + NUM_IMAGE_TOKENS, self.n)

    def image_positions(self) -> slice:
        return slice(self.vision_start, self.vision_start + NUM_IMAGE_TOKENS)

    def whole(self) -> slice:
        return slice(None)


@dataclass(frozen=True)
class StoredField:
    """How a sample keeps one teacher field of `KDSide` (a batch's is [B, ...]): when `when`, the positions `at`
    along dimension `dim` of its own tensor, the only ones the losses read; a batch holds `fill` elsewhere."""

    key: str  # the tensor's name in a shard: "{index}/{key}"
    when: Callable[[Layout], bool]
    at: Callable[[Layout], torch.Tensor | slice]
    dim: int  # of one sample's tensor
    seq: bool = True  # `dim` is the sequence, of the batch's length; False: the sample keeps its whole tensor
    fill: float = 0.0
    kv_heads: bool = False  # keys: dim 0 stored before the GQA repeat, repeated to the query heads on read
    fp32: bool = False  # read in fp32 whatever the run's dtype (the LSEs)


STORED = {
    "hidden": StoredField("hidden", Layout.always, Layout.supervised, dim=0),  # [n_sup, H]
    "q0": StoredField("q", Layout.has_text, Layout.text_rows, dim=1),  # [Ht, n_text, D]
    "k0": StoredField("k", Layout.has_text, Layout.image_positions, dim=1, kv_heads=True),  # [Hkv, 144, D]
    "lse0": StoredField("lse", Layout.has_text, Layout.text_rows, dim=1, fill=float("-inf"), fp32=True),
    "vision_tokens": StoredField("vision", Layout.has_image, Layout.whole, dim=0, seq=False),  # [144, H]
}


def along(dim: int, at: torch.Tensor | slice) -> tuple:
    """The index that selects positions `at` of dimension `dim`."""
    return (slice(None),) * dim + (at,)


def cache_fields(manifest: dict[str, Any]) -> tuple[str, ...]:
    return tuple(manifest.get("fields", V2_FIELDS))


def lacking(fields: Collection[str]) -> dict[str, list[str]]:
    """The registered terms that read a teacher field not in `fields`, with those fields."""
    return {name: [f for f in t.teacher if f not in fields] for name, t in TERMS.items()
            if not set(t.teacher) <= set(fields)}


def check_fields(folder: str | Path, fields: Collection[str], weights: Mapping[str, float]) -> None:
    """Refuse a cache that lacks a teacher field which a term with a nonzero weight reads; the terms at weight 0
    that read such a field are not computed (`AlignKDLoss(skip=...)`)."""
    missing = lacking(fields)
    weighted = {name: m for name, m in missing.items() if weights[name] != 0.0}
    if weighted:
        what = "; ".join(f"{name} ({flag(name)} {weights[name]:g}) reads {', '.join(m)}"
                         for name, m in weighted.items())
        raise CacheMismatch(f"teacher cache {folder} holds the teacher's {', '.join(fields)}, but {what}. Build the "
                            f"cache anew in another --cache-teacher folder (it stores what the registered terms read), "
                            f"or give these terms weight 0")
    if missing:
        log.info(f"teacher cache {folder} lacks what {', '.join(missing)} read: at weight 0 they are not computed "
                 f"(logged as 0)")


# ---- sizes -----------------------------------------------------------------------------------------------------------

def sample_bytes(n: int, n_text: int, n_sup: int, has_image: bool, hidden: int = 4096, heads: int = 32,
                 kv_heads: int = 32, head_dim: int = 128, element_size: int = 2) -> int:
    """Tensor bytes one sample takes in a cache of the built-in terms' fields (`V2_FIELDS`; defaults: the bf16
    MobileVLM V2-7B teacher; LSEs are fp32)."""
    total = n_sup * hidden
    lse = 0
    if has_image:
        total += NUM_IMAGE_TOKENS * hidden
        if n_text:
            total += heads * n_text * head_dim + kv_heads * NUM_IMAGE_TOKENS * head_dim
            lse = heads * n_text * 4
    return total * element_size + lse


# ---- fingerprints and the manifest -----------------------------------------------------------------------------------

def file_fingerprint(path: Path) -> dict[str, Any]:
    """name, size and a sha256 of the content: whole for small files, else 1024 evenly spaced 4 KiB windows (every
    tensor larger than size/1024 bytes, ~14 MB for a 14 GB file, is sampled). Modification times are left out on
    purpose: copying a checkpoint changes them, not its content."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= _WHOLE_FILE_LIMIT:
            h.update(f.read())
        else:
            for w in range(_WINDOWS):
                f.seek((size - _WINDOW) * w // (_WINDOWS - 1))
                h.update(f.read(_WINDOW))
    return {"name": path.name, "size": size, "sha256_sampled": h.hexdigest()}


def teacher_fingerprint(folder: str | Path, quant: str, vision_tower: str | Path | None = None) -> dict[str, Any]:
    """The teacher's identity without loading it: config.json, weight-file fingerprints, quantization, and the CLIP
    config folder if one was passed (it can change the tower's config)."""
    from model.checkpoint import weight_files  # noqa: PLC0415 - keep this module light to import

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    vt = None
    if vision_tower is not None and (Path(vision_tower) / "config.json").is_file():
        vt = hashlib.sha256((Path(vision_tower) / "config.json").read_bytes()).hexdigest()
    return {"path": str(folder.resolve()), "config": config,
            "weights": [file_fingerprint(f) for f in weight_files(folder)], "quant": quant,
            "vision_tower_config": vt}


def teacher_shapes(config: dict[str, Any]) -> dict[str, int]:
    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    return {"hidden": hidden, "heads": heads, "kv_heads": int(config.get("num_key_value_heads") or heads),
            "head_dim": int(config.get("head_dim") or hidden // heads), "vocab": int(config["vocab_size"])}


def make_manifest(teacher: dict[str, Any] | None, tokenizer: str, json_path: str | Path, image_folder: str | Path,
                  template: str, image_mode: str, max_len: int, num_samples: int,
                  shard_size: int = DEFAULT_SHARD_SIZE, dtype: torch.dtype | None = None,
                  fields: Collection[str] | None = None) -> dict[str, Any]:
    """What a cache is made from. `teacher` is `teacher_fingerprint(...)` (None: not known, i.e. not checked);
    `tokenizer` is `data.tokenizer_fingerprint(...)` of the tokenizer that tokenizes the data; `fields` the teacher
    fields it stores (default: what the registered terms read)."""
    fields = tuple(teacher_fields() if fields is None else fields)
    unknown = sorted(set(fields) - set(STORED) - {SHARED})
    if unknown:
        raise ValueError(f"the teacher cache does not know how to store KDSide fields {unknown}: add them to "
                         f"STORED in training/teacher_cache.py")
    st = Path(json_path).stat()
    return {
        "format": FORMAT, "version": VERSION,
        "teacher": teacher,
        "shapes": teacher_shapes(teacher["config"]) if teacher else None,
        "tokenizer": tokenizer,
        "data": {"path": str(Path(json_path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns},
        "image_folder": str(Path(image_folder).resolve()),
        "template": template, "image_mode": image_mode, "max_len": int(max_len), "num_samples": int(num_samples),
        "shard_size": int(shard_size),
        "dtype": str(dtype).replace("torch.", "") if dtype is not None else None,
        "fields": list(fields),
    }


def _dict_diff(a: dict, b: dict, limit: int = 4) -> str:
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    shown = ", ".join(f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def compare_manifests(cached: dict[str, Any], expected: dict[str, Any], check_quant: bool = True) -> list[str]:
    """Human-readable differences, cache -> this run ([] when they match). A None teacher in `expected` means the
    run did not name one (the cache's teacher is used as is); `check_quant=False` accepts the cache's quantization
    (the run asked for --teacher-dtype auto)."""
    if cached.get("format") != FORMAT or cached.get("version") != VERSION:
        return [f"cache format {cached.get('format')!r} version {cached.get('version')!r} (this alignkd reads "
                f"{FORMAT!r} version {VERSION})"]
    out = []
    ct, et = cached.get("teacher") or {}, expected.get("teacher")
    if et is not None:
        if ct.get("config") != et["config"]:
            out.append(f"teacher config ({_dict_diff(ct.get('config') or {}, et['config'])})")
        cw = {w["name"]: w for w in ct.get("weights", [])}
        ew = {w["name"]: w for w in et["weights"]}
        if cw != ew:
            what = []
            for name in sorted(set(cw) | set(ew)):
                a, b = cw.get(name), ew.get(name)
                if a is None or b is None:
                    what.append(f"{name} {'only in this teacher' if a is None else 'only in the cached teacher'}")
                elif a["size"] != b["size"]:
                    what.append(f"{name} size {a['size']:,} -> {b['size']:,} B")
                elif a != b:
                    what.append(f"{name} content differs (same size)")
            out.append(f"teacher weights {ct.get('path')} -> {et['path']}: " + "; ".join(what))
        if ct.get("vision_tower_config") != et.get("vision_tower_config"):
            out.append("teacher vision tower config (--vision-tower)")
        if check_quant and ct.get("quant") != et.get("quant"):
            out.append(f"teacher quantization {ct.get('quant')} -> {et.get('quant')} (--teacher-dtype)")
    if cached.get("tokenizer") != expected["tokenizer"]:
        out.append(f"tokenizer (sha256 {str(cached.get('tokenizer'))[:12]}... -> {expected['tokenizer'][:12]}...)")
    cd, ed = cached.get("data") or {}, expected["data"]
    if cd != ed:
        parts = []
        if cd.get("path") != ed["path"]:
            parts.append(f"path {cd.get('path')} -> {ed['path']}")
        if cd.get("size") != ed["size"]:
            parts.append(f"size {cd.get('size')} -> {ed['size']} B")
        if cd.get("mtime_ns") != ed["mtime_ns"]:
            parts.append("modification time")
        out.append("data file (" + ", ".join(parts) + ")")
    for key, what in (("image_folder", "image folder"), ("template", "template"), ("image_mode", "image mode"),
                      ("max_len", "max_len"), ("num_samples", "number of samples")):
        if cached.get(key) != expected[key]:
            out.append(f"{what} {cached.get(key)!r} -> {expected[key]!r}")
    return out


# ---- dataset indices through the DataLoader --------------------------------------------------------------------------

class IndexedDataset(torch.utils.data.Dataset):
    """The dataset with each sample's (or skip sentinel's) dataset index under "index"."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**self.dataset[i], "index": int(i)}


class IndexedCollator(Collator):
    """`Collator` plus "index" (dataset indices of the batch rows, in order) and "skipped_index" ({index: reason})."""

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
        out = super().__call__(batch)
        out["index"] = [s["index"] for s in batch if "skip" not in s]
        out["skipped_index"] = {s["index"]: s["skip"] for s in batch if "skip" in s}
        return out


# ---- files -----------------------------------------------------------------------------------------------------------

def _atomic_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _save_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file  # noqa: PLC0415

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # safetensors creates 0600 files; make them like the rest of DIR
    with open(tmp, "rb") as f:  # on disk before the rename makes it visible
        os.fsync(f.fileno())
    os.replace(tmp, path)


def shard_path(folder: Path, shard: int) -> Path:
    return Path(folder) / "shards" / f"{shard:08d}.safetensors"


def write_shard(folder: Path, shard: int, records: dict[int, dict[str, Any]]) -> None:
    """Write one complete shard: records {index: {"meta": {...}, "tensors": {name: tensor}}}."""
    tensors = {f"{i}/{name}": t for i, r in records.items() for name, t in r.get("tensors", {}).items()}
    meta = {str(i): r["meta"] for i, r in sorted(records.items())}
    _save_safetensors(shard_path(folder, shard), tensors,
                      {"format": FORMAT, "version": str(VERSION), "samples": json.dumps(meta)})


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CacheMismatch(f"teacher cache {folder}: manifest.json is not valid JSON ({e})") from None


def missing_shards(folder: str | Path, manifest: dict[str, Any]) -> list[int]:
    n, size = manifest["num_samples"], manifest["shard_size"]
    return [s for s in range((n + size - 1) // size) if not shard_path(Path(folder), s).is_file()]


def check_cache(folder: str | Path, expected: dict[str, Any], check_quant: bool = True,
                weights: Mapping[str, float] | None = None) -> str:
    """"empty" (nothing there yet), "partial" (a matching build to resume) or "complete"; raises CacheMismatch when
    DIR holds a cache made from something else, or (given the run's term weights) lacks what a weighted term reads.
    A cache that holds more fields than the run's terms read serves."""
    folder = Path(folder)
    cached = read_manifest(folder)
    if cached is None:
        if folder.is_dir() and any(folder.iterdir()):
            raise CacheMismatch(f"{folder} is not empty and has no manifest.json: not a teacher cache (give an "
                                f"empty or new folder)")
        return "empty"
    diffs = compare_manifests(cached, expected, check_quant)
    if diffs:
        raise CacheMismatch(f"teacher cache {folder} was made with another " + "; another ".join(diffs) +
                            ". Use another --cache-teacher folder, or delete this one to rebuild it.")
    if weights is not None:
        check_fields(folder, cache_fields(cached), weights)
    lm_head_done = SHARED not in cache_fields(cached) or (folder / "lm_head.safetensors").is_file()
    if (folder / "index.json").is_file() and lm_head_done and not missing_shards(folder, cached):
        return "complete"
    return "partial"


# ---- building --------------------------------------------------------------------------------------------------------

def _sample_record(t, side: KDSide, b: int, kv_groups: int, fields: Collection[str]) -> dict[str, Any]:
    """The cached tensors of batch row b: of each of `fields` of the teacher's `side`, what `STORED` keeps. `t` is the
    MobileVLMOutput (made with labels) that gives the sample's layout."""
    mm = t.mm
    n = int(mm.attention_mask[b].sum())
    rows = (mm.labels[b, 1:] != IGNORE_INDEX).nonzero().flatten()
    vs = int(mm.vision_start[b])
    text = mm.text_mask[b].nonzero().flatten()
    layout = Layout(n, vs, int(text.numel()), rows)
    lo = vs + NUM_IMAGE_TOKENS  # the text rows are one run from the image's end to the sequence's
    if layout.has_text() and (int(text[0]), int(text[-1]), layout.n_text) != (lo, n - 1, n - lo):
        raise RuntimeError(f"unexpected text rows {int(text[0])}..{int(text[-1])} for image at {vs}, length {n}")
    tensors = {}
    for name in fields:
        stored = STORED.get(name)
        if stored is None or not stored.when(layout):  # the lm_head weight is stored once, not per sample
            continue
        x = getattr(side, name)[b]
        x = x[::kv_groups] if stored.kv_heads else x
        tensors[stored.key] = x[along(stored.dim, stored.at(layout))].detach().to("cpu").clone().contiguous()
    meta = {"n": n, "n_sup": int(rows.numel()), "vision_start": vs, "n_text": layout.n_text}
    return {"meta": meta, "tensors": tensors}


def _sync(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


@torch.no_grad()
def build_cache(folder: str | Path, teacher, dataset, manifest: dict[str, Any], batch_size: int,
                num_workers: int = 0, pad_id: int = 0, rank: int = 0, world: int = 1) -> None:
    """Run the teacher (a MobileVLM with q/k capture) over every sample whose shard is missing and write the shards;
    then index.json. Resumable: finished shards are kept. Uses its own RNG for the loader (the caller's global RNG
    state is not consumed). Under torchrun every rank calls it: rank r builds the missing shards r, r + N, ...
    (a shard's content does not depend on who builds it), rank 0 sets DIR up first and writes index.json last, and
    it returns on every rank once the cache is complete."""
    if rank:
        _sync(world)  # rank 0 sets DIR up alone first (below)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cached = read_manifest(folder)
    if cached is None:  # first: a folder with anything in it but no manifest is refused by check_cache
        _atomic_json(folder / "manifest.json", manifest)
        cached = manifest
    (folder / "shards").mkdir(exist_ok=True)
    for stale in list(folder.glob(".*.tmp-*")) + list((folder / "shards").glob(".*.tmp-*")):
        stale.unlink()  # a write interrupted between save and rename
    device = teacher.device
    fields = cache_fields(cached)
    if SHARED in fields and not (folder / "lm_head.safetensors").is_file():
        _save_safetensors(folder / "lm_head.safetensors",
                          {"weight": teacher.lm_head.weight.detach().to("cpu").clone().contiguous()},
                          {"format": FORMAT, "version": str(VERSION)})
    if not rank:
        _sync(world)
    _sync(world)  # every rank has removed its leftovers above: from here on none removes another's files
    n, size = cached["num_samples"], cached["shard_size"]
    todo = [s for s in missing_shards(folder, cached) if s % world == rank]  # this rank's shards
    indices = [i for s in todo for i in range(s * size, min((s + 1) * size, n))]
    want = {s: min((s + 1) * size, n) - s * size for s in todo}
    kv_groups = teacher.num_heads // cached["shapes"]["kv_heads"]
    if indices:
        log.info(f"teacher cache {folder}: {len(indices):,} of {n:,} samples to compute ({len(todo)} shards"
                 + (f" of rank {rank}; each of {world} ranks builds its own)" if world > 1 else ")"))
        loader = torch.utils.data.DataLoader(IndexedDataset(dataset), batch_size=batch_size, sampler=indices,
                                             collate_fn=IndexedCollator(pad_id), num_workers=num_workers,
                                             generator=torch.Generator().manual_seed(0),
                                             worker_init_fn=ignore_stop_signals)  # see data/workers.py
        pending: dict[int, dict[int, dict]] = {}
        dtype = teacher.lm_head.weight.dtype
        with tqdm(total=len(indices), desc="teacher cache", dynamic_ncols=True, disable=rank > 0) as pbar, \
                contextlib.closing(iterate_loader(loader)) as batches:  # closed: its workers end with it
            for batch in batches:
                for i, reason in batch["skipped_index"].items():
                    pending.setdefault(i // size, {})[i] = {"meta": {"skip": reason}}
                if "input_ids" in batch:
                    has_image = batch["has_image"].to(device)
                    images = batch["images"].to(device, dtype)
                    feats = teacher.encode_images(images[has_image]) if bool(has_image.any()) else None
                    t = teacher(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                labels=batch["labels"].to(device), image_features=feats, compute_logits=False)
                    lse = attention_row_lse(t.q0, t.k0, t.mm.text_mask, t.mm.attention_mask) \
                        if "lse0" in fields else None
                    side = KDSide(t.hidden_states, teacher.lm_head.weight, t.q0, t.k0, t.mm.vision_tokens, lse)
                    for b, i in enumerate(batch["index"]):
                        pending.setdefault(i // size, {})[i] = _sample_record(t, side, b, kv_groups, fields)
                    del t, lse, side
                for s in [s for s, recs in pending.items() if len(recs) == want[s]]:
                    write_shard(folder, s, pending.pop(s))
                pbar.update(len(batch["index"]) + len(batch["skipped_index"]))
        if pending:
            raise RuntimeError(f"teacher cache build ended with unfinished shards {sorted(pending)}")
    _sync(world)  # every shard is written
    if not rank:
        _write_index(folder, cached)
    _sync(world)


def _write_index(folder: Path, manifest: dict[str, Any]) -> None:
    from safetensors import safe_open  # noqa: PLC0415

    n_shards = (manifest["num_samples"] + manifest["shard_size"] - 1) // manifest["shard_size"]
    skipped, cached, shard_bytes = Counter(), 0, 0
    for s in range(n_shards):
        path = shard_path(folder, s)
        shard_bytes += path.stat().st_size
        with safe_open(str(path), framework="pt") as f:
            for meta in json.loads(f.metadata()["samples"]).values():
                if "skip" in meta:
                    skipped[meta["skip"]] += 1
                else:
                    cached += 1
    lm_head = folder / "lm_head.safetensors"
    lm_bytes = lm_head.stat().st_size if lm_head.is_file() else 0
    _atomic_json(folder / "index.json", {
        "format": FORMAT, "version": VERSION, "num_samples": manifest["num_samples"], "num_shards": n_shards,
        "shard_size": manifest["shard_size"], "cached": cached, "skipped": dict(skipped),
        "shard_bytes": shard_bytes, "lm_head_bytes": lm_bytes,
        "bytes_per_cached_sample": shard_bytes / max(cached, 1)})


# ---- reading ---------------------------------------------------------------------------------------------------------

class TeacherCache:
    """A complete cache, read by dataset index. `teacher_side` gives the `KDSide` a live teacher would give."""

    MAX_OPEN = 16  # open shard handles kept (safetensors reads one tensor at a time, memory-mapped)

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        if self.manifest is None or not (self.folder / "index.json").is_file():
            raise CacheMismatch(f"teacher cache {self.folder} is not complete (no manifest.json or index.json)")
        self.index = json.loads((self.folder / "index.json").read_text())
        shapes = self.manifest["shapes"]
        self.hidden_size, self.num_heads, self.kv_heads = shapes["hidden"], shapes["heads"], shapes["kv_heads"]
        self.shard_size = self.manifest["shard_size"]
        self.fields = cache_fields(self.manifest)
        self._handles: dict[int, tuple[Any, dict]] = {}
        self._lm_head: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.manifest["num_samples"]

    def describe(self) -> str:
        ix = self.index
        return (f"{ix['cached']:,} samples ({sum(ix['skipped'].values()):,} skipped), "
                f"{ix['shard_bytes'] / 2**20:,.1f} MiB + lm_head {ix['lm_head_bytes'] / 2**20:,.1f} MiB, "
                f"{ix['bytes_per_cached_sample'] / 2**10:,.1f} KiB/sample, teacher {self.manifest['teacher']['path']}"
                f" ({self.manifest['teacher']['quant']}, {self.manifest['dtype']}), fields {', '.join(self.fields)}")

    def terms_without_fields(self) -> tuple[str, ...]:
        """The registered terms that read a teacher field this cache does not hold (at weight 0: not computed)."""
        return tuple(lacking(self.fields))

    def _shard(self, s: int):
        from safetensors import safe_open  # noqa: PLC0415

        if s not in self._handles:
            path = shard_path(self.folder, s)
            if not path.is_file():
                raise CacheMismatch(f"teacher cache {self.folder}: shard {path.name} is missing")
            if len(self._handles) >= self.MAX_OPEN:
                self._handles.pop(next(iter(self._handles)))
            f = safe_open(str(path), framework="pt")
            self._handles[s] = (f, json.loads(f.metadata()["samples"]))
        return self._handles[s]

    def sample(self, i: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """(meta, tensors on CPU) of dataset index i."""
        f, metas = self._shard(i // self.shard_size)
        meta = metas.get(str(i))
        if meta is None:
            raise CacheMismatch(f"teacher cache {self.folder} has no entry for sample {i}")
        if "skip" in meta:
            raise CacheMismatch(f"sample {i} was skipped ({meta['skip']}) when the teacher cache was built but is "
                                f"in this batch: the data differ from the cache's")
        layout = Layout.of(meta)
        keys = [STORED[name].key for name in self.fields if name in STORED and STORED[name].when(layout)]
        return meta, {k: f.get_tensor(f"{i}/{k}") for k in keys}

    def lm_head(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        if self._lm_head is None or self._lm_head.device != torch.device(device) or self._lm_head.dtype != dtype:
            from safetensors.torch import load_file  # noqa: PLC0415

            self._lm_head = load_file(str(self.folder / "lm_head.safetensors"))["weight"].to(device, dtype)
        return self._lm_head

    def teacher_side(self, indices: list[int], batch, device: torch.device, dtype: torch.dtype):
        """The teacher's `KDSide` for the batch rows `indices` (dataset indices), laid out like `batch` (a KDBatch
        of the spliced, right-padded sequence)."""
        B, L = batch.labels.shape
        if len(indices) != B:
            raise ValueError(f"{len(indices)} indices for a batch of {B}")
        samples = [self.sample(int(i)) for i in indices]
        sup = batch.labels[:, 1:] != IGNORE_INDEX
        n_valid = batch.attention_mask.sum(1).tolist()
        n_text = batch.text_mask.sum(1).tolist()
        starts = batch.vision_start.tolist()
        layouts = []
        for b, (i, (meta, _)) in enumerate(zip(indices, samples)):
            rows = sup[b].nonzero().flatten()
            layout = (n_valid[b], int(rows.numel()), starts[b], n_text[b])
            if layout != (meta["n"], meta["n_sup"], meta["vision_start"], meta["n_text"]):
                cached = (meta["n"], meta["n_sup"], meta["vision_start"], meta["n_text"])
                raise CacheMismatch(f"sample {i}: this batch has (length, supervised rows, image start, text rows) "
                                    f"{layout}, the teacher cache {self.folder} has {cached}")
            layouts.append(Layout.of(meta, rows))
        side = {f.name: None for f in dataclass_fields(KDSide)}  # None: a field this cache does not hold
        for name in self.fields:
            if name in STORED:
                side[name] = self._batch_field(STORED[name], layouts, [t for _, t in samples], L, device, dtype)
        if SHARED in self.fields:
            side[SHARED] = self.lm_head(device, dtype)
        return KDSide(**side)

    def _batch_field(self, stored: StoredField, layouts: list[Layout], tensors: list[dict[str, torch.Tensor]],
                     length: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
        """One field of the batch: each sample's stored positions, `stored.fill` elsewhere (None: no sample of the
        batch stores it, e.g. no text after an image)."""
        kept = [(b, t[stored.key]) for b, t in enumerate(tensors) if stored.key in t]
        if not kept:
            return None
        shape = list(kept[0][1].shape)
        if stored.kv_heads:
            shape[0] = self.num_heads
        if stored.seq:
            shape[stored.dim] = length
        out = torch.full((len(layouts), *shape), stored.fill, device=device,
                         dtype=torch.float32 if stored.fp32 else dtype)
        for b, x in kept:
            x = x.to(device, out.dtype)
            if stored.kv_heads:
                x = x.repeat_interleave(self.num_heads // self.kv_heads, dim=0)
            out[b][along(stored.dim, stored.at(layouts[b]))] = x
        return out


__all__ = ["CacheMismatch", "DEFAULT_SHARD_SIZE", "IndexedCollator", "IndexedDataset", "STORED", "StoredField",
           "TeacherCache", "build_cache", "check_cache", "check_fields", "compare_manifests", "file_fingerprint",
           "make_manifest", "sample_bytes", "teacher_fingerprint", "write_shard"]
