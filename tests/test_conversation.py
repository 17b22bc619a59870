"""Prompt templates render exactly the reference's strings."""

from __future__ import annotations

import pytest

from exgra_med.conversation import LLAVA_SYSTEM, TEMPLATES, get_template

QA = [("human", "Is it round?\n<image>"), ("gpt", "Yes")]


def test_llava_med_training_format_matches_reference():
    text = get_template("llava_med").render(QA)
    assert text == (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the human's questions.\n\n"
        "### Human: Is it round?\n<image>\n### Assistant: Yes\n### "
    )


def test_llava_med_generation_prompt_ends_at_assistant_role():
    text = get_template("llava_med").render(QA[:1], add_generation_prompt=True)
    assert text.endswith("\n\n### Human: Is it round?\n<image>\n### Assistant:")


def test_llava_med_targets_are_answers_and_separators():
    segs = get_template("llava_med").segments(QA)
    assert [(s.text, s.target) for s in segs[1:]] == [
        ("###", True),
        (" Human: Is it round?\n<image>\n", False),
        ("### Assistant: Yes\n", True),
        ("### ", True),
    ]
    assert segs[0].text == LLAVA_SYSTEM + "\n\n" and not segs[0].target


def test_simple_eval_prompt_is_llava_med_reference_prompt():
    text = get_template("simple").render([("human", "Q?\n<im_patch>")], add_generation_prompt=True)
    assert text == (
        LLAVA_SYSTEM + "###Human: Hi!###Assistant: Hi there!  How can I help you today?\n###"
        "Human: Q?\n<im_patch>###"
    )


def test_clean_answer_cuts_at_stop_string_and_role_prefix():
    simple = get_template("simple")
    assert simple.clean_answer(" Assistant: yes, it is.\n###Human: more") == "yes, it is."
    assert get_template("llava_med").clean_answer(" The lung.\n### Human:") == "The lung."
    assert get_template("vicuna_v1").clean_answer(" Yes</s>") == "Yes"


def test_vicuna_mistral_plain_formats():
    msgs = [("human", "Q1"), ("gpt", "A1"), ("human", "Q2")]
    assert get_template("vicuna_v1").render(msgs, add_generation_prompt=True) == (
        TEMPLATES["vicuna_v1"].system + " USER: Q1 ASSISTANT: A1</s>USER: Q2 ASSISTANT:"
    )
    assert get_template("mistral").render(msgs, add_generation_prompt=True) == (
        "[INST] Q1 [/INST] A1 </s>[INST] Q2 [/INST]"
    )
    assert (
        get_template("plain").render([("human", "<image>"), ("gpt", "A caption.")]) == "<image>\nA caption.\n"
    )
    assert [s.target for s in get_template("plain").segments([("human", "x"), ("gpt", "y")])] == [False, True]


def test_stop_strings():
    assert {n: t.stop_str for n, t in TEMPLATES.items()} == {
        "llava_med": "###",
        "simple": "###",
        "vicuna_v1": "</s>",
        "mistral": "</s>",
        "plain": "\n",
    }


def test_unknown_template_and_role_raise():
    with pytest.raises(ValueError, match="unknown conversation template 'nope'"):
        get_template("nope")
    with pytest.raises(ValueError, match="role"):
        get_template("llava_med").render([("assistant", "x")])
