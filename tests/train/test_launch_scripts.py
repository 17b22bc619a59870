"""The training launchers (scripts/stage1.sh, stage2.sh, stage2_vlm.sh, finetune.sh) run torchrun with a recipe of
recipes/ and only the user's paths and overrides: the arguments a script launches parse to its recipe's, except
for the flags it passes. A fake TORCHRUN records the command instead of launching it."""

from __future__ import annotations

import dataclasses
import os
import subprocess
from pathlib import Path

import pytest

from exgra_med.train.main import parse_args

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "recipes"
CPU = ["--bf16", "False", "--use_cpu", "True"]  # the recipes ask for bf16 on GPUs
# What a launcher may pass besides the recipe without a variable asking for it: where things are, never how to train.
PATH_FLAGS = {"model_name_or_path", "vision_tower", "pretrain_mm_mlp_adapter", "data_path", "val_data_path",
              "test_data_path", "image_folder", "output_dir"}
STAGE_ENV = {"MODEL_PATH": "m", "VISION_TOWER": "v", "DATA_PATH": "d.json", "IMAGE_FOLDER": "imgs",
             "PROJECTOR": "stage1"}
# The variables the scripts read, unset for each run unless a test sets them.
SCRIPT_VARIABLES = {*STAGE_ENV, "OUTPUT_DIR", "DATA_DIR", "ALPHA", "DENSE_CONNECTOR", "LR", "EPOCHS", "BATCH",
                    "GRAD_ACCUM", "EVAL_BATCH", "EVAL_MAX_NEW_TOKENS", "NNODES", "NODE_RANK", "MASTER_ADDR",
                    "MASTER_PORT", "DEEPSPEED", "FSDP", "FSDP_CONFIG"}


def _launch(tmp_path: Path, script: str, *args: str, cwd: Path | None = None, **env: str) -> list[str]:
    """The arguments `scripts/SCRIPT ARGS` gives `torchrun ... -m exgra_med.train` (asserting the launcher's own
    arguments come first)."""
    record = tmp_path / "torchrun_argv"
    fake = tmp_path / "torchrun"
    fake.write_text(f"#!/usr/bin/env bash\nprintf '%s\\0' \"$@\" > {record}\n")
    fake.chmod(0o755)
    clean = {k: v for k, v in os.environ.items() if k not in SCRIPT_VARIABLES}
    subprocess.run(["bash", str(REPO / "scripts" / script), *args], cwd=cwd or tmp_path, check=True,
                   env={**clean, "TORCHRUN": str(fake), "NPROC_PER_NODE": "2", **env})
    argv = record.read_bytes().decode().split("\0")[:-1]
    launcher = argv.index("-m")
    assert argv[:launcher][-2:] == ["--nproc_per_node", "2"] and argv[launcher + 1] == "exgra_med.train"
    return argv[launcher + 2:]


def _flags(argv: list[str]) -> dict[str, str]:
    """{flag: value} of `--flag value` pairs (each flag once)."""
    assert len(argv) % 2 == 0 and all(a.startswith("--") for a in argv[::2]), argv
    names = [a[2:] for a in argv[::2]]
    assert len(set(names)) == len(names), argv
    return dict(zip(names, argv[1::2], strict=True))


def _fields(argv: list[str]) -> dict[str, object]:
    """Every parsed argument of `argv` (recipe first), by name."""
    groups = parse_args([*argv, *CPU])
    return {f.name: getattr(g, f.name) for g in groups for f in dataclasses.fields(g) if f.init}


def _assert_recipe_plus(argv: list[str], recipe: str, overrides: dict[str, str]) -> dict[str, str]:
    """`argv` is RECIPE followed by path flags and exactly `overrides`; it parses to the recipe's arguments except
    for the flags it passes. Returns the flags."""
    assert argv[0] == str(RECIPES / recipe)
    flags = _flags(argv[1:])
    assert {k: v for k, v in flags.items() if k not in PATH_FLAGS} == overrides  # no hyperparameter of its own
    launched, alone = _fields(argv), _fields(argv[:1])
    assert {k for k in launched if launched[k] != alone[k]} <= set(flags)
    return flags


@pytest.mark.parametrize("args, env, recipe, overrides", [
    ((), {}, "stage1.yaml", {}),
    (("--seed", "3"), {"DENSE_CONNECTOR": "dci", "OUTPUT_DIR": "o"}, "stage1.yaml",
     {"mm_dense_connector_type": "dci", "seed": "3"}),
], ids=["recipe", "variables"])
def test_stage1_launches_its_recipe(tmp_path, args, env, recipe, overrides):
    flags = _assert_recipe_plus(_launch(tmp_path, "stage1.sh", *args, **STAGE_ENV, **env), recipe, overrides)
    assert (flags["model_name_or_path"], flags["vision_tower"], flags["data_path"], flags["image_folder"]) == (
        "m", "v", "d.json", "imgs")
    assert flags["output_dir"] == env.get("OUTPUT_DIR", "runs/stage1")


