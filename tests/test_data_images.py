"""Image preprocessing against HF's CLIPImageProcessor (built in code with clip-vit-large-patch14-336's settings)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from data import expand2square, process_image
from data.images import CLIP_MEAN, CLIP_STD, PAD_FILL


@pytest.fixture(scope="module")
def clip_processor():
    import transformers

    transformers.logging.set_verbosity_error()  # the "no torchvision, using the PIL backend" notice
    return transformers.CLIPImageProcessor(
        do_resize=True, size={"shortest_edge": 336}, resample=3, do_center_crop=True,
        crop_size={"height": 336, "width": 336}, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), do_convert_rgb=True)


def _image(w, h, mode, seed=0):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    arr[: h // 3] = (200, 30, 90)  # some structure, not only noise
    return Image.fromarray(arr, "RGB").convert(mode)


IMAGES = [(517, 301, "RGB"), (301, 517, "RGB"), (999, 337, "RGB"), (40, 63, "RGB"), (336, 336, "RGB"),
          (255, 180, "L"), (123, 77, "P"), (210, 211, "CMYK"), (97, 150, "RGBA")]


@pytest.mark.parametrize("mode", ["square", "pad"])
@pytest.mark.parametrize("w,h,img_mode", IMAGES)
def test_matches_clip_image_processor(clip_processor, w, h, img_mode, mode):
    img = _image(w, h, img_mode, seed=w * h)
    ours = process_image(img, mode)
    assert ours.shape == (3, 336, 336) and ours.dtype == torch.float32
    # MobileVLM converts to RGB with a plain convert("RGB") before padding (transformers 4.33 did the same inside
    # the processor; transformers 5 composites alpha onto white, so give it the RGB image)
    rgb = img.convert("RGB")
    ref_input = expand2square(rgb) if mode == "pad" else rgb
    ref = clip_processor(ref_input, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(ours, ref, atol=0, rtol=0)  # bit for bit


def test_pad_mode_differs_from_square_on_non_square_images():
    img = _image(400, 200, "RGB")
    assert not torch.allclose(process_image(img, "pad"), process_image(img, "square"))
    sq = _image(300, 300, "RGB")
    torch.testing.assert_close(process_image(sq, "pad"), process_image(sq, "square"))


def test_expand2square_centres_the_image():
    assert PAD_FILL == (122, 116, 104)
    wide = Image.new("RGB", (10, 4), (255, 0, 0))
    out = np.asarray(expand2square(wide))
    assert out.shape == (10, 10, 3)
    assert (out[3:7] == (255, 0, 0)).all()  # pasted at (0, (10 - 4) // 2)
    assert (out[:3] == PAD_FILL).all() and (out[7:] == PAD_FILL).all()
    tall = Image.new("RGB", (3, 8), (0, 255, 0))
    out = np.asarray(expand2square(tall))
    assert out.shape == (8, 8, 3)
    assert (out[:, 2:5] == (0, 255, 0)).all()  # pasted at ((8 - 3) // 2, 0)
    assert (out[:, :2] == PAD_FILL).all() and (out[:, 5:] == PAD_FILL).all()
    square = Image.new("RGB", (5, 5))
    assert expand2square(square) is square


def test_pad_fill_is_normalised_to_about_zero():
    # the padding colour is the CLIP mean, so padded borders come out near 0 after normalisation
    out = process_image(Image.new("RGB", (336, 100), (255, 255, 255)), "pad")
    assert out[:, :50].abs().max() < 0.02  # int() truncated the mean to 122, 116, 104
    assert out[:, 168].min() > 1.5  # the white band in the middle


def test_unknown_mode():
    with pytest.raises(ValueError, match="unknown image mode"):
        process_image(Image.new("RGB", (5, 5)), "crop")
