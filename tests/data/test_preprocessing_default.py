"""The default image preprocessing is the reference's: the processor's own resize + centre crop, on every path
(training data, in-training VQA scoring, generate-vqa / zero-shot, chat / web / API)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor

from exgra_med.data.dataset import SupervisedDataset
from exgra_med.data.images import DEFAULT_ASPECT_RATIO, preprocess_image
from exgra_med.eval import generate, grounding, zero_shot
from exgra_med.model.auto import LoadOptions
from exgra_med.serve import api, chat, web
from exgra_med.serve.engine import InferenceEngine
from exgra_med.train.args import DataArguments
from exgra_med.train.vqa_eval import VQAGenerationSettings

PROC = CLIPImageProcessor(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8})


def _wide_image() -> Image.Image:
    """24 x 8: a horizontal gradient, so that padding, cropping and squashing all give different pixels."""
    rng = np.random.default_rng(0)
    pixels = np.linspace(0, 255, 24, dtype=np.float64)[None, :, None].repeat(8, 0).repeat(3, 2)
    pixels = pixels + rng.integers(0, 20, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _processor_output(img: Image.Image) -> torch.Tensor:
    return torch.as_tensor(PROC(images=img, return_tensors="pt")["pixel_values"][0])


def test_default_is_the_processors_own_resize_and_crop():
    img = _wide_image()
    expected = _processor_output(img)
    assert DEFAULT_ASPECT_RATIO == "square"
    assert torch.equal(preprocess_image(img, PROC), expected)
    padded = preprocess_image(img, PROC, "pad")  # the option: differs (the borders are the mean colour)
    assert padded.shape == expected.shape and not torch.allclose(padded, expected, atol=0.05)


def test_training_dataset_default_is_the_processors_output(word_tokenizer, tmp_path):
    img = _wide_image()
    (tmp_path / "images").mkdir()
    img.save(tmp_path / "images" / "wide.png")
    records = [{"id": "w", "image": "wide.png", "conversations": [
        {"from": "human", "value": "What is shown?\n<image>"}, {"from": "gpt", "value": "A red circle."}]}]
    (tmp_path / "data.json").write_text(json.dumps(records))
    dataset = SupervisedDataset(tmp_path / "data.json", tmp_path / "images", word_tokenizer, PROC,
                                num_image_tokens=4, mm_use_im_start_end=True)
    assert torch.equal(dataset[0]["pixel_values"], _processor_output(img))


def test_every_entry_point_defaults_to_the_reference_preprocessing(tiny_model_dir):
    assert DataArguments(data_path="x.json").image_aspect_ratio == "square"
    with pytest.raises(ValueError, match="--image_aspect_ratio"):
        DataArguments(data_path="x.json", image_aspect_ratio="keep")
    assert VQAGenerationSettings().image_aspect_ratio == "square"
    for command in (generate, zero_shot, grounding, chat, web, api):
        parser = command.build_parser()
        assert parser.get_default("image_aspect_ratio") is None  # what the checkpoint recorded

    # The chat / web / API engine of a checkpoint that records nothing: pixels equal to its processor's own output.
    engine = InferenceEngine.from_path(str(tiny_model_dir), LoadOptions(device="cpu", dtype=torch.float32))
    assert engine.backend.image_aspect_ratio == "square"
    img = _wide_image()
    expected = torch.as_tensor(engine.backend.image_processor(images=img, return_tensors="pt")["pixel_values"])
    assert torch.equal(engine.backend.pixels(img), expected[0])
