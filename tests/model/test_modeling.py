"""The composite model: parity with transformers' LLaVA, save/load, generation, errors, the three tiny LLMs."""

from __future__ import annotations

import pytest
import torch

from exgra_med.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_PATCH_TOKEN
from exgra_med.model.export import check_exportable, to_hf_llava
from exgra_med.model.loading import ConnectorOptions, build_from_parts, load_pretrained
from exgra_med.model.tiny import make_tiny_model


def _prompt_ids(tokenizer, n_image_tokens: int, text: str = "What colour is the shape?", start_end: bool = True):
    image = DEFAULT_IMAGE_PATCH_TOKEN * n_image_tokens
    if start_end:
        image = DEFAULT_IM_START_TOKEN + image + DEFAULT_IM_END_TOKEN
    return tokenizer(f"### Human: {text}\n{image}\n### Assistant:", return_tensors="pt").input_ids


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model, tokenizer, processor = load_pretrained(str(tiny_model_dir), dtype=torch.float32)
    return model, tokenizer, processor


def test_logits_equal_transformers_llava(tiny):
    model, tokenizer, _ = tiny
    llava = to_hf_llava(model)
    torch.manual_seed(0)
    ids = _prompt_ids(tokenizer, model.num_image_tokens)
    pixels = torch.randn(1, 3, 32, 32)
    ours = model(input_ids=ids, pixel_values=pixels).logits
    theirs = llava(input_ids=ids, pixel_values=pixels).logits
    assert ours.shape == theirs.shape == (1, ids.shape[1], len(tokenizer))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    # The images matter: other pixels give other logits at the answer position.
    other = model(input_ids=ids, pixel_values=torch.randn(1, 3, 32, 32)).logits
    assert not torch.allclose(ours[0, -1], other[0, -1])


def test_save_and_reload_is_exact(tiny, tmp_path):
    model, tokenizer, processor = tiny
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    again, tok2, _ = load_pretrained(str(tmp_path), dtype=torch.float32)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    assert tok2.convert_tokens_to_ids(DEFAULT_IMAGE_PATCH_TOKEN) == model.config.image_token_id


def test_image_token_mismatch_raises(tiny):
    model, tokenizer, _ = tiny
    ids = _prompt_ids(tokenizer, model.num_image_tokens - 1)
    with pytest.raises(ValueError, match="image tokens and image features disagree"):
        model(input_ids=ids, pixel_values=torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="no pixel_values"):
        model(input_ids=_prompt_ids(tokenizer, model.num_image_tokens))


def test_generate_matches_step_by_step_greedy(tiny):
    model, tokenizer, _ = tiny
    ids = _prompt_ids(tokenizer, model.num_image_tokens)
    pixels = torch.randn(1, 3, 32, 32)
    out = model.generate(
        ids, pixels, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=tokenizer.pad_token_id
    )
    assert out.shape == (1, 6)
    # Recompute without a cache: append the argmax token and run the full forward again.
    seq = ids
    for expected in out[0]:
        logits = model(input_ids=seq, pixel_values=pixels).logits
        nxt = logits[0, -1].argmax()
        assert int(nxt) == int(expected)
        seq = torch.cat([seq, nxt.view(1, 1)], dim=1)


