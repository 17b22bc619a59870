"""`exgra-med export-hf`: the export loads as transformers LLaVA with equal logits; its processor rebuilds our
prompts exactly; connectors that LLaVA cannot express fail clearly and write nothing."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from exgra_med.cli import main as cli_main
from exgra_med.model.auto import LoadOptions
from exgra_med.model.loading import ConnectorOptions
from exgra_med.model.tiny import make_tiny_model
from exgra_med.serve.engine import InferenceEngine

QUESTION = "What color is the shape?"


def _image() -> Image.Image:
    gen = torch.Generator().manual_seed(5)
    pixels = (torch.rand(40, 56, 3, generator=gen) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels)


@pytest.mark.parametrize("aspect", [None, "pad"])  # None: the default, the reference's resize + centre crop
def test_export_loads_in_transformers_with_equal_logits(tiny_model_dir, tmp_path, aspect):
    out = tmp_path / "hf"
    flags = [] if aspect is None else ["--image-aspect-ratio", aspect]
    assert cli_main(["export-hf", "--in", str(tiny_model_dir), "--out", str(out), *flags]) == 0
    assert (out / "model.safetensors").is_file() and (out / "processor_config.json").is_file()
    llava = LlavaForConditionalGeneration.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    engine = InferenceEngine.from_path(str(tiny_model_dir), LoadOptions(device="cpu", image_aspect_ratio=aspect))
    image = _image()
    # The exported chat template + processor produce exactly the prompt our engine builds.
    messages = [{"role": "user", "content": [{"type": "text", "text": QUESTION}, {"type": "image"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=prompt, images=image, return_tensors="pt")
    prompt = engine.backend.encode_conversation([("human", QUESTION)], image)
    ours_ids = torch.tensor([prompt.input_ids])
    assert torch.equal(inputs.input_ids, ours_ids)
    pixels = prompt.images[None]
    torch.testing.assert_close(inputs.pixel_values, pixels)
    with torch.no_grad():
        theirs = llava(**inputs).logits
        ours = engine.model(input_ids=ours_ids, pixel_values=pixels).logits
    assert theirs.shape == (1, ours_ids.shape[1], len(engine.tokenizer))
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    # Greedy generation agrees token for token.
    gen = llava.generate(**inputs, max_new_tokens=5, do_sample=False)[0, ours_ids.shape[1]:]
    mine = engine.model.generate(ours_ids, pixels, max_new_tokens=5, do_sample=False,
                                 pad_token_id=engine.tokenizer.pad_token_id)[0]
    assert gen.tolist() == mine.tolist()


def test_unexportable_connector_fails_clearly(tmp_path, capsys):
    src = make_tiny_model(tmp_path / "dci", options=ConnectorOptions(mm_dense_connector_type="dci"))
    out = tmp_path / "hf"
    assert cli_main(["export-hf", "--in", str(src), "--out", str(out)]) == 2
    message = capsys.readouterr().err
    # one line after the loader's progress bars
    assert message.strip().splitlines()[-1].startswith("exgra-med export-hf: error: cannot express"), message
    assert "cannot express this model in transformers' LLaVA format" in message
    assert "mm_dense_connector_type='dci'" in message
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".hf.")]  # no staging leftovers


@pytest.mark.parametrize("template", ["llava_med", "simple", "vicuna_v1", "mistral", "plain"])
def test_export_carries_the_trained_template_and_settings(tiny_model_dir, tmp_path, template):
    """The exported chat template renders a multi-turn conversation exactly as our template (the one the checkpoint
    recorded, or the flag); config.json carries the recorded settings."""
    from exgra_med.io import read_json, write_json_atomic
    from exgra_med.model.auto import load_backend

    src = tmp_path / "src"
    src.mkdir()
    for item in tiny_model_dir.iterdir():
        if item.is_file():
            (src / item.name).write_bytes(item.read_bytes())
        else:
            (src / item.name).symlink_to(item)
    config = read_json(src / "config.json")
    config.update(conv_template=template, image_aspect_ratio="pad", tokenizer_model_max_length=300)
    write_json_atomic(src / "config.json", config)
    out = tmp_path / "hf"
    assert cli_main(["export-hf", "--in", str(src), "--out", str(out)]) == 0
    exported = read_json(out / "config.json")
    assert (exported["conv_template"], exported["image_aspect_ratio"], exported["tokenizer_model_max_length"]) == (
        template, "pad", 300)
    processor = AutoProcessor.from_pretrained(out)
    messages = [{"role": "user", "content": [{"type": "text", "text": QUESTION}, {"type": "image"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Red."}]},
                {"role": "user", "content": [{"type": "text", "text": "And its shape?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    theirs = processor(text=prompt, images=_image(), return_tensors="pt").input_ids[0].tolist()
    ours = load_backend(str(src), LoadOptions(device="cpu")).encode_conversation(
        [("human", QUESTION), ("gpt", "Red."), ("human", "And its shape?")], _image())
    assert theirs == ours.input_ids
