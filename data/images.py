"""Image preprocessing of MobileVLM V2: optional pad-to-square, then what HF's
`CLIPImageProcessor` does for clip-vit-large-patch14-336, in PIL + numpy so no processor config is needed."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .constants import CLIP_MEAN, CLIP_STD, IMAGE_SIZE

PAD_FILL = tuple(int(x * 255) for x in CLIP_MEAN)  # (122, 116, 104)
IMAGE_MODES = ("pad", "square")


def expand2square(img: Image.Image, fill: tuple[int, ...] = PAD_FILL) -> Image.Image:
    """Centre `img` on a max(w, h) square canvas of colour `fill` (a square image is returned unchanged)."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new(img.mode, (side, side), fill)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


def process_image(img: Image.Image, mode: str = "pad") -> torch.Tensor:
    """FloatTensor [3, 336, 336]. `pad`: expand2square first (stage-2 training, most evals); `square`: resize and
    centre crop only (stage-1 pretraining, ScienceQA)."""
    if mode not in IMAGE_MODES:
        raise ValueError(f"unknown image mode {mode!r}; choose one of {IMAGE_MODES}")
    # transformers 4.33 (MobileVLM's) converted with a plain convert("RGB"), dropping alpha; transformers 5 would
    # composite transparency onto white instead
    if img.mode != "RGB":
        img = img.convert("RGB")
    if mode == "pad":
        img = expand2square(img)
    w, h = img.size
    short, long = min(w, h), max(w, h)
    new_long = int(IMAGE_SIZE * long / short)  # HF truncates the long side
    img = img.resize((IMAGE_SIZE, new_long) if w <= h else (new_long, IMAGE_SIZE), resample=Image.BICUBIC)
    arr = np.asarray(img)
    top, left = (arr.shape[0] - IMAGE_SIZE) // 2, (arr.shape[1] - IMAGE_SIZE) // 2
    arr = arr[top:top + IMAGE_SIZE, left:left + IMAGE_SIZE]
    # HF's order of operations and dtypes: rescale in float64, cast to float32, normalize in float32
    arr = (arr.astype(np.float64) * (1 / 255)).astype(np.float32)
    arr = (arr - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
