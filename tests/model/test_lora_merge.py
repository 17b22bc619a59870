"""`exgra-med merge-lora`: a checkpoint saved during a --lora_enable run becomes a plain checkpoint whose logits
equal those of the PEFT-wrapped model that saved it."""

from __future__ import annotations

import pytest
import torch

from exgra_med.cli import main as cli_main
from exgra_med.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_PATCH_TOKEN
from exgra_med.model.checkpoint import load_model
from exgra_med.model.lora import merge_lora_state_dict
from exgra_med.train.args import ModelArguments
from exgra_med.train.llava import set_trainable

LORA_ALPHA = 8


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory):
    """A LoRA-wrapped tiny model with non-zero adapters, saved as the trainer saves checkpoint-N."""
    model, tokenizer, processor = load_model(tiny_model_dir, dtype=torch.float32)
    args = ModelArguments(model_name_or_path=str(tiny_model_dir), lora_enable=True, lora_r=4, lora_alpha=LORA_ALPHA)
    set_trainable(model, args)
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero; a trained adapter is not
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    model.eval()
    run = tmp_path_factory.mktemp("lora_run")
    ckpt = run / "checkpoint-2"
    model.save_pretrained(ckpt)
    tokenizer.save_pretrained(ckpt)  # the trainer saves the processing class in each checkpoint
    processor.save_pretrained(run)  # the image processor only lands in the run folder
    return model, tokenizer, ckpt


def _inputs(tokenizer, n: int):
    image = DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_PATCH_TOKEN * n + DEFAULT_IM_END_TOKEN
    ids = tokenizer(f"### Human: Is there a circle?\n{image}\n### Assistant:", return_tensors="pt").input_ids
    return ids, torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))


def test_merged_checkpoint_equals_peft_model(lora_run, tmp_path):
    peft_model, tokenizer, ckpt = lora_run
    from safetensors import safe_open

    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert "language_model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight" in names
    out = tmp_path / "merged"
    assert cli_main(["merge-lora", "--in", str(ckpt), "--out", str(out), "--lora-alpha", str(LORA_ALPHA)]) == 0
    merged, tok2, processor = load_model(out, dtype=torch.float32)
    assert not any("lora" in k or "base_layer" in k for k in merged.state_dict())
    assert processor.crop_size["height"] == 32 and len(tok2) == len(tokenizer)
    ids, pixels = _inputs(tokenizer, merged.num_image_tokens)
    with torch.no_grad():
        expected = peft_model(input_ids=ids, pixel_values=pixels).logits
        got = merged(input_ids=ids, pixel_values=pixels).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # The adapters matter: merging with another alpha gives other logits.
    out2 = tmp_path / "merged_wrong_alpha"
    assert cli_main(["merge-lora", "--in", str(ckpt), "--out", str(out2), "--lora-alpha", "1"]) == 0
    wrong, _, _ = load_model(out2, dtype=torch.float32)
    with torch.no_grad():
        assert (wrong(input_ids=ids, pixel_values=pixels).logits - expected).abs().max() > 1e-3


def test_merge_formula_and_errors(tiny_model_dir, tmp_path, capsys):
    a, b, w = torch.randn(2, 3), torch.randn(4, 2), torch.randn(4, 3)
    prefix = "language_model.base_model.model.model.layers.0.mlp.up_proj"
    state = {f"{prefix}.base_layer.weight": w, f"{prefix}.lora_A.default.weight": a,
             f"{prefix}.lora_B.default.weight": b, "mm_projector.0.weight": torch.ones(1)}
    merged, n = merge_lora_state_dict(state, lora_alpha=6)
    assert n == 1 and set(merged) == {"language_model.model.layers.0.mlp.up_proj.weight", "mm_projector.0.weight"}
    torch.testing.assert_close(merged["language_model.model.layers.0.mlp.up_proj.weight"], w + 3.0 * b @ a)
    del state[f"{prefix}.lora_B.default.weight"]
    with pytest.raises(ValueError, match="has lora_A but not its pair"):
        merge_lora_state_dict(state, lora_alpha=6)
    assert cli_main(["merge-lora", "--in", str(tiny_model_dir), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("exgra-med merge-lora: error: ") and "Traceback" not in err, err
    assert "no LoRA weights" in err
