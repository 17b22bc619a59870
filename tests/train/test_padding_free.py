"""`exgra-med train --padding_free True`: the same run as padded (stage 1, stage 2 with the alignment, fine-tuning),
and clear errors, before any weights are loaded, where the LLM or its attention cannot pack."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from exgra_med.model.packing import PaddingFreeError
from exgra_med.train import llava
from exgra_med.train import main as train_main

COMMON = [
    "--per_device_train_batch_size", "4", "--logging_steps", "1", "--report_to", "none", "--learning_rate", "1e-3",
    "--dataloader_num_workers", "0", "--seed", "0", "--use_cpu", "True", "--save_strategy", "no", "--max_steps", "3",
]
ALIGN = ["--contrastive", "True", "--multi_graph", "True", "--after_de", "True", "--align_masked_mean", "True"]


def _argv(model: list[str], data: Path, out: Path, *extra: str) -> list[str]:
    return [*model, "--data_path", str(data / "instruct.json"), "--image_folder", str(data / "images"),
            "--output_dir", str(out), *COMMON, *extra]


def _losses(out: Path) -> list[dict]:
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return [{k: v for k, v in h.items() if "loss" in k} for h in history if "lm_loss" in h]


def _record_batch_shapes(monkeypatch) -> list[tuple[bool, tuple[int, ...]]]:
    """(padding_free, packed layout) of every batch the training collator makes."""
    from exgra_med.data.collate import DataCollator

    shapes = []

    def call(self, items):
        batch = DataCollator.__call__(self, items)
        shapes.append((self.padding_free, "position_ids" in batch and "attention_mask" not in batch))
        return batch

    monkeypatch.setattr(llava, "DataCollator", type("Recording", (DataCollator,), {"__call__": call}))
    return shapes


def test_stage2_with_alignment_packed_run_equals_padded_run(tiny_model_dir, easy_vqa_dir, tmp_path, monkeypatch):
    """Three steps of stage 2 with the alignment (masked text means, so that its text pass packs too): the packed run
    logs the padded run's losses and ends with its weights."""
    shapes = _record_batch_shapes(monkeypatch)
    model = ["--model_name_or_path", str(tiny_model_dir / "llm"), "--vision_tower", str(tiny_model_dir / "vision")]
    padded, packed = tmp_path / "padded", tmp_path / "packed"
    assert train_main.main(_argv(model, easy_vqa_dir, padded, *ALIGN)) == 0
    assert len(shapes) >= 3 and not any(flag or packed for flag, packed in shapes)
    shapes.clear()
    assert train_main.main(_argv(model, easy_vqa_dir, packed, *ALIGN, "--padding_free", "True")) == 0
    assert len(shapes) >= 3 and all(flag and packed for flag, packed in shapes)  # (+ the loader's prefetch)
    packed_losses, padded_losses = _losses(packed), _losses(padded)
    assert len(packed_losses) == 3 and all("align_loss" in h for h in packed_losses)
    assert all(torch.isfinite(torch.tensor(list(h.values()))).all() for h in packed_losses)
    for p, q in zip(packed_losses, padded_losses):
        assert p.keys() == q.keys()
        for key in p:
            assert p[key] == pytest.approx(q[key], rel=1e-4, abs=1e-5), key
    a, b = load_file(str(packed / "model.safetensors")), load_file(str(padded / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        # Adam's first steps turn gradient rounding (1e-7) into update differences of up to ~1e-5.
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-4, msg=key)


@pytest.mark.parametrize("stage", ["stage1", "finetune"])
def test_stage1_and_fine_tuning_pack(tiny_model_dir, easy_vqa_dir, tmp_path, monkeypatch, stage):
    """Stage 1 (projector only, alignment records) and fine-tuning from an ExGra-Med checkpoint (whose LLM config,
    `text_config`, is the one checked) train on packed batches."""
    shapes = _record_batch_shapes(monkeypatch)
    out = tmp_path / stage
    if stage == "stage1":
        model = ["--model_name_or_path", str(tiny_model_dir / "llm"), "--vision_tower", str(tiny_model_dir / "vision"),
                 "--tune_mm_mlp_adapter", "True"]
        argv = _argv(model, easy_vqa_dir, out, "--padding_free", "True")
        argv[argv.index(str(easy_vqa_dir / "instruct.json"))] = str(easy_vqa_dir / "alignment.json")
    else:
        argv = _argv(["--model_name_or_path", str(tiny_model_dir)], easy_vqa_dir, out, "--padding_free", "True")
    assert train_main.main(argv) == 0
    assert len(shapes) >= 3 and all(flag and packed for flag, packed in shapes)
    losses = _losses(out)
    assert [sorted(h) for h in losses] == [["lm_loss", "loss"]] * 3
    assert all(0 < h["lm_loss"] < 20 for h in losses)


class ModelLoaded(Exception):
    """Raised by the patched weight loader: the run got past the checks."""


def test_attention_or_llm_that_cannot_pack_fails_before_loading(tiny_model_dir, easy_vqa_dir, tmp_path, monkeypatch):
    from transformers import RwkvConfig

    import exgra_med.model.loading as loading

    def build_from_parts(*args, **kwargs):
        raise ModelLoaded

    monkeypatch.setattr(llava, "build_from_parts", build_from_parts)
    monkeypatch.setattr(loading, "build_from_parts", build_from_parts)
    model = ["--model_name_or_path", str(tiny_model_dir / "llm"), "--vision_tower", str(tiny_model_dir / "vision")]
    argv = _argv(model, easy_vqa_dir, tmp_path / "run", "--padding_free", "True")
    with pytest.raises(PaddingFreeError, match=r"--padding_free True needs --attn_implementation in .*'paged\|sdpa'"):
        train_main.main([*argv, "--attn_implementation", "paged|sdpa"])
    rwkv = tmp_path / "rwkv"
    RwkvConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1).save_pretrained(rwkv)
    argv[1] = str(rwkv)
    with pytest.raises(PaddingFreeError, match="RwkvForCausalLM does not build its attention masks"):
        train_main.main(argv)
    with pytest.raises(ModelLoaded):  # and a model that packs goes on to loading
        train_main.main(_argv(model, easy_vqa_dir, tmp_path / "run", "--padding_free", "True"))
