"""The image check before training: a header scan misses a truncated PNG, a full decode finds it; every bad image is
listed with its record, field and reason."""

from __future__ import annotations

import pytest
from PIL import Image

from exgra_med.data.images import IMAGE_CHECKS, BadImage, ImageLoadError, check_record_images, find_bad_images
from exgra_med.train.args import DataArguments


def write_truncated_png(path, size=(64, 48), cut: int = 200):
    """A PNG with its last `cut` bytes removed: its header reads, its pixels do not decode."""
    Image.effect_noise(size, 64).convert("RGB").save(path)
    data = path.read_bytes()
    path.write_bytes(data[:-cut])
    return path


def test_a_truncated_png_passes_the_header_scan_and_fails_the_decode(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    write_truncated_png(tmp_path / "cut.png")
    records = [{"id": "a", "image": "ok.png"}, {"id": "b", "image": ["ok.png", "cut.png"]}, {"id": "c"},
               {"id": "d", "image": "gone.png"}]
    assert check_record_images(records[:3], tmp_path, "src.json", mode="header") == 3
    with pytest.raises(ImageLoadError, match=r"src.json: record 'b': field 'image\[1\]': cannot decode image "
                                             r".*cut.png.*truncated.* \(and 1 more bad image\)"):
        check_record_images(records, tmp_path, "src.json", mode="decode")
    bad = find_bad_images(records, tmp_path, mode="decode", workers=2)
    assert [(b.index, b.record_id, b.field, b.file) for b in bad] == [
        (1, "b", "image[1]", "cut.png"), (3, "d", "image", "gone.png")]
    assert "truncated" in bad[0].reason and "not found" in bad[1].reason
    assert isinstance(bad[0], BadImage)
    assert find_bad_images(records, tmp_path, mode="header") == [bad[1]]  # the missing file only
    assert find_bad_images(records, tmp_path, mode="none") == []


def test_image_check_flag_and_its_alias():
    assert IMAGE_CHECKS == ("auto", "decode", "header", "none")
    assert DataArguments(data_path="d.json").image_check == "auto"
    assert DataArguments(data_path="d.json", skip_image_check=True).image_check == "none"
    with pytest.raises(ValueError, match="--image_check must be one of"):
        DataArguments(data_path="d.json", image_check="full")
    with pytest.raises(ValueError, match="--skip_image_check True is --image_check none"):
        DataArguments(data_path="d.json", skip_image_check=True, image_check="decode")


def test_every_bad_image_is_found_in_record_order_across_chunks(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    records = [{"id": i, "image": "gone.png" if i in (0, 255, 256, 599) else "ok.png"} for i in range(600)]
    bad = find_bad_images(records, tmp_path, mode="header", workers=1)  # chunks of 256 images
    assert [b.record_id for b in bad] == [0, 255, 256, 599]
