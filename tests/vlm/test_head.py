"""The alignment head on a native VLM: image nodes pooled per sample, the extra text pass under activation
checkpointing, the head's own files, and the LM loss untouched when the alignment is off."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from exgra_med.align.config import AlignmentConfig
from exgra_med.data.chat import ChatEncoder, NativeCollator, NativeDataset, stop_strings
from exgra_med.model.native.aligned import (
    ALIGNMENT_CONFIG,
    ALIGNMENT_WEIGHTS,
    AlignedVLM,
    load_alignment_head,
    read_head_config,
    save_alignment_head,
)

ALIGN = AlignmentConfig(contrastive=True, multi_graph=True, after_de=True)


def _model(folder, config=ALIGN) -> AlignedVLM:
    torch.manual_seed(0)
    return AlignedVLM(AutoModelForImageTextToText.from_pretrained(folder), config)


def _batch(folder, data_dir, n=4) -> dict:
    processor = AutoProcessor.from_pretrained(folder)
    encoder = ChatEncoder(processor, stop_strings(processor))
    dataset = NativeDataset(data_dir / "instruct.json", data_dir / "images", encoder, alignment=True)
    return NativeCollator(processor.tokenizer.pad_token_id)([dataset[i] for i in range(n)])


def test_image_nodes_are_token_means_over_each_samples_images(tiny_vlm):
    model = _model(tiny_vlm("qwen2_5_vl"))
    feats = [torch.randn(2, 64), torch.randn(3, 64), torch.randn(4, 64)]
    out = type("ImageOutputs", (), {"pooler_output": tuple(feats)})()
    nodes = model.image_nodes(out, [1, 2], 2)  # sample 0: image 0; sample 1: images 1 and 2
    torch.testing.assert_close(nodes[0], feats[0].mean(0))
    torch.testing.assert_close(nodes[1], torch.cat(feats[1:]).mean(0))  # over all 7 tokens, not per image
    stacked = type("ImageOutputs", (), {"pooler_output": torch.randn(2, 16, 64)})()  # Gemma 3: (images, N, D)
    torch.testing.assert_close(model.image_nodes(stacked, [1, 1], 2), stacked.pooler_output.mean(1))
    with pytest.raises(ValueError, match="at least one image per sample"):
        model.image_nodes(out, [3, 0], 2)


def test_stage2_forward_adds_alpha_times_the_alignment_and_is_the_lm_loss_without_it(arch, tiny_vlm, easy_vqa_dir):
    folder = tiny_vlm(arch)
    batch = _batch(folder, easy_vqa_dir)
    aligned = _model(folder, ALIGN.replace(alpha=0.5))
    out = aligned(**batch)
    assert torch.isfinite(out.lm_loss) and 0 <= out.align_loss.item() <= 2
    torch.testing.assert_close(out.loss, out.lm_loss + 0.5 * out.align_loss)
    assert set(out.align_parts) == {"image", "response", "extended"}
    out.loss.backward()
    assert all(p.grad is not None for p in aligned.alignment.parameters())  # the GNN is trained

    plain = _model(folder, AlignmentConfig())
    assert plain.alignment is None
    reference = AutoModelForImageTextToText.from_pretrained(folder)
    model_inputs = {k: v for k, v in batch.items()
                    if k not in ("ids", "images_per_sample", "response_ids", "response_mask", "extended_ids",
                                 "extended_mask")}
    torch.testing.assert_close(plain(**batch).loss, reference(**model_inputs).loss, rtol=0, atol=0)


def _saved_bytes(fn) -> tuple[torch.Tensor, int]:
    total = 0

    def pack(t: torch.Tensor):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total


def test_activation_checkpointing_applies_to_the_extra_text_pass(tiny_vlm, easy_vqa_dir):
    """The after_de pass over the response + extended texts runs through the model's checkpointed layers: it keeps
    far fewer activations for backward, with the same hidden states."""
    folder = tiny_vlm("qwen2_5_vl")
    batch = _batch(folder, easy_vqa_dir)
    model = _model(folder).train()

    def text_pass():
        return model.alignment_head.encode_text_pairs(model.base_vlm, batch["response_ids"], batch["response_mask"],
                                                      batch["extended_ids"], batch["extended_mask"])

    (plain_response, plain_extended), plain_bytes = _saved_bytes(text_pass)
    model.activation_checkpointing_enable()
    assert model.language_model.gradient_checkpointing
    (ckpt_response, ckpt_extended), ckpt_bytes = _saved_bytes(text_pass)
    torch.testing.assert_close(ckpt_response, plain_response)
    torch.testing.assert_close(ckpt_extended, plain_extended)
    assert ckpt_bytes < 0.5 * plain_bytes, (ckpt_bytes, plain_bytes)
    (ckpt_response.sum() + ckpt_extended.sum()).backward()  # recomputed in backward
    assert model.language_model.layers[0].mlp.up_proj.weight.grad is not None


def test_head_files_round_trip_and_a_mismatched_head_is_not_loaded(tiny_vlm, tmp_path):
    folder = tiny_vlm("gemma3")
    trained = _model(folder)
    with torch.no_grad():
        for p in trained.alignment.parameters():
            p.add_(1.0)
    state = {k: v for k, v in trained.alignment.state_dict().items()}
    save_alignment_head(state, tmp_path, trained.alignment_config, 64)
    assert (tmp_path / ALIGNMENT_WEIGHTS).is_file() and (tmp_path / ALIGNMENT_CONFIG).is_file()
    assert read_head_config(tmp_path) == {"alignment_config": ALIGN.to_dict(), "hidden_size": 64}
    fresh = _model(folder)
    assert load_alignment_head(fresh, tmp_path)
    for key, value in fresh.alignment.state_dict().items():
        torch.testing.assert_close(value, state[key])
    other = {k: torch.zeros(3) for k in state}
    save_alignment_head(other, tmp_path, ALIGN, 3)
    assert not load_alignment_head(fresh, tmp_path)  # wrong shapes: a warning, the head keeps its weights
    assert read_head_config(tmp_path / "nowhere") is None


def test_the_ot_ablation_needs_equal_token_counts_and_is_refused(tiny_vlm):
    with pytest.raises(ValueError, match="--simi_type OT"):
        _model(tiny_vlm("qwen2_5_vl"), AlignmentConfig(contrastive=True, simi_type="OT"))


@pytest.mark.parametrize("long_texts", [False, True])
def test_the_packed_text_pass_equals_a_pass_per_text(arch, tiny_vlm, long_texts):
    """Both texts of a sample in one row (block-causal mask, restarting positions) give each text's own hidden states;
    texts longer than Gemma 3's sliding window (64 in the tiny model) take the padded 2B-row pass, equal too."""
    model = _model(tiny_vlm(arch)).eval()
    g = torch.Generator().manual_seed(0)
    t1, t2 = (70, 90) if long_texts else (7, 12)
    ids1, ids2 = torch.randint(10, 300, (3, t1), generator=g), torch.randint(10, 300, (3, t2), generator=g)
    mask1, mask2 = torch.ones(3, t1, dtype=torch.long), torch.ones(3, t2, dtype=torch.long)
    mask1[0, 5:], mask1[2, 3:], mask2[1, t2 - 3:] = 0, 0, 0
    with torch.no_grad():
        head = model.alignment_head
        first, second = head.encode_text_pairs(model.base_vlm, ids1, mask1, ids2, mask2)
        alone1, alone2 = head.encode_texts(model.base_vlm, ids1, mask1), head.encode_texts(model.base_vlm, ids2, mask2)
    torch.testing.assert_close(first[mask1.bool()], alone1[mask1.bool()], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(second[mask2.bool()], alone2[mask2.bool()], rtol=1e-4, atol=1e-5)
