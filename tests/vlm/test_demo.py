"""`DEMO_ARCH=<arch> bash scripts/demo.sh` runs the demo on a tiny native VLM (a few steps per stage here)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from exgra_med.data.prepare.easy_vqa import parse_rationale

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_demo_on_a_native_vlm(tmp_path):
    demo = tmp_path / "demo"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}", "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "DEMO_ARCH": "gemma3", "DEMO_DIR": str(demo), "STAGE2_STEPS": "2",
           "FINETUNE_STEPS": "2", "STAGE2_BATCH": "4", "BATCH": "4", "DEMO_IMAGES": "40", "TEST_QUESTIONS": "8",
           "MASTER_PORT": "29571"}
    result = subprocess.run(["bash", str(REPO / "scripts" / "demo.sh")], capture_output=True, text=True, env=env,
                            timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "tiny gemma3 model" in result.stdout
    for row in ("| majority answer |", "| real images |", "| shuffled images |"):
        assert row in result.stdout
    assert json.loads((demo / "stage2" / "config.json").read_text())["model_type"] == "gemma3"
    assert (demo / "stage2" / "exgra_med_alignment.safetensors").is_file()  # stage 2 trained the alignment head
    answers = (demo / "finetune" / "test_answers.jsonl").read_text().splitlines()
    assert len(answers) == len(json.loads((demo / "finetune" / "test_questions.json").read_text())) > 0


@pytest.mark.slow
def test_demo_defaults_read_one_cls_token_and_fine_tune_on_rationale_answers(tmp_path):
    """`bash scripts/demo.sh` (ExGra-Med's own model) end to end at toy scale with its defaults: the LLM gets one image
    token (the tower's last-layer CLS) and the `mistral` template through stage 2, fine-tuning and evaluation, and is
    fine-tuned on `train_rationale.json` (yes/no answered with the comparison in words)."""
    demo = tmp_path / "demo"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}", "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "DEMO_DIR": str(demo), "TOWER_STEPS": "2", "STAGE1_STEPS": "2",
           "STAGE2_STEPS": "2", "FINETUNE_STEPS": "2", "STAGE2_BATCH": "4", "BATCH": "4", "DEMO_IMAGES": "40",
           "TEST_QUESTIONS": "8", "MASTER_PORT": "29573"}
    for name in ("DEMO_ARCH", "VISION_FLAGS", "TEMPLATE", "RATIONALE", "FINETUNE_DATA", "MAX_NEW_TOKENS"):
        env.pop(name, None)
    result = subprocess.run(["bash", str(REPO / "scripts" / "demo.sh")], capture_output=True, text=True, env=env,
                            timeout=1200)
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
