"""SupervisedDataset: exact label masks, image placeholders, alignment texts, and loud errors."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import CLIPImageProcessor, PreTrainedTokenizerFast

from exgra_med.constants import IGNORE_INDEX
from exgra_med.conversation import LLAVA_SYSTEM
from exgra_med.data.dataset import (
    SupervisedDataset,
    TokenizationMismatchError,
    alignment_text,
    image_placeholder,
)
from exgra_med.data.images import ImageLoadError
from exgra_med.data.records import RecordError

PROC = CLIPImageProcessor(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8})
TEXT_ONLY = {
    "id": "t1",
    "conversations": [{"from": "human", "value": "Is it round?"}, {"from": "gpt", "value": "Yes."}],
}


def _image_record(rid="img1", image="a.png"):
    return {
        "id": rid,
        "image": image,
        "conversations": [
            {"from": "human", "value": "What is shown?\n<image>"},
            {"from": "gpt", "value": "A red circle.\nRound."},
            {"from": "human", "value": "Is it round?"},
            {"from": "gpt", "value": "Yes"},
        ],
        "conversations_long": [
            {"from": "human", "value": "What is shown?\n<image>"},
            {"from": "gpt", "value": "The image shows a red circle."},
            {"from": "human", "value": "Is it round?"},
            {"from": "gpt", "value": "Yes, it is."},
        ],
    }


def _dataset(tmp_path, records, tokenizer, **kw):
    (tmp_path / "data.json").write_text(json.dumps(records))
    Image.new("RGB", (12, 6), (255, 0, 0)).save(tmp_path / "a.png")
    args = {"num_image_tokens": 3, "mm_use_im_start_end": True}
    args.update(kw)
    return SupervisedDataset(tmp_path / "data.json", tmp_path, tokenizer, PROC, **args)


def test_labels_token_by_token(tmp_path, word_tokenizer):
    item = _dataset(tmp_path, [TEXT_ONLY], word_tokenizer)[0]
    tok = word_tokenizer
    header = tok(LLAVA_SYSTEM + "\n\n")["input_ids"]  # BOS + system prompt + two newlines
    tail = [
        "###",
        "ĠHuman",
        ":",
        "ĠIs",
        "Ġit",
        "Ġround",
        "?",
        "Ċ",
        "###",
        "ĠAssistant",
        ":",
        "ĠYes",
        ".",
        "Ċ",
        "###",
        "Ġ",
    ]
    target = [True, False, False, False, False, False, False, False] + [True] * 8
    ids = item["input_ids"].tolist()
    assert ids[: len(header)] == header
    assert tok.convert_ids_to_tokens(ids[len(header) :]) == tail
    expected = [IGNORE_INDEX] * len(header) + [
        i if t else IGNORE_INDEX for i, t in zip(ids[len(header) :], target)
    ]
    assert item["labels"].tolist() == expected
    assert item["id"] == "t1" and "pixel_values" not in item


@pytest.mark.parametrize("start_end", [True, False])
def test_image_placeholder_forms(tmp_path, word_tokenizer, start_end):
    ds = _dataset(tmp_path, [_image_record()], word_tokenizer, mm_use_im_start_end=start_end)
    item = ds[0]
    tokens = word_tokenizer.convert_ids_to_tokens(item["input_ids"].tolist())
    block = ["<im_start>"] + ["<im_patch>"] * 3 + ["<im_end>"] if start_end else ["<im_patch>"] * 3
    i = tokens.index(block[0])
    assert tokens[i : i + len(block)] == block and tokens[i - 1] == "Ċ"
    assert tokens.count("<im_patch>") == 3 and ("<im_start>" in tokens) == start_end
    assert (item["labels"][i : i + len(block)] == IGNORE_INDEX).all()
    assert item["pixel_values"].shape == (3, 8, 8)
    assert image_placeholder(2, True) == "<im_start><im_patch><im_patch><im_end>"
    assert image_placeholder(2, False) == "<im_patch><im_patch>"


def test_alignment_texts(tmp_path, word_tokenizer):
    record = _image_record()
    assert alignment_text(record["conversations"]) == "A red circle.Round.. Yes"
    assert alignment_text(record["conversations_long"]) == "The image shows a red circle.. Yes, it is."
    assert alignment_text([{"from": "gpt", "value": "a<im_start><im_patch><im_end><image>b"}]) == "ab"
    item = _dataset(tmp_path, [record], word_tokenizer, alignment=True)[0]
    assert item["response_ids"].tolist() == word_tokenizer("A red circle.Round.. Yes")["input_ids"]
    assert (
        item["extended_ids"].tolist()
        == word_tokenizer("The image shows a red circle.. Yes, it is.")["input_ids"]
    )
    assert item["response_ids"][0] == word_tokenizer.bos_token_id


def test_alignment_requires_conversations_long(tmp_path, word_tokenizer):
    with pytest.raises(RecordError, match="record 't1': missing field 'conversations_long'"):
        _dataset(tmp_path, [TEXT_ONLY], word_tokenizer, alignment=True)


def test_malformed_record_is_named(tmp_path, word_tokenizer):
    bad = {"id": "bad7", "conversations": [{"from": "human", "value": "x"}, {"from": "human", "value": "y"}]}
    with pytest.raises(RecordError, match="record 'bad7': conversations\\[1\\].from is 'human'"):
        _dataset(tmp_path, [TEXT_ONLY, bad], word_tokenizer)


def test_missing_and_corrupt_images_name_record_and_path(tmp_path, word_tokenizer):
    ds = _dataset(
        tmp_path, [_image_record("m1", "missing.png"), _image_record("c1", "broken.png")], word_tokenizer
    )
    (tmp_path / "broken.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(ImageLoadError, match="record 'm1': image file not found: .*missing.png"):
        ds[0]
    with pytest.raises(ImageLoadError, match="record 'c1': cannot decode image .*broken.png"):
        ds[1]


def test_fully_masked_target_raises(tmp_path, word_tokenizer):
    ds = _dataset(tmp_path, [TEXT_ONLY], word_tokenizer, max_length=20)
    with pytest.raises(RecordError, match="record 't1': every label is masked"):
        ds[0]


def test_truncation_through_image_tokens_raises(tmp_path, word_tokenizer):
    n_before_image = len(word_tokenizer(LLAVA_SYSTEM + "\n\n### Human: What is shown?\n")["input_ids"])
    ds = _dataset(tmp_path, [_image_record()], word_tokenizer, max_length=n_before_image + 2)
    with pytest.raises(RecordError, match="record 'img1': found 1 <im_patch> tokens, expected 3"):
        ds[0]


def test_tokenization_mismatch_raises(tmp_path):
    # A tokenizer that only splits at newlines: "### Human: ..." is one token spanning the "###"
    # target and the masked question, so no label mask can follow it.
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "[PAD]": 3, "<im_patch>": 4, "<im_start>": 5, "<im_end>": 6}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("\n", behavior="removed")
    backend.add_special_tokens(["<im_patch>", "<im_start>", "<im_end>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="[PAD]")
    ds = _dataset(tmp_path, [TEXT_ONLY], tok)
    with pytest.raises(TokenizationMismatchError, match="record 't1': tokenization mismatch"):
        ds[0]


def test_tokenizer_without_image_tokens_is_rejected(tmp_path):
    backend = Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    with pytest.raises(ValueError, match="prepare_tokenizer"):
        _dataset(tmp_path, [TEXT_ONLY], tok)


def test_items_are_long_tensors_of_equal_length(tmp_path, word_tokenizer):
    item = _dataset(tmp_path, [_image_record()], word_tokenizer, alignment=True)[0]
    assert item["input_ids"].dtype == torch.long and item["labels"].shape == item["input_ids"].shape
