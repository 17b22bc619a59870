"""exgra_med.model.checkpoint: weights read the same from every file layout, atomic writes leave nothing partial,
both checkpoint layouts load through the one loader with the one dtype policy."""

from __future__ import annotations

import json

import pytest
import torch

from exgra_med.model import checkpoint
from exgra_med.model.checkpoint import (
    load_model,
    read_weights,
    resolve_dtype,
    weight_files,
    write_json,
    write_safetensors,
    write_weights,
)
from tests.model.test_reference_checkpoint import write_reference_checkpoint


def _state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "model.embed.weight": torch.randn(8, 4, generator=gen),
        "model.mm_projector.0.weight": torch.randn(4, 3, generator=gen),
        "model.mm_projector.0.bias": torch.randn(4, generator=gen),
        "lm_head.weight": torch.randn(8, 4, generator=gen).to(torch.bfloat16),
    }


def _assert_equal(got: dict, expected: dict) -> None:
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key


def test_safetensors_bin_and_sharded_folders_read_the_same(tmp_path):
    state = _state()
    single_st = tmp_path / "single_st"
    write_weights(state, single_st)
    single_bin = tmp_path / "single_bin"
    single_bin.mkdir()
    torch.save(state, single_bin / "pytorch_model.bin")
    sharded_st = tmp_path / "sharded_st"
    files = write_weights(state, sharded_st, max_shard_size=200)
    assert (sharded_st / "model.safetensors.index.json").is_file() and len(files) > 2
    sharded_bin = tmp_path / "sharded_bin"
    sharded_bin.mkdir()
    weight_map = {}
    for i, key in enumerate(sorted(state)):
        name = f"pytorch_model-{i % 2 + 1:05d}-of-00002.bin"
        weight_map[key] = name
    for name in set(weight_map.values()):
        torch.save({k: v for k, v in state.items() if weight_map[k] == name}, sharded_bin / name)
    (sharded_bin / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))

    for source in (single_st, single_bin, sharded_st, sharded_bin, single_st / "model.safetensors",
                   single_bin / "pytorch_model.bin"):
        _assert_equal(read_weights(source), state)
        kept = read_weights(source, keep=lambda k: "mm_projector." in k)
        _assert_equal(kept, {k: v for k, v in state.items() if "mm_projector." in k})
    # A filtered read of a sharded folder opens only the shards holding kept keys.
    only_head = weight_files(sharded_bin, keep=lambda k: k == "lm_head.weight")
    assert only_head == [sharded_bin / weight_map["lm_head.weight"]]


def test_missing_weights_name_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no weights"):
        read_weights(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such weights file"):
        read_weights(tmp_path / "nope.safetensors")


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    import exgra_med.model.checkpoint as checkpoint

    target = tmp_path / "w.safetensors"
    write_safetensors({"a": torch.ones(2)}, target)
    before = target.read_bytes()

    def half_written(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", half_written)
    with pytest.raises(OSError, match="disk full"):
        write_safetensors({"a": torch.zeros(2)}, target)
    with pytest.raises(OSError, match="disk full"):
        write_safetensors({"a": torch.zeros(2)}, tmp_path / "new.safetensors")
    assert target.read_bytes() == before  # the old file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]  # no new file, no temp file

    config = tmp_path / "config.json"
    write_json({"b": 2, "a": 1}, config)
    assert config.read_text() == '{\n  "a": 1,\n  "b": 2\n}\n'
    with pytest.raises(TypeError):
        write_json({"a": object()}, config)  # fails after the temp file was opened
    assert json.loads(config.read_text()) == {"a": 1, "b": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "w.safetensors"]


def test_staged_output_dir_removes_a_failed_folder(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with checkpoint.staged_output_dir(out) as tmp:
            write_json({}, tmp / "config.json")
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []
    with checkpoint.staged_output_dir(out) as tmp:
        write_json({}, tmp / "config.json")
    assert [p.name for p in out.iterdir()] == ["config.json"]


def test_dtype_policy():
    assert resolve_dtype(torch.float16, "cuda") == torch.float16  # an explicit dtype wins
    assert resolve_dtype(None, "cuda:1") == torch.bfloat16
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype(None, None) is None  # no device: the checkpoint's own dtype


def test_both_layouts_load_with_one_dtype_policy(tiny_model_dir, tmp_path):
    ref = tmp_path / "release"
    write_reference_checkpoint(tiny_model_dir, ref, "mlp2x_gelu", sharded_bin=True)
    tower = str(tiny_model_dir / "vision")
    for path in (tiny_model_dir, ref):
        model, tokenizer, processor = load_model(path, vision_tower=tower, device="cpu")
        assert not model.training and processor.crop_size["height"] == 32
        assert {p.dtype for p in model.parameters()} == {torch.float32}
        assert model.config.image_token_id == tokenizer.convert_tokens_to_ids("<im_patch>")
        half, _, _ = load_model(path, vision_tower=tower, dtype=torch.bfloat16)
        assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    # With no device the checkpoint's own dtype is kept, for every part (the vision tower's sub-config included).
    for part in (half, tokenizer, processor):
        part.save_pretrained(tmp_path / "bf16")
    kept, _, _ = load_model(tmp_path / "bf16")
    assert {p.dtype for p in kept.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="neither an ExGra-Med checkpoint"):
        load_model(tiny_model_dir / "vision")
    with pytest.raises(FileNotFoundError, match="absent: no such local model file or folder"):
        load_model(tmp_path / "absent")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_default_is_bfloat16(tiny_model_dir):
    model, _, _ = load_model(tiny_model_dir, device="cuda")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in model.parameters()} == {"cuda"}
