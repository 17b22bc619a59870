"""Padding-free batches: transformers' packed masks, and packed == padded (losses, gradients, text features)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaModel,
    MambaConfig,
    MistralConfig,
    MistralModel,
    Qwen2Config,
    Qwen2Model,
    RwkvConfig,
)
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from exgra_med.data.collate import DataCollator
from exgra_med.data.dataset import SupervisedDataset
from exgra_med.model.loading import ConnectorOptions, build_from_parts
from exgra_med.model.packing import PaddingFreeError, check_padding_free, pack_texts, segment_index, segment_mean

LENGTHS = (3, 5, 1, 4)  # samples of one packed row


def _positions() -> torch.Tensor:
    return torch.cat([torch.arange(n) for n in LENGTHS])[None]  # (1, L)


def _expected_mask(window: int | None = None) -> torch.Tensor:
    """Block-diagonal causal (L, L): a token sees the tokens of its own sample up to itself (within the window)."""
    seg = segment_index(_positions())
    pos = _positions()[0]
    allowed = (seg[:, None] == seg[None, :]) & (pos[None, :] <= pos[:, None])
    if window is not None:
        allowed &= pos[:, None] - pos[None, :] < window
    return allowed


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_transformers_builds_a_block_diagonal_causal_mask_from_packed_position_ids(impl):
    config = LlamaConfig(hidden_size=16, num_attention_heads=2, num_hidden_layers=1, vocab_size=50)
    config._attn_implementation = impl
    embeds = torch.zeros(1, sum(LENGTHS), 16)
    mask = create_causal_mask(config, embeds, attention_mask=None, cache=None, position_ids=_positions())
    allowed = mask[0, 0] if impl == "sdpa" else mask[0, 0] == 0  # eager: additive (0 = attend, min = blocked)
    assert torch.equal(allowed, _expected_mask())
    # With a KV cache (what an LLM builds by itself when config.use_cache is on) the packing goes unseen.
    from transformers import DynamicCache

    unseen = create_causal_mask(config, embeds, None, cache=DynamicCache(config=config), position_ids=_positions())
    assert unseen is None or not torch.equal(unseen[0, 0] if impl == "sdpa" else unseen[0, 0] == 0, _expected_mask())

    window = MistralConfig(hidden_size=16, num_attention_heads=2, num_hidden_layers=1, vocab_size=50, sliding_window=2)
    window._attn_implementation = impl
    mask = create_sliding_window_causal_mask(window, embeds, None, cache=None, position_ids=_positions())
    allowed = mask[0, 0] if impl == "sdpa" else mask[0, 0] == 0
    assert torch.equal(allowed, _expected_mask(window=2))


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_llm_on_a_packed_row_equals_each_sample_alone(kind, impl):
    torch.manual_seed(0)
    config_cls, model_cls = {"llama": (LlamaConfig, LlamaModel), "mistral": (MistralConfig, MistralModel),
                             "qwen2": (Qwen2Config, Qwen2Model)}[kind]
    config = config_cls(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                        num_hidden_layers=2, vocab_size=60, attn_implementation=impl)
    model = model_cls(config).eval()
    check_padding_free(config)
    ids = torch.randint(0, 60, (1, sum(LENGTHS)))
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=_positions(), use_cache=False).last_hidden_state[0]
        alone = torch.cat([model(input_ids=part[None]).last_hidden_state[0] for part in ids[0].split(LENGTHS)])
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


def test_models_and_attention_that_cannot_pack_are_refused():
    with pytest.raises(PaddingFreeError, match=r"--attn_implementation in .*got 'paged\|sdpa'"):
        check_padding_free(LlamaConfig(), "paged|sdpa")
    with pytest.raises(PaddingFreeError, match="linear_attention"):
        check_padding_free(MambaConfig())
    with pytest.raises(PaddingFreeError, match="does not build its attention masks through transformers"):
        check_padding_free(RwkvConfig())


def test_segment_mean_is_the_masked_mean_of_each_sample():
    hidden = torch.randn(sum(LENGTHS), 6)
    means = segment_mean(hidden, segment_index(_positions()), len(LENGTHS))
    expected = torch.stack([part.mean(0) for part in hidden.split(LENGTHS)])
    torch.testing.assert_close(means, expected)


def test_packed_texts_pool_and_unpack_like_the_padded_texts():
    """`pack_texts` rows (first-fit within the longest text, or one row): per-text means equal the masked means of
    the padded texts, and unpacking restores the padded layout."""
    from exgra_med.align import pool_tokens

    mask = torch.zeros(5, 6, dtype=torch.long)
    for i, n in enumerate((6, 2, 3, 0, 4)):  # a text may be empty
        mask[i, :n] = 1
    ids = torch.randint(1, 50, (5, 6)) * mask
    for one_row in (False, True):
        packed = pack_texts(ids, mask, one_row)
        assert packed.ids.shape == ((1, 15) if one_row else (3, 6))  # rows [0], [4, 1], [2] + filler
        hidden = packed.ids[..., None].float() * torch.tensor([1.0, -2.0])  # (R, C, 2) features of the ids
        padded = ids[..., None].float() * torch.tensor([1.0, -2.0])
        torch.testing.assert_close(packed.pooled(hidden, 5), pool_tokens(padded, mask, masked=True))
        torch.testing.assert_close(packed.unpacked(hidden, (5, 6)), padded * mask[..., None])
        seg = segment_index(packed.position_ids)
        assert int(seg[-1]) + 1 == (4 if one_row else 5)  # the empty text has no segment; the filler has one


ALIGNMENTS = {
    "lm_only": None,
    "multi_graph_masked_mean": dict(contrastive=True, multi_graph=True, after_de=True, masked_mean=True),
    "multi_graph_reference_mean": dict(contrastive=True, multi_graph=True, after_de=True),
    "contrastive_ot": dict(contrastive=True, multi_graph=False, after_de=True, simi_type="OT"),
    "lora_multi_graph_masked_mean": dict(contrastive=True, multi_graph=True, after_de=True, masked_mean=True),
}


def _items(tiny_model_dir, easy_vqa_dir, tmp_path, alignment, n=5):
    options = ConnectorOptions(alignment=alignment) if alignment else ConnectorOptions()
    torch.manual_seed(0)
    model, tokenizer, processor = build_from_parts(str(tiny_model_dir / "llm"), str(tiny_model_dir / "vision"),
                                                   options, dtype=torch.float32)
    records = json.loads((easy_vqa_dir / "instruct.json").read_text())[:n]
    # Lengths that differ a lot, as in instruction data: one record gets a long extra turn (twice the others).
    for key in ("conversations", "conversations_long"):
        turns = records[1][key]
        records[1][key] = turns + [dict(turns[0], value="Describe the image. " * 30), turns[1]]
    if not alignment:  # a text-only sample among image samples (the alignment needs an image per sample)
        records[2].pop("image")
        records[2]["conversations"][0]["value"] = records[2]["conversations"][0]["value"].replace("<image>", "")
    data = tmp_path / "records.json"
    data.write_text(json.dumps(records))
    dataset = SupervisedDataset(data, easy_vqa_dir / "images", tokenizer, processor,
                                num_image_tokens=model.num_image_tokens, mm_use_im_start_end=True,
                                alignment=bool(alignment))
    return model, tokenizer, [dataset[i] for i in range(n)]


def _step(model, batch):
    """Loss parts, the alignment's inputs and every gradient of one training step from a fixed noise state."""
    if hasattr(model.alignment, "set_rng_state"):  # the multi-graph loss draws noise: the same for both batches
        model.alignment.set_rng_state(model._test_rng)
    seen, rows = {}, []
    hooks = [model.language_model.get_decoder().register_forward_hook(
        lambda mod, args, kwargs, out: rows.append(tuple(out.last_hidden_state.shape[:2])), with_kwargs=True)]
    if model.alignment is not None:
        hooks.append(model.alignment.register_forward_pre_hook(lambda mod, args: seen.update(inputs=args)))
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    for hook in hooks:
        hook.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, seen.get("inputs"), grads, rows


