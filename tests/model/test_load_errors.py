"""Mistakes in what a command is asked to load end in one line before any weights load: a folder without weights,
a cut-short safetensors file, a CUDA device without a GPU, flash-attention without its package."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from exgra_med.cli import main as cli_main
from exgra_med.model import auto, checkpoint


@pytest.fixture
def question_file(tmp_path):
    path = tmp_path / "q.json"
    path.write_text(json.dumps([{"id": 1, "conversations": [{"from": "human", "value": "What?"}]}]))
    return path


def _one_line(capsys, argv: list[str]) -> str:
    rc = cli_main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    return err[0]


def _no_loading(monkeypatch):
    """Fail the test if transformers starts reading weights."""
    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the mistake was found")

    monkeypatch.setattr(auto, "load_model", refuse)
    monkeypatch.setattr(auto, "load_native", refuse)


def test_a_model_folder_without_weights_is_refused_in_one_line(tiny_model_dir, tmp_path, question_file, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "model.safetensors").unlink()
    line = _one_line(capsys, ["generate-vqa", "--model", str(model), "--question-file", str(question_file),
                              "--answers-file", str(tmp_path / "a.jsonl"), "--device", "cpu"])
    assert line == (f"exgra-med generate-vqa: error: {model}: no weights (model.safetensors, pytorch_model.bin or "
                    "a sharded index)")
    with pytest.raises(FileNotFoundError, match="no weights"):
        checkpoint.load_model(model)


def test_a_cut_short_safetensors_file_is_refused_in_one_line(tiny_model_dir, tmp_path, question_file, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    weights = model / "model.safetensors"
    with weights.open("r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    line = _one_line(capsys, ["generate-vqa", "--model", str(model), "--question-file", str(question_file),
                              "--answers-file", str(tmp_path / "a.jsonl"), "--device", "cpu"])
    assert line.startswith(f"exgra-med generate-vqa: error: {weights}: not a complete safetensors file (")
    assert line.endswith("); an interrupted download or copy? Fetch it again")
    with pytest.raises(ValueError, match="not a complete safetensors file"):
        checkpoint.load_model(model)


def test_a_missing_shard_of_an_index_is_refused(tiny_model_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    keys = list(checkpoint.read_weights(model / "model.safetensors"))
    (model / "model.safetensors").rename(model / "model-00001-of-00002.safetensors")
    index = {"weight_map": {k: f"model-0000{1 + i % 2}-of-00002.safetensors" for i, k in enumerate(keys)}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="named by its index are missing: model-00002-of-00002.safetensors"):
        checkpoint.check_weights(model)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_a_cuda_device_without_a_gpu_is_refused_before_loading(tiny_model_dir, tmp_path, question_file, capsys,
                                                                monkeypatch, device):
    _no_loading(monkeypatch)
    line = _one_line(capsys, ["generate-vqa", "--model", str(tiny_model_dir), "--question-file", str(question_file),
                              "--answers-file", str(tmp_path / "a.jsonl"), "--device", device])
    assert line == (f"exgra-med generate-vqa: error: --device {device}: no CUDA GPU is visible to torch; "
                    "use --device cpu (or auto)")
    with pytest.raises(ValueError, match="no CUDA GPU is visible"):
        auto.load_backend(str(tiny_model_dir), auto.LoadOptions(device=device))


def test_flash_attention_without_its_package_is_refused_before_loading(tiny_model_dir, tmp_path, question_file,
                                                                       capsys, monkeypatch):
    _no_loading(monkeypatch)
    monkeypatch.setattr(auto, "flash_attention_available", lambda: False)
    line = _one_line(capsys, ["generate-vqa", "--model", str(tiny_model_dir), "--question-file", str(question_file),
                              "--answers-file", str(tmp_path / "a.jsonl"), "--device", "cpu",
                              "--attn-implementation", "flash_attention_2"])
    assert line == ("exgra-med generate-vqa: error: --attn-implementation flash_attention_2 needs the flash-attn "
                    "package (pip install 'exgra-med[flash]') and a CUDA GPU; use sdpa")
