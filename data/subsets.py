"""Training subsets by name, in MobileVLM's data layout."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Subset:
    json: str  # relative to the data root
    image_folder: str  # relative to the data root; the records' image paths are relative to it
    template: str
    image_mode: str
    about: str  # what the JSON is, for error messages


SUBSETS = {
    "sharegpt4v": Subset("pretrain_data/share-captioner_coco_lcs_sam_1246k_1107.json", "pretrain_data", "plain",
                         "square", "ShareGPT4V-PT captions (stage-1 pretraining, 1.246M image-caption pairs)"),
    "mix2m": Subset("finetune_data/MobileVLM_V2_FT_Mix2M.json", "finetune_data", "v1", "pad",
                    "MobileVLM V2 multi-task fine-tuning mix (HF dataset mtgv/MobileVLM_V2_FT_Mix2M)"),
    "demo": Subset("synthetic_mixed.json", ".", "v1", "pad",
                   "synthetic shapes made by data.make_synthetic_dataset(DIR, n, seed, 'mixed'); DIR is the root"),
}


def resolve_subset(name: str, data_root: str | Path | None = None, data: str | Path | None = None,
                   image_folder: str | Path | None = None) -> tuple[Path, Path, str, str]:
    """(json_path, image_folder, template, image_mode) of subset `name`; `data` and `image_folder` override the
    subset's paths (their template and image mode stay the subset's). Both paths must exist."""
    if name not in SUBSETS:
        raise ValueError(f"unknown subset {name!r}; choose one of {sorted(SUBSETS)}")
    sub = SUBSETS[name]
    root = Path(data_root) if data_root is not None else None
    if root is not None and not root.is_dir():
        raise FileNotFoundError(f"data root not found: {root}; it should hold {sub.json} ({sub.about})")
    if (data is None or image_folder is None) and root is None:
        raise ValueError(f"subset {name!r} needs --data-root DIR (holding {sub.json}, with images under "
                         f"{sub.image_folder}/), or both --data FILE and --image-folder DIR")
    json_path = Path(data) if data is not None else root / sub.json
    folder = Path(image_folder) if image_folder is not None else root / sub.image_folder
    for there, missing in ((json_path.is_file(), f"{name} JSON not found: {json_path}; expected {sub.about} at "
                                                 f"DATA_ROOT/{sub.json}"),
                           (folder.is_dir(), f"{name} image folder not found: {folder}; expected the images that "
                                             f"the records' 'image' paths point into, at DATA_ROOT/{sub.image_folder}/")):
        if not there:
            raise FileNotFoundError(missing)
    return json_path, folder, sub.template, sub.image_mode
