"""Released checkpoints in the reference layout: direct loading and `exgra-med convert` give the reference's logits.

The test writes a tiny checkpoint exactly as the reference saves one (LlavaLlamaForCausalLM config with
`mm_*` keys and stale special ids, `model.*` + `model.mm_projector.*` + `lm_head.*` weights, tokenizer with
the image tokens, vision tower in a separate folder) and re-implements the reference forward independently:
CLIP hidden_states[-2] without CLS -> projector -> spliced after `<im_start>` -> LLaMA -> lm_head.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPVisionModel, LlamaForCausalLM

from exgra_med.cli import main as cli_main
from exgra_med.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_PATCH_TOKEN
from exgra_med.model.checkpoint import load_model
from exgra_med.model.reference import is_reference_checkpoint, read_reference_config


def write_reference_checkpoint(tiny_model_dir, out, projector: str, sharded_bin: bool) -> dict:
    """A LlavaLlamaForCausalLM folder built from the tiny LLM, with a seeded random projector."""
    from transformers import AutoTokenizer

    llm = LlamaForCausalLM.from_pretrained(tiny_model_dir / "llm")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir / "llm")
    hidden = llm.config.hidden_size
    vision_hidden = CLIPVisionModel.from_pretrained(tiny_model_dir / "vision").config.hidden_size
    gen = torch.Generator().manual_seed(7)
    if projector == "linear":
        proj = {
            "weight": torch.randn(hidden, vision_hidden, generator=gen) * 0.05,
            "bias": torch.randn(hidden, generator=gen),
        }
    else:
        proj = {
            "0.weight": torch.randn(hidden, vision_hidden, generator=gen) * 0.05,
            "0.bias": torch.randn(hidden, generator=gen) * 0.05,
            "2.weight": torch.randn(hidden, hidden, generator=gen) * 0.05,
            "2.bias": torch.randn(hidden, generator=gen) * 0.05,
        }
    state = dict(llm.state_dict())
    state.update({f"model.mm_projector.{k}": v for k, v in proj.items()})
    out.mkdir(parents=True)
    if sharded_bin:
        keys = sorted(state)
        shards = {
            "pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
            "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2 :],
        }
        weight_map = {}
        for name, part in shards.items():
            torch.save({k: state[k].clone() for k in part}, out / name)
            weight_map.update({k: name for k in part})
        (out / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"))
    cfg = llm.config.to_dict()
    cfg.update(
        architectures=["LlavaLlamaForCausalLM"],
        model_type="llava",
        pad_token_id=-1,
        bos_token_id=0,
        eos_token_id=1,
        mm_vision_tower="openai/clip-vit-large-patch14",
        mm_hidden_size=vision_hidden,
        mm_vision_select_layer=-2,
        mm_use_im_start_end=True,
        use_mm_proj=True,
        mm_projector_type=projector,
        mm_dense_connector_type="none",
        sep_image_conv_front=False,
        tune_mm_mlp_adapter=False,
    )
    if projector == "linear":
        del cfg["mm_projector_type"]  # v0 configs without the key mean a linear projector
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    tokenizer.save_pretrained(out)
    return proj


def reference_logits(tiny_model_dir, ref_dir, proj: dict, input_ids, pixels) -> torch.Tensor:
    """The reference forward, written independently of exgra_med's model code."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ref_dir)
    llm = LlamaForCausalLM.from_pretrained(tiny_model_dir / "llm").eval()
    tower = CLIPVisionModel.from_pretrained(tiny_model_dir / "vision").eval()
    with torch.no_grad():
        feats = tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]  # (1, N, C)
        if "weight" in proj:
            feats = F.linear(feats, proj["weight"], proj["bias"])
        else:
            feats = F.linear(
                F.gelu(F.linear(feats, proj["0.weight"], proj["0.bias"])), proj["2.weight"], proj["2.bias"]
            )
        embeds = llm.model.embed_tokens(input_ids)[0]  # (T, D)
        start = int((input_ids[0] == tokenizer.convert_tokens_to_ids(DEFAULT_IM_START_TOKEN)).nonzero()[0])
        n = feats.shape[1]
        assert int(input_ids[0, start + n + 1]) == tokenizer.convert_tokens_to_ids(DEFAULT_IM_END_TOKEN)
        spliced = torch.cat([embeds[: start + 1], feats[0], embeds[start + n + 1 :]], dim=0)
        return llm(inputs_embeds=spliced.unsqueeze(0)).logits


