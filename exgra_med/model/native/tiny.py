"""Tiny random transformers-native VLMs with a working processor and chat template, written offline.

`make_tiny_vlm(out, arch)` saves, with `save_pretrained`, a random model of the architecture and its processor
(image processor + a small byte-level BPE tokenizer trained here with the `tokenizers` library, carrying the
architecture's special tokens and a chat template in the style of the released models). The folder loads with
`AutoModelForImageTextToText` / `AutoProcessor` alone, like a downloaded checkpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessor,
    Gemma3Processor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
)
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

from exgra_med.model.tokenizer import default_corpus

logger = logging.getLogger(__name__)

ARCHES = ("qwen2_5_vl", "gemma3", "llava_onevision")

# Chat templates after those the released checkpoints ship (images as content items of type "image").
QWEN_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}{%- else -%}"
    "{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{ '<end_of_turn>\n' }}{%- endfor -%}{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)
ONEVISION_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + ' ' }}"
    "{% if message['content'] is string %}{{ '\n' + message['content'] }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\n' + content['text'] }}"
    "{% endfor %}{% endif %}{{ '<|im_end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TinySize:
    """Sizes of a tiny model: LLM hidden size / layers / heads, vision hidden size / layers."""

    hidden: int = 64
    layers: int = 2
    heads: int = 4
    vision_hidden: int = 32
    vision_layers: int = 2
    # The vision patch (None: the architecture's, 14 for Qwen2.5-VL as released, 4 for LLaVA-OneVision); Gemma 3's
    # is fixed (4).
    patch_size: int | None = None
    # Qwen2.5-VL only: the spatial merge (merge x merge patches per image token). The default 2 is the released
    # models'; patch 7 / merge 4 gives the same 4 tokens for a 64 px image from 4x finer patches.
    merge_size: int = 2
    # LLaVA-OneVision only: the tile side in pixels (the encoder's image size; None: 16) and the largest anyres grid,
    # anyres_grid x anyres_grid tiles (the released models go to 6 x 6). Each image is the whole image at tile size
    # plus its tiles, (side / patch)^2 tokens each, with a newline token per row of tiles' patches.
    image_size: int | None = None
    anyres_grid: int = 2


def build_chat_tokenizer(
    texts: Iterable[str], special_tokens: Sequence[str], chat_template: str, vocab_size: int = 1200,
    **tokens: str,
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts` with `special_tokens` (ids in that order from 0) and a chat
    template; `tokens` names the roles (eos_token, pad_token, bos_token, ...) and the architecture's extra special
    tokens (image_token, boi_token, ...), saved in tokenizer_config.json as the released tokenizers do."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=1, special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    roles = {k: v for k, v in tokens.items() if k in ("eos_token", "pad_token", "bos_token", "unk_token")}
    extra = {k: v for k, v in tokens.items() if k not in roles}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, model_max_length=4096, padding_side="right", extra_special_tokens=extra, **roles
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def _corpus(extra: Sequence[str]) -> list[str]:
    return default_corpus() + list(extra) + ["user assistant model system You are a helpful assistant."]


def _ids(tokenizer: PreTrainedTokenizerFast, *names: str) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(n) for n in names]


def _qwen2_5_vl(size: TinySize, corpus: list[str]):
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
               "<|image_pad|>", "<|video_pad|>"]
    tokenizer = build_chat_tokenizer(
        corpus, special, QWEN_TEMPLATE, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        image_token="<|image_pad|>", video_token="<|video_pad|>", vision_bos_token="<|vision_start|>",
        vision_eos_token="<|vision_end|>",
    )
    pad, _, eos, v_start, v_end, image, video = _ids(tokenizer, *special)
    # patch x merge (default 28) pixels a side per image token; a 64 x 64 image becomes 56 x 56: 2 x 2 = 4 tokens.
    patch = size.patch_size or 14
    factor = patch * size.merge_size
    pixels = {"min_pixels": factor * factor * 4, "max_pixels": factor * factor * 16, "patch_size": patch,
              "merge_size": size.merge_size, "temporal_patch_size": 2}
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels), video_processor=Qwen2VLVideoProcessor(**pixels),
        tokenizer=tokenizer, chat_template=QWEN_TEMPLATE,
    )
    head_dim = size.hidden // size.heads
    section = [head_dim // 2 - 2 * (head_dim // 6), head_dim // 6, head_dim // 6]  # sums to head_dim / 2
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=size.hidden, intermediate_size=2 * size.hidden,
            num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.heads // 2,
            max_position_embeddings=4096, bos_token_id=None, eos_token_id=eos, pad_token_id=pad,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section},
        ),
        vision_config=dict(
            depth=size.vision_layers, hidden_size=size.vision_hidden, intermediate_size=2 * size.vision_hidden,
            num_heads=2, out_hidden_size=size.hidden, patch_size=patch, spatial_merge_size=size.merge_size,
            temporal_patch_size=2, fullatt_block_indexes=[size.vision_layers - 1], window_size=2 * factor,
        ),
        image_token_id=image, video_token_id=video, vision_start_token_id=v_start, vision_end_token_id=v_end,
    )
    return Qwen2_5_VLForConditionalGeneration(config), processor, [eos]


def _gemma3(size: TinySize, corpus: list[str]):
    special = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
               "<end_of_image>", "<image_soft_token>"]
    tokenizer = build_chat_tokenizer(
        corpus, special, GEMMA_TEMPLATE, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
        unk_token="<unk>", boi_token="<start_of_image>", eoi_token="<end_of_image>",
        image_token="<image_soft_token>",
    )
    pad, eos, bos, _, _, end_of_turn, boi, eoi, image = _ids(tokenizer, *special)
    tokens_per_image = 16  # 32 px, patch 4: 8 x 8 patches, pooled to 4 x 4
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessor(size={"height": 32, "width": 32}, do_pan_and_scan=False,
                                             image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]),
        tokenizer=tokenizer, chat_template=GEMMA_TEMPLATE, image_seq_length=tokens_per_image,
    )
    config = Gemma3Config(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=size.hidden, intermediate_size=2 * size.hidden,
            num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.heads // 2,
            head_dim=size.hidden // size.heads, query_pre_attn_scalar=size.hidden // size.heads,
            max_position_embeddings=4096, sliding_window=64, pad_token_id=pad, eos_token_id=[eos, end_of_turn],
            bos_token_id=bos,
        ),
        vision_config=dict(
            model_type="siglip_vision_model", hidden_size=size.vision_hidden,
            intermediate_size=2 * size.vision_hidden, num_hidden_layers=size.vision_layers, num_attention_heads=2,
            image_size=32, patch_size=4,
        ),
        mm_tokens_per_image=tokens_per_image, boi_token_index=boi, eoi_token_index=eoi, image_token_index=image,
    )
    return Gemma3ForConditionalGeneration(config), processor, [eos, end_of_turn]


def _llava_onevision(size: TinySize, corpus: list[str]):
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
    tokenizer = build_chat_tokenizer(
        corpus, special, ONEVISION_TEMPLATE, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        image_token="<image>", video_token="<video>",
    )
    pad, _, eos, image, video = _ids(tokenizer, *special)
    # Default: 16 px tiles, patch 4 (16 tokens per tile), anyres grids up to 2 x 2 tiles, as the released 384 px
    # tiles up to 6 x 6.
    tile, patch = size.image_size or 16, size.patch_size or 4
    if tile % patch:
        raise ValueError(f"--image-size {tile} must be a multiple of --patch-size {patch}")
    grids = range(1, size.anyres_grid + 1)
    pinpoints = [[tile * rows, tile * cols] for rows in grids for cols in grids]
    image_processor = LlavaOnevisionImageProcessor(size={"height": tile, "width": tile}, image_grid_pinpoints=pinpoints,
                                                   image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    processor = LlavaOnevisionProcessor(
        image_processor=image_processor, video_processor=LlavaOnevisionVideoProcessor(size={"height": tile,
                                                                                           "width": tile}),
        tokenizer=tokenizer, num_image_tokens=(tile // patch) ** 2, vision_feature_select_strategy="full",
        chat_template=ONEVISION_TEMPLATE,
    )
    config = LlavaOnevisionConfig(
        text_config=dict(
            model_type="qwen2", vocab_size=len(tokenizer), hidden_size=size.hidden,
            intermediate_size=2 * size.hidden, num_hidden_layers=size.layers, num_attention_heads=size.heads,
            num_key_value_heads=size.heads // 2, max_position_embeddings=4096, eos_token_id=eos,
            pad_token_id=pad, bos_token_id=None, tie_word_embeddings=False,
        ),
        vision_config=dict(
            model_type="siglip_vision_model", hidden_size=size.vision_hidden,
            intermediate_size=2 * size.vision_hidden, num_hidden_layers=size.vision_layers, num_attention_heads=2,
            image_size=tile, patch_size=patch,
        ),
        image_token_index=image, video_token_index=video, vision_feature_select_strategy="full",
        vision_feature_layer=-1, image_grid_pinpoints=pinpoints, vision_aspect_ratio="anyres_max_9",
    )
    return LlavaOnevisionForConditionalGeneration(config), processor, [eos]


_BUILDERS = {"qwen2_5_vl": _qwen2_5_vl, "gemma3": _gemma3, "llava_onevision": _llava_onevision}


def make_tiny_vlm(
    out: str | Path, arch: str, seed: int = 0, size: TinySize | None = None, corpus: Sequence[str] = ()
) -> Path:
    """Write a tiny random `arch` model with its processor to `out` (native format); returns `out`."""
    if arch not in _BUILDERS:
        raise ValueError(f"--arch must be one of llava, {', '.join(ARCHES)}; got {arch!r}")
    size = size or TinySize()
    if arch != "qwen2_5_vl" and size.merge_size != TinySize.merge_size:
        raise ValueError(f"--merge-size sets the image tokens of qwen2_5_vl only, not of {arch}")
    if arch == "gemma3" and size.patch_size is not None:
        raise ValueError("--patch-size sets the vision patches of qwen2_5_vl and llava_onevision only, not of gemma3")
    if arch != "llava_onevision" and (size.image_size, size.anyres_grid) != (None, TinySize.anyres_grid):
        raise ValueError(f"--image-size / --anyres-grid set the tiles of llava_onevision only, not of {arch}")
    if size.anyres_grid < 1:
        raise ValueError(f"--anyres-grid must be at least 1, got {size.anyres_grid}")
    torch.manual_seed(seed)
    model, processor, eos_ids = _BUILDERS[arch](size, _corpus(corpus))
    tokenizer = processor.tokenizer
    generation = model.generation_config
    generation.eos_token_id = eos_ids if len(eos_ids) > 1 else eos_ids[0]
    generation.pad_token_id = tokenizer.pad_token_id
    generation.bos_token_id = tokenizer.bos_token_id
    out = Path(out)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    logger.info("tiny %s (%.2fM parameters, %d tokens) written to %s", arch,
                sum(p.numel() for p in model.parameters()) / 1e6, len(tokenizer), out)
    return out
