"""QLoRA (`--bits 4|8 --lora_enable True`): a real few-step run on CPU (bitsandbytes >= 0.48 has CPU kernels), the
merge to a full-precision checkpoint, and the one-line errors where quantisation cannot run."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import load_file


def _bnb():
    return pytest.importorskip("bitsandbytes")


def _args(tiny_model_dir, data, out, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", str(tiny_model_dir / "llm"), "--vision_tower", str(tiny_model_dir / "vision"),
        "--data_path", str(data / "instruct.json"), "--image_folder", str(data / "images"),
        "--output_dir", str(out), "--contrastive", "True", "--multi_graph", "True", "--after_de", "True",
        "--lora_enable", "True", "--lora_r", "4", "--lora_alpha", "8", "--max_steps", "3", "--learning_rate", "1e-2",
        "--per_device_train_batch_size", "2", "--save_strategy", "steps", "--save_steps", "3", "--logging_steps", "1",
        "--use_cpu", "True", "--report_to", "none", "--dataloader_num_workers", "0", *extra,
    ]


def test_dequantize_bnb_state_restores_4_and_8_bit_weights():
    from exgra_med.model.quantization import dequantize_bnb_state

    bnb = _bnb()
    torch.manual_seed(0)
    dense = torch.nn.Linear(64, 32, bias=False)
    four = bnb.nn.Linear4bit(64, 32, bias=False, quant_type="nf4")
    four.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4")
    eight = bnb.nn.Linear8bitLt(64, 32, bias=False, has_fp16_weights=False)
    eight.weight = bnb.nn.Int8Params(dense.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    four, eight = four.to("cpu"), eight.to("cpu")  # quantised when placed
    state = {**{f"a.{k}": v for k, v in four.state_dict().items()},
             **{f"b.{k}": v for k, v in eight.state_dict().items()}, "c.weight": dense.weight.data}
    assert state["a.weight"].dtype == torch.uint8 and state["b.weight"].dtype == torch.int8
    out, n = dequantize_bnb_state(state)
    assert n == 2 and set(out) == {"a.weight", "b.weight", "c.weight"}
    # exactly what bitsandbytes itself computes from the live layers
    live = bnb.functional.dequantize_4bit(four.weight.data, four.weight.quant_state)
    torch.testing.assert_close(out["a.weight"], live, rtol=0, atol=0)
    torch.testing.assert_close(out["b.weight"], eight.weight.data.float() * eight.weight.SCB[:, None] / 127)
    for key, tolerance in (("a.weight", 0.1), ("b.weight", 0.01)):  # and close to the dense weights
        assert out[key].dtype == torch.float32 and out[key].shape == dense.weight.shape
        error = (out[key] - dense.weight.data).abs().mean() / dense.weight.data.abs().mean()
        assert 0 < error < tolerance, (key, error)
    plain = {"c.weight": dense.weight.data}
    assert dequantize_bnb_state(plain) == (plain, 0)  # nothing quantised: the same dict back


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_trains_adapters_and_merges_to_a_full_precision_checkpoint(bits, tiny_model_dir, easy_vqa_dir,
                                                                          tmp_path):
    from peft import PeftModel

    from exgra_med.cli import main as cli_main
    from exgra_med.model.loading import load_pretrained
    from exgra_med.train.main import parse_args, train

    bnb = _bnb()

    out = tmp_path / "qlora"
    trainer = train(*parse_args(_args(tiny_model_dir, easy_vqa_dir, out, "--bits", str(bits))))
    model = trainer.model
    assert isinstance(model.language_model, PeftModel)
    up = model.language_model.get_base_model().model.layers[0].mlp.up_proj
    assert type(up.base_layer) is (bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt)
    assert model.mm_projector[0].weight.dtype == torch.float32 and model.alignment is not None
    assert all(p.dtype == torch.float32 for p in model.alignment.parameters())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith(("mm_projector.", "alignment.")) for n in trainable)

    # checkpoint-3: the quantised base weights as bitsandbytes saves them, and trained adapters (B starts at 0)
    ckpt = load_file(str(out / "checkpoint-3" / "model.safetensors"))
    prefix = "language_model.base_model.model.model.layers.0.mlp.up_proj."
    assert ckpt[prefix + "base_layer.weight"].dtype == (torch.uint8 if bits == 4 else torch.int8)
    lora_b = ckpt[prefix + "lora_B.default.weight"]
    assert lora_b.abs().max() > 1e-4

    # the run's own output: merged, dense, float32 LLM weights, no quantisation left in config.json
    final = load_file(str(out / "model.safetensors"))
    assert not any("lora_" in k or "base_layer" in k or "quant" in k or k.endswith(".SCB") for k in final)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and "quantization_config" not in config["text_config"]
    assert config["lora_alpha"] is None
    key = "model.layers.0.mlp.up_proj.weight"
    merged = final[f"language_model.{key}"]
    assert merged.dtype == torch.float32
    base = load_file(str(tiny_model_dir / "llm" / "model.safetensors"))[key]
    delta = (8 / 4) * lora_b.float() @ ckpt[prefix + "lora_A.default.weight"].float()
    quant_error = (merged - delta - base).abs().max() / base.abs().max()  # what 4/8-bit rounding left
    assert quant_error < (0.15 if bits == 4 else 0.02), quant_error
    assert (merged - base).abs().max() > 0.5 * delta.abs().max()  # the adapters were folded in

    # merge-lora of the checkpoint gives the same weights
    merged_dir = tmp_path / "merged"
    assert cli_main(["merge-lora", "--in", str(out / "checkpoint-3"), "--out", str(merged_dir)]) == 0
    again = load_file(str(merged_dir / "model.safetensors"))
    assert set(again) == set(final)
    for name, value in final.items():
        torch.testing.assert_close(again[name], value, msg=name)

    # the merged checkpoint loads as a plain model and generates
    loaded, tokenizer, _ = load_pretrained(str(out))
    assert type(loaded.language_model.model.layers[0].mlp.up_proj) is torch.nn.Linear
    ids = tokenizer("What color is the shape?", return_tensors="pt").input_ids
    new = loaded.generate(ids, max_new_tokens=4, do_sample=False, min_new_tokens=4)
    assert new.shape == (1, 4)
    logits = loaded(input_ids=ids).logits
    assert torch.isfinite(logits).all()


def _cli(argv: list[str]) -> int:
    from exgra_med.cli import main as cli_main

    return cli_main(["train", *argv])


def test_bits_without_bitsandbytes_fail_in_one_line_before_anything_is_loaded(tiny_model_dir, tmp_path, capsys,
                                                                              monkeypatch):
    """Before the data is read: the data file does not even exist."""
    argv = _args(tiny_model_dir, tmp_path / "missing", tmp_path / "out", "--bits", "4")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not installed
    assert _cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--bits 4 needs bitsandbytes: pip install 'exgra-med[quant]'" in err
    assert not list((tmp_path / "out").glob("*.safetensors"))  # only the recipe record was written


@pytest.mark.parametrize("bits", [4, 8])
def test_bits_without_a_backend_fail_in_one_line(bits, tiny_model_dir, tmp_path, capsys, monkeypatch):
    """A bitsandbytes without kernels for this machine (simulated: its probe layer fails to run)."""
    _bnb()
    import exgra_med.model.quantization as quantization

    def no_backend(*args, **kwargs):
        raise RuntimeError("no kernel registered for cpu")

    monkeypatch.setattr(quantization, "_probe", no_backend)
    assert _cli(_args(tiny_model_dir, tmp_path / "missing", tmp_path / "out", "--bits", str(bits))) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert f"--bits {bits}: bitsandbytes" in err and f"cannot run {bits}-bit layers on cpu" in err
    assert "no kernel registered" in err


def test_bits_flag_combinations_are_checked(tiny_model_dir, easy_vqa_dir, tmp_path, capsys):
    from exgra_med.train.main import parse_args

    base = _args(tiny_model_dir, easy_vqa_dir, tmp_path / "o")  # later flags override earlier ones
    for bad, message in ((["--bits", "4", "--lora_enable", "False"], "--bits 4 trains LoRA adapters"),
                         (["--bits", "3"], "--bits must be one of"),
                         (["--bits", "4", "--quant_type", "int4"], "--quant_type must be")):
        with pytest.raises(SystemExit):
            parse_args(base + bad)
        assert message in capsys.readouterr().err
    argv = _args(tiny_model_dir, easy_vqa_dir, tmp_path / "o", "--bits", "4", "--fsdp", "full_shard")
    assert _cli(argv) == 2
    assert "not with FSDP or ZeRO-3" in capsys.readouterr().err


@pytest.mark.slow
def test_qlora_run_resumed_from_its_checkpoint_ends_with_the_same_weights(tiny_model_dir, easy_vqa_dir, tmp_path):
    """The checkpoint's quantisation state is not read back (the base is quantised again, identically, from the LLM
    folder); the adapters, projector, alignment head, optimizer and RNG states are."""
    import shutil

    from exgra_med.train.main import parse_args, train

    _bnb()
    flags = ("--bits", "4", "--max_steps", "4", "--save_steps", "2")
    train(*parse_args(_args(tiny_model_dir, easy_vqa_dir, tmp_path / "full", *flags)))
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    train(*parse_args(_args(tiny_model_dir, easy_vqa_dir, tmp_path / "resumed", *flags,
                            "--resume_from_checkpoint", "auto")))
    full = load_file(str(tmp_path / "full" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert set(full) == set(resumed)
    for name, value in full.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=0, msg=name)
