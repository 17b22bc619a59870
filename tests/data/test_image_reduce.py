"""Images decoded only as large as the processor needs (`load_image(path, side)`), the processor's input side, and the
decode plan a server budgets from the header (`plan_decode`)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from transformers import CLIPImageProcessor

from exgra_med.data.images import (
    REDUCING_GAP,
    load_image,
    plan_decode,
    processor_input_side,
    reduction_factor,
)


def _noisy_gradient(width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width]
    pixels = np.stack([xx * 255 / width, yy * 255 / height, (xx + yy) % 256], -1)
    pixels = pixels + rng.normal(0, 20, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _clip(side: int) -> CLIPImageProcessor:
    return CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})


def test_processor_input_side():
    assert processor_input_side(_clip(336)) == 336  # transformers' SizeDict
    assert processor_input_side(CLIPImageProcessor(size={"height": 384, "width": 384}, crop_size=None,
                                                   do_center_crop=False)) == 384
    assert processor_input_side(CLIPImageProcessor(do_resize=False)) is None  # full size to the model: never reduced
    assert processor_input_side(None) is None


def test_reduction_factor_keeps_the_gap():
    assert reduction_factor(6300, 6300, 336) == 6  # 1050 >= 3 x 336
    assert reduction_factor(1300, 9000, 224) == 1  # the shorter side decides
    assert reduction_factor(6300, 6300, None) == 1
    for width, height, side in [(6300, 6300, 336), (2100, 1500, 224), (5000, 700, 32)]:
        factor = reduction_factor(width, height, side)
        assert min(width, height) // factor >= REDUCING_GAP * side


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "RGBA"])
def test_images_up_to_the_gap_are_decoded_exactly_as_before(tmp_path, mode):
    path = tmp_path / "image.png"
    _noisy_gradient(1300, 1000).convert(mode).save(path)  # 1000 < 2 x 3 x 224: no reduction
    reduced, full = load_image(path, side=224), load_image(path)
    assert reduced.mode == "RGB" and reduced.size == full.size == (1300, 1000)
    assert np.array_equal(np.asarray(reduced), np.asarray(full))


@pytest.mark.parametrize("mode", ["RGB", "P"])
def test_large_images_are_reduced_and_the_processor_sees_nearly_the_same(tmp_path, mode):
    path = tmp_path / "image.png"
    _noisy_gradient(2100, 1500).convert(mode).save(path)
    processor = _clip(224)
    reduced = load_image(path, side=224)
    assert reduced.mode == "RGB" and reduced.size == (1050, 750)  # factor 2: 750 >= 3 x 224
    full = processor(images=load_image(path), return_tensors="np")["pixel_values"]
    small = processor(images=reduced, return_tensors="np")["pixel_values"]
    difference = np.abs(full - small)  # normalised units: 1 grey level is ~0.015
    assert difference.mean() < 0.01 and difference.max() < 0.1


def test_jpeg_is_decoded_at_a_reduced_scale(tmp_path):
    path = tmp_path / "image.jpg"
    _noisy_gradient(2400, 1600).save(path, quality=90)
    plan = plan_decode(path, side=64)
    # DCT scaling: 1/8 at most (300x200), then reduced to keep 3 x 64 on the shorter side.
    assert (plan.width, plan.height) == (2400, 1600) and plan.size == (300, 200)
    assert plan.peak_bytes < 2400 * 1600  # far below one byte a pixel of the declared canvas
    assert load_image(path, side=64).size == plan.size


def test_plan_counts_the_canvas_and_the_rgb_copy(tmp_path):
    Image.new("RGB", (700, 500)).save(tmp_path / "rgb.png")
    Image.new("P", (700, 500)).save(tmp_path / "p.png")
    # Not reduced: the decoded canvas (PIL keeps RGB in 4 bytes a pixel) and its RGB copy.
    assert plan_decode(tmp_path / "rgb.png").peak_bytes == 700 * 500 * (4 + 4)
    assert plan_decode(tmp_path / "p.png").peak_bytes == 700 * 500 * (1 + 4)
    # Reduced by 3 (side 50): RGB is reduced as decoded; a palette image is converted to RGB first.
    rgb, palette = plan_decode(tmp_path / "rgb.png", side=50), plan_decode(tmp_path / "p.png", side=50)
    assert rgb.size == palette.size == (234, 167)
    assert rgb.peak_bytes == 700 * 500 * 4 + 234 * 167 * 4
    assert palette.peak_bytes == 700 * 500 * (1 + 4) + 234 * 167 * 4
