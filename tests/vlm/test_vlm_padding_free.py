"""`exgra-med train --padding_free True` on native VLMs: the packed collator's layout, packed forwards and 3-step
stage-2 runs equal to padded ones (Qwen2.5-VL with its 3D positions, LLaVA-OneVision), and the one-line refusal of
the architectures and attention implementations that cannot pack (Gemma 3), before any weights are read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from exgra_med.align.config import AlignmentConfig
from exgra_med.constants import IGNORE_INDEX
from exgra_med.data.chat import ChatEncoder, NativeCollator, NativeDataset, stop_strings
from exgra_med.model.native.aligned import ALIGNMENT_WEIGHTS, AlignedVLM
from exgra_med.model.packing import PACKED_NATIVE_VLMS, PaddingFreeError, check_native_padding_free
from exgra_med.train import native
from tests.vlm.runs import log_history, train_args

ALIGN_FLAGS = ("--align_masked_mean", "True")  # with tests.vlm.runs' --contrastive / --multi_graph / --after_de
ALIGN = AlignmentConfig(contrastive=True, multi_graph=True, after_de=True, masked_mean=True)
HEAD_KEYS = ("ids", "images_per_sample", "row_order", "response_ids", "response_mask", "extended_ids",
             "extended_mask")


def _varied_records(easy_vqa_dir: Path, out: Path) -> Path:
    """The instruct records cut to 1-4 question/answer pairs: lengths that differ, so that rows hold several."""
    records = json.loads((easy_vqa_dir / "instruct.json").read_text())
    for i, record in enumerate(records):
        for key in ("conversations", "conversations_long"):
            record[key] = record[key][: 2 * (1 + i % 4)]
    out.write_text(json.dumps(records))
    return out


def _items(folder: Path, data: Path, images: Path, n: int) -> tuple[list[dict], int]:
    processor = AutoProcessor.from_pretrained(folder)
    dataset = NativeDataset(data, images, ChatEncoder(processor, stop_strings(processor)), alignment=True)
    return [dataset[i] for i in range(n)], processor.tokenizer.pad_token_id


@pytest.mark.parametrize("one_row", [False, True])
def test_packed_batches_hold_the_samples_in_rows_with_their_images_in_row_order(tiny_vlm, easy_vqa_dir, tmp_path,
                                                                                 one_row):
    data = _varied_records(easy_vqa_dir, tmp_path / "varied.json")
    items, pad = _items(tiny_vlm("qwen2_5_vl"), data, easy_vqa_dir / "images", 6)
    padded = NativeCollator(pad)(items)
    packed = NativeCollator(pad, padding_free=True, one_row=one_row)(items)
    assert "attention_mask" not in packed
    shape = packed["input_ids"].shape
    assert packed["labels"].shape == packed["position_ids"].shape == packed["mm_token_type_ids"].shape == shape
    order = packed["row_order"]
    assert sorted(order) == list(range(6))
    lengths = padded["attention_mask"].sum(1).tolist()
    if one_row:
        assert shape == (1, sum(lengths)) and order == list(range(6))
    else:
        assert shape[1] == max(lengths) and shape[0] < 6  # first-fit decreasing: some rows hold two samples
    # Row-major, the samples one after the other in row order, each as in the padded batch; fillers ignored.
    flat = {k: packed[k].flatten() for k in ("input_ids", "labels", "position_ids", "mm_token_type_ids")}
    starts = (flat["position_ids"] == 0).nonzero().flatten().tolist() + [flat["input_ids"].numel()]
    segments = list(zip(starts[:-1], starts[1:]))
    samples = [(s, e) for s, e in segments if flat["labels"][s:e].ne(IGNORE_INDEX).any()]
    assert len(samples) == 6
    for i, (s, e) in zip(order, samples):
        n = lengths[i]
        assert e - s == n and torch.equal(flat["input_ids"][s:e], padded["input_ids"][i, :n])
        assert torch.equal(flat["position_ids"][s:e], torch.arange(n))
        assert torch.equal(flat["mm_token_type_ids"][s:e], padded["mm_token_type_ids"][i, :n])
        assert flat["labels"][s] == IGNORE_INDEX  # no sample learns to predict the next one's first token
        assert torch.equal(flat["labels"][s + 1:e], padded["labels"][i, 1:n])
    for s, e in set(segments) - set(samples):  # fillers: pad tokens, text type
        assert flat["input_ids"][s:e].eq(pad).all() and not flat["mm_token_type_ids"][s:e].any()
    # Images in row order (the order of their tokens in the rows); ids, counts and alignment texts in batch order.
    grids = padded["image_grid_thw"].split(padded["images_per_sample"])
    assert torch.equal(packed["image_grid_thw"], torch.cat([grids[i] for i in order]))
    patches = padded["pixel_values"].split([int(g.prod()) for g in padded["image_grid_thw"]])
    assert torch.equal(packed["pixel_values"], torch.cat([patches[i] for i in order]))
    for key in ("ids", "images_per_sample", "response_ids", "response_mask", "extended_ids", "extended_mask"):
        assert packed[key] == padded[key] if isinstance(padded[key], list) else torch.equal(packed[key], padded[key])


def test_gemma_token_types_pack_with_the_ids(tiny_vlm, easy_vqa_dir):
    items, pad = _items(tiny_vlm("gemma3"), easy_vqa_dir / "instruct.json", easy_vqa_dir / "images", 3)
    packed = NativeCollator(pad, padding_free=True, one_row=True)(items)
    image_token = AutoConfig.from_pretrained(tiny_vlm("gemma3")).image_token_index
    assert torch.equal(packed["token_type_ids"].bool(), packed["input_ids"] == image_token)
    assert packed["token_type_ids"].sum().item() == 3 * 16


def _forward(folder: Path, batch: dict, impl: str = "sdpa") -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(lm_loss + align_loss, per-sample logits in batch order) of an `AlignedVLM` over `batch`."""
    model = AlignedVLM(AutoModelForImageTextToText.from_pretrained(folder, attn_implementation=impl), ALIGN)
    out = model.eval()(**batch)
    if "attention_mask" in batch:
        return torch.stack([out.lm_loss, out.align_loss]), [
            out.logits[i, : int(n)] for i, n in enumerate(batch["attention_mask"].sum(1))]
    flat, labels = out.logits.flatten(0, 1), batch["labels"].flatten()  # (R * C, V), (R * C,)
    starts = (batch["position_ids"].flatten() == 0).nonzero().flatten().tolist() + [labels.numel()]
    samples = [(s, e) for s, e in zip(starts[:-1], starts[1:]) if labels[s:e].ne(IGNORE_INDEX).any()]  # no fillers
    logits = [None] * len(samples)
    for i, (s, e) in zip(batch["row_order"], samples):
        logits[i] = flat[s:e]
    return torch.stack([out.lm_loss, out.align_loss]), logits


