"""Tokenizers: an offline byte-level BPE tokenizer for tiny models, and the image-token additions.

The tiny tokenizer mirrors LLaMA's layout (`<unk>`=0, `<s>`=1, `</s>`=2, BOS prepended) so tests and
demos exercise the same code paths as a real checkpoint. `<image>` is deliberately *not* a token:
as in the reference, the dataset and the prompt builders replace it by patch tokens before
tokenizing, and a stray `<image>` is ordinary text.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from exgra_med.constants import (
    DEFAULT_IM_END_TOKEN,
    DEFAULT_IM_START_TOKEN,
    DEFAULT_IMAGE_PATCH_TOKEN,
    DEFAULT_PAD_TOKEN,
)
from exgra_med.conversation import TEMPLATES

logger = logging.getLogger(__name__)

UNK, BOS, EOS = "<unk>", "<s>", "</s>"
SPECIAL_TOKENS = [
    UNK,
    BOS,
    EOS,
    DEFAULT_PAD_TOKEN,
    DEFAULT_IMAGE_PATCH_TOKEN,
    DEFAULT_IM_START_TOKEN,
    DEFAULT_IM_END_TOKEN,
]


def _template_texts() -> list[str]:
    """Everything the prompt templates emit, so their punctuation gets merges of its own."""
    messages = [
        ("human", "What is shown?\n<image>"),
        ("gpt", "A red circle."),
        ("human", "Is it round?"),
        ("gpt", "Yes"),
    ]
    return [t.render(messages, add_generation_prompt=g) for t in TEMPLATES.values() for g in (False, True)]


def build_word_tokenizer(
    texts: Iterable[str], out_dir: str | None = None, vocab_size: int = 2000
) -> PreTrainedTokenizerFast:
    """Train a small byte-level BPE tokenizer on `texts` (plus the template strings), fully offline.

    Byte-level BPE never produces `<unk>` and decodes back to the exact input text. Saved with
    `save_pretrained(out_dir)` when `out_dir` is given.
    """
    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size must be at least {len(SPECIAL_TOKENS) + 256} (bytes + special tokens)")
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts) + _template_texts(), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=DEFAULT_PAD_TOKEN,
        model_max_length=4096,
        padding_side="right",
    )
    # The image tokens are already special in the vocabulary; this registers them as added tokens.
    add_image_tokens(tokenizer, mm_use_im_start_end=True)
    logger.info("trained a byte-level BPE tokenizer with %d tokens", len(tokenizer))
    if out_dir is not None:
        tokenizer.save_pretrained(out_dir)
    return tokenizer


def add_image_tokens(tokenizer: PreTrainedTokenizerBase, mm_use_im_start_end: bool) -> int:
    """Add `<im_patch>` (and `<im_start>`, `<im_end>`) as special tokens, as the reference does; returns
    how many were new (the caller resizes the embeddings by that much)."""
    added = tokenizer.add_tokens([DEFAULT_IMAGE_PATCH_TOKEN], special_tokens=True)
    if mm_use_im_start_end:
        added += tokenizer.add_tokens([DEFAULT_IM_START_TOKEN, DEFAULT_IM_END_TOKEN], special_tokens=True)
    return added


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """Give `tokenizer` a pad token (`[PAD]`, as the reference's v0 recipe) if it has none; returns the
    number of tokens added."""
    if tokenizer.pad_token is not None:
        return 0
    return tokenizer.add_special_tokens({"pad_token": DEFAULT_PAD_TOKEN})


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase, mm_use_im_start_end: bool) -> int:
    """What training does to an LLM's tokenizer, as the reference: a pad token if it has none, then the image
    tokens. Returns how many tokens were added (the caller resizes the embeddings by that much)."""
    return ensure_pad_token(tokenizer) + add_image_tokens(tokenizer, mm_use_im_start_end)


def default_corpus() -> list[str]:
    """Text the tiny tokenizer is trained on: every template's fixed text and the easy-VQA questions/answers."""
    texts = []
    for template in TEMPLATES.values():
        texts.append(template.render([("human", "hello"), ("gpt", "hi")], add_generation_prompt=True))
    try:
        # lazy: the easy-VQA package only for the default corpus
        import easy_vqa

        for split in ("train", "test"):
            questions, answers, _ = getattr(easy_vqa, f"get_{split}_questions")()
            texts += questions + answers
        texts += easy_vqa.get_answers()
    except ImportError:  # easy-vqa is a dependency; a missing one only narrows the vocabulary
        logger.warning("easy-vqa not installed: the tiny tokenizer knows only the templates' words")
    texts += [
        "Describe the image concisely.",
        "What is shown in this picture? Provide a brief description of the image.",
        'Answer with either "Yes" or "No"',
        "The image shows a medical scan of the chest, the brain, the abdomen and a pathology slide.",
        "yes no circle rectangle triangle red green blue black gray yellow teal brown",
    ]
    return texts
