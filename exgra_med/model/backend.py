"""`Backend`: the one interface train, eval and serve call, whatever model family sits behind it.

A back end holds a loaded model with its tokenizer and image processor and knows how this family turns a question or
a conversation into model inputs (`Prompt`), how it decodes a batch of prompts, and how its answers end. Besides
`generate` (a whole batch at once), it decodes step by step for the serving engine's continuous batching: `prefill`
(prompts -> first-token logits and a `DecodeState`), `decode_step` (one token per row), and `DecodeState.select` /
`DecodeState.concat` to drop finished rows and let new ones join. Two families
implement it: `exgra_med.model.llava_backend.LlavaBackend` (this project's LLaVA-style model, any HF causal LM behind
a vision tower and connector) and `exgra_med.model.native.backend.NativeBackend` (any transformers-native VLM that
`AutoModelForImageTextToText` loads: Qwen2.5-VL, Gemma 3, LLaVA-OneVision, ...). The family is chosen ONCE, when a
model is loaded or built (`exgra_med.model.auto`); no code outside `exgra_med.model` asks which family it holds.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import DynamicCache, GenerationConfig, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from exgra_med.constants import GPT, HUMAN
from exgra_med.conversation import ConversationTemplate
from exgra_med.data.images import DEFAULT_ASPECT_RATIO

Message = tuple[str, str]  # (role, text), role "human" or "gpt"


@dataclass
class Prompt:
    """One encoded prompt: its token ids (image tokens included) and the family's image inputs for it (LLaVA:
    pixel values (3, H, W) or None; a native VLM: the processor's per-image outputs)."""

    input_ids: list[int]
    images: Any = None


@dataclass
class DecodeState:
    """The per-row state of rows decoded together, step by step: the KV cache and the attention mask, left padded to
    one length L, and the position of each row's last token, in `generate`'s layout ((B, 1), or (k, B, 1) for
    multimodal RoPE such as Qwen2.5-VL's)."""

    cache: DynamicCache  # layers of (B, H, L, D) keys and values
    attention_mask: torch.Tensor  # (B, L), 0 on the left padding
    last_positions: torch.Tensor  # (..., B, 1)

    @property
    def rows(self) -> int:
        return self.attention_mask.shape[0]

    def select(self, rows: Sequence[int]) -> DecodeState:
        """The state of `rows` only, in that order; cache columns no kept row attends to are dropped."""
        index = torch.as_tensor(list(rows), dtype=torch.long, device=self.attention_mask.device)
        mask = self.attention_mask[index]  # (B', L)
        start = int(mask.any(0).long().argmax()) if mask.numel() else mask.shape[1]
        layers = [(k[index.to(k.device), :, start:], v[index.to(v.device), :, start:]) for k, v, *_ in self.cache]
        return DecodeState(DynamicCache(layers), mask[:, start:], self.last_positions.index_select(-2, index))

    @staticmethod
    def concat(states: Sequence[DecodeState]) -> DecodeState:
        """Rows of several states decoded together: each left padded (zero keys and values, masked) to the longest."""
        length = max(s.attention_mask.shape[1] for s in states)
        pads = [length - s.attention_mask.shape[1] for s in states]
        layers = [
            tuple(torch.cat([F.pad(kv[i], (0, 0, pad, 0)) for kv, pad in zip(per_state, pads)]) for i in (0, 1))
            for per_state in zip(*[list(s.cache) for s in states])
        ]  # per layer: (sum B, H, length, D) keys and values
        mask = torch.cat([F.pad(s.attention_mask, (pad, 0)) for s, pad in zip(states, pads)])
        positions = torch.cat([s.last_positions for s in states], dim=-2)
        return DecodeState(DynamicCache(layers), mask, positions)


class StopOnString(StoppingCriteria):
    """Per-row stop once the decoded tail of a row's tokens contains `stop` (works when `generate` starts from
    input embeddings and sees only the generated tokens)."""

    def __init__(self, tokenizer, stop: str, tail_tokens: int = 8) -> None:
        self.tokenizer, self.stop, self.tail = tokenizer, stop, tail_tokens

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        tails = self.tokenizer.batch_decode(input_ids[:, -self.tail :], skip_special_tokens=True)
        return torch.tensor([self.stop in t for t in tails], dtype=torch.bool, device=input_ids.device)


