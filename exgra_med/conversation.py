"""Prompt templates: how a list of (role, text) messages becomes the string the LLM reads.

`llava_med` is the reference's training format (METHOD section 2)::

    {system}\\n\\n### Human: {q}\\n### Assistant: {a}\\n###

`simple` is LLaVA-Med's evaluation prompt (one few-shot exchange, "###" separators); answers are cut at
the next "###". `vicuna_v1`, `mistral` and `plain` follow LLaVA's templates of the same names.

A template renders a conversation as `Segment`s: pieces of text flagged as LM targets or not. The
dataset tokenizes the joined text once and maps every token back to its segment, so the label mask
always agrees with the real tokenization (see `exgra_med.data.dataset`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

from exgra_med.constants import GPT, HUMAN

LLAVA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
# The reference's `simple` template opens with one exchange (two spaces in the answer are theirs).
SIMPLE_FEW_SHOT: tuple[tuple[str, str], ...] = (
    (HUMAN, "Hi!"),
    (GPT, "Hi there!  How can I help you today?\n"),
)


@dataclass(frozen=True)
class Segment:
    """A piece of rendered text; `target` marks text the LM is trained to produce."""

    text: str
    target: bool


@dataclass(frozen=True)
class ConversationTemplate:
    """A prompt format. `style` selects the layout; `stop_str` ends generation (answers are cut there)."""

    name: str
    style: str  # "llava_med" | "simple" | "vicuna" | "mistral" | "plain"
    system: str
    roles: tuple[str, str]  # display names of (human, gpt)
    stop_str: str
    few_shot: tuple[tuple[str, str], ...] = field(default=())

    def segments(
        self, messages: Sequence[tuple[str, str]], add_generation_prompt: bool = False
    ) -> list[Segment]:
        """Render `messages` ((role, text) with role "human"/"gpt") as target/non-target segments."""
        messages = list(self.few_shot) + [(_check_role(r), t) for r, t in messages]
        return _STYLES[self.style](self, messages, add_generation_prompt)

    def render(self, messages: Sequence[tuple[str, str]], add_generation_prompt: bool = False) -> str:
        """The prompt string; with `add_generation_prompt` it ends where the assistant's answer begins."""
        return "".join(s.text for s in self.segments(messages, add_generation_prompt))

    def chat_template(self, image_text: str) -> str:
        """This format as a Jinja chat template (an exported model's processor renders prompts as `render` does);
        an image part becomes "\\n" + `image_text`."""
        return _jinja_template(self, image_text)

    def clean_answer(self, generated: str, strip_role: bool = True) -> str:
        """Cut generated text at `stop_str` and, with `strip_role`, drop a leading assistant role prefix (`simple`
        lets the model write "Assistant:" itself; the reference's VQA evaluation keeps it)."""
        text = generated.split(self.stop_str, 1)[0] if self.stop_str else generated
        text = text.strip()
        prefix = f"{self.roles[1]}:"
        if strip_role and self.roles[1] and text.startswith(prefix):
            text = text[len(prefix) :].strip()
        return text


def _check_role(role: str) -> str:
    if role not in (HUMAN, GPT):
        raise ValueError(f"message role must be {HUMAN!r} or {GPT!r}, got {role!r}")
    return role


def _llava_med(t: ConversationTemplate, messages: list, gen: bool) -> list[Segment]:
    # Targets follow the reference's `_mask_targets`: whole assistant turns ("### Assistant: ...\n"),
    # the "###" that opens each human turn (the reference leaves the first tokens of a human turn
    # unmasked) and the closing "### ", so the model learns to emit "###" when an answer ends.
    segs = [Segment(f"{t.system}\n\n", False)]
    for role, text in messages:
        if role == HUMAN:
            segs += [Segment("###", True), Segment(f" {t.roles[0]}: {text}\n", False)]
        else:
            segs.append(Segment(f"### {t.roles[1]}: {text}\n", True))
    segs.append(Segment(f"### {t.roles[1]}:", False) if gen else Segment("### ", True))
    return segs


def _simple(t: ConversationTemplate, messages: list, gen: bool) -> list[Segment]:
    # LLaVA-Med's eval prompt (SINGLE separator style). Like the reference, the generation prompt ends
    # with the separator after the question and the model continues with "Assistant: ...".
    segs = [Segment(t.system + "###", False)]
    for role, text in messages:
        if role == HUMAN:
            segs.append(Segment(f"{t.roles[0]}: {text}###", False))
        else:
            segs += [Segment(f"{t.roles[1]}:", False), Segment(f" {text}###", True)]
    return segs


