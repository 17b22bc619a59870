"""Real multi-process runs through the shipped scripts: torchrun DDP (gloo) and DeepSpeed ZeRO-2, on CPU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[2]
CPU_ARGS = [
    "--bf16", "False", "--activation_checkpointing", "False", "--dataloader_num_workers", "0",
    "--per_device_train_batch_size", "2", "--logging_steps", "1", "--save_strategy", "no", "--use_cpu", "True",
]


def _run_script(script: str, env_extra: dict, args: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    bin_dir = str(Path(sys.executable).parent)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PATH=f"{bin_dir}:{os.environ['PATH']}", **env_extra)
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / script), *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _env(tiny_model_dir: Path, data: Path, projector: Path, out: Path, port: int, **extra) -> dict:
    env = dict(
        MODEL_PATH=str(tiny_model_dir / "llm"), VISION_TOWER=str(tiny_model_dir / "vision"),
        DATA_PATH=str(data / "instruct.json"), IMAGE_FOLDER=str(data / "images"), PROJECTOR=str(projector),
        OUTPUT_DIR=str(out), MASTER_PORT=str(port),
    )
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def projector(stage1_projector):
    return stage1_projector


STAGE2_ARGS = [*CPU_ARGS, "--max_steps", "3", "--learning_rate", "1e-3"]


@pytest.fixture(scope="module")
def ddp_stage2(tiny_model_dir, easy_vqa_dir, projector, tmp_path_factory):
    """Stage 2 with alignment through scripts/stage2.sh under a real 2-process torchrun (DDP, gloo)."""
    out = tmp_path_factory.mktemp("s2") / "stage2_ddp"
    env = _env(tiny_model_dir, easy_vqa_dir, projector, out, free_port(), NPROC_PER_NODE="2")
    _run_script("stage2.sh", env, STAGE2_ARGS)
    return out


@pytest.mark.slow
def test_stage2_script_two_process_torchrun(ddp_stage2):
    out = ddp_stage2
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    # Each step consumed 2 processes x 2 records.
    assert state["log_history"][-1]["train_samples_per_second"] > 0
    steps = [h for h in state["log_history"] if "lm_loss" in h]
    assert [h["step"] for h in steps] == [1, 2, 3]
    assert all("align_loss" in h for h in steps)
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()


@pytest.mark.slow
def test_stage2_script_on_two_simulated_nodes_matches_one_node(
    tiny_model_dir, easy_vqa_dir, projector, ddp_stage2, tmp_path
):
    """Two launches of scripts/stage2.sh as node 0 and node 1 of a 2-node run (1 process each, rendezvous at
    127.0.0.1, gloo) train exactly the weights of the 1-node 2-process run, and only global rank 0 writes: node 1's
    output folder (its own, as on a machine of its own) stays empty."""
    port = free_port()
    bin_dir = str(Path(sys.executable).parent)
    procs = []
    for node in (0, 1):
        env = _env(tiny_model_dir, easy_vqa_dir, projector, tmp_path / f"node{node}", port, NNODES="2",
                   NODE_RANK=str(node), MASTER_ADDR="127.0.0.1", NPROC_PER_NODE="1")
        env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PATH=f"{bin_dir}:{os.environ['PATH']}", **env)
        procs.append(subprocess.Popen(
            ["bash", str(REPO / "scripts" / "stage2.sh"), *STAGE2_ARGS], env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        ))
    try:
        logs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)
    out = tmp_path / "node0"
    state = json.loads((out / "trainer_state.json").read_text())
    one_node = json.loads((ddp_stage2 / "trainer_state.json").read_text())
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    assert len(losses) == 3 and losses == [h["loss"] for h in one_node["log_history"] if "loss" in h]
    two, one = load_file(str(out / "model.safetensors")), load_file(str(ddp_stage2 / "model.safetensors"))
    assert set(two) == set(one)
    for name, value in one.items():
        torch.testing.assert_close(two[name], value, rtol=0, atol=0, msg=name)
    initial = load_file(str(tiny_model_dir / "llm" / "model.safetensors"))
    key = next(k for k in initial if "layers.0.mlp.up_proj" in k)
    assert not torch.equal(two[f"language_model.{key}"], initial[key])  # trained
    node1 = tmp_path / "node1"
    assert not node1.exists() or not any(node1.rglob("*")), sorted(node1.rglob("*"))


def test_launcher_refuses_a_node_rank_out_of_range_and_a_missing_master_addr(tmp_path):
    """The multi-node mistakes that otherwise hang at the rendezvous end at once with one line."""
    env = {k: v for k, v in os.environ.items() if k != "MASTER_ADDR"}
    script = tmp_path / "x.sh"
    script.write_text(f'source "{REPO / "scripts" / "_launch.sh"}"\necho "${{DISTRIBUTED_ARGS[@]}}"\n')
    for extra, message in (
        ({"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "node0.example"}, "NODE_RANK must be 0..NNODES-1"),
        ({"NNODES": "2", "NODE_RANK": "1"}, "NNODES=2 needs MASTER_ADDR"),
    ):
        proc = subprocess.run(["bash", str(script)], env={**env, **extra, "NPROC_PER_NODE": "1"},
                              capture_output=True, text=True)
        assert proc.returncode == 2 and message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    node1 = {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "node0.example", "NPROC_PER_NODE": "1"}
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, env={**env, **node1})
    assert proc.returncode == 0 and "--nnodes 2 --node_rank 1 --master_addr node0.example" in proc.stdout


@pytest.mark.slow
def test_stage2_script_fsdp_matches_ddp(tiny_model_dir, easy_vqa_dir, projector, ddp_stage2, tmp_path):
    """FSDP full_shard through scripts/fsdp.json (layers to wrap taken from the model) trains the same weights as
    DDP."""
    out = tmp_path / "stage2_fsdp"
    env = _env(tiny_model_dir, easy_vqa_dir, projector, out, free_port(), NPROC_PER_NODE="2",
               FSDP="full_shard auto_wrap")
    _run_script("stage2.sh", env, STAGE2_ARGS)
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    assert all("align_loss" in h for h in state["log_history"] if "lm_loss" in h)
    fsdp, ddp = load_file(str(out / "model.safetensors")), load_file(str(ddp_stage2 / "model.safetensors"))
    assert set(fsdp) == set(ddp)  # a full (gathered) state dict, not one rank's shard
    for name, value in ddp.items():
        assert fsdp[name].shape == value.shape, name
        torch.testing.assert_close(fsdp[name], value, rtol=1e-5, atol=1e-6, msg=name)
    initial = load_file(str(tiny_model_dir / "llm" / "model.safetensors"))
    key = next(k for k in initial if "layers.0.mlp.up_proj" in k)
    assert not torch.equal(fsdp[f"language_model.{key}"], initial[key])  # the LLM was trained


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("ninja") is None and not Path(sys.executable).with_name("ninja").exists(),
    reason="DeepSpeed needs ninja to build its CPU ops",
)
def test_stage1_script_deepspeed_zero2(tiny_model_dir, easy_vqa_dir, tmp_path):
    pytest.importorskip("deepspeed")
    out = tmp_path / "stage1_zero2"
    env = _env(
        tiny_model_dir,
        easy_vqa_dir,
        tmp_path,
        out,
        free_port(),
        NPROC_PER_NODE="2",
        DEEPSPEED=str(REPO / "scripts" / "deepspeed" / "zero2.json"),
        DATA_PATH=str(easy_vqa_dir / "alignment.json"),
    )
    _run_script("stage1.sh", env, [*CPU_ARGS, "--max_steps", "3", "--learning_rate", "1e-2"])
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    assert [h["step"] for h in state["log_history"] if "lm_loss" in h] == [1, 2, 3]
    projector = load_file(str(out / "mm_projector.safetensors"))
    from exgra_med.model.loading import build_from_parts

    fresh, _, _ = build_from_parts(str(tiny_model_dir / "llm"), str(tiny_model_dir / "vision"))
    assert set(projector) == {f"mm_projector.{k}" for k in fresh.mm_projector.state_dict()} | {
        "model.embed_tokens.weight"}
    assert all(torch.isfinite(v).all() for v in projector.values())
    ids = [fresh.config.im_start_token_id, fresh.config.im_end_token_id]
    initial = fresh.get_input_embeddings().weight.detach()[ids]
    assert (projector["model.embed_tokens.weight"] - initial).abs().amax(dim=1).min() > 1e-4  # trained under ZeRO-2


@pytest.mark.slow
def test_lora_run_saves_a_merged_checkpoint_equal_to_merging_its_last_checkpoint(
    tiny_model_dir, easy_vqa_dir, projector, tmp_path
):
    """2-process LoRA stage 2: every rank saves the adapter model, rank 0 folds the adapters in. The result equals
    `merge-lora` of the run's last checkpoint with the lora_alpha the checkpoint records (no flag needed)."""
    from exgra_med.cli import main as cli_main
    from exgra_med.model.loading import load_pretrained

    out = tmp_path / "stage2_lora"
    env = _env(tiny_model_dir, easy_vqa_dir, projector, out, free_port(), NPROC_PER_NODE="2")
    _run_script(
        "stage2.sh",
        env,
        [
            *STAGE2_ARGS,
            "--lora_enable",
            "True",
            "--lora_r",
            "4",
            "--lora_alpha",
            "8",
            "--save_strategy",
            "steps",
            "--save_steps",
            "3",
        ],
    )
    assert not (out / "lora-unmerged").exists() and not (out / ".lora-merged").exists()
    final = load_file(str(out / "model.safetensors"))
    assert not any("lora_" in k or "base_layer" in k for k in final)
    assert json.loads((out / "config.json").read_text())["lora_alpha"] is None
    ckpt_config = json.loads((out / "checkpoint-3" / "config.json").read_text())
    assert ckpt_config["lora_alpha"] == 8
    merged_dir = tmp_path / "merged_from_checkpoint"
    assert cli_main(["merge-lora", "--in", str(out / "checkpoint-3"), "--out", str(merged_dir)]) == 0
    merged = load_file(str(merged_dir / "model.safetensors"))
    assert set(merged) == set(final)
    for name, value in final.items():
        torch.testing.assert_close(merged[name], value, msg=name)
    base = load_file(str(tiny_model_dir / "llm" / "model.safetensors"))
    key = next(k for k in base if "layers.0.self_attn.q_proj" in k)
    assert not torch.equal(final[f"language_model.{key}"], base[key])  # trained adapters were folded in
    model, _, _ = load_pretrained(str(out))
    assert model.config.lora_alpha is None