@pytest.mark.parametrize("args, env, recipe, overrides", [
    ((), {}, "stage2_exgra_med.yaml", {}),
    (("--max_steps", "3"), {"ALPHA": "0.5", "DENSE_CONNECTOR": "dci"}, "stage2_exgra_med.yaml",
     {"alpha": "0.5", "mm_dense_connector_type": "dci", "max_steps": "3"}),
    (("--llava-med",), {}, "stage2_llava_med.yaml", {}),
    (("--llava-med", "--seed", "1"), {"ALPHA": "0.5"}, "stage2_llava_med.yaml", {"seed": "1"}),  # no alignment
], ids=["exgra-med", "exgra-med-variables", "llava-med", "llava-med-alpha-ignored"])
def test_stage2_launches_its_recipe(tmp_path, args, env, recipe, overrides):
    flags = _assert_recipe_plus(_launch(tmp_path, "stage2.sh", *args, **STAGE_ENV, **env), recipe, overrides)
    assert flags["pretrain_mm_mlp_adapter"] == "stage1" and flags["output_dir"] == "runs/stage2"


@pytest.mark.parametrize("args, env, recipe, overrides", [
    ((), {}, "stage2_vlm.yaml", {}),
    ((), {"ALPHA": "2"}, "stage2_vlm.yaml", {"alpha": "2"}),
    (("--no-alignment", "--max_steps", "1"), {"ALPHA": "2"}, "stage2_vlm_no_alignment.yaml", {"max_steps": "1"}),
], ids=["alignment", "alpha", "no-alignment"])
def test_stage2_vlm_launches_its_recipe(tmp_path, args, env, recipe, overrides):
    env = {**STAGE_ENV, **env, "MODEL_PATH": "Qwen/Qwen2.5-VL-7B-Instruct"}
    del env["VISION_TOWER"], env["PROJECTOR"]
    flags = _assert_recipe_plus(_launch(tmp_path, "stage2_vlm.sh", *args, **env), recipe, overrides)
    assert "vision_tower" not in flags and flags["output_dir"] == "runs/stage2_vlm"


def _prepared(root: Path, name: str) -> Path:
    data = root / name
    data.mkdir(parents=True)
    for split in ("train", "val", "test"):
        (data / f"{split}.json").write_text("[]")
    return data


@pytest.mark.parametrize("dataset", ["vqa-rad", "slake", "pathvqa"])
@pytest.mark.parametrize("dci", [False, True], ids=["", "dci"])
def test_finetune_launches_the_data_sets_recipe_with_its_own_paths(tmp_path, dataset, dci):
    """With the default variables, the launched command is the recipe itself: the paths it passes are the recipe's."""
    _prepared(tmp_path / "data", dataset.replace("-", "_"))
    recipe = f"finetune_{dataset.replace('-', '_')}{'_dci' if dci else ''}.yaml"
    argv = _launch(tmp_path, "finetune.sh", dataset, *(["--dci"] if dci else []), cwd=tmp_path)
    _assert_recipe_plus(argv, recipe, {})
    assert _fields(argv) == _fields(argv[:1])


def test_finetune_variables_each_override_one_flag(tmp_path):
    data = _prepared(tmp_path, "mine")
    env = dict(DATA_DIR=str(data), MODEL_PATH="mm", OUTPUT_DIR="oo", IMAGE_FOLDER="ii", LR="1e-4", EPOCHS="2",
               BATCH="4", GRAD_ACCUM="3", EVAL_BATCH="5", EVAL_MAX_NEW_TOKENS="7")
    argv = _launch(tmp_path, "finetune.sh", "slake", "--dci", "--max_steps", "2", **env)
    flags = _assert_recipe_plus(argv, "finetune_slake_dci.yaml", {
        "learning_rate": "1e-4", "num_train_epochs": "2", "per_device_train_batch_size": "4",
        "gradient_accumulation_steps": "3", "eval_batch_size": "5", "eval_max_new_tokens": "7", "max_steps": "2"})
    assert (flags["model_name_or_path"], flags["output_dir"], flags["image_folder"]) == ("mm", "oo", "ii")
    assert flags["val_data_path"] == str(data / "val.json")


@pytest.mark.parametrize("dci", [False, True], ids=["", "dci"])
def test_finetune_on_another_data_set_runs_the_vqa_rad_recipe_at_lr(tmp_path, dci):
    data = _prepared(tmp_path, "mine")
    argv = _launch(tmp_path, "finetune.sh", "easy-vqa", *(["--dci"] if dci else []), DATA_DIR=str(data), LR="1e-4")
    flags = _assert_recipe_plus(argv, f"finetune_vqa_rad{'_dci' if dci else ''}.yaml", {"learning_rate": "1e-4"})
    assert flags["output_dir"] == "runs/finetune/easy-vqa" + ("-dci" if dci else "")


def test_backend_flags_follow_the_paths_and_the_users_flags_come_last(tmp_path):
    argv = _launch(tmp_path, "stage2.sh", "--llava-med", "--fsdp", "shard_grad_op", **STAGE_ENV,
                   FSDP="full_shard auto_wrap")
    assert argv[-6:] == ["--fsdp", "full_shard auto_wrap", "--fsdp_config", str(REPO / "scripts" / "fsdp.json"),
                         "--fsdp", "shard_grad_op"]
    argv = _launch(tmp_path, "stage1.sh", "--learning_rate", "1e-4", **STAGE_ENV, DEEPSPEED="zero2.json")
    assert argv[-4:] == ["--deepspeed", "zero2.json", "--learning_rate", "1e-4"]
