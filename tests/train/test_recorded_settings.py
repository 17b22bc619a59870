"""The preprocessing a model was trained with travels in its checkpoint: a model trained with
`--image_aspect_ratio pad` is evaluated and served with `pad` without the flag, exactly as with it given."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from PIL import Image

from exgra_med.eval.generate import main as generate_vqa
from exgra_med.io import read_json
from exgra_med.model.auto import LoadOptions, load_backend
from exgra_med.serve.engine import InferenceEngine
from exgra_med.train.main import main as train

CPU = ["--bf16", "False", "--activation_checkpointing", "False", "--dataloader_num_workers", "0", "--logging_steps",
       "1", "--save_strategy", "no", "--use_cpu", "True", "--report_to", "none", "--seed", "0"]


def _wide_copies(easy_vqa_dir: Path, out: Path, split: str, n: int) -> list[dict]:
    """The first `n` records of `split` with their images widened to 2:1 (a grey band on the right), so that padding
    to a square and the processor's centre crop see different pixels."""
    records = json.loads((easy_vqa_dir / f"{split}.json").read_text())[:n]
    out.mkdir(parents=True, exist_ok=True)
    for record in records:
        image = Image.open(easy_vqa_dir / "images" / record["image"]).convert("RGB")
        wide = Image.new("RGB", (2 * image.width, image.height), (90, 90, 90))
        wide.paste(image, (0, 0))
        wide.save(out / record["image"])
    return records


def _answers(path: Path) -> dict[str, tuple[str, str]]:
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    return {str(r["question_id"]): (r["text"], r["metadata"]["generation"]["image_aspect_ratio"]) for r in rows}


def test_a_model_trained_with_pad_answers_with_pad_without_the_flag(tiny_model_dir, easy_vqa_dir, tmp_path, caplog):
    images = tmp_path / "images"
    data = tmp_path / "train.json"
    data.write_text(json.dumps(_wide_copies(easy_vqa_dir, images, "train", 8)))
    questions = tmp_path / "questions.json"
    questions.write_text(json.dumps(_wide_copies(easy_vqa_dir, images, "test", 6)))
    out = tmp_path / "trained"
    assert train(["--model_name_or_path", str(tiny_model_dir), "--data_path", str(data), "--image_folder",
                  str(images), "--output_dir", str(out), "--max_steps", "1", "--per_device_train_batch_size", "4",
                  "--learning_rate", "1e-3", "--image_aspect_ratio", "pad", "--model_max_length", "200", *CPU]) == 0
    config = read_json(out / "config.json")
    assert (config["image_aspect_ratio"], config["conv_template"]) == ("pad", "llava_med")
    assert config["tokenizer_model_max_length"] == 200 and config["text_config"]["max_position_embeddings"] > 200

    def run(name: str, *flags: str) -> dict[str, tuple[str, str]]:
        answers = tmp_path / f"{name}.jsonl"
        assert generate_vqa(["--model", str(out), "--question-file", str(questions), "--image-folder", str(images),
                             "--answers-file", str(answers), "--max-new-tokens", "4", "--quiet", *flags]) == 0
        return _answers(answers)

    implicit, explicit = run("implicit"), run("explicit", "--image-aspect-ratio", "pad")
    assert implicit == explicit and {aspect for _, aspect in implicit.values()} == {"pad"}
    assert {aspect for _, aspect in run("square", "--image-aspect-ratio", "square").values()} == {"square"}

    # Not vacuous: on these images the two settings give the model different pixels.
    backend = load_backend(str(out), LoadOptions(device="cpu"))
    square = load_backend(str(out), LoadOptions(device="cpu", image_aspect_ratio="square"))
    wide = Image.open(next(images.iterdir()))
    assert backend.image_aspect_ratio == "pad" and not torch.equal(backend.pixels(wide), square.pixels(wide))
    # Serving reads it too.
    engine = InferenceEngine.from_path(str(out), LoadOptions(device="cpu"))
    try:
        assert engine.backend.image_aspect_ratio == "pad" and engine.backend.template.name == "llava_med"
        assert engine.context_length == 200  # the trained maximum length bounds the prompts served
    finally:
        engine.close()
    # Evaluation warns about questions longer than the trained length.
    long_question = tmp_path / "long.json"
    record = dict(json.loads(questions.read_text())[0])
    record["conversations"] = [{**record["conversations"][0],
                                "value": record["conversations"][0]["value"] + " why" * 300},
                               *record["conversations"][1:]]
    long_question.write_text(json.dumps([record]))
    with caplog.at_level(logging.WARNING):
        assert generate_vqa(["--model", str(out), "--question-file", str(long_question), "--image-folder",
                             str(images), "--answers-file", str(tmp_path / "long.jsonl"), "--max-new-tokens", "2",
                             "--quiet"]) == 0
    assert "longer than the model's 200-token context" in caplog.text
