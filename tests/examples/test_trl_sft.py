"""examples/trl_sft: a TRL SFTTrainer run with the ExGra-Med alignment head on a tiny Qwen2.5-VL (3 steps, 8 records)
logs a finite positive alignment loss at every step, trains the objective's GNN, and saves a folder that the project
loads back, head included."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

from exgra_med.align.config import AlignmentConfig
from exgra_med.model.auto import load_backend
from exgra_med.model.native.aligned import (
    ALIGNMENT_CONFIG,
    ALIGNMENT_WEIGHTS,
    AlignedVLM,
    load_alignment_head,
    read_head_config,
)
from exgra_med.model.native.backend import NativeBackend
from exgra_med.model.native.tiny import make_tiny_vlm
from tests.conftest import small_easy_vqa

pytest.importorskip("trl")

STEPS = 3


@pytest.fixture(scope="module")
def trl_run(easy_vqa_dir, tmp_path_factory):
    """The output folder of a 3-step run (batch 4, alpha 0.5) and its log history."""
    from examples.trl_sft.train import main

    root = tmp_path_factory.mktemp("trl_sft")
    model = make_tiny_vlm(root / "model", "qwen2_5_vl", seed=0)
    data = small_easy_vqa(easy_vqa_dir, root / "data", {"instruct": 8})
    out = root / "out"
    argv = ["--model", str(model), "--data", str(data / "instruct.json"), "--image-folder", str(data / "images"),
            "--output-dir", str(out), "--max-steps", str(STEPS), "--per-device-train-batch-size", "4",
            "--learning-rate", "1e-3", "--logging-steps", "1", "--alpha", "0.5", "--seed", "0", "--bf16", "False",
            "--save-strategy", "no", "--report-to", "none"]
    assert main(argv) == 0
    return out, json.loads((out / "trainer_state.json").read_text())["log_history"]


def test_every_logged_step_has_a_finite_positive_alignment_loss_added_with_alpha(trl_run):
    _, history = trl_run
    steps = [entry for entry in history if "align_loss" in entry]
    assert [entry["step"] for entry in steps] == list(range(1, STEPS + 1))
    for entry in steps:
        assert math.isfinite(entry["align_loss"]) and 0 < entry["align_loss"] <= 2  # a Hamming loss in [0, 2]
        assert math.isfinite(entry["lm_loss"]) and entry["lm_loss"] > 0
        assert entry["loss"] == pytest.approx(entry["lm_loss"] + 0.5 * entry["align_loss"], rel=1e-3)
        assert {"align_loss/image", "align_loss/response", "align_loss/extended"} <= set(entry)


def test_the_objective_is_trained_and_saved_beside_the_model(trl_run):
    from examples.trl_sft.train import build_objective

    out, _ = trl_run
    assert (out / ALIGNMENT_WEIGHTS).is_file() and (out / ALIGNMENT_CONFIG).is_file()
    saved_config = read_head_config(out)
    config = AlignmentConfig.from_dict(saved_config["alignment_config"])
    assert config.multi_graph and config.after_de and config.alpha == 0.5
    initial = build_objective(config, saved_config["hidden_size"]).state_dict()
    trained = load_file(str(out / ALIGNMENT_WEIGHTS))
    assert set(trained) == set(initial) and len(trained) > 0
    changed = [k for k in initial if not torch.equal(initial[k], trained[k])]
    assert changed, "no weight of the alignment objective changed in training"
    assert not any(k.startswith("alignment.") for k in load_file(str(out / "model.safetensors")))


def test_the_saved_folder_loads_back_with_its_head(trl_run):
    out, _ = trl_run
    backend = load_backend(str(out))
    assert isinstance(backend, NativeBackend)
    config = AlignmentConfig.from_dict(read_head_config(out)["alignment_config"])
    model = AlignedVLM(AutoModelForImageTextToText.from_pretrained(out), config)
    assert load_alignment_head(model, out)
    saved = load_file(str(out / ALIGNMENT_WEIGHTS))
    for name, value in model.alignment.state_dict().items():
        torch.testing.assert_close(value, saved[name])
