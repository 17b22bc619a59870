"""`<im_start>`/`<im_end>` input embeddings: the reference's mean initialisation of new tokens, and the stage-1
projector file's rows in this project's and the reference's layout."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from exgra_med.model.delimiters import EMBED_KEY, delimiter_ids, load_delimiter_rows
from exgra_med.model.loading import ConnectorOptions, build_from_parts, load_projector, save_projector


def _plain_llm(out) -> None:
    """A tiny LLaMA whose tokenizer knows no image tokens (like a Vicuna folder), so training adds them."""
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "[PAD]", "what", "is", "shown", "a", "circle"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                        pad_token="[PAD]")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False, pad_token_id=3)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)


def test_new_delimiters_start_at_the_mean_of_the_other_rows(tiny_model_dir, tmp_path):
    _plain_llm(tmp_path / "llm")
    model, tokenizer, _ = build_from_parts(str(tmp_path / "llm"), str(tiny_model_dir / "vision"), ConnectorOptions())
    ids = delimiter_ids(model)
    assert ids == tokenizer.convert_tokens_to_ids(["<im_start>", "<im_end>"]) and min(ids) >= 9  # newly added
    for emb in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
        others = torch.ones(emb.shape[0], dtype=torch.bool)
        others[ids] = False
        mean = emb[others].mean(dim=0)
        for i in ids:
            torch.testing.assert_close(emb[i], mean, rtol=0, atol=1e-6)


def test_projector_file_round_trip_and_reference_layout(tiny_model_dir, tmp_path):
    model, _, _ = build_from_parts(str(tiny_model_dir / "llm"), str(tiny_model_dir / "vision"), ConnectorOptions())
    ids = delimiter_ids(model)
    weight = model.get_input_embeddings().weight
    with torch.no_grad():
        weight[ids] = torch.tensor([[1.5], [-2.5]]).expand(2, weight.shape[1])
    save_projector(model, tmp_path)

    fresh, _, _ = build_from_parts(str(tiny_model_dir / "llm"), str(tiny_model_dir / "vision"), ConnectorOptions())
    untouched = fresh.get_input_embeddings().weight.detach().clone()
    load_projector(fresh, tmp_path)
    loaded = fresh.get_input_embeddings().weight.detach()
    assert torch.equal(loaded[ids], weight.detach()[ids])
    others = torch.ones(loaded.shape[0], dtype=torch.bool)
    others[ids] = False
    assert torch.equal(loaded[others], untouched[others])

    # The reference's mm_projector.bin stores the whole embedding matrix under the same key.
    full = torch.randn_like(loaded)
    assert load_delimiter_rows(fresh, {EMBED_KEY: full}, "ref.bin")
    assert torch.equal(fresh.get_input_embeddings().weight.detach()[ids], full[ids])
    with pytest.raises(ValueError, match=r"bad\.bin: model\.embed_tokens\.weight has shape \(3, "):
        load_delimiter_rows(fresh, {EMBED_KEY: torch.zeros(3, loaded.shape[1])}, "bad.bin")