def test_batched_left_padded_generation_equals_single(tiny):
    model, tokenizer, _ = tiny
    prompts = [
        _prompt_ids(tokenizer, model.num_image_tokens, q)[0] for q in ("Is it red?", "What shape is in the image now?")
    ]
    pixels = torch.randn(2, 3, 32, 32)
    width = max(len(p) for p in prompts)
    ids = torch.full((2, width), tokenizer.pad_token_id)
    mask = torch.zeros((2, width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = p
        mask[i, width - len(p) :] = 1
    kwargs = dict(max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
    batched = model.generate(ids, pixels, attention_mask=mask, **kwargs)
    for i, p in enumerate(prompts):
        single = model.generate(p[None], pixels[i : i + 1], **kwargs)
        assert batched[i].tolist() == single[0].tolist()


def test_gradient_checkpointing_gives_same_gradients(tiny):
    model, tokenizer, _ = tiny
    ids = _prompt_ids(tokenizer, model.num_image_tokens)
    pixels = torch.randn(1, 3, 32, 32)
    grads = []
    for enable in (False, True):
        model.train()
        if enable:
            model.activation_checkpointing_enable()
        model.zero_grad()
        model(input_ids=ids, pixel_values=pixels, labels=ids).loss.backward()
        grads.append(model.mm_projector[0].weight.grad.clone())
        model.activation_checkpointing_disable()
    model.eval()
    model.zero_grad()
    torch.testing.assert_close(grads[0], grads[1])
    assert grads[0].abs().sum() > 0


@pytest.mark.parametrize("llm", ["mistral", "qwen2"])
def test_other_llms_build_train_and_generate(tmp_path, llm):
    out = make_tiny_model(tmp_path / llm, llm=llm, hidden=64, layers=1, vision_hidden=32, vision_layers=2)
    model, tokenizer, _ = load_pretrained(str(out), dtype=torch.float32)
    assert model.language_model.config.model_type == llm
    ids = _prompt_ids(tokenizer, model.num_image_tokens)
    loss = model(input_ids=ids, pixel_values=torch.randn(1, 3, 32, 32), labels=ids).loss
    assert torch.isfinite(loss) and loss > 0
    gen = model.generate(ids, torch.randn(1, 3, 32, 32), max_new_tokens=3, do_sample=False, eos_token_id=None)
    assert gen.shape == (1, 3)


def test_plain_placeholder_and_biomedclip_tower(tmp_path):
    out = make_tiny_model(
        tmp_path / "bm",
        vision="biomedclip",
        image_size=64,
        hidden=64,
        layers=1,
        options=ConnectorOptions(mm_use_im_start_end=False, mm_dense_connector_type="dci", num_l=3),
    )
    model, tokenizer, _ = load_pretrained(str(out), dtype=torch.float32)
    assert model.config.vision_tower_type == "open_clip"
    assert model.num_image_tokens == (64 // 16) ** 2
    assert tokenizer.convert_tokens_to_ids(DEFAULT_IMAGE_PATCH_TOKEN) == model.config.image_token_id
    ids = _prompt_ids(tokenizer, model.num_image_tokens, start_end=False)
    out1 = model(input_ids=ids, pixel_values=torch.randn(1, 3, 64, 64), labels=ids)
    assert out1.logits.shape[1] == ids.shape[1] and torch.isfinite(out1.loss)
    with pytest.raises(ValueError, match="cannot express"):
        check_exportable(model)


def test_build_from_parts_adds_tokens_and_resizes(tiny_model_dir):
    model, tokenizer, processor = build_from_parts(
        str(tiny_model_dir / "llm"), str(tiny_model_dir / "vision"), ConnectorOptions(mm_projector_type="linear")
    )
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    assert isinstance(model.mm_projector, torch.nn.Linear)
    assert processor.crop_size["height"] == 32
    assert all(not p.requires_grad for p in model.vision_tower.parameters())


def test_spatial_pooling_averages_patch_blocks_before_the_projector(tmp_path):
    from PIL import Image
    from transformers import AutoProcessor

    from exgra_med.model.connector import select_features

    out = make_tiny_model(
        tmp_path / "pooled", patch_size=4, hidden=64, layers=1, options=ConnectorOptions(mm_spatial_pool_stride=2)
    )
    model, tokenizer, _ = load_pretrained(str(out), dtype=torch.float32)
    assert model.config.mm_spatial_pool_stride == 2 and model.num_image_tokens == (32 // 4 // 2) ** 2 == 16
    pixels = torch.randn(1, 3, 32, 32)
    grid = select_features(model.vision_tower(pixels), -2).reshape(1, 8, 8, -1)  # (1, 8, 8, C) patch grid
    first_block = grid[0, :2, :2].reshape(4, -1).mean(0)  # the top-left 2 x 2 patches
    last_block = grid[0, 6:, 6:].reshape(4, -1).mean(0)
    feats = model.get_image_features(pixels)
    assert feats.shape == (1, 16, 64)
    torch.testing.assert_close(feats[0, 0], model.mm_projector(first_block))
    torch.testing.assert_close(feats[0, -1], model.mm_projector(last_block))
    ids = _prompt_ids(tokenizer, 16)
    assert torch.isfinite(model(input_ids=ids, pixel_values=pixels, labels=ids).loss)
    # The processor expands <image> into the pooled count, from the checkpoint's config.
    processor = AutoProcessor.from_pretrained(out)
    text = processor(text="<image>\nWhat colour?", images=[Image.new("RGB", (32, 32))])
    assert int((text["input_ids"] == model.config.image_token_id).sum()) == 16
    with pytest.raises(ValueError, match="mm_spatial_pool_stride=2"):
        check_exportable(model)
    with pytest.raises(ValueError, match="mm_spatial_pool_stride=3 must divide"):
        make_tiny_model(tmp_path / "bad", patch_size=4, options=ConnectorOptions(mm_spatial_pool_stride=3))


def test_cls_patch_model_equals_llava_with_the_full_strategy(tmp_path):
    out = make_tiny_model(
        tmp_path / "full", hidden=64, layers=1, options=ConnectorOptions(mm_vision_select_feature="cls_patch")
    )
    model, tokenizer, _ = load_pretrained(str(out), dtype=torch.float32)
    assert model.num_image_tokens == (32 // 8) ** 2 + 1
    llava = to_hf_llava(model)
    assert llava.config.vision_feature_select_strategy == "full"
    ids = _prompt_ids(tokenizer, model.num_image_tokens)
    pixels = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(
        model(input_ids=ids, pixel_values=pixels).logits, llava(input_ids=ids, pixel_values=pixels).logits,
        rtol=0, atol=1e-5,
    )


def test_cls_model_feeds_one_token_per_image(tmp_path):
    out = make_tiny_model(
        tmp_path / "cls", hidden=64, layers=1,
        options=ConnectorOptions(mm_vision_select_feature="cls", mm_vision_select_layer=-1),
    )
    model, tokenizer, _ = load_pretrained(str(out), dtype=torch.float32)
    assert model.num_image_tokens == 1
    pixels = torch.randn(2, 3, 32, 32)
    cls = model.vision_tower(pixels).layers[-1][:, :1]
    torch.testing.assert_close(model.get_image_features(pixels), model.mm_projector(cls))
    ids = _prompt_ids(tokenizer, 1)
    gen = model.generate(ids, pixels[:1], max_new_tokens=3, do_sample=False, eos_token_id=None)
    assert gen.shape == (1, 3)
    with pytest.raises(ValueError, match="mm_vision_select_feature='cls'"):
        check_exportable(model)
    with pytest.raises(ValueError, match="needs a vision tower with a CLS token"):
        make_tiny_model(
            tmp_path / "bm", vision="biomedclip", image_size=64, hidden=64, layers=1,
            options=ConnectorOptions(mm_vision_select_feature="cls"),
        )
