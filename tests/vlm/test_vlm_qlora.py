"""QLoRA (`--bits 4|8 --lora_enable True`) and Liger (`--use_liger_kernel True`) on a transformers-native VLM.

QLoRA: a real 3-step stage-2 run with the alignment on the tiny Qwen2.5-VL on CPU (bitsandbytes >= 0.50 has CPU
kernels): the language model's linear layers are bitsandbytes layers under trained adapters, the vision encoder,
merger and head stay full precision, and the saved folder is a dense checkpoint that loads and answers. Liger: its
kernels are Triton GPU kernels, so on CPU the run is refused in one line as on the LLaVA path, and the patching is
checked on the model without running it.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from tests.vlm.runs import STAGE2_STEPS, log_history, train_args

LORA = ("--lora_enable", "True", "--lora_r", "4", "--lora_alpha", "8")
UP_PROJ = "model.language_model.layers.0.mlp.up_proj"


def _bnb():
    return pytest.importorskip("bitsandbytes")


@pytest.mark.slow
@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_stage2_trains_adapters_on_quantised_layers_and_saves_a_dense_checkpoint(bits, tiny_vlm, easy_vqa_dir,
                                                                                     tmp_path):
    """10 to 25 s each on 2 shared CPU cores (8-bit: with activation checkpointing)."""
    from transformers import AutoModelForImageTextToText

    from exgra_med.model.auto import LoadOptions, load_backend
    from exgra_med.train.main import parse_args, train

    bnb = _bnb()
    folder, out = tiny_vlm("qwen2_5_vl"), tmp_path / "qlora"
    argv = train_args(folder, easy_vqa_dir / "instruct.json", easy_vqa_dir / "images", out, STAGE2_STEPS, *LORA,
                      "--bits", str(bits), "--learning_rate", "1e-2",
                      *(("--activation_checkpointing", "True") if bits == 8 else ()))
    trainer = train(*parse_args(argv))

    steps = [h for h in log_history(out) if "lm_loss" in h]
    assert [h["step"] for h in steps] == list(range(1, STAGE2_STEPS + 1))
    assert all(math.isfinite(h["loss"]) and math.isfinite(h["lm_loss"]) and math.isfinite(h["align_loss"])
               for h in steps)

    # What trained: adapters on the bitsandbytes layers of the language model; the vision encoder, the merger and the
    # alignment head unquantised, the merger and the head trained in float32.
    model = trainer.model
    vlm = model.base_vlm
    up = vlm.get_submodule(UP_PROJ)
    assert type(up.base_layer) is (bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt)
    decoder_linears = [m for n, m in vlm.model.language_model.named_modules() if n.endswith("_proj")]
    assert decoder_linears and all(isinstance(m.base_layer, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))
                                   for m in decoder_linears)
    visual = [m for m in vlm.model.visual.modules() if isinstance(m, torch.nn.Linear)]
    assert visual and all(type(m) is torch.nn.Linear for m in visual)
    assert type(vlm.lm_head) is torch.nn.Linear
    assert vlm.is_activation_checkpointing is (bits == 8)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or ".merger." in n or n.startswith("alignment.") for n in trainable)
    assert all(p.dtype == torch.float32 for p in model.alignment.parameters())
    assert all(p.dtype == torch.float32 for p in vlm.model.visual.merger.parameters())
    lora_a, lora_b = up.lora_A["default"].weight.detach(), up.lora_B["default"].weight.detach()
    assert lora_b.abs().max() > 1e-4  # trained (B starts at zero)

    # The saved folder: dense weights (no packed uint8 / int8, no quantisation state, no adapters), no
    # quantization_config, the adapters folded into the dequantised weights.
    weights = load_file(str(out / "model.safetensors"))
    assert all(v.dtype == torch.float32 for v in weights.values())
    assert not any("lora_" in k or "base_layer" in k or "quant" in k or k.endswith(".SCB") for k in weights)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in json.dumps(config) and config["model_type"] == "qwen2_5_vl"
    initial = AutoModelForImageTextToText.from_pretrained(folder).state_dict()
    loaded = AutoModelForImageTextToText.from_pretrained(out)
    assert type(loaded.get_submodule(UP_PROJ)) is torch.nn.Linear
    saved = loaded.state_dict()
    assert set(saved) == set(initial)
    key = f"{UP_PROJ}.weight"
    delta = (8 / 4) * lora_b.float() @ lora_a.float()
    quant_error = (saved[key] - delta - initial[key]).abs().max() / initial[key].abs().max()
    assert quant_error < (0.15 if bits == 4 else 0.02), quant_error  # what 4-/8-bit rounding left
    assert (saved[key] - initial[key]).abs().max() > 0.5 * delta.abs().max()  # the adapters were folded in
    assert (out / "exgra_med_alignment.safetensors").is_file()

    # ... and answers a question through the project's loader.
    backend = load_backend(str(out), LoadOptions(device="cpu"))
    record = json.loads((easy_vqa_dir / "test.json").read_text())[0]
    prompt = backend.encode_question(record, easy_vqa_dir / "images")
    new = backend.generate([prompt], **backend.generate_kwargs(4, min_new_tokens=4))
    assert new.shape == (1, 4)
    assert isinstance(backend.answer_batch([prompt], max_new_tokens=4)[0], str)


def test_qlora_skips_the_vision_encoder_and_projector_wherever_they_sit():
    """transformers matches skip entries from the start of a module's full name or as its suffix: the entries keep
    `model.visual.*` and the projectors unquantised, and only those."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    from exgra_med.model.native.training import QLORA_SKIP_MODULES
    from exgra_med.model.quantization import skip_at_any_depth

    skip = skip_at_any_depth(QLORA_SKIP_MODULES)
    for kept in ("model.visual.blocks.0.attn.qkv", "model.visual.merger.mlp.0", "lm_head",
                 "model.vision_tower.vision_model.encoder.layers.0.mlp.fc1", "model.multi_modal_projector.linear_1"):
        assert not should_convert_module(kept, skip), kept
    for quantised in ("model.language_model.layers.0.mlp.up_proj", "model.language_model.layers.1.self_attn.q_proj",
                      "model.visualizer.fc"):
        assert should_convert_module(quantised, skip), quantised


