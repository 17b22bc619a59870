"""scripts/finetune.sh on two ranks: validation and test answers sharded and gathered in order (one rank and the
script's flags: tests/train/test_finetune_scripts.py). Modules named *distributed.py run one after another on one xdist
worker (tests/conftest.py)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import free_port, small_easy_vqa
from tests.train.test_finetune_scripts import _env, cpu_flags

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_two_ranks_shard_and_gather_val_and_test_answers(tiny_model_dir, easy_vqa_dir, tmp_path):
    data = small_easy_vqa(easy_vqa_dir, tmp_path / "data", {"train": 16, "val": 5, "test": 5})
    out = tmp_path / "ft"
    cpu = cpu_flags(batch=2, every=2, eval_batch=2, new_tokens=3)
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "finetune.sh"), "easy-vqa", *cpu],
        capture_output=True,
        text=True,
        check=False,
        env=_env(
            MODEL_PATH=str(tiny_model_dir),
            DATA_DIR=str(data),
            OUTPUT_DIR=str(out),
            LR="1e-4",
            NPROC_PER_NODE="2",
            MASTER_PORT=str(free_port()),
        ),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    test = json.loads((data / "test.json").read_text())
    lines = [json.loads(x) for x in (out / "test_answers.jsonl").read_text().splitlines()]
    assert [x["question_id"] for x in lines] == [r["id"] for r in test]  # 3 + 2 answers gathered, in order

    from exgra_med.eval.generate import generate_answers
    from exgra_med.eval.metrics import load_predictions, vqa_train_metrics
    from exgra_med.model.loading import load_pretrained

    model, tokenizer, processor = load_pretrained(str(out))
    alone = generate_answers(model, tokenizer, processor, test, 1, "simple", 3, image_folder=data / "images")
    assert [x["text"] for x in lines] == [alone[str(r["id"])] for r in test]  # each answer from its own question

    results = json.loads((out / "test_results.json").read_text())
    expected = vqa_train_metrics(test, load_predictions(str(out / "test_answers.jsonl")))
    assert results["eval_test_average"] == pytest.approx(expected["average"], abs=1e-3)
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert [h["step"] for h in history if "eval_val_average" in h] == [2]
