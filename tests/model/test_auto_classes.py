"""`import exgra_med` registers the config, model and processor with transformers' Auto classes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from exgra_med.constants import DEFAULT_IMAGE_PATCH_TOKEN
from exgra_med.conversation import get_template
from exgra_med.data.images import preprocess_image
from exgra_med.model import ExGraMedConfig, ExGraMedForConditionalGeneration, ExGraMedProcessor
from exgra_med.model.checkpoint import load_model


def test_auto_classes_load_a_checkpoint_like_the_project_loader(tiny_model_dir):
    config = AutoConfig.from_pretrained(tiny_model_dir)
    assert isinstance(config, ExGraMedConfig)
    auto_model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    assert type(auto_model) is ExGraMedForConditionalGeneration
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    assert isinstance(processor, ExGraMedProcessor)
    model, tokenizer, image_processor = load_model(tiny_model_dir, device="cpu")
    assert processor.num_image_tokens == model.num_image_tokens
    assert processor.mm_use_im_start_end == model.config.mm_use_im_start_end

    image = Image.new("RGB", (40, 30), (220, 30, 30))
    prompt = get_template("llava_med").render([("human", "What color is the shape?\n<image>")],
                                              add_generation_prompt=True)
    inputs = processor(images=image, text=prompt)
    ids = inputs["input_ids"][0].tolist()
    assert ids.count(tokenizer.convert_tokens_to_ids(DEFAULT_IMAGE_PATCH_TOKEN)) == model.num_image_tokens
    torch.testing.assert_close(inputs["pixel_values"][0], preprocess_image(image, image_processor, "square"))
    with torch.no_grad():
        expected = model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"]).logits
        got = auto_model(**inputs).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_processor_counts_images_against_markers(tiny_model_dir):
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    with pytest.raises(ValueError, match=r"0 <image> marker\(s\) but 1 image\(s\)"):
        processor(text="no marker here", images=Image.new("RGB", (8, 8)))
    batch = processor(text=["short", "a longer question with more words"])
    assert batch["input_ids"].shape[0] == 2 and "pixel_values" not in batch


@pytest.mark.slow
def test_import_exgra_med_registers_for_hub_ids_in_a_fresh_interpreter(offline_hub):
    """A new interpreter: `import exgra_med`, then plain transformers calls on a Hub id from the local cache."""
    code = (
        "import json, exgra_med\n"
        "from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor\n"
        "c = AutoConfig.from_pretrained('acme/tiny-exgra')\n"
        "m = AutoModelForImageTextToText.from_pretrained('acme/tiny-exgra')\n"
        "p = AutoProcessor.from_pretrained('acme/tiny-exgra')\n"
        "print(json.dumps([type(c).__name__, type(m).__name__, type(p).__name__, p.num_image_tokens]))\n"
    )
    env = dict(os.environ, HF_HUB_CACHE=str(offline_hub), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    names = json.loads(done.stdout.strip().splitlines()[-1])
    assert names[:3] == ["ExGraMedConfig", "ExGraMedForConditionalGeneration", "ExGraMedProcessor"]
    assert names[3] > 0
    # Without `import exgra_med`, transformers does not know the model type (what the registration adds).
    bare = subprocess.run([sys.executable, "-c", "from transformers import AutoConfig\n"
                           "AutoConfig.from_pretrained('acme/tiny-exgra')"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert bare.returncode != 0 and "exgra_med" in bare.stderr