def test_inference_quantisation_skips_the_vision_encoder_and_projector_wherever_they_sit(monkeypatch):
    """--load-4bit / --load-8bit on a native VLM: the same any-depth skip entries as QLoRA training (a bare "visual"
    would quantise `model.visual.blocks.*`)."""
    _bnb()
    from transformers.quantizers.quantizers_utils import should_convert_module

    from exgra_med.model.native.backend import QUANT_SKIP_MODULES
    from exgra_med.model.quantization import inference_bnb_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the config only; nothing is loaded
    for bits in (4, 8):
        skip = inference_bnb_config(bits, torch.bfloat16, QUANT_SKIP_MODULES).llm_int8_skip_modules
        for kept in ("model.visual.blocks.0.attn.qkv", "model.visual.merger.mlp.0", "lm_head",
                     "model.multi_modal_projector.linear_1"):
            assert not should_convert_module(kept, skip), (bits, kept)
        assert should_convert_module("model.language_model.layers.0.mlp.up_proj", skip)


def test_liger_on_a_native_vlm_fails_on_cpu_in_one_line_as_on_the_llava_path(tiny_vlm, tiny_model_dir, easy_vqa_dir,
                                                                            tmp_path, capsys):
    from exgra_med.cli import main as cli
    from exgra_med.model.liger import llm_model_type

    folder = tiny_vlm("qwen2_5_vl")
    assert llm_model_type(folder) == "qwen2_5_vl"  # the type Liger patches the native VLM by
    native = train_args(folder, easy_vqa_dir / "instruct.json", easy_vqa_dir / "images", tmp_path / "native", 1)
    llava = ["--model_name_or_path", str(tiny_model_dir / "llm"), "--vision_tower", str(tiny_model_dir / "vision"),
             "--data_path", str(easy_vqa_dir / "instruct.json"), "--image_folder", str(easy_vqa_dir / "images"),
             "--output_dir", str(tmp_path / "llava"), "--max_steps", "1", "--use_cpu", "True", "--report_to", "none"]
    capsys.readouterr()  # the fixtures' progress bars
    errors = []
    for argv in (native, llava):
        assert cli(["train", *argv, "--use_liger_kernel", "True"]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err
        errors.append(err)
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        prefix = "exgra-med train: error: --use_liger_kernel True needs liger-kernel"
    else:
        prefix = "exgra-med train: error: --use_liger_kernel True needs a CUDA GPU"
    assert all(e.startswith(prefix) for e in errors), errors
    assert errors[0] == errors[1]
    assert not list((tmp_path / "native").glob("*.safetensors"))


@pytest.fixture
def restore_gemma3_modules(monkeypatch):
    """Liger replaces functions and classes of transformers' Gemma3 module, and SigLIP's `nn.LayerNorm` (torch's own):
    put them back after the test, so that later tests in this process run the plain models."""
    from transformers.models.gemma3 import modeling_gemma3

    for name in ("apply_rotary_pos_emb", "Gemma3RMSNorm", "Gemma3MLP"):
        monkeypatch.setattr(modeling_gemma3, name, getattr(modeling_gemma3, name))
    monkeypatch.setattr(torch.nn, "LayerNorm", torch.nn.LayerNorm)
    monkeypatch.setattr(torch.nn, "CrossEntropyLoss", torch.nn.CrossEntropyLoss)
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", torch.nn.functional.cross_entropy)


@pytest.mark.parametrize("alignment", [True, False])
def test_liger_patches_the_whole_native_vlm(alignment, tiny_vlm, tmp_path, restore_gemma3_modules):
    """`NativeTraining.build` with `--use_liger_kernel True` (the CUDA check is `check_environment`'s, not run here):
    Liger's norms and MLPs in the language model (LoRA adapters still inside) and in the vision encoder; its fused
    forward only without the alignment, whose image nodes that forward does not return."""
    pytest.importorskip("liger_kernel")
    from liger_kernel.transformers.model.gemma3 import multimodal_forward

    from exgra_med.train.main import parse_args
    from exgra_med.train.native import NativeTraining

    folder = tiny_vlm("gemma3")
    argv = train_args(folder, tmp_path / "unused.json", tmp_path, tmp_path / "out", 1, *LORA, "--use_liger_kernel",
                      "True", alignment=alignment)
    model_args, _, training_args = parse_args(argv)
    model = NativeTraining(str(folder)).build(model_args, training_args).model
    vlm = model.base_vlm
    decoder = vlm.model.language_model
    norms = [decoder.norm] + [n for layer in decoder.layers for n in (layer.input_layernorm,
                                                                      layer.post_attention_layernorm)]
    assert {n._get_name() for n in norms} == {"LigerRMSNorm"}
    assert {layer.mlp._get_name() for layer in decoder.layers} == {"LigerGEGLUMLP"}
    assert "lora_A" in dict(decoder.layers[0].mlp.up_proj.named_modules())  # the adapters sit inside
    tower = vlm.model.vision_tower
    assert {m._get_name() for layer in tower.encoder.layers for m in (layer.layer_norm1, layer.layer_norm2)} == {
        "LigerLayerNorm"}
    assert (getattr(vlm.forward, "__func__", None) is multimodal_forward) is not alignment


def test_a_liger_patcher_that_does_not_import_is_refused_in_one_line(tiny_vlm, monkeypatch):
    pytest.importorskip("liger_kernel")
    import liger_kernel.transformers
    from transformers import AutoModelForImageTextToText

    from exgra_med.align.config import AlignmentConfig
    from exgra_med.model.liger import LigerUnavailableError, apply_liger
    from exgra_med.model.native.aligned import AlignedVLM

    def stale(model, **kwargs):
        raise ImportError("cannot import name 'LigerQwen2_5_VLCausalLMOutputWithPast'\nfrom output_classes")

    monkeypatch.setattr(liger_kernel.transformers, "_apply_liger_kernel_to_instance", stale)
    model = AlignedVLM(AutoModelForImageTextToText.from_pretrained(tiny_vlm("qwen2_5_vl")), AlignmentConfig())
    with pytest.raises(LigerUnavailableError) as error:
        apply_liger(model)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("--use_liger_kernel True: liger-kernel ")
    assert "cannot patch 'qwen2_5_vl' models" in message
    assert "LigerQwen2_5_VLCausalLMOutputWithPast" in message
