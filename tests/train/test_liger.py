"""`--use_liger_kernel True`: one-line errors where Liger cannot run, the kernels patched onto the LLM inside the
ExGra-Med model, and the LM loss routed through Liger's fused linear cross-entropy.

Liger's kernels are Triton GPU kernels, so on CPU the tests check the patching and the routing; the fused loss
itself is replaced by its plain-torch definition (`hidden @ W.T`, cross-entropy), which records that it was called.
"""

from __future__ import annotations

import functools
import json
import sys

import pytest
import torch

from exgra_med.model.liger import LigerUnavailableError, check_liger, llm_model_type


def _train_argv(tiny_model_dir, data, out, *extra: str) -> list[str]:
    return [
        "train", "--model_name_or_path", str(tiny_model_dir / "llm"), "--vision_tower", str(tiny_model_dir / "vision"),
        "--data_path", str(data / "instruct.json"), "--image_folder", str(data / "images"), "--output_dir", str(out),
        "--max_steps", "1", "--use_cpu", "True", "--report_to", "none", "--use_liger_kernel", "True", *extra,
    ]


def test_liger_on_cpu_fails_in_one_line_before_the_data_is_read(tiny_model_dir, tmp_path, capsys):
    from exgra_med.cli import main

    assert main(_train_argv(tiny_model_dir, tmp_path / "missing", tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        assert "--use_liger_kernel True needs liger-kernel: pip install 'exgra-med[liger]'" in err
    else:
        assert "--use_liger_kernel True needs a CUDA GPU" in err and "trains on cpu" in err


def test_liger_missing_fails_in_one_line(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from exgra_med.cli import main

    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # not installed
    assert main(_train_argv(tiny_model_dir, tmp_path / "missing", tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--use_liger_kernel True needs liger-kernel: pip install 'exgra-med[liger]'" in err


def test_unsupported_llm_is_refused_by_its_type(tiny_model_dir, tmp_path, monkeypatch):
    pytest.importorskip("liger_kernel")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # past the CUDA check, to the model type
    assert llm_model_type(tiny_model_dir / "llm") == "llama"  # a plain LLM folder
    assert llm_model_type(tiny_model_dir) == "llama"  # an ExGra-Med checkpoint: its text_config
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    check_liger("cuda", llm_model_type(tiny_model_dir))
    with pytest.raises(LigerUnavailableError, match=r"--use_liger_kernel True: liger-kernel has no kernels for "
                                                    r"LLM type 'gpt2' \(it has: .*llama.*\)"):
        check_liger("cuda", llm_model_type(gpt2))
    with pytest.raises(LigerUnavailableError, match="needs a CUDA GPU"):
        check_liger("cpu", "llama")


@pytest.fixture
def restore_llama_module(monkeypatch):
    """Liger also replaces functions and classes of transformers' llama module (RoPE, RMSNorm, MLP): put them back
    after the test, so that later tests in this process run plain LLaMA."""
    from transformers.models.llama import modeling_llama

    for name in ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP"):
        monkeypatch.setattr(modeling_llama, name, getattr(modeling_llama, name))
    monkeypatch.setattr(modeling_llama.LlamaForCausalLM, "forward", modeling_llama.LlamaForCausalLM.forward)
    return modeling_llama


@pytest.mark.parametrize("lora", [False, True])
def test_kernels_are_patched_onto_the_llm_inside_the_model(lora, tiny_model_dir, restore_llama_module):
    pytest.importorskip("liger_kernel")
    from liger_kernel.transformers.model.llama import lce_forward
    from liger_kernel.transformers.rope import liger_rotary_pos_emb

    from exgra_med.model.liger import apply_liger
    from exgra_med.model.loading import load_pretrained
    from exgra_med.train.args import ModelArguments
    from exgra_med.train.llava import set_trainable

    model, _, _ = load_pretrained(str(tiny_model_dir))
    if lora:
        set_trainable(model, ModelArguments(model_name_or_path="x", lora_enable=True, lora_r=4))
    llm = apply_liger(model)
    assert llm is (model.language_model.get_base_model() if lora else model.language_model)
    assert llm.forward.__func__ is lce_forward  # the LM loss: fused linear cross-entropy
    decoder = llm.model
    names = [decoder.norm._get_name()] + [
        m._get_name() for layer in decoder.layers for m in (layer.input_layernorm, layer.post_attention_layernorm)
    ]
    assert names == ["LigerRMSNorm"] * (1 + 2 * len(decoder.layers))
    assert [layer.mlp._get_name() for layer in decoder.layers] == ["LigerSwiGLUMLP"] * len(decoder.layers)
    assert restore_llama_module.apply_rotary_pos_emb is liger_rotary_pos_emb
    if lora:  # the adapters still sit in the patched MLP's projections
        assert "lora_A" in dict(decoder.layers[0].mlp.up_proj.named_modules())
    assert model.vision_tower.__class__.__module__.startswith("exgra_med")  # the vision tower is untouched


def test_lm_loss_goes_through_the_fused_linear_cross_entropy(tiny_model_dir, easy_vqa_dir, restore_llama_module,
                                                             monkeypatch):
    pytest.importorskip("liger_kernel")
    import liger_kernel.transformers.functional as liger_functional

    from exgra_med.data.collate import DataCollator
    from exgra_med.data.dataset import SupervisedDataset
    from exgra_med.model.liger import apply_liger
    from exgra_med.model.loading import load_pretrained

    model, tokenizer, processor = load_pretrained(str(tiny_model_dir))
    dataset = SupervisedDataset(easy_vqa_dir / "instruct.json", easy_vqa_dir / "images", tokenizer, processor,
                                num_image_tokens=model.num_image_tokens, mm_use_im_start_end=True)
    batch = DataCollator(tokenizer)([dataset[i] for i in range(3)])
    batch.pop("ids")
    model.train()
    plain = model(**batch)
    plain.loss.backward()
    plain_grad = model.get_output_embeddings().weight.grad.clone()
    model.zero_grad()
    prompt = tokenizer("What color is the shape?", return_tensors="pt").input_ids
    plain_answer = model.eval().generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    model.train()

    calls = []
    original = liger_functional.liger_fused_linear_cross_entropy

    @functools.wraps(original)  # the same signature: Liger filters the arguments it passes by it
    def reference(input, weight, target, *args, ignore_index=-100, reduction="mean", **kwargs):
        calls.append((tuple(input.shape), tuple(target.shape), reduction))
        return torch.nn.functional.cross_entropy(
            (input @ weight.T).float(), target, ignore_index=ignore_index, reduction=reduction
        )

    monkeypatch.setattr(liger_functional, "liger_fused_linear_cross_entropy", reference)
    # the Triton kernels (RMSNorm, SwiGLU, RoPE) need a GPU; the fused loss's routing is what is tested here
    apply_liger(model, rope=False, rms_norm=False, swiglu=False)
    fused = model(**batch)
    batch_size, length = batch["input_ids"].shape
    assert calls == [((batch_size * length, model.config.text_config.hidden_size), (batch_size * length,), "mean")]
    assert fused.logits is None  # never materialised in training
    torch.testing.assert_close(fused.lm_loss, plain.lm_loss)
    torch.testing.assert_close(fused.loss, plain.loss)
    fused.loss.backward()
    torch.testing.assert_close(model.get_output_embeddings().weight.grad, plain_grad)
    model.eval()
    with torch.no_grad():
        evaluated = model(**batch)  # evaluation and generation keep the logits
        answer = model.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert evaluated.logits is not None and len(calls) == 1
    torch.testing.assert_close(evaluated.loss, plain.loss)
    assert torch.equal(answer, plain_answer)  # generation with the KV cache through Liger's forward