@pytest.mark.parametrize("arch_name", PACKED_NATIVE_VLMS)
def test_packed_forward_gives_the_padded_logits_and_losses(arch_name, tiny_vlm, easy_vqa_dir, tmp_path):
    """Every sample's logits, the LM loss and the alignment loss of packed rows (first-fit and one row) are those of
    the padded batch: 3D positions per sample (Qwen2.5-VL), images in row order, no attention across samples."""
    folder = tiny_vlm(arch_name)
    data = _varied_records(easy_vqa_dir, tmp_path / "varied.json")
    items, pad = _items(folder, data, easy_vqa_dir / "images", 6)
    losses, logits = _forward(folder, NativeCollator(pad)(items))
    for one_row in (False, True):
        packed_losses, packed_logits = _forward(folder, NativeCollator(pad, padding_free=True, one_row=one_row)(items))
        torch.testing.assert_close(packed_losses, losses, rtol=1e-5, atol=1e-5)
        for got, expected in zip(packed_logits, logits):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_gemma3_packed_forward_differs_which_is_why_it_is_refused(tiny_vlm, easy_vqa_dir, tmp_path):
    """transformers looks Gemma 3's bidirectional image blocks up by in-sample position on sliding-window layers of
    a packed row; if this starts to pass, Gemma 3 packs and can join PACKED_NATIVE_VLMS."""
    folder = tiny_vlm("gemma3")
    data = _varied_records(easy_vqa_dir, tmp_path / "varied.json")
    items, pad = _items(folder, data, easy_vqa_dir / "images", 6)
    padded, _ = _forward(folder, NativeCollator(pad)(items))
    packed, _ = _forward(folder, NativeCollator(pad, padding_free=True, one_row=True)(items))
    assert abs(packed[0] - padded[0]) > 1e-4


