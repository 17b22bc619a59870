"""Stage-2 alignment inside the model: one batched extra LLM pass, the right pooled inputs, the total loss."""

from __future__ import annotations

import pytest
import torch

from exgra_med.align import ContrastiveAlignmentLoss, MultiGraphAlignmentLoss, pool_tokens
from exgra_med.data.collate import DataCollator
from exgra_med.data.dataset import SupervisedDataset
from exgra_med.model.loading import ConnectorOptions, build_from_parts


def _model_and_batch(tiny_model_dir, easy_vqa_dir, batch_size=4, **alignment):
    torch.manual_seed(0)
    model, tokenizer, processor = build_from_parts(
        str(tiny_model_dir / "llm"), str(tiny_model_dir / "vision"), ConnectorOptions(alignment=alignment)
    )
    dataset = SupervisedDataset(
        easy_vqa_dir / "instruct.json", easy_vqa_dir / "images", tokenizer, processor,
        num_image_tokens=model.num_image_tokens, mm_use_im_start_end=True, alignment=True,
    )
    batch = DataCollator(tokenizer)([dataset[i] for i in range(batch_size)])
    batch.pop("ids")
    return model.eval(), batch


def test_after_de_runs_one_batched_pass_equal_to_separate_passes(tiny_model_dir, easy_vqa_dir):
    model, batch = _model_and_batch(tiny_model_dir, easy_vqa_dir, contrastive=True, multi_graph=True, after_de=True)
    assert isinstance(model.alignment, MultiGraphAlignmentLoss)
    calls, seen = [], {}
    decoder = model.language_model.get_decoder()
    hook = decoder.register_forward_hook(
        lambda mod, args, kwargs, out: calls.append(tuple(out.last_hidden_state.shape[:2])), with_kwargs=True
    )
    pre = model.alignment.register_forward_pre_hook(lambda mod, args: seen.update(nodes=args))
    with torch.no_grad():
        out = model(**batch)
    hook.remove()
    pre.remove()
    b, t = batch["input_ids"].shape
    t1, t2 = batch["response_ids"].shape[1], batch["extended_ids"].shape[1]
    # The LM pass, then ONE pass over both texts of each sample, packed side by side (no padding to the longer).
    assert calls == [(b, t), (b, t1 + t2)]
    image, response, extended = seen["nodes"]
    with torch.no_grad():
        expected_image = model.get_image_features(batch["pixel_values"]).mean(1)
        head, lm = model.alignment_head, model.language_model
        expected_response = pool_tokens(head.encode_texts(lm, batch["response_ids"], batch["response_mask"]))
        expected_extended = pool_tokens(head.encode_texts(lm, batch["extended_ids"], batch["extended_mask"]))
    torch.testing.assert_close(image, expected_image)
    torch.testing.assert_close(response, expected_response, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(extended, expected_extended, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, out.lm_loss + model.config.alignment_config.alpha * out.align_loss)
    assert 0.0 <= float(out.align_loss) <= 2.0
    # The per-modality parts come back on the output; the loss is their mean.
    assert set(out.align_parts) == {"image", "response", "extended"}
    torch.testing.assert_close(sum(out.align_parts.values()) / 3, out.align_loss)


@pytest.mark.parametrize("impl,packed", [("sdpa", True), ("eager", True), ("flex_attention", False)])
def test_text_pair_pass_equals_separate_passes_at_every_position(tiny_model_dir, easy_vqa_dir, impl, packed):
    """Packed (block-causal mask, restarted positions) or padded 2B pass == two separate passes, padding included
    (the reference's mean pools over padding positions too)."""
    model, _ = _model_and_batch(tiny_model_dir, easy_vqa_dir, contrastive=True, multi_graph=True, after_de=True)
    model.language_model.set_attn_implementation(impl)
    g = torch.Generator().manual_seed(0)
    b, t1, t2 = 4, 7, 12
    ids1, ids2 = torch.randint(10, 60, (b, t1), generator=g), torch.randint(10, 60, (b, t2), generator=g)
    mask1, mask2 = torch.ones(b, t1, dtype=torch.long), torch.ones(b, t2, dtype=torch.long)
    mask1[1, 4:], mask2[2, 5:], mask2[0, 11:] = 0, 0, 0
    ids1[mask1 == 0], ids2[mask2 == 0] = 0, 0
    rows = []
    hook = model.language_model.get_decoder().register_forward_hook(
        lambda mod, args, kwargs, out: rows.append(out.last_hidden_state.shape[0]), with_kwargs=True
    )
    with torch.no_grad():
        head, lm = model.alignment_head, model.language_model
        h1, h2 = head.encode_text_pairs(lm, ids1, mask1, ids2, mask2)
    hook.remove()
    assert rows == [b if packed else 2 * b]
    with torch.no_grad():
        r1, r2 = head.encode_texts(lm, ids1, mask1), head.encode_texts(lm, ids2, mask2)
    assert h1.shape == r1.shape and h2.shape == r2.shape
    torch.testing.assert_close(h1, r1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h2, r2, rtol=1e-5, atol=1e-5)


def test_alpha_and_embedding_texts_without_after_de(tiny_model_dir, easy_vqa_dir):
    model, batch = _model_and_batch(tiny_model_dir, easy_vqa_dir, contrastive=True, multi_graph=True, alpha=0.25)
    calls = []
    hook = model.language_model.get_decoder().register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        out = model(**batch)
    hook.remove()
    assert calls == [1]  # texts use the input embeddings, no extra LLM pass
    torch.testing.assert_close(out.loss, out.lm_loss + 0.25 * out.align_loss)


def test_alignment_gradient_reaches_projector_llm_and_gnn(tiny_model_dir, easy_vqa_dir):
    model, batch = _model_and_batch(tiny_model_dir, easy_vqa_dir, contrastive=True, multi_graph=True, after_de=True)
    model.train()
    model.zero_grad()
    out = model(**batch)
    out.align_loss.backward()  # the alignment part alone
    gnn = [p.grad for p in model.alignment.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in gnn)
    assert model.mm_projector[0].weight.grad is not None and model.mm_projector[0].weight.grad.abs().sum() > 0
    q = model.language_model.get_decoder().layers[0].self_attn.q_proj.weight.grad
    assert q is not None and q.abs().sum() > 0


@pytest.mark.parametrize("loss_type,simi_type", [("infonce", "average"), ("siglip", "average"), ("infonce", "OT")])
def test_contrastive_ablations_train(tiny_model_dir, easy_vqa_dir, loss_type, simi_type):
    model, batch = _model_and_batch(
        tiny_model_dir, easy_vqa_dir, contrastive=True, multi_graph=False, after_de=True,
        contrastive_loss_type=loss_type, simi_type=simi_type,
    )
    assert isinstance(model.alignment, ContrastiveAlignmentLoss)
    model.train()
    out = model(**batch)
    assert torch.isfinite(out.align_loss) and out.align_loss > 0
    assert set(out.align_parts) == {"image_response"}
    out.loss.backward()
    assert any(p.grad is not None for p in model.alignment.parameters())