@pytest.mark.parametrize("one_row", [False, True], ids=["rows", "one_row"])
@pytest.mark.parametrize("name", list(ALIGNMENTS))
def test_packed_and_padded_batches_give_equal_losses_and_gradients(tiny_model_dir, easy_vqa_dir, tmp_path, name,
                                                                   one_row):
    """The same samples padded and packed (rows within the longest sample, as for sdpa / eager; or one row, as for
    flash / flex attention): equal losses, alignment inputs (in batch order) and gradients."""
    model, tokenizer, items = _items(tiny_model_dir, easy_vqa_dir, tmp_path, ALIGNMENTS[name])
    if name.startswith("lora"):
        from peft import LoraConfig, get_peft_model

        model.requires_grad_(False)
        model.language_model = get_peft_model(model.language_model, LoraConfig(r=4, target_modules="all-linear"))
        model.mm_projector.requires_grad_(True)
        model.alignment.requires_grad_(True)
        for n, p in model.language_model.named_parameters():  # nonzero B: gradients reach both LoRA factors
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.02)
    model.train()
    if hasattr(model.alignment, "generator_for"):
        model.alignment.generator_for(torch.device("cpu"))
        model._test_rng = model.alignment.get_rng_state()
    packed_batch = DataCollator(tokenizer, padding_free=True, one_row=one_row)(items)
    padded_batch = DataCollator(tokenizer)(items)
    assert one_row or packed_batch["row_order"].tolist() != list(range(len(items)))  # rows reorder the LM samples
    padded, padded_inputs, padded_grads, padded_rows = _step(model, padded_batch)
    packed, packed_inputs, packed_grads, packed_rows = _step(model, packed_batch)

    b, t = padded_batch["input_ids"].shape
    total = int(padded_batch["attention_mask"].sum())
    assert total < 0.8 * b * t  # the padded batch holds much padding
    rows, width = packed_rows[0]
    assert (rows, width) == ((1, total) if one_row else (rows, t)) and rows * width < 0.8 * b * t
    assert rows > 1 or one_row  # rows: several samples share a row
    if ALIGNMENTS[name] and (ALIGNMENTS[name].get("masked_mean") or not ALIGNMENTS[name]["multi_graph"]):
        # ... and so did the text pass (its layout follows the LLM's attention: sdpa here, so rows)
        keys = ("response_mask", "extended_mask") if ALIGNMENTS[name]["multi_graph"] else ("response_mask",)
        n_text = sum(int(padded_batch[k].sum()) for k in keys)
        padded_text = b * sum(padded_batch[k].shape[1] for k in keys)
        text_rows, text_width = packed_rows[1]
        assert n_text <= text_rows * text_width <= padded_text
    torch.testing.assert_close(packed.lm_loss, padded.lm_loss, rtol=1e-5, atol=1e-6)
    if model.alignment is not None:
        torch.testing.assert_close(packed.align_loss, padded.align_loss, rtol=0, atol=1e-6)
        if len(padded_inputs) == 3 and padded_inputs[2].dim() == 2 and padded_inputs[1].dim() == 3:
            # contrastive: image tokens, text tokens, text mask; the loss reads the real text tokens only
            mask = padded_inputs[2].bool()
            packed_inputs = (packed_inputs[0], packed_inputs[1][mask], packed_inputs[2])
            padded_inputs = (padded_inputs[0], padded_inputs[1][mask], padded_inputs[2])
        for packed_input, padded_input in zip(packed_inputs, padded_inputs):  # image / text nodes (or tokens)
            torch.testing.assert_close(packed_input, padded_input, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed.loss, padded.loss, rtol=1e-5, atol=1e-6)
    assert set(packed_grads) == set(padded_grads) and len(padded_grads) > 0
    for n, g in padded_grads.items():
        torch.testing.assert_close(packed_grads[n], g, rtol=1e-4, atol=1e-5, msg=n)
    assert any(g.abs().sum() > 0 for n, g in padded_grads.items() if "language_model" in n)


def test_packed_batch_refuses_a_cache_and_flash_attention_rows(tiny_model_dir, easy_vqa_dir, tmp_path):
    model, tokenizer, items = _items(tiny_model_dir, easy_vqa_dir, tmp_path, None, n=3)
    batch = DataCollator(tokenizer, padding_free=True)(items)
    assert batch["input_ids"].shape[0] > 1
    with pytest.raises(ValueError, match="padding-free batch cannot use a KV cache"):
        model(**batch, use_cache=True)
    # flash-attention's varlen path reads packed samples from one row only: several rows would attend across samples
    model.language_model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match=r"flash_attention_2 reads packed samples from one row only; got \d rows"):
        model(**batch)
