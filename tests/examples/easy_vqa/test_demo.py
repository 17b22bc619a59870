"""The demo's scripts at toy scale (a few steps per stage): examples/easy_vqa/demo.sh on ExGra-Med's own model and
(`DEMO_ARCH`) on a tiny native VLM, and its last part, examples/easy_vqa/finetune_audit.sh."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from examples.easy_vqa.rationale import parse_rationale
from examples.easy_vqa.rationale_answers import rationale_answers
from tests.conftest import free_port, small_easy_vqa

REPO = Path(__file__).resolve().parents[3]
DEMO = REPO / "examples" / "easy_vqa"


def _env(**extra) -> dict:
    """The environment of a demo script: this interpreter's console scripts first on PATH, offline, one thread."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}", "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1", **extra}


@pytest.mark.slow
def test_demo_on_a_native_vlm(tmp_path):
    """`DEMO_ARCH=gemma3`: the model's own vision encoder pre-trained on the captions (the whole model written back in
    its format), stage 2 from it with the alignment head, then the default demo's fine-tuning on rationale answers and
    its audit (counterfactual rows included), the model prompted with its own chat template."""
    demo = tmp_path / "demo"
    env = _env(DEMO_ARCH="gemma3", DEMO_DIR=str(demo), TOWER_STEPS="2", STAGE2_STEPS="2", FINETUNE_STEPS="2",
               STAGE2_BATCH="4", BATCH="4", DEMO_IMAGES="40", TEST_QUESTIONS="8", MASTER_PORT=str(free_port()),
               TINY_FLAGS="--hidden 32 --vision-hidden 16")  # smaller than the demo's: the test checks the wiring
    for name in ("RATIONALE", "FINETUNE_DATA", "MAX_NEW_TOKENS", "CONV_MODE"):
        env.pop(name, None)
    result = subprocess.run(["bash", str(DEMO / "demo.sh")], capture_output=True, text=True, env=env, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "tiny gemma3 model" in result.stdout and re.search(r"^demo took \d+ s", result.stdout, re.M)
    for row in ("| majority answer |", "| real images |", "| shuffled images |", "| question kind | edit |"):
        assert row in result.stdout
    tower = json.loads((demo / "tower" / "pretrain_tower.json").read_text())
    assert tower["kind"] == "gemma3" and tower["history"][-1]["step"] == 2
    config = json.loads((demo / "tower" / "config.json").read_text())
    assert config["model_type"] == "gemma3" and config["vision_config"]["hidden_size"] == 16
    assert f"model_name_or_path: {demo / 'tower'}\n" in (demo / "stage2" / "train_recipe.yaml").read_text()
    assert json.loads((demo / "stage2" / "config.json").read_text())["model_type"] == "gemma3"
    assert (demo / "stage2" / "exgra_med_alignment.safetensors").is_file()  # stage 2 trained the alignment head
    recipe = (demo / "finetune" / "train_recipe.yaml").read_text()
    assert f"data_path: {demo / 'data' / 'train_rationale.json'}\n" in recipe and "conv_template" not in recipe
    answers = (demo / "finetune" / "test_answers_8.jsonl").read_text().splitlines()
    assert len(answers) == len(json.loads((demo / "finetune" / "test_questions.json").read_text())) > 0
    assert json.loads(answers[0])["metadata"]["generation"]["max_new_tokens"] == 32


@pytest.mark.slow
def test_demo_defaults_read_one_cls_token_and_fine_tune_on_rationale_answers(tmp_path):
    """`bash examples/easy_vqa/demo.sh` (ExGra-Med's own model) end to end at toy scale with its defaults: the LLM gets
    one image token (the tower's last-layer CLS) and the `mistral` template through stage 2, fine-tuning and
    evaluation, and is fine-tuned on `train_rationale.json` (yes/no answered with the comparison in words)."""
    demo = tmp_path / "demo"
    env = _env(DEMO_DIR=str(demo), TOWER_STEPS="2", STAGE1_STEPS="2", STAGE2_STEPS="2", FINETUNE_STEPS="2",
               STAGE2_BATCH="4", BATCH="4", DEMO_IMAGES="40", TEST_QUESTIONS="8", MASTER_PORT=str(free_port()))
    for name in ("DEMO_ARCH", "VISION_FLAGS", "TEMPLATE", "RATIONALE", "FINETUNE_DATA", "MAX_NEW_TOKENS"):
        env.pop(name, None)
    result = subprocess.run(["bash", str(DEMO / "demo.sh")], capture_output=True, text=True, env=env, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r"^demo took \d+ s", result.stdout, re.M)
    for row in ("| question prior |", "| real images |", "| blank images |", "| shuffled images |"):
        assert row in result.stdout
    for stage in ("stage2", "finetune"):
        config = json.loads((demo / stage / "config.json").read_text())
        assert (config["mm_vision_select_feature"], config["mm_vision_select_layer"]) == ("cls", -1)
        assert config["conv_template"] == "mistral"
    recipe = (demo / "finetune" / "train_recipe.yaml").read_text()
    assert f"data_path: {demo / 'data' / 'train_rationale.json'}\n" in recipe
    rationale = json.loads((demo / "data" / "train_rationale.json").read_text())
    steps = [parse_rationale(r["conversations"][1]["value"]) for r in rationale if r["answer_type"] == "CLOSED"]
    steps = [s for s in steps if s is not None]  # (an image whose colour or shape is unknown keeps its yes / no)
    assert steps and all(s["comparison"] in ("same", "different") and s["answer"] in ("yes", "no") for s in steps)
    answer = json.loads((demo / "finetune" / "test_answers_8.jsonl").read_text().splitlines()[0])
    assert answer["metadata"]["generation"]["conv_mode"] == "mistral"
    assert answer["metadata"]["generation"]["max_new_tokens"] == 32
    audit = json.loads((demo / "finetune" / "grounding_audit.json").read_text())
    assert audit["questions"] == 8 and set(audit["answers"]) == {"real images", "blank images", "shuffled images"}


@pytest.mark.slow
def test_finetune_audit_on_another_train_file_prints_the_grounding_audit_and_scores(
    tiny_model_dir, easy_vqa_dir, tmp_path
):
    """One run: fine-tuning on FINETUNE_DATA into FINETUNE_OUT, then the audit (real-image answers written as
    generate-vqa writes them) and the reference metrics of those answers."""
    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "stage2").symlink_to(tiny_model_dir)
    data = small_easy_vqa(easy_vqa_dir, demo / "data", {"train": 64, "val": 4, "test": 40})
    records, changed = rationale_answers(json.loads((data / "train.json").read_text()))
    assert changed > 0
    train = tmp_path / "train_rationale.json"
    train.write_text(json.dumps(records))
    out = tmp_path / "ft_rationale"
    env = dict(DEMO_DIR=str(demo), FINETUNE_STEPS="2", BATCH="4", TEST_QUESTIONS="12", MASTER_PORT=str(free_port()),
               FINETUNE_DATA=str(train), FINETUNE_OUT=str(out))
    result = subprocess.run(["bash", str(DEMO / "finetune_audit.sh")], capture_output=True, text=True,
                            check=False, env=_env(**env))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"data_path: {train}" in (out / "train_recipe.yaml").read_text()
    assert not (demo / "finetune").exists()
    assert "| system | overall | closed | open |" in result.stdout
    for row in ("| real images |", "| blank images |", "| shuffled images |", "| majority answer |",
                "| question prior |"):
        assert row in result.stdout
    assert "counterfactual controls (" in result.stdout  # easy-VQA's truth is known: the edited-image rows
    answers = [json.loads(line) for line in (out / "test_answers_12.jsonl").read_text().splitlines()]
    questions = json.loads((out / "test_questions.json").read_text())
    assert len(answers) == len(questions) == 12
    assert answers[0]["metadata"]["generation"]["conv_mode"] == "llava_med"  # the stage-2 checkpoint's template
    audit = json.loads((out / "grounding_audit.json").read_text())
    assert audit["questions"] == 12 and set(audit["answers_changed_vs_real"]) == {"blank images", "shuffled images"}
    assert audit["answers"]["real images"] == {str(a["question_id"]): a["text"] for a in answers}
    scores = json.loads((out / "test_scores.json").read_text())
    assert scores["closed_accuracy"] == audit["rows"]["real images"]["closed_accuracy"]
    assert scores["recall"] == audit["rows"]["real images"]["recall"]

    env.update(FINETUNE_DATA=str(tmp_path / "missing.json"))
    result = subprocess.run(["bash", str(DEMO / "finetune_audit.sh")], capture_output=True, text=True,
                            check=False, env=_env(**env))
    assert result.returncode == 2 and "missing.json not found" in result.stderr