def _vicuna(t: ConversationTemplate, messages: list, gen: bool) -> list[Segment]:
    # "{system} USER: q ASSISTANT: a</s>USER: q2 ASSISTANT:" (LLaVA's TWO separator style).
    segs = [Segment(t.system + " ", False)]
    for role, text in messages:
        if role == HUMAN:
            segs.append(Segment(f"{t.roles[0]}: {text} ", False))
        else:
            segs += [Segment(f"{t.roles[1]}:", False), Segment(f" {text}</s>", True)]
    if gen:
        segs.append(Segment(f"{t.roles[1]}:", False))
    return segs


def _mistral(t: ConversationTemplate, messages: list, gen: bool) -> list[Segment]:
    segs: list[Segment] = []
    for i, (role, text) in enumerate(messages):
        if role == HUMAN:
            if i == 0 and t.system:
                text = f"<<SYS>>\n{t.system}\n<</SYS>>\n\n{text}"
            segs.append(Segment(f"[INST] {text} [/INST]", False))
        else:
            segs.append(Segment(f" {text} </s>", True))
    return segs


def _plain(t: ConversationTemplate, messages: list, gen: bool) -> list[Segment]:
    # LLaVA's pre-training format: the human turn is only the image, the caption is the target.
    return [Segment(f"{text}\n", role == GPT) for role, text in messages]


_STYLES = {
    "llava_med": _llava_med,
    "simple": _simple,
    "vicuna": _vicuna,
    "mistral": _mistral,
    "plain": _plain,
}


def _say(text: str) -> str:
    """Jinja that prints `text` verbatim (a JSON string literal is a valid Jinja one)."""
    return "{{ " + json.dumps(text) + " }}" if text else ""


def _jinja_template(template: ConversationTemplate, image_text: str) -> str:
    """`template` as a Jinja chat template that renders chat messages exactly as `template.render` does (each style's
    pieces as in `_STYLES` above: change both together); an image part becomes "\\n" + `image_text` (the
    processor then expands its image token to the model's number of image tokens)."""
    human, assistant = template.roles
    turns = {  # style: (opening, user before, user after, assistant before, assistant after, generation prompt)
        "llava_med": (f"{template.system}\n\n", f"### {human}: ", "\n", f"### {assistant}: ", "\n",
                      f"### {assistant}:"),
        "simple": (f"{template.system}###", f"{human}: ", "###", f"{assistant}: ", "###", ""),
        "vicuna": (f"{template.system} ", f"{human}: ", " ", f"{assistant}: ", "</s>", f"{assistant}:"),
        "mistral": ("", "[INST] ", " [/INST]", " ", " </s>", ""),
        "plain": ("", "", "\n", "", "\n", ""),
    }
    if template.style not in turns or (template.style == "mistral" and template.system):
        raise ValueError(f"prompt template {template.name!r} has no chat-template form for the export")
    opening, user_before, user_after, reply_before, reply_after, generation = turns[template.style]
    for role, text in template.few_shot:  # `simple` opens with one exchange
        opening += (user_before + text + user_after) if role == HUMAN else (reply_before + text + reply_after)
    content = (
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}"
        "{% elif item['type'] == 'image' %}" + _say("\n" + image_text) + "{% endif %}{% endfor %}{% endif %}"
    )
    return (
        _say(opening)
        + "{% for message in messages %}{% if message['role'] == 'user' %}" + _say(user_before) + content
        + _say(user_after) + "{% else %}" + _say(reply_before) + content + _say(reply_after) + "{% endif %}"
        + "{% endfor %}{% if add_generation_prompt %}" + _say(generation) + "{% endif %}"
    )


TEMPLATES: dict[str, ConversationTemplate] = {
    "llava_med": ConversationTemplate("llava_med", "llava_med", LLAVA_SYSTEM, ("Human", "Assistant"), "###"),
    "simple": ConversationTemplate(
        "simple", "simple", LLAVA_SYSTEM, ("Human", "Assistant"), "###", few_shot=SIMPLE_FEW_SHOT
    ),
    "vicuna_v1": ConversationTemplate("vicuna_v1", "vicuna", VICUNA_SYSTEM, ("USER", "ASSISTANT"), "</s>"),
    "mistral": ConversationTemplate("mistral", "mistral", "", ("USER", "ASSISTANT"), "</s>"),
    "plain": ConversationTemplate("plain", "plain", "", ("", ""), "\n"),
}


def get_template(name: str) -> ConversationTemplate:
    """The template called `name`; an unknown name lists the available ones."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown conversation template {name!r}; choose from {sorted(TEMPLATES)}") from None
