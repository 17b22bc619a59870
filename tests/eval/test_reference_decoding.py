"""VQA answers as the reference's evaluation produces them: up to 1024 new tokens, cut at "###", stripped of white
space, a leading "Assistant:" kept unless `strip_role_prefix` asks otherwise; zero-shot's own defaults."""

from __future__ import annotations

import argparse

import pytest
import torch
from torch import nn

from exgra_med.conversation import get_template
from exgra_med.eval.generate import build_parser, generate_answers, generate_batch
from exgra_med.eval.metrics import score_vqa
from exgra_med.model.backend import Prompt
from exgra_med.model.llava_backend import LlavaBackend
from exgra_med.train.args import DataArguments
from exgra_med.train.vqa_eval import VQAGenerationSettings


class ScriptedModel(nn.Module):
    """Stands in for the VLM: `generate` returns the ids of fixed texts and records its generation config."""

    def __init__(self, tokenizer, texts: list[str]):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.tokenizer, self.texts, self.configs = tokenizer, texts, []
        self.num_image_tokens = 4
        self.config = argparse.Namespace(mm_use_im_start_end=True)

    def get_input_embeddings(self):
        return nn.Embedding(1, 1)

    def generate(self, input_ids, pixel_values, attention_mask, generation_config=None, stopping_criteria=None,
                 **kwargs):
        self.configs.append(generation_config)
        rows = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in self.texts[: input_ids.shape[0]]]
        width = max(map(len, rows))
        pad = self.tokenizer.pad_token_id
        return torch.tensor([r + [pad] * (width - len(r)) for r in rows])


def test_answers_keep_the_role_prefix_by_default(word_tokenizer):
    raw = [" Assistant: yes, it is.\n###Human: more", " Assistant: a red circle###"]
    model = ScriptedModel(word_tokenizer, raw)
    backend = LlavaBackend(model, word_tokenizer, None, get_template("simple"))
    prompts = [Prompt([1, 5, 6]), Prompt([1, 7])]
    assert generate_batch(backend, prompts) == ["Assistant: yes, it is.", "Assistant: a red circle"]
    assert model.configs[-1].max_new_tokens == 1024 and not model.configs[-1].do_sample
    assert generate_batch(backend, prompts, strip_role_prefix=True) == ["yes, it is.", "a red circle"]

    # Through generate_answers, and what the prefix moves: exact match / F1 of open answers, not recall or
    # closed accuracy.
    records = [
        {"id": "c", "answer_type": "CLOSED", "conversations": [
            {"from": "human", "value": "Is it round?"}, {"from": "gpt", "value": "yes, it is."}]},
        {"id": "o", "answer_type": "OPEN", "conversations": [
            {"from": "human", "value": "What is shown?"}, {"from": "gpt", "value": "a red circle"}]},
    ]
    kept = generate_answers(model, word_tokenizer, None, records, batch_size=2)
    stripped = generate_answers(model, word_tokenizer, None, records, batch_size=2, strip_role_prefix=True)
    assert kept["o"] == "Assistant: a red circle" and stripped["o"] == "a red circle"
    candidates = {"0": ["a red circle", "yes"]}
    with_prefix, without = score_vqa(records, kept, candidates), score_vqa(records, stripped, candidates)
    assert with_prefix["recall"] == without["recall"] == 100.0
    assert with_prefix["closed_accuracy"] == without["closed_accuracy"] == 100.0
    # After normalisation (articles dropped) the prefixed answer holds 3 tokens, 2 of them right.
    assert with_prefix["exact_match"] == pytest.approx(200 / 3) and with_prefix["f1"] == pytest.approx(80.0)
    assert with_prefix["precision"] == pytest.approx(200 / 3)
    assert without["exact_match"] == without["precision"] == without["f1"] == 100.0


def test_vqa_decoding_defaults_are_the_references():
    args = build_parser().parse_args(["--model", "m", "--question-file", "q", "--answers-file", "a"])
    assert (args.max_new_tokens, args.temperature, args.strip_role_prefix) == (1024, 0.0, False)
    assert VQAGenerationSettings().max_new_tokens == 1024
    assert DataArguments(data_path="x.json").eval_max_new_tokens == 1024