def _record_batches(monkeypatch) -> list[tuple[bool, bool, int, int]]:
    """(padding_free, packed layout, rows, samples) of every batch the training collator makes."""
    batches = []

    def call(self, items):
        batch = NativeCollator.__call__(self, items)
        batches.append((self.padding_free, "position_ids" in batch and "attention_mask" not in batch,
                        batch["input_ids"].shape[0], len(batch["ids"])))
        return batch

    monkeypatch.setattr(native, "NativeCollator", type("Recording", (NativeCollator,), {"__call__": call}))
    return batches


def _step_losses(out: Path) -> list[dict]:
    return [{k: v for k, v in h.items() if "loss" in k} for h in log_history(out) if "lm_loss" in h]


@pytest.mark.parametrize("arch_name", PACKED_NATIVE_VLMS)
def test_stage2_with_alignment_packed_run_equals_padded_run(arch_name, tiny_vlm, easy_vqa_dir, tmp_path,
                                                            monkeypatch):
    """Three steps of stage 2 with the alignment: the packed run logs the padded run's losses and ends with its
    weights. Qwen2.5-VL packs first-fit rows (sdpa's layout); LLaVA-OneVision (image tokens fill its rows) one row,
    the layout of flash / flex attention."""
    from exgra_med.train.main import main

    batches = _record_batches(monkeypatch)
    if arch_name == "llava_onevision":
        monkeypatch.setattr(native, "packs_in_one_row", lambda impl: True)
    folder, images = tiny_vlm(arch_name), easy_vqa_dir / "images"
    data = _varied_records(easy_vqa_dir, tmp_path / "varied.json")
    padded, packed = tmp_path / "padded", tmp_path / "packed"
    assert main(train_args(folder, data, images, padded, 3, *ALIGN_FLAGS)) == 0
    assert len(batches) >= 3 and not any(flag or layout for flag, layout, _, _ in batches)
    batches.clear()
    assert main(train_args(folder, data, images, packed, 3, *ALIGN_FLAGS, "--padding_free", "True")) == 0
    assert len(batches) >= 3 and all(flag and layout for flag, layout, _, _ in batches)
    assert any(rows < samples for _, _, rows, samples in batches), batches  # rows really hold several samples

    packed_losses, padded_losses = _step_losses(packed), _step_losses(padded)
    assert len(packed_losses) == 3 and all("align_loss" in h for h in packed_losses)
    for p, q in zip(packed_losses, padded_losses):
        assert p.keys() == q.keys()
        for key in p:
            assert p[key] == pytest.approx(q[key], rel=1e-4, abs=1e-5), key
    for name in ("model.safetensors", ALIGNMENT_WEIGHTS):
        a, b = load_file(str(packed / name)), load_file(str(padded / name))
        assert a.keys() == b.keys()
        for key in a:
            # Adam's first steps turn gradient rounding (1e-7) into update differences of up to ~1e-5.
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-4, msg=key)


class ModelLoaded(Exception):
    """Raised by the patched model builder: the run got past the checks."""


def test_architectures_and_attention_that_cannot_pack_are_refused_in_one_line(tiny_vlm, easy_vqa_dir, tmp_path,
                                                                             capsys, monkeypatch):
    from exgra_med.cli import main as cli

    def build_native_model(*args, **kwargs):
        raise ModelLoaded

    monkeypatch.setattr(native, "build_native_model", build_native_model)
    data, images = easy_vqa_dir / "instruct.json", easy_vqa_dir / "images"
    gemma = train_args(tiny_vlm("gemma3"), data, images, tmp_path / "out", 1, "--padding_free", "True")
    assert cli(["train", *gemma]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("exgra-med train: error: --padding_free True: Gemma 3's sliding-window layers"), err
    assert err.endswith("train gemma3 padded")
    qwen = train_args(tiny_vlm("qwen2_5_vl"), data, images, tmp_path / "out", 1, "--padding_free", "True")
    assert cli(["train", *qwen, "--attn_implementation", "paged|sdpa"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("exgra-med train: error: --padding_free True needs --attn_implementation in"), err
    with pytest.raises(ModelLoaded):  # and a model that packs goes on to loading
        from exgra_med.train.main import main

        main(qwen)
    # An architecture nobody has checked is refused rather than trained on a wrong mask.
    from transformers import PaliGemmaConfig

    with pytest.raises(PaddingFreeError, match="verified on the native VLMs llava_onevision, qwen2_5_vl only, not "
                                               "'paligemma'"):
        check_native_padding_free(PaliGemmaConfig())
