"""YAML recipes: every shipped recipe parses to the paper's settings, flags override a recipe, bad recipes fail naming
the file and key, a tiny recipe trains and its resolved copy reruns to the same arguments."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from exgra_med.train.main import main, parse_args
from exgra_med.train.recipes import RESOLVED_RECIPE, RecipeError

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
SHIPPED = sorted(RECIPES.rglob("*.yaml"))
CPU = ["--bf16", "False", "--use_cpu", "True"]  # the recipes ask for bf16 on GPUs


def test_the_paper_runs_ship_as_recipes():
    names = {str(p.relative_to(RECIPES)) for p in SHIPPED}
    assert {"stage1.yaml", "stage2_exgra_med.yaml", "stage2_llava_med.yaml"} <= names
    for data in ("vqa_rad", "slake", "pathvqa"):
        assert {f"finetune_{data}.yaml", f"finetune_{data}_dci.yaml"} <= names
    for p in (10, 40):
        assert {f"data_efficiency/stage1_{p}.yaml", f"data_efficiency/stage2_exgra_med_{p}.yaml",
                f"data_efficiency/stage2_llava_med_{p}.yaml"} <= names
    assert {"stage2_vlm.yaml", "stage2_vlm_no_alignment.yaml"} <= names  # scripts/stage2_vlm.sh


@pytest.mark.parametrize("recipe", SHIPPED, ids=lambda p: str(p.relative_to(RECIPES)))
def test_each_shipped_recipe_parses_to_its_stage(recipe):
    model_args, data_args, training_args = parse_args([str(recipe), *CPU])
    name = recipe.stem
    align = model_args.alignment_config(seed=0)
    if name.startswith("stage1"):
        assert model_args.tune_mm_mlp_adapter and not align.enabled
        assert (training_args.learning_rate, training_args.num_train_epochs) == (2e-3, 1)
        assert training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps == 32
    elif name.startswith("stage2"):
        assert not model_args.tune_mm_mlp_adapter
        # A native VLM brings its own vision encoder and projector; the LLaVA path its stage-1 projector.
        vlm = "_vlm" in name
        assert (model_args.vision_tower is None, model_args.pretrain_mm_mlp_adapter is None) == (vlm, vlm)
        assert (training_args.learning_rate, training_args.num_train_epochs) == (2e-5, 3)
        exgra = "exgra_med" in name or name == "stage2_vlm"
        assert (align.enabled, align.multi_graph, align.after_de) == (exgra, exgra, exgra)
        if exgra:
            assert align.alpha == 1.0
    else:
        data = name.removeprefix("finetune_").removesuffix("_dci")
        dci = name.endswith("_dci")
        expected = {("vqa_rad", False): (4e-5, 15, 32), ("vqa_rad", True): (2e-5, 15, 32),
                    ("slake", False): (4e-5, 15, 64), ("slake", True): (4e-5, 18, 64),
                    ("pathvqa", False): (3e-5, 15, 32), ("pathvqa", True): (2e-5, 15, 32)}
        assert (training_args.learning_rate, training_args.num_train_epochs,
                training_args.per_device_train_batch_size) == expected[(data, dci)]
        assert (training_args.metric_for_best_model, training_args.eval_strategy) == ("eval_val_average", "epoch")
        assert data_args.evaluate_on_val and data_args.val_data_path == f"data/{data}/val.json"
        assert data_args.eval_max_new_tokens == 1024  # the reference's answer length, cut at ###
        assert model_args.model_name_or_path.endswith("-dci") == dci
    # The data-efficiency cells read their own subsample and stage-1 run.
    if "data_efficiency" in recipe.parts:
        fraction = name.rsplit("_", 1)[1]
        assert data_args.data_path.endswith(f"_{fraction}.json")
        assert training_args.output_dir.endswith(name)


def test_flags_override_the_recipe(tmp_path):
    model_args, _, training_args = parse_args([str(RECIPES / "stage2_exgra_med.yaml"), *CPU, "--alpha", "0.5",
                                               "--learning_rate=1e-4", "--output_dir", str(tmp_path)])
    assert model_args.alignment_config(seed=0).alpha == 0.5
    assert training_args.learning_rate == 1e-4 and training_args.output_dir == str(tmp_path)
    assert training_args.num_train_epochs == 3  # from the recipe


def test_bad_recipes_fail_naming_file_and_key(tmp_path):
    typo = tmp_path / "typo.yaml"
    typo.write_text("model_name_or_path: x\ndata_path: y\nlearning_rat: 1e-4\n")
    with pytest.raises(RecipeError, match=r"typo.yaml: unknown trainer flag\(s\) \['learning_rat'\]"):
        parse_args([str(typo)])
    broken = tmp_path / "broken.yaml"
    broken.write_text("model_name_or_path: [x\n")
    with pytest.raises(RecipeError, match="broken.yaml: invalid YAML"):
        parse_args([str(broken)])
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="list.yaml: a recipe is a mapping of trainer flags, found a list"):
        parse_args([str(listed)])
    with pytest.raises(RecipeError, match="missing.yaml: recipe file not found"):
        parse_args([str(tmp_path / "missing.yaml")])


def test_a_tiny_recipe_trains_and_its_resolved_copy_reruns_to_the_same_arguments(
    tiny_model_dir, easy_vqa_dir, tmp_path
):
    out = tmp_path / "stage1"
    argv = [str(RECIPES / "stage1.yaml"), *CPU, "--model_name_or_path", str(tiny_model_dir / "llm"),
            "--vision_tower", str(tiny_model_dir / "vision"), "--data_path", str(easy_vqa_dir / "alignment.json"),
            "--image_folder", str(easy_vqa_dir / "images"), "--output_dir", str(out), "--max_steps", "2",
            "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1", "--dataloader_num_workers",
            "0", "--save_strategy", "no", "--activation_checkpointing", "False", "--seed", "0"]
    assert main(argv) == 0
    assert (out / "mm_projector.safetensors").is_file()
    resolved = yaml.safe_load((out / RESOLVED_RECIPE).read_text())
    assert resolved["learning_rate"] == 2e-3 and resolved["tune_mm_mlp_adapter"] is True  # from the recipe
    assert resolved["max_steps"] == 2 and resolved["model_name_or_path"] == str(tiny_model_dir / "llm")  # flags
    assert "stage1.yaml" in (out / RESOLVED_RECIPE).read_text().splitlines()[0]
    again = parse_args([str(out / RESOLVED_RECIPE)])
    first = parse_args(argv)
    assert again[0] == first[0] and again[1] == first[1]
    for name in ("learning_rate", "max_steps", "per_device_train_batch_size", "lr_scheduler_type", "warmup_steps",
                 "bf16", "output_dir", "seed", "save_strategy"):
        assert getattr(again[2], name) == getattr(first[2], name), name


def _one_line(capsys, argv: list[str]) -> str:
    from exgra_med.cli import main as cli_main

    rc = cli_main(["train", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    return err[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_a_bf16_recipe_on_a_cpu_says_in_one_line_to_pass_bf16_false(tmp_path, capsys):
    line = _one_line(capsys, [str(RECIPES / "stage1.yaml"), "--output_dir", str(tmp_path / "out")])
    assert line == ("exgra-med train: error: --bf16 True (bf16 mixed precision) needs a GPU that supports bf16, "
                    "and none is visible; pass --bf16 False to train on the CPU")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text, expected", [
    ("", "the recipe is empty; a recipe is a mapping of trainer flags"),
    ("# only a comment\n", "the recipe is empty; a recipe is a mapping of trainer flags"),
    ("num_train_epochs: [1, 2]\n", "num_train_epochs: expected one value, got a list"),
    ("learning_rate: abc\n", "learning_rate: invalid value 'abc'"),
    ("per_device_train_batch_size: 1.5\n", "per_device_train_batch_size: invalid value 1.5"),
    ("bf16: maybe\n", "bf16: invalid value 'maybe'"),
    ("lr_scheduler_type: sideways\n", "lr_scheduler_type: invalid value 'sideways'"),
])
def test_recipe_type_errors_and_empty_recipes_end_in_one_line(tmp_path, capsys, text, expected):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    line = _one_line(capsys, [str(recipe), "--output_dir", str(tmp_path / "out")])
    assert line.startswith(f"exgra-med train: error: {recipe}: {expected}"), line


def test_a_failed_validation_leaves_no_recipe_behind(tiny_model_dir, easy_vqa_dir, tmp_path, capsys):
    out = tmp_path / "run"
    line = _one_line(capsys, [str(RECIPES / "stage1.yaml"), *CPU, "--model_name_or_path", str(tiny_model_dir / "llm"),
                              "--vision_tower", str(tiny_model_dir / "vision"),
                              "--data_path", str(tmp_path / "missing.json"),
                              "--image_folder", str(easy_vqa_dir / "images"), "--output_dir", str(out)])
    assert "missing.json" in line
    assert not out.exists()  # neither train_recipe.yaml nor the folder made for it
    out.mkdir()
    (out / RESOLVED_RECIPE).write_text("# an earlier run's recipe\n")
    _one_line(capsys, [str(RECIPES / "stage1.yaml"), *CPU, "--model_name_or_path", str(tiny_model_dir / "llm"),
                       "--data_path", str(tmp_path / "missing.json"), "--output_dir", str(out)])
    assert (out / RESOLVED_RECIPE).read_text() == "# an earlier run's recipe\n"  # put back as it was
