"""The grounding audit on a model that provably ignores images and on one whose answers depend on them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from exgra_med.eval.grounding import CONDITIONS, audit, blank_images, changed_fraction, main, shuffled_images
from exgra_med.model.loading import load_pretrained


@pytest.fixture(scope="module")
def questions(easy_vqa_dir) -> list[dict]:
    return json.loads((easy_vqa_dir / "test.json").read_text())[:24]


def _model(tiny_model_dir, projector_scale: float):
    """The tiny model with its projector scaled: 0 makes every image the same zero features (the answers cannot
    depend on the image); a large factor makes the image features dominate the prompt."""
    model, tokenizer, processor = load_pretrained(str(tiny_model_dir), dtype=torch.float32)
    with torch.no_grad():
        for p in model.mm_projector.parameters():
            p.mul_(projector_scale)
    return model, tokenizer, processor


def _run(model, tokenizer, processor, questions, easy_vqa_dir):
    return audit(model, tokenizer, processor, questions, json.loads((easy_vqa_dir / "candidate.json").read_text()),
                 image_folder=easy_vqa_dir / "images", train=json.loads((easy_vqa_dir / "train.json").read_text()),
                 seed=0, batch_size=8, max_new_tokens=3)


def test_shuffle_is_seeded_and_moves_every_image(questions):
    a, b = shuffled_images(questions, 3), shuffled_images(questions, 3)
    assert [r["image"] for r in a] == [r["image"] for r in b]
    assert {r["image"] for r in a} == {r["image"] for r in questions}
    assert all(x["image"] != y["image"] for x, y in zip(a, questions))
    assert [r["image"] for r in shuffled_images(questions, 4)] != [r["image"] for r in a]


def test_blank_images_keep_the_size(questions, easy_vqa_dir, tmp_path):
    blank = blank_images(questions[:3], easy_vqa_dir / "images", tmp_path)
    for original, record in zip(questions[:3], blank):
        image = Image.open(record["image"])
        assert image.size == Image.open(easy_vqa_dir / "images" / original["image"]).size
        assert image.convert("RGB").getextrema() == ((255, 255),) * 3
    assert changed_fraction({"1": "Yes", "2": "red"}, {"1": "yes ", "2": "blue"}) == 50.0


def test_audit_of_a_model_that_ignores_images(tiny_model_dir, easy_vqa_dir, questions):
    result = _run(*_model(tiny_model_dir, 0.0), questions, easy_vqa_dir)
    assert result["answers_changed_vs_real"] == {"blank images": 0.0, "shuffled images": 0.0}
    real = result["rows"]["real images"]
    assert all(result["rows"][name] == real for name in CONDITIONS)
    assert {"majority answer", "question prior"} <= set(result["rows"])


def test_audit_of_a_model_whose_answers_depend_on_the_image(tiny_model_dir, easy_vqa_dir, questions):
    result = _run(*_model(tiny_model_dir, 50.0), questions, easy_vqa_dir)
    changed = result["answers_changed_vs_real"]
    assert changed["blank images"] > 0 and changed["shuffled images"] > 0, changed
    assert result["answers"]["real images"] != result["answers"]["shuffled images"]


def test_cli_prints_the_table_and_writes_json(tiny_model_dir, easy_vqa_dir, questions, tmp_path, capsys):
    qfile = tmp_path / "questions.json"
    qfile.write_text(json.dumps(questions[:6]))
    out = tmp_path / "audit.json"
    assert main([
        "--model", str(tiny_model_dir), "--question-file", str(qfile), "--image-folder",
        str(easy_vqa_dir / "images"), "--candidate", str(easy_vqa_dir / "candidate.json"), "--train",
        str(easy_vqa_dir / "train.json"), "--out", str(out), "--max-new-tokens", "3", "--quiet",
    ]) == 0
    printed = capsys.readouterr().out
    for row in (*CONDITIONS, "majority answer", "question prior"):
        assert f"| {row} |" in printed
    saved = json.loads(Path(out).read_text())
    assert saved["questions"] == 6 and set(saved["answers"]) == set(CONDITIONS)


@pytest.mark.slow
def test_eval_vqa_script_runs_the_audit(tiny_model_dir, easy_vqa_dir, questions, tmp_path):
    import os
    import subprocess
    import sys

    data = tmp_path / "data"
    data.mkdir()
    (data / "test.json").write_text(json.dumps(questions[:6]))
    (data / "candidate.json").write_text((easy_vqa_dir / "candidate.json").read_text())
    (data / "images").symlink_to(easy_vqa_dir / "images")
    out = tmp_path / "eval"
    repo = Path(__file__).resolve().parents[2]
    bin_dir = str(Path(sys.executable).parent)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PATH=f"{bin_dir}:{os.environ['PATH']}",
               MODEL_PATH=str(tiny_model_dir), DATA_DIR=str(data), OUT_DIR=str(out), NUM_CHUNKS="1",
               TRAIN_FILE=str(easy_vqa_dir / "train.json"))
    proc = subprocess.run(["bash", str(repo / "scripts" / "eval_vqa.sh"), "--max-new-tokens", "3"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "| shuffled images |" in proc.stdout and "| question prior |" in proc.stdout
    audit = json.loads((out / "test_answers_grounding.json").read_text())
    assert audit["questions"] == 6 and (out / "test_answers_scores.json").is_file()
