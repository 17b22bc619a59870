"""Stage 1 -> stage 2 training in-process, and resuming a run killed mid-training."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from exgra_med.model.loading import load_pretrained
from exgra_med.train.main import main, parse_args, train

COMMON = [
    "--per_device_train_batch_size", "4", "--logging_steps", "1", "--report_to", "none",
    "--dataloader_num_workers", "0", "--seed", "0", "--use_cpu", "True", "--save_strategy", "no",
]


def _stage1(tiny_model_dir: Path, data: Path, out: Path, steps: int = 3, extra=()) -> list[str]:
    return [
        "--model_name_or_path", str(tiny_model_dir / "llm"), "--vision_tower", str(tiny_model_dir / "vision"),
        "--data_path", str(data / "alignment.json"), "--image_folder", str(data / "images"),
        "--tune_mm_mlp_adapter", "True", "--learning_rate", "2e-3", "--max_steps", str(steps),
        "--output_dir", str(out), *COMMON, *extra,
    ]


def _log_history(out: Path) -> list[dict]:
    return json.loads((out / "trainer_state.json").read_text())["log_history"]


def test_stage1_saves_projector_and_delimiter_embeddings_and_stage2_loads_them(tiny_model_dir, easy_vqa_dir, tmp_path):
    s1 = tmp_path / "stage1"
    # With weight decay: the frozen rows of the trained matrix must not decay either.
    trainer = train(*parse_args(_stage1(tiny_model_dir, easy_vqa_dir, s1, extra=["--weight_decay", "0.1"])))
    weights = load_file(str(s1 / "mm_projector.safetensors"))
    assert {k for k in weights if not k.startswith("mm_projector.")} == {"model.embed_tokens.weight"}
    assert not (s1 / "model.safetensors").exists()
    history = _log_history(s1)
    assert [h["step"] for h in history if "lm_loss" in h] == [1, 2, 3]
    assert all(h["lm_loss"] == pytest.approx(h["loss"], rel=1e-4) for h in history if "lm_loss" in h)

    # Only the <im_start>/<im_end> rows of the input embeddings moved, and those are what the file holds.
    config = trainer.model.config
    ids = [config.im_start_token_id, config.im_end_token_id]
    before = load_file(str(tiny_model_dir / "llm" / "model.safetensors"))["model.embed_tokens.weight"]
    after = trainer.model.get_input_embeddings().weight.detach()
    others = torch.ones(before.shape[0], dtype=torch.bool)
    others[ids] = False
    assert torch.equal(after[others], before[others])
    assert (after[ids] - before[ids]).abs().amax(dim=1).min() > 1e-4  # both rows trained
    assert torch.equal(weights["model.embed_tokens.weight"], after[ids])
    out_before = load_file(str(tiny_model_dir / "llm" / "model.safetensors"))["lm_head.weight"]
    assert torch.equal(trainer.model.get_output_embeddings().weight.detach(), out_before)  # LM head frozen

    # Stage 2 with lr 0: the saved checkpoint must hold exactly the stage-1 projector, the stage-1 delimiter
    # embeddings, and the LLM's other weights.
    s2 = tmp_path / "stage2"
    argv = [
        "--model_name_or_path", str(tiny_model_dir / "llm"), "--vision_tower", str(tiny_model_dir / "vision"),
        "--pretrain_mm_mlp_adapter", str(s1), "--data_path", str(easy_vqa_dir / "instruct.json"),
        "--image_folder", str(easy_vqa_dir / "images"), "--learning_rate", "0", "--max_steps", "2",
        "--output_dir", str(s2), *COMMON,
    ]
    assert main(argv) == 0
    model, _, _ = load_pretrained(str(s2), dtype=torch.float32)
    for key, value in weights.items():
        if key.startswith("mm_projector."):
            torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)
    stage2_embed = model.get_input_embeddings().weight.detach()
    assert torch.equal(stage2_embed[ids], weights["model.embed_tokens.weight"])
    assert torch.equal(stage2_embed[others], before[others])
    trainable_llm = [p for n, p in model.named_parameters() if n.startswith("language_model.")]
    assert trainable_llm and all(p.requires_grad for p in trainable_llm)
    assert [h["step"] for h in _log_history(s2) if "lm_loss" in h] == [1, 2]


def test_stage1_without_delimiter_training_leaves_embeddings_alone(tiny_model_dir, easy_vqa_dir, tmp_path):
    s1 = tmp_path / "stage1"
    trainer = train(*parse_args(_stage1(tiny_model_dir, easy_vqa_dir, s1, 2, ["--tune_im_start_end", "False"])))
    before = load_file(str(tiny_model_dir / "llm" / "model.safetensors"))["model.embed_tokens.weight"]
    assert torch.equal(trainer.model.get_input_embeddings().weight.detach(), before)
    assert not trainer.model.get_input_embeddings().weight.requires_grad


def test_stage2_llm_weights_change_and_projector_trains(tiny_model_dir, easy_vqa_dir, tmp_path):
    out = tmp_path / "stage2"
    argv = [
        "--model_name_or_path", str(tiny_model_dir / "llm"), "--vision_tower", str(tiny_model_dir / "vision"),
        "--data_path", str(easy_vqa_dir / "instruct.json"), "--image_folder", str(easy_vqa_dir / "images"),
        "--learning_rate", "1e-3", "--max_steps", "2", "--output_dir", str(out), *COMMON,
        "--save_at_steps", "1",  # a learning-curve point, with --save_strategy no
    ]
    assert main(argv) == 0
    before = load_file(str(tiny_model_dir / "llm" / "model.safetensors"))
    after, _, _ = load_pretrained(str(out), dtype=torch.float32)
    state = after.state_dict()
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(state[f"language_model.{key}"], before[key])
    # --save_at_steps: checkpoint-1 only (step 2 is the final model), a complete model between the two
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    step1 = load_pretrained(str(out / "checkpoint-1"), dtype=torch.float32)[0].state_dict()[f"language_model.{key}"]
    assert not torch.equal(step1, before[key]) and not torch.equal(step1, state[f"language_model.{key}"])
    vision_before = load_file(str(tiny_model_dir / "vision" / "model.safetensors"))
    vkey = next(iter(vision_before))
    assert torch.equal(state[f"vision_tower.model.{vkey}"], vision_before[vkey])  # frozen tower


def _run_stage1_subprocess(argv: list[str]) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-m", "exgra_med.train", *argv],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(tiny_model_dir, easy_vqa_dir, tmp_path):
    steps = 24
    save = ["--save_strategy", "steps", "--save_steps", "3"]
    reference = tmp_path / "uninterrupted"
    assert main(_stage1(tiny_model_dir, easy_vqa_dir, reference, steps, save)) == 0

    out = tmp_path / "killed"
    argv = _stage1(tiny_model_dir, easy_vqa_dir, out, steps, save)
    proc = _run_stage1_subprocess(argv)
    deadline = time.time() + 300
    while not (out / "checkpoint-3" / "trainer_state.json").is_file():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "mm_projector.safetensors").exists(), "the run finished before it could be killed"

    resumed = _run_stage1_subprocess([*argv, "--resume_from_checkpoint", "auto"])
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    final = load_file(str(out / "mm_projector.safetensors"))
    expected = load_file(str(reference / "mm_projector.safetensors"))
    for key in expected:
        torch.testing.assert_close(final[key], expected[key], rtol=1e-5, atol=1e-6)
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == steps


@pytest.mark.parametrize("from_checkpoint,lora", [(False, False), (True, False), (True, True)])
def test_half_precision_model_has_one_dtype(tiny_model_dir, tmp_path, from_checkpoint, lora):
    """With --bf16 every parameter, the alignment GNN included, is bf16: ZeRO-3 flattens a group into one buffer
    and refuses mixed dtypes (seen on a GPU before this was fixed)."""
    from exgra_med.train.llava import build_model
    from exgra_med.train.main import parse_args

    source = [str(tiny_model_dir)] if from_checkpoint else [str(tiny_model_dir / "llm"), "--vision_tower",
                                                             str(tiny_model_dir / "vision")]
    model_args, _, training_args = parse_args([
        "--model_name_or_path", *source, "--data_path", "unused.json", "--output_dir", str(tmp_path),
        "--bf16", "True", "--use_cpu", "True", "--contrastive", "True", "--multi_graph", "True", "--after_de", "True",
        "--lora_enable", str(lora), "--lora_r", "4",
    ])
    model, _, _ = build_model(model_args, training_args)
    assert model.alignment is not None
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    if lora:  # PEFT's adapters too (it upcasts them to float32 unless told not to)
        assert any("lora_A" in n and p.requires_grad for n, p in model.named_parameters())


def test_save_at_steps_is_checked(tiny_model_dir, easy_vqa_dir, tmp_path, capsys):
    argv = _stage1(tiny_model_dir, easy_vqa_dir, tmp_path / "out")
    for flags, message in ((["--save_at_steps", "0", "5"], "optimizer steps >= 1, got [0, 5]"),
                           (["--save_at_steps", "5", "--save_total_limit", "1"], "--save_total_limit would delete")):
        with pytest.raises(SystemExit):
            parse_args([*argv, *flags])
        assert message in capsys.readouterr().err
    assert parse_args([*argv, "--save_at_steps", "25", "50"])[2].save_at_steps == [25, 50]
    assert parse_args([*argv, "--save_at_steps", "5", "--save_total_limit", "0"])[2].save_at_steps == [5]
