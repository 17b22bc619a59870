"""Command-line options shared by `chat`, `web` and `serve-api`: which model, how to load it, how to decode."""

from __future__ import annotations

import argparse

from exgra_med.conversation import TEMPLATES
from exgra_med.data.images import ASPECT_RATIOS, DEFAULT_ASPECT_RATIO
from exgra_med.model.auto import DTYPES, LoadOptions
from exgra_med.serve.engine import GenerationSettings, InferenceEngine


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """--model, --vision-tower, --conv-template, --load-4bit/--load-8bit, --device, --dtype and decoding flags."""
    p.add_argument("--model", required=True,
                   help="ExGra-Med checkpoint, released reference-layout folder or transformers-native VLM folder, "
                   "or a Hub id (owner/name[@rev])")
    p.add_argument("--vision-tower", default=None, help="local vision tower folder (reference-layout checkpoints)")
    p.add_argument("--conv-template", default=None, choices=sorted(TEMPLATES),
                   help="prompt template (default: the one the checkpoint was trained with, else llava_med)")
    quant = p.add_mutually_exclusive_group()
    quant.add_argument("--load-4bit", action="store_true", help="4-bit NF4 weights (bitsandbytes, CUDA only)")
    quant.add_argument("--load-8bit", action="store_true", help="8-bit weights (bitsandbytes, CUDA only)")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--image-aspect-ratio", default=None, choices=ASPECT_RATIOS,
                   help="square: the processor's resize + centre crop (reference); pad: pad to a square first "
                   f"(default: the one the checkpoint was trained with, else {DEFAULT_ASPECT_RATIO})")
    p.add_argument("--max-new-tokens", type=int, default=256,
                   help="answer length in tokens: the default and, for the servers, the cap of a request's max_tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy decoding")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with temperature > 0)")


def add_serving_limits(p: argparse.ArgumentParser) -> None:
    """--max-prompt-tokens, --max-batch-size, --max-queue: the bounds of the `web` and `serve-api` servers."""
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="longest prompt (history and image tokens included); always at most the model's context "
                   "minus --max-new-tokens")
    p.add_argument("--max-batch-size", type=int, default=8, help="concurrent requests decoded together")
    p.add_argument("--max-queue", type=int, default=32, help="requests allowed to wait; more get HTTP 429 / a message")


def settings_from_args(args: argparse.Namespace) -> GenerationSettings:
    """Decoding settings from the parsed flags."""
    return GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)


def load_options(args: argparse.Namespace) -> LoadOptions:
    """How to load the model, from the parsed flags."""
    return LoadOptions(
        device=args.device, dtype=DTYPES[args.dtype] if args.dtype else None,
        bits=4 if args.load_4bit else 8 if args.load_8bit else 16, vision_tower=args.vision_tower,
        template=args.conv_template, image_aspect_ratio=args.image_aspect_ratio,
    )


def engine_from_args(args: argparse.Namespace) -> InferenceEngine:
    """Load the model named by the parsed flags (raises QuantizationUnavailableError on CPU with --load-4bit)."""
    return InferenceEngine.from_path(
        args.model,
        load_options(args),
        max_prompt_tokens=getattr(args, "max_prompt_tokens", None),
        max_batch_size=getattr(args, "max_batch_size", 8),
        max_queue=getattr(args, "max_queue", 32),
    )
