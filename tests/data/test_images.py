"""Image loading (PNG, DICOM), errors naming the path, pad-to-square and preprocessing."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file
from transformers import CLIPImageProcessor

from exgra_med.data.images import ImageLoadError, expand2square, load_image, preprocess_image


def test_png_is_converted_to_rgb(tmp_path):
    Image.new("L", (5, 3), 77).save(tmp_path / "g.png")
    img = load_image(tmp_path / "g.png")
    assert img.mode == "RGB" and img.size == (5, 3) and img.getpixel((0, 0)) == (77, 77, 77)


def test_missing_and_corrupt_files_name_the_path(tmp_path):
    with pytest.raises(ImageLoadError, match="image file not found: .*nope.png"):
        load_image(tmp_path / "nope.png")
    (tmp_path / "bad.png").write_bytes(b"not a png at all")
    with pytest.raises(ImageLoadError, match="cannot decode image .*bad.png"):
        load_image(tmp_path / "bad.png")
    (tmp_path / "bad.dcm").write_bytes(b"\0" * 10)
    with pytest.raises(ImageLoadError, match="bad.dcm"):
        load_image(tmp_path / "bad.dcm")


def test_dicom_ct_without_window_uses_min_max_after_rescale():
    path = get_testdata_file("CT_small.dcm")
    raw = pydicom.dcmread(path).pixel_array.astype(float)  # RescaleSlope 1, intercept -1024, no window
    img = np.asarray(load_image(path))
    assert img.shape == (128, 128, 3) and img.min() == 0 and img.max() == 255
    r, c = np.unravel_index(np.argmax(raw), raw.shape)
    assert tuple(img[r, c]) == (255, 255, 255)
    expected = np.round((raw[5, 7] - raw.min()) / (raw.max() - raw.min()) * 255)
    assert img[5, 7, 0] == expected


def test_dicom_mr_uses_stored_window():
    path = get_testdata_file("MR_small.dcm")
    ds = pydicom.dcmread(path)
    assert (float(ds.WindowCenter), float(ds.WindowWidth)) == (600.0, 1600.0)
    raw = ds.pixel_array.astype(float)
    img = np.asarray(load_image(path))
    expected = np.round(np.clip((raw - (600 - 800)) / 1600, 0, 1) * 255)
    assert np.array_equal(img[..., 0], expected.astype(np.uint8))
    assert img[..., 0].min() == 52  # darkest pixel 127 -> (127 + 200) / 1600 * 255


def test_dicom_monochrome1_is_inverted(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "inv.dcm")
    normal = np.asarray(load_image(get_testdata_file("MR_small.dcm")))
    inverted = np.asarray(load_image(tmp_path / "inv.dcm"))
    assert np.array_equal(inverted.astype(int), 255 - normal.astype(int))


def test_expand2square_centres_and_fills():
    img = Image.new("RGB", (4, 2), (255, 0, 0))
    sq = expand2square(img, (0, 0, 255))
    assert sq.size == (4, 4)
    assert sq.getpixel((0, 0)) == (0, 0, 255) and sq.getpixel((0, 1)) == (255, 0, 0)
    assert sq.getpixel((3, 2)) == (255, 0, 0) and sq.getpixel((3, 3)) == (0, 0, 255)
    tall = expand2square(Image.new("RGB", (1, 3), (9, 9, 9)), (1, 2, 3))
    assert [tall.getpixel((x, 1)) for x in range(3)] == [(1, 2, 3), (9, 9, 9), (1, 2, 3)]


def test_preprocess_pads_with_processor_mean():
    proc = CLIPImageProcessor(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8})
    wide = Image.new("RGB", (16, 4), (255, 255, 255))
    padded = preprocess_image(wide, proc, "pad")
    assert padded.shape == (3, 8, 8)
    # top row is the padding colour int(mean * 255) / 255, normalised: about 0 in every channel
    mean, std = torch.tensor(proc.image_mean), torch.tensor(proc.image_std)
    pad_value = (torch.tensor([int(m * 255) for m in proc.image_mean]) / 255 - mean) / std
    assert torch.allclose(padded[:, 0, 0], pad_value, atol=0.02)
    cropped = preprocess_image(wide, proc, "square")
    assert torch.allclose(cropped[:, 0, 0], (1 - mean) / std, atol=0.02)  # center crop of white
    with pytest.raises(ValueError, match="image_aspect_ratio"):
        preprocess_image(wide, proc, "keep")
