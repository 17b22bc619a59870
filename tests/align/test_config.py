"""AlignmentConfig: the one declaration of the alignment options, its defaults, validation, old config.json files, the
loss modules built from it and the trainer flags generated from it."""

from __future__ import annotations

import dataclasses
import json

import pytest

from exgra_med.align import AlignmentConfig, ContrastiveAlignmentLoss, MultiGraphAlignmentLoss, build_alignment_loss
from exgra_med.align.config import LEGACY_KEYS

# config.json of a stage-2 run written before `alignment_config` existed (flat keys, as ExGraMedConfig held them).
OLD_STYLE_CONFIG = {
    "model_type": "exgra_med",
    "text_config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                    "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 100},
    "vision_config": {"model_type": "clip_vision_model"},
    "mm_projector_type": "mlp2x_gelu",
    "contrastive": True,
    "multi_graph": True,
    "after_de": True,
    "alpha": 0.5,
    "contrastive_loss_type": "infonce",
    "simi_type": "average",
    "align_k": 3,
    "align_lambda": 40,
    "align_noise_scale": 0.1,
    "align_seed": 7,
    "align_masked_mean": True,
    "align_global_batch": False,
    "align_scale_invariant": True,
}


def test_defaults_are_the_reference_values():
    cfg = AlignmentConfig()
    assert cfg.to_dict() == {
        "contrastive": False, "multi_graph": False, "after_de": False, "alpha": 1.0,
        "contrastive_loss_type": "infonce", "simi_type": "average", "ot_eps": 0.1, "ot_max_iter": 500,
        "k": 5, "lambda_val": 80.0, "scale_invariant": False, "relative_lambda": 0.5, "undo_loss_scale": False,
        "noise_scale": 0.05,
        "dropout": 0.1, "masked_mean": False, "global_batch": False, "solver": "ipfp", "solve_on": None,
        "solver_pairs": "sparse", "seed": 0,
    }
    assert not cfg.enabled
    assert all(f.metadata["help"] for f in dataclasses.fields(AlignmentConfig))


@pytest.mark.parametrize("changes,match", [
    ({"k": 0}, "align_k"),
    ({"lambda_val": 0.0}, "align_lambda"),
    ({"noise_scale": -1.0}, "align_noise_scale"),
    ({"dropout": 1.0}, "align_dropout"),
    ({"relative_lambda": 0}, "align_relative_lambda"),
    ({"contrastive_loss_type": "triplet"}, "contrastive_loss_type"),
    ({"simi_type": "max"}, "simi_type"),
    ({"solver": "gurobi"}, "align_solver"),
    ({"solver_pairs": "csr"}, "align_solver_pairs"),
    ({"alpha": "1"}, "alpha"),
    ({"contrastive": 1}, "contrastive"),
    ({"multi_graph": True}, "--multi_graph needs --contrastive"),
    ({"after_de": True}, "--after_de needs --contrastive"),
    ({"kk": 3}, "unknown alignment option 'kk'"),
])
def test_invalid_values_name_the_option_and_flag(changes, match):
    with pytest.raises(ValueError, match=match):
        AlignmentConfig().replace(**changes)


def test_legacy_flat_keys_map_to_fields_and_round_trip():
    cfg = AlignmentConfig.from_dict({k: v for k, v in OLD_STYLE_CONFIG.items() if k in LEGACY_KEYS})
    assert (cfg.contrastive, cfg.multi_graph, cfg.after_de, cfg.alpha) == (True, True, True, 0.5)
    assert (cfg.k, cfg.lambda_val, cfg.noise_scale, cfg.seed) == (3, 40.0, 0.1, 7)
    assert cfg.masked_mean and cfg.scale_invariant and not cfg.global_batch
    assert isinstance(cfg.lambda_val, float)  # JSON's 40 read as 40.0
    assert AlignmentConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_old_style_config_json_loads_into_the_nested_config(tmp_path):
    from exgra_med.model.config import ExGraMedConfig

    (tmp_path / "config.json").write_text(json.dumps(OLD_STYLE_CONFIG))
    config = ExGraMedConfig.from_pretrained(tmp_path)
    expected = AlignmentConfig(contrastive=True, multi_graph=True, after_de=True, alpha=0.5, k=3, lambda_val=40.0,
                               noise_scale=0.1, seed=7, masked_mean=True, scale_invariant=True)
    assert config.alignment_config == expected
    # Saved again: one nested dict, no flat keys left.
    config.save_pretrained(tmp_path / "new")
    saved = json.loads((tmp_path / "new" / "config.json").read_text())
    assert saved["alignment_config"] == expected.to_dict()
    assert not set(saved) & (set(LEGACY_KEYS) - {"alignment_config"})
    assert ExGraMedConfig.from_pretrained(tmp_path / "new").alignment_config == expected
    # Loading overrides: flat keys change one option each, an AlignmentConfig replaces the whole.
    changed = ExGraMedConfig.from_pretrained(tmp_path, align_k=2, alpha=0.1)
    assert (changed.alignment_config.k, changed.alignment_config.alpha, changed.alignment_config.seed) == (2, 0.1, 7)
    replaced = ExGraMedConfig.from_pretrained(tmp_path, alignment_config=AlignmentConfig())
    assert replaced.alignment_config == AlignmentConfig()
    # One home: the flat names are not attributes of the config (only migrated when a file or caller passes them).
    assert not hasattr(config, "alpha") and not hasattr(config, "align_k")


