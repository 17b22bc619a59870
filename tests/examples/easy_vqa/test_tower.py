"""examples/easy_vqa/tower.py: contrastive pre-training of the demo's CLIP vision tower, or of a native VLM's vision
encoder, on image-caption records."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from transformers import CLIPVisionModel

from examples.easy_vqa.tower import TowerPretrainConfig, pretrain_tower, tokenize_captions

REPO = Path(__file__).resolve().parents[3]
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 180, 30)}


@pytest.fixture(scope="module")
def caption_data(tmp_path_factory):
    """60 images of one coloured disc on white at random places, captioned "A <colour> circle."."""
    root = tmp_path_factory.mktemp("captions")
    (root / "images").mkdir()
    gen = torch.Generator().manual_seed(0)
    records = []
    for i in range(60):
        colour = list(COLOURS)[i % 3]
        x, y = (int(v) for v in torch.randint(4, 20, (2,), generator=gen))
        img = Image.new("RGB", (32, 32), (255, 255, 255))
        ImageDraw.Draw(img).ellipse((x, y, x + 10, y + 10), fill=COLOURS[colour])
        img.save(root / "images" / f"{i}.png")
        records.append(
            {
                "id": f"c{i}",
                "image": f"{i}.png",
                "conversations": [
                    {"from": "human", "value": "Describe the image.\n<image>"},
                    {"from": "gpt", "value": f"A {colour} circle."},
                ],
            }
        )
    (root / "captions.json").write_text(json.dumps(records))
    return root


def test_captions_end_with_an_id_both_clip_pooling_rules_find(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir / "llm")
    ids, mask = tokenize_captions(tokenizer, ["A red circle.", "A blue one."], max_tokens=32)
    end = len(tokenizer)
    lengths = mask.sum(1)
    for row, n in zip(ids, lengths):
        assert row[n - 1] == end  # the end-of-caption id closes every caption
        assert int(row.argmax()) == n - 1  # and is the largest id (transformers' legacy pooling rule)
    assert mask[0].tolist() != mask[1].tolist() or ids.shape[1] == int(lengths.max())


def test_pretraining_learns_the_captions_and_writes_a_drop_in_tower(tiny_model_dir, caption_data, tmp_path):
    out = tmp_path / "tower"
    config = TowerPretrainConfig(
        steps=80, batch_size=24, learning_rate=2e-3, warmup_steps=5, eval_every=40, heldout_fraction=0.25, seed=0
    )
    summary = pretrain_tower(
        tiny_model_dir / "vision",
        tiny_model_dir / "llm",
        caption_data / "captions.json",
        caption_data / "images",
        out,
        config,
    )
    assert summary["pairs"] == {"train": 45, "heldout": 15}
    assert summary["distinct_captions"] == 3
    # Held-out images are matched to their own caption after training (chance: 1/3).
    assert summary["heldout_retrieval_after"] >= 0.9 > summary["heldout_retrieval_before"] + 0.3
    saved = json.loads((out / "pretrain_tower.json").read_text())
    assert saved["history"][-1]["step"] == 80 and saved["config"]["seed"] == 0

    before = CLIPVisionModel.from_pretrained(tiny_model_dir / "vision")
    after = CLIPVisionModel.from_pretrained(out)
    assert after.config.to_dict()["image_size"] == before.config.image_size
    changed = [k for k, v in after.state_dict().items() if not torch.equal(v, before.state_dict()[k])]
    assert "embeddings.patch_embedding.weight" in changed
    assert (out / "preprocessor_config.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["qwen2_5_vl", "gemma3", "llava_onevision"])
def test_a_native_vlms_vision_encoder_learns_the_captions_and_the_language_model_stays(arch, caption_data, tmp_path):
    """`--tower` a native VLM folder: its image features (after the projector) learn to retrieve the captions, the
    vision side's weights change, the language model's do not, and the output is the whole model in its format."""
    from transformers import AutoModelForImageTextToText

    from exgra_med.model.native.tiny import make_tiny_vlm

    start = make_tiny_vlm(tmp_path / "tiny", arch, seed=0)
    out = tmp_path / "tower"
    config = TowerPretrainConfig(
        steps=80, batch_size=24, learning_rate=2e-3, warmup_steps=5, eval_every=40, heldout_fraction=0.25, seed=0
    )
    summary = pretrain_tower(start, None, caption_data / "captions.json", caption_data / "images", out, config)
    assert summary["kind"] == arch and summary["pairs"] == {"train": 45, "heldout": 15}
    assert summary["heldout_retrieval_after"] >= 0.9 > summary["heldout_retrieval_before"] + 0.3

    before = AutoModelForImageTextToText.from_pretrained(start)
    after = AutoModelForImageTextToText.from_pretrained(out)  # loads as it is, in its own format
    assert after.config.model_type == arch
    old = dict(before.named_parameters())
    changed = {n for n, p in after.named_parameters() if not torch.equal(p, old[n])}
    decoder = next(n for n, m in after.named_modules() if m is after.get_decoder())
    assert changed and not any(n.startswith(decoder + ".") for n in changed)  # the language model is untouched
    assert any("vision" in n or "visual" in n for n in changed)
    # the processor's files (tokenizer, image processor, chat template) beside it, as in the folder it started from
    assert {f.name for f in start.iterdir()} <= {f.name for f in out.iterdir()}
    assert (out / "pretrain_tower.json").is_file()


@pytest.mark.slow
def test_bad_input_fails_before_training_with_one_line(tiny_model_dir, caption_data, tmp_path):
    records = json.loads((caption_data / "captions.json").read_text())
    records[7]["image"] = "missing.png"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(records))
    cmd = [
        sys.executable,
        "-m",
        "examples.easy_vqa.tower",
        "--tower",
        str(tiny_model_dir / "vision"),
        "--tokenizer",
        str(tiny_model_dir / "llm"),
        "--data",
        str(bad),
        "--image-folder",
        str(caption_data / "images"),
        "--out",
        str(tmp_path / "out"),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("python -m examples.easy_vqa.tower: error: ")
    assert "missing.png" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
