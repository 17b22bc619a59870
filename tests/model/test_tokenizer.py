"""The offline tiny tokenizer and the image-token additions (exgra_med.model.tokenizer)."""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from exgra_med.conversation import TEMPLATES
from exgra_med.model.tokenizer import add_image_tokens, build_word_tokenizer, ensure_pad_token


def test_special_token_layout_is_llama_like(word_tokenizer):
    tok = word_tokenizer
    assert tok.convert_tokens_to_ids(
        ["<unk>", "<s>", "</s>", "[PAD]", "<im_patch>", "<im_start>", "<im_end>"]
    ) == [0, 1, 2, 3, 4, 5, 6]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (1, 2, 3, 0)
    assert tok("Yes")["input_ids"][0] == 1


def test_every_template_round_trips_without_unknown_tokens(word_tokenizer):
    msgs = [("human", "Qu'est-ce? 42 ~ é\n<im_start><im_patch><im_end>"), ("gpt", "Ünïcode ok.")]
    for template in TEMPLATES.values():
        text = template.render(msgs)
        ids = word_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert word_tokenizer.unk_token_id not in ids
        assert word_tokenizer.decode(ids) == text
        assert ids.count(4) == 1  # <im_patch> is one token
    assert word_tokenizer.convert_ids_to_tokens(word_tokenizer("###")["input_ids"]) == ["<s>", "###"]


def test_save_and_reload(tmp_path):
    tok = build_word_tokenizer(["a red circle", "a blue square"], out_dir=str(tmp_path), vocab_size=400)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "### Human: a red circle\n<im_patch>\n### "
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    assert loaded.pad_token == "[PAD]" and len(loaded) == len(tok)


def test_add_image_tokens_and_pad_to_a_plain_tokenizer():
    backend = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    assert add_image_tokens(tok, mm_use_im_start_end=False) == 1
    assert add_image_tokens(tok, mm_use_im_start_end=True) == 2
    assert add_image_tokens(tok, mm_use_im_start_end=True) == 0
    assert tok("a<im_patch><im_start>")["input_ids"] == [1, 2, 3]
    assert ensure_pad_token(tok) == 1 and tok.pad_token == "[PAD]" and ensure_pad_token(tok) == 0


def test_vocab_size_too_small_is_rejected():
    import pytest

    with pytest.raises(ValueError, match="vocab_size must be at least"):
        build_word_tokenizer(["x"], vocab_size=10)