def test_loss_modules_are_built_from_the_config():
    assert build_alignment_loss(AlignmentConfig(), 8) is None
    cfg = AlignmentConfig(contrastive=True, multi_graph=True, k=3, lambda_val=10.0, noise_scale=0.2, dropout=0.3,
                          seed=4, global_batch=True, scale_invariant=True, relative_lambda=0.25, solver="exhaustive")
    loss = build_alignment_loss(cfg, 8)
    assert isinstance(loss, MultiGraphAlignmentLoss)
    assert (loss.dim, loss.k, loss.lambda_val, loss.noise_scale, loss.seed) == (8, 3, 10.0, 0.2, 4)
    assert loss.global_batch and loss.scale_invariant_grad and loss.relative_lambda == 0.25
    assert loss.gnn.dropout == 0.3 and loss.solver_kwargs == {"backend": "exhaustive"}
    dense = build_alignment_loss(AlignmentConfig(contrastive=True, multi_graph=True, solver_pairs="dense"), 8)
    assert dense.solver_kwargs == {"backend": "ipfp", "pairs": "dense"}
    ablation = build_alignment_loss(AlignmentConfig(contrastive=True, contrastive_loss_type="siglip",
                                                    simi_type="OT", ot_eps=0.2, ot_max_iter=9), 8)
    assert isinstance(ablation, ContrastiveAlignmentLoss)
    assert (ablation.loss_type, ablation.simi_type, ablation.ot_eps, ablation.ot_max_iter) == ("siglip", "OT", 0.2, 9)


def test_module_defaults_are_the_config_defaults():
    cfg, loss = AlignmentConfig(), MultiGraphAlignmentLoss(8)
    assert (loss.k, loss.lambda_val, loss.noise_scale, loss.seed, loss.relative_lambda, loss.gnn.dropout) == (
        cfg.k, cfg.lambda_val, cfg.noise_scale, cfg.seed, cfg.relative_lambda, cfg.dropout)
    ablation = ContrastiveAlignmentLoss(8)
    assert (ablation.loss_type, ablation.simi_type, ablation.ot_eps, ablation.ot_max_iter) == (
        cfg.contrastive_loss_type, cfg.simi_type, cfg.ot_eps, cfg.ot_max_iter)


def test_trainer_flags_are_generated_from_the_fields():
    from transformers import HfArgumentParser

    from exgra_med.train.args import ModelArguments

    flags = {f.metadata["flag"] or f.name for f in dataclasses.fields(AlignmentConfig) if f.metadata["cli"]}
    # Today's flags (scripts/*.sh) and the options that had none before.
    assert {"contrastive", "multi_graph", "after_de", "alpha", "contrastive_loss_type", "simi_type", "align_lambda",
            "align_masked_mean", "align_global_batch", "align_scale_invariant", "align_k", "align_noise_scale",
            "align_dropout", "align_relative_lambda"} <= flags
    (args,) = HfArgumentParser(ModelArguments).parse_args_into_dataclasses(args=[
        "--model_name_or_path", "x", "--contrastive", "True", "--multi_graph", "True", "--after_de", "True",
        "--alpha", "0.5", "--align_k", "3", "--align_lambda", "20", "--align_noise_scale", "0.1",
        "--align_dropout", "0.2", "--align_relative_lambda", "0.3", "--align_scale_invariant", "True",
        "--align_masked_mean", "True", "--align_global_batch", "True",
    ])
    cfg = args.alignment_config(seed=11)
    assert cfg == AlignmentConfig(contrastive=True, multi_graph=True, after_de=True, alpha=0.5, k=3, lambda_val=20.0,
                                  noise_scale=0.1, dropout=0.2, relative_lambda=0.3, scale_invariant=True,
                                  masked_mean=True, global_batch=True, seed=11)
    (plain,) = HfArgumentParser(ModelArguments).parse_args_into_dataclasses(args=["--model_name_or_path", "x"])
    assert plain.alignment_config(seed=0) == AlignmentConfig()
    with pytest.raises(ValueError, match="--after_de needs --contrastive"):
        HfArgumentParser(ModelArguments).parse_args_into_dataclasses(
            args=["--model_name_or_path", "x", "--after_de", "True"])
