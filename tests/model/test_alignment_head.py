"""`AlignmentHead` as a public component: given image features, the alignment texts and any causal LM, it returns
the configured loss, with gradients into the LM and the objective; texts go through one extra decoder pass."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from exgra_med.align.config import AlignmentConfig
from exgra_med.align.loss import pool_tokens
from exgra_med.model.alignment_head import AlignmentHead, AlignmentTexts


def _lm(impl: str = "sdpa") -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, pad_token_id=0)
    config._attn_implementation = impl
    return LlamaForCausalLM(config)


def _texts(b: int = 4) -> AlignmentTexts:
    g = torch.Generator().manual_seed(1)
    response, extended = torch.randint(1, 64, (b, 6), generator=g), torch.randint(1, 64, (b, 9), generator=g)
    response_mask, extended_mask = torch.ones_like(response), torch.ones_like(extended)
    response_mask[1, 4:], extended_mask[2, 3:] = 0, 0
    response[response_mask == 0], extended[extended_mask == 0] = 0, 0
    return AlignmentTexts(response, response_mask, extended, extended_mask)


def test_build_is_none_when_the_alignment_is_off():
    assert AlignmentHead.build(AlignmentConfig(), 16) is None


def test_from_batch_reads_the_collated_keys_and_is_none_without_texts():
    texts = _texts()
    batch = {"response_ids": texts.response_ids, "response_mask": texts.response_mask,
             "extended_ids": texts.extended_ids, "extended_mask": texts.extended_mask}
    got = AlignmentTexts.from_batch(batch)
    assert torch.equal(got.extended_ids, texts.extended_ids) and torch.equal(got.response_mask, texts.response_mask)
    assert AlignmentTexts.from_batch({"input_ids": texts.response_ids}) is None


@pytest.mark.parametrize("masked_mean", [False, True])
def test_multi_graph_loss_on_a_plain_causal_lm(masked_mean):
    """The head's nodes are the mean image feature and the pooled decoder states of each text (as two separate
    passes would give them), the loss is finite and trains both the LM and the objective's GNN."""
    lm = _lm()
    config = AlignmentConfig(contrastive=True, multi_graph=True, after_de=True, masked_mean=masked_mean)
    head = AlignmentHead.build(config, 16)
    texts = _texts()
    image = torch.randn(4, 5, 16, requires_grad=True)
    seen = {}
    hook = head.objective.register_forward_pre_hook(lambda mod, args: seen.update(nodes=args))
    out = head(image, texts, lm)
    hook.remove()
    with torch.no_grad():
        decoder = lm.get_decoder()
        alone = [decoder(input_ids=i, attention_mask=m).last_hidden_state
                 for i, m in ((texts.response_ids, texts.response_mask), (texts.extended_ids, texts.extended_mask))]
    torch.testing.assert_close(seen["nodes"][0], image.mean(1))
    torch.testing.assert_close(seen["nodes"][1], pool_tokens(alone[0], texts.response_mask, masked_mean),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seen["nodes"][2], pool_tokens(alone[1], texts.extended_mask, masked_mean),
                               rtol=1e-5, atol=1e-5)
    assert torch.isfinite(out.loss) and 0.0 <= out.loss.item() <= 2.0
    assert set(out.parts) == {"image", "response", "extended"}
    out.loss.backward()
    assert image.grad is not None and float(image.grad.abs().sum()) > 0
    assert lm.model.layers[0].mlp.up_proj.weight.grad is not None
    assert any(p.grad is not None for p in head.objective.parameters())


def test_packed_text_pass_with_masked_means_equals_the_padded_one():
    """A padding-free batch (`packed=True`) encodes the texts packed into rows: the same loss as the padded pass."""
    lm = _lm()
    config = AlignmentConfig(contrastive=True, multi_graph=True, after_de=True, masked_mean=True, noise_scale=0.0)
    head = AlignmentHead.build(config, 16)
    image = torch.randn(4, 3, 16)
    nodes, shapes = [], []
    hook = head.objective.register_forward_pre_hook(lambda mod, args: nodes.append(args))
    decoder_hook = lm.get_decoder().register_forward_pre_hook(
        lambda mod, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    with torch.no_grad():
        head(image, _texts(), lm, packed=False)
        head(image, _texts(), lm, packed=True)
    hook.remove()
    decoder_hook.remove()
    texts = _texts()
    real_tokens = int(texts.response_mask.sum() + texts.extended_mask.sum())
    assert shapes[0] == (4, 6 + 9)  # the two texts of each sample side by side
    rows, width = shapes[1]  # the 2B texts packed into rows no longer than the longest text
    assert width == 9 and rows < 2 * 4 and rows * width >= real_tokens
    for padded, packed in zip(nodes[0], nodes[1]):
        torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)


def test_contrastive_ablation_and_input_embeddings_without_after_de():
    lm = _lm()
    head = AlignmentHead.build(AlignmentConfig(contrastive=True, multi_graph=False, simi_type="average"), 16)
    calls = []
    hook = lm.get_decoder().register_forward_hook(lambda *a: calls.append(1))
    out = head(torch.randn(4, 3, 16), _texts(), lm)
    hook.remove()
    assert calls == [] and torch.isfinite(out.loss)  # texts are the input embeddings: no decoder pass


def test_image_features_must_be_three_dimensional():
    head = AlignmentHead.build(AlignmentConfig(contrastive=True, multi_graph=True), 16)
    with pytest.raises(ValueError, match=r"\(B, N, D\)"):
        head(torch.randn(4, 16), _texts(), _lm())