def _inputs(tokenizer, n_tokens: int):
    image = DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_PATCH_TOKEN * n_tokens + DEFAULT_IM_END_TOKEN
    ids = tokenizer(f"### Human: What color is the shape?\n{image}\n### Assistant:", return_tensors="pt").input_ids
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    return ids, pixels


@pytest.mark.parametrize("projector,sharded_bin", [("mlp2x_gelu", False), ("linear", True)])
def test_convert_and_direct_load_match_reference_forward(tiny_model_dir, tmp_path, projector, sharded_bin):
    ref = tmp_path / "release"
    proj = write_reference_checkpoint(tiny_model_dir, ref, projector, sharded_bin)
    assert is_reference_checkpoint(ref) and not is_reference_checkpoint(tiny_model_dir)
    out = tmp_path / "converted"
    assert (
        cli_main(
            [
                "convert",
                "--from",
                "reference",
                "--in",
                str(ref),
                "--vision-tower",
                str(tiny_model_dir / "vision"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    model, tokenizer, processor = load_model(out, dtype=torch.float32)
    assert model.config.mm_projector_type == projector
    assert model.num_image_tokens == 16 and processor.crop_size["height"] == 32
    ids, pixels = _inputs(tokenizer, model.num_image_tokens)
    expected = reference_logits(tiny_model_dir, ref, proj, ids, pixels)
    with torch.no_grad():
        ours = model(input_ids=ids, pixel_values=pixels).logits
    assert ours.shape == expected.shape == (1, ids.shape[1], len(tokenizer))
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
    # Special ids come from the tokenizer, not the stale v0 config values (pad -1, bos 0, eos 1).
    assert model.config.text_config.pad_token_id == tokenizer.pad_token_id
    assert model.config.text_config.eos_token_id == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("</s>")
    # Loading the release folder directly (as chat/web/API do) gives the same logits.
    direct, _, _ = load_model(ref, vision_tower=str(tiny_model_dir / "vision"), device="cpu")
    assert {p.dtype for p in direct.parameters()} == {torch.float32}
    with torch.no_grad():
        torch.testing.assert_close(direct(input_ids=ids, pixel_values=pixels).logits, expected, rtol=0, atol=1e-5)


def test_reference_errors_name_the_problem(tiny_model_dir, tmp_path, capsys):
    ref = tmp_path / "release"
    write_reference_checkpoint(tiny_model_dir, ref, "mlp2x_gelu", False)
    with pytest.raises(ValueError, match="not a local folder.*--vision-tower"):
        load_model(ref)  # config names the hub id of CLIP-L, which is not here
    cfg = json.loads((ref / "config.json").read_text())
    cfg["mm_hidden_size"] = 1024
    (ref / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="mm_hidden_size=1024.*gives 128"):
        load_model(ref, vision_tower=str(tiny_model_dir / "vision"))
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    # Through the CLI, user mistakes are one line and exit code 2.
    assert cli_main(["convert", "--in", str(ref), "--vision-tower", str(tiny_model_dir / "vision"),
                     "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    with pytest.raises(ValueError, match="not a reference"):
        read_reference_config(tiny_model_dir)
    # convert takes reference folders only
    assert cli_main(["convert", "--in", str(tiny_model_dir), "--out", str(tmp_path / "from_ours")]) == 2
    assert "not a reference" in capsys.readouterr().err
    assert not (tmp_path / "from_ours").exists()