def check_messages(messages: Sequence[Message]) -> list[Message]:
    """`messages` as a list, checked: roles human/gpt, ending with a human message."""
    messages = [(role, text) for role, text in messages]
    if not messages or messages[-1][0] != HUMAN:
        raise ValueError("the conversation must end with a human message")
    for role, _ in messages:
        if role not in (HUMAN, GPT):
            raise ValueError(f"message role must be {HUMAN!r} or {GPT!r}, got {role!r}")
    return messages


class Backend(ABC):
    """A loaded model of one family, ready to answer (see the module docstring).

    `template` is the prompt template answers are rendered and cut with (`answer_template`), `image_aspect_ratio` the
    image preprocessing; both default to what the checkpoint recorded when it was trained.
    """

    family: ClassVar[str]

    def __init__(self, model, tokenizer, image_processor, template: ConversationTemplate,
                 image_aspect_ratio: str = DEFAULT_ASPECT_RATIO):
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.template = template
        self.image_aspect_ratio = image_aspect_ratio

    # --- what callers read -----------------------------------------------------------------------------------
    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        """Where inputs go (the input embeddings' device)."""
        return self.model.get_input_embeddings().weight.device

    @property
    def context_length(self) -> int | None:
        """The longest input the model is for: the language model's context (`max_position_embeddings`), or the
        maximum length it was trained with (`tokenizer_model_max_length`, recorded by training, as the reference
        records it) when that is shorter; None when the config says neither."""
        config = self.model.config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        limits = [getattr(text, "max_position_embeddings", None), getattr(config, "tokenizer_model_max_length", None)]
        limits = [int(v) for v in limits if isinstance(v, int) and v > 0]
        return min(limits) if limits else None

    @property
    def pad_token_id(self) -> int:
        """The id prompts are left padded with: the tokenizer's pad, else its end of sequence, else unk."""
        for value in (self.tokenizer.pad_token_id, *sorted(self.eos_token_ids), self.tokenizer.unk_token_id):
            if value is not None:
                return int(value)
        raise ValueError("the tokenizer has no pad, eos or unk token to pad prompts with")

    @property
    def eos_token_ids(self) -> set[int]:
        """The tokens that end an answer."""
        eos = self.tokenizer.eos_token_id
        return {int(eos)} if eos is not None else set()

    # --- prompts -------------------------------------------------------------------------------------------
    @abstractmethod
    def encode_conversation(self, messages: Sequence[Message], image: Image.Image | None = None,
                            system: str | None = None) -> Prompt:
        """The generation prompt of a conversation ending with a human turn, with at most one image (attached to the
        first human turn: where it says `<image>`, else after its text); `system` replaces the system prompt."""

    def prompt_text(self, messages: Sequence[Message], has_image: bool, system: str | None = None) -> str:
        """The prompt as text (image tokens expanded), for display and length checks."""
        image = Image.new("RGB", (1, 1)) if has_image else None
        return self.tokenizer.decode(self.encode_conversation(messages, image, system).input_ids)

    @abstractmethod
    def encode_question(self, record: dict, image_folder: str | os.PathLike | None) -> Prompt:
        """The generation prompt of a VQA record (its first human turn) with its images; errors name the record."""

    @abstractmethod
    def question_length(self, record: dict) -> int:
        """Prompt tokens of a VQA record without reading its image (to batch prompts of similar length)."""

    # --- generation ----------------------------------------------------------------------------------------
    @abstractmethod
    def batch_inputs(self, prompts: Sequence[Prompt]) -> dict[str, Any]:
        """`generate` inputs of prompts decoded together: left padded, on the model's device."""

    def generate(self, prompts: Sequence[Prompt], **generate_kwargs) -> torch.Tensor:
        """New token ids (B, T_new) of prompts decoded together (generation config, streamer, ... in kwargs)."""
        inputs = self.batch_inputs(prompts)
        out = self.model.generate(**inputs, **generate_kwargs)
        return self.new_tokens(out, inputs)

    def new_tokens(self, out: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
        """The generated part of `generate`'s output."""
        return out

    def prompt_position_ids(self, inputs: dict[str, Any]) -> torch.Tensor:
        """Position ids of left-padded prompts as `generate` computes them: from the attention mask, or the model's
        own rule (Qwen2.5-VL's multimodal RoPE, (4, B, T)); transformers' per-model hook."""
        return self.model._prepare_position_ids_for_generation(inputs["input_ids"], dict(inputs))

    def generation_history(self, prompt: Prompt, generated: Sequence[int]) -> list[int]:
        """The token ids `generate` shows its logits processors for one row: the prompt's and the generated ones."""
        return [*prompt.input_ids, *generated]

    def step_processors(self, prompt: Prompt, temperature: float, top_p: float) -> LogitsProcessorList:
        """The logits processors (and, when sampling, warpers) `generate` applies to one row with these settings:
        `generate_kwargs`' config completed from the model's generation config (repetition penalty, top-k, ...), by
        transformers' own merge and builder; empty for plain greedy decoding."""
        model = self.decoder
        config, _ = model._prepare_generation_config(self.generate_kwargs(1, temperature, top_p)["generation_config"])
        length = len(self.generation_history(prompt, []))
        return model._get_logits_processor(generation_config=config, input_ids_seq_length=length, device=self.device)

    @property
    def decoder(self) -> torch.nn.Module:
        """The module a decoding step runs on (generated tokens are text: no image inputs)."""
        return self.model

    def prefill(self, prompts: Sequence[Prompt]) -> tuple[torch.Tensor, DecodeState]:
        """Run prompts (left padded, with their images) through the model: the logits of each row's next token
        (B, V) in float32, and the state to decode them on with `decode_step`."""
        inputs = self.batch_inputs(prompts)
        positions = self.prompt_position_ids(inputs)
        out = self.model(**inputs, position_ids=positions, cache=DynamicCache(), use_cache=True, logits_to_keep=1)
        state = DecodeState(out.cache, inputs["attention_mask"], positions[..., -1:])
        return out.logits[:, -1].float(), state

    def decode_step(self, state: DecodeState, tokens: torch.Tensor) -> torch.Tensor:
        """Feed each row its next token (B,) and advance `state`; returns the logits of the token after (B, V)."""
        device = state.attention_mask.device
        state.attention_mask = torch.cat([state.attention_mask, state.attention_mask.new_ones(state.rows, 1)], 1)
        state.last_positions = state.last_positions + 1
        out = self.decoder(input_ids=tokens.to(device)[:, None], attention_mask=state.attention_mask,
                           position_ids=state.last_positions, cache=state.cache, use_cache=True, logits_to_keep=1)
        state.cache = out.cache
        return out.logits[:, -1].float()

    def generate_kwargs(self, max_new_tokens: int, temperature: float = 0.0, top_p: float | None = None,
                        **overrides) -> dict[str, Any]:
        """`generate` keyword arguments of the answer loop: greedy (temperature 0) or sampled decoding that ends at
        the family's end-of-sequence tokens and, per row, at the template's stop string."""
        sampling = temperature > 0
        eos = sorted(self.eos_token_ids)
        config = GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=sampling, temperature=temperature if sampling else None,
            top_p=top_p if sampling else None, top_k=None, num_beams=1, use_cache=True,
            pad_token_id=self.pad_token_id, eos_token_id=(eos[0] if len(eos) == 1 else eos) or None,
        )
        kwargs: dict[str, Any] = {"generation_config": config}
        stop = self.answer_template.stop_str
        if stop:
            kwargs["stopping_criteria"] = StoppingCriteriaList([StopOnString(self.tokenizer, stop)])
        kwargs.update(overrides)
        return kwargs

    @property
    def answer_template(self) -> ConversationTemplate:
        """The template whose stop string and role prefix cut an answer."""
        return self.template

    def decode(self, new_tokens: torch.Tensor, strip_role_prefix: bool = False) -> list[str]:
        """Answer texts: special tokens dropped, cut at the stop string, white space stripped."""
        texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return [self.answer_template.clean_answer(t, strip_role_prefix) for t in texts]

    def answer_batch(self, prompts: Sequence[Prompt], max_new_tokens: int, temperature: float = 0.0,
                     strip_role_prefix: bool = False, **generate_kwargs) -> list[str]:
        """The answers of prompts decoded together."""
        with torch.inference_mode():
            kwargs = self.generate_kwargs(max_new_tokens, temperature, **generate_kwargs)
            return self.decode(self.generate(prompts, **kwargs), strip_role_prefix)

    # --- mode ------------------------------------------------------------------------------------------------
    @property
    def training(self) -> bool:
        return self.model.training

    def train(self, mode: bool = True) -> Backend:
        self.model.train(mode)
        return self

    def eval(self) -> Backend:
        return self.train(False)
