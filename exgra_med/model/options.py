"""The option groups of every command that loads a model: which model and how to load it (`ModelOptions`), how to
decode (`DecodingOptions`).

Each group declares its flags once (`add_arguments`) and reads them back once (`from_args`), so that generate-vqa,
zero-shot, grounding-audit, chat, web and serve-api (and export-hf, for the flags it shares) spell, document and
default them alike. The reference's `--conv-mode` is a hidden alias of `--conv-template`. The defaults that differ
between commands for a reason (each evaluation decodes as the reference's script did) are parameters of
`DecodingOptions.add_arguments`, never second declarations.
"""

from __future__ import annotations

import argparse
from collections.abc import Collection
from dataclasses import dataclass, fields

import torch

from exgra_med.conversation import TEMPLATES
from exgra_med.data.images import ASPECT_RATIOS, DEFAULT_ASPECT_RATIO
from exgra_med.errors import UserError
from exgra_med.model.auto import DTYPES, LoadOptions
from exgra_med.model.native.backend import CHAT_TEMPLATE_NAME
from exgra_med.model.quantization import QUANT_BITS

# `--device auto` / `--dtype auto`: LoadOptions' defaults (cuda when available; bfloat16 on CUDA, float32 on the CPU).
AUTO = "auto"
DTYPE_CHOICES = (AUTO, *DTYPES)
TEMPLATE_CHOICES = tuple(sorted(TEMPLATES))

_TEMPLATE_HELP = (
    "prompt template (default: the one the checkpoint was trained with, else simple for generate-vqa, zero-shot and "
    "grounding-audit, llava_med for chat, web and serve-api; a transformers-native VLM uses its own chat template)"
)


@dataclass
class ModelOptions:
    """Which model to load and how: placement, precision, quantisation, attention kernel and the prompt / image
    settings (None: what the checkpoint recorded, else the command's default)."""

    model: str
    """ExGra-Med checkpoint, reference-layout or transformers-native VLM folder, or a Hub id (owner/name[@rev])."""
    vision_tower: str | None = None
    """Local vision tower folder, for reference-layout checkpoints whose config names no local tower."""
    conv_template: str | None = None
    """Prompt template; None: the checkpoint's recorded one, else the command's default."""
    bits: int = 16
    """Weight precision: 16, or 8 / 4 for bitsandbytes weights (CUDA only)."""
    device: str = AUTO
    """auto | cpu | cuda | cuda:N; auto: cuda when a GPU is visible, else cpu."""
    dtype: str = AUTO
    """A key of `DTYPES`, or auto: bfloat16 on CUDA, float32 on the CPU."""
    attn_implementation: str = "sdpa"
    """transformers' attention implementation (sdpa, eager, flash_attention_2, ...)."""
    image_aspect_ratio: str | None = None
    """square | pad; None: the checkpoint's recorded one, else square."""

    def __post_init__(self):
        if self.bits not in QUANT_BITS:
            raise UserError(f"bits must be one of {QUANT_BITS} (--load-4bit / --load-8bit), got {self.bits}")
        if self.dtype not in DTYPE_CHOICES:
            raise UserError(f"--dtype must be one of {DTYPE_CHOICES}, got {self.dtype!r}")
        if self.device != AUTO:
            try:
                torch.device(self.device)
            except (RuntimeError, ValueError) as e:
                raise UserError(f"--device {self.device!r}: not a device (auto, cpu, cuda, cuda:N)") from e
        if self.conv_template not in (None, CHAT_TEMPLATE_NAME, *TEMPLATES):
            raise UserError(f"--conv-template must be one of {TEMPLATE_CHOICES}, got {self.conv_template!r}")
        if self.image_aspect_ratio not in (None, *ASPECT_RATIOS):
            raise UserError(f"--image-aspect-ratio must be one of {ASPECT_RATIOS}, got {self.image_aspect_ratio!r}")

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser, *, only: Collection[str] | None = None) -> None:
        """Declare the flags of the fields in `only` (default: every field) in a "model" group of `parser`."""
        names = {f.name for f in fields(cls)}
        wanted = names if only is None else set(only)
        if wanted - names:
            raise ValueError(f"ModelOptions has no fields {sorted(wanted - names)}")
        group = parser.add_argument_group("model", "which model and how to load it")
        if "model" in wanted:
            group.add_argument("--model", required=True,
                               help="ExGra-Med checkpoint, released reference-layout folder or transformers-native "
                               "VLM folder, or a Hub id (owner/name[@rev])")
        if "vision_tower" in wanted:
            group.add_argument("--vision-tower", default=None,
                               help="local vision tower folder (reference-layout checkpoints)")
        if "conv_template" in wanted:
            group.add_argument("--conv-template", default=None, choices=TEMPLATE_CHOICES, help=_TEMPLATE_HELP)
            # The reference's spelling, kept so that its command lines run unchanged.
            group.add_argument("--conv-mode", dest="conv_template", default=argparse.SUPPRESS,
                               choices=TEMPLATE_CHOICES, help=argparse.SUPPRESS)
        if "bits" in wanted:
            # The default comes from the parser, so that the help of each flag does not show "(default: 16)".
            parser.set_defaults(bits=16)
            quant = group.add_mutually_exclusive_group()
            quant.add_argument("--load-4bit", dest="bits", action="store_const", const=4, default=argparse.SUPPRESS,
                               help="4-bit NF4 weights (bitsandbytes, CUDA only)")
            quant.add_argument("--load-8bit", dest="bits", action="store_const", const=8, default=argparse.SUPPRESS,
                               help="8-bit weights (bitsandbytes, CUDA only)")
        if "device" in wanted:
            group.add_argument("--device", default=AUTO, help="auto | cpu | cuda | cuda:N (auto: cuda when available)")
        if "dtype" in wanted:
            group.add_argument("--dtype", default=AUTO, choices=DTYPE_CHOICES,
                               help="weights dtype (auto: bfloat16 on CUDA, float32 on the CPU; for export-hf, which "
                               "loads on no device, the checkpoint's own)")
        if "attn_implementation" in wanted:
            group.add_argument("--attn-implementation", default="sdpa",
                               help="transformers' attention implementation: sdpa, eager, flash_attention_2, ...")
        if "image_aspect_ratio" in wanted:
            group.add_argument("--image-aspect-ratio", default=None, choices=ASPECT_RATIOS,
                               help="square: the processor's resize + centre crop (reference); pad: pad to a square "
                               f"first (default: the one the checkpoint was trained with, else {DEFAULT_ASPECT_RATIO})")

    @classmethod
    def from_args(cls, args: argparse.Namespace, **overrides) -> ModelOptions:
        """The options parsed by `add_arguments` (fields it did not declare keep their defaults; `overrides` win,
        e.g. export-hf's `model=args.src`); a bad value raises a `UserError` naming its flag."""
        found = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        return cls(**{**found, **overrides})

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """The dtype asked for; None for auto."""
        return None if self.dtype == AUTO else DTYPES[self.dtype]

    def load_options(self) -> LoadOptions:
        """`exgra_med.model.auto.LoadOptions` of these options (auto: None, i.e. LoadOptions' defaults)."""
        return LoadOptions(
            device=None if self.device == AUTO else self.device, dtype=self.torch_dtype,
            attn_implementation=self.attn_implementation, bits=self.bits, vision_tower=self.vision_tower,
            template=self.conv_template, image_aspect_ratio=self.image_aspect_ratio,
        )


@dataclass
class DecodingOptions:
    """How answers are decoded: length limit, greedy or sampled, nucleus mass and the sampling seed."""

    max_new_tokens: int = 256
    """Answer length limit in tokens (for web and serve-api also the cap of a request's max_tokens)."""
    temperature: float = 0.0
    """0: greedy decoding; > 0: sampling at that temperature."""
    top_p: float = 1.0
    """Nucleus sampling mass (with temperature > 0); 1: no nucleus cut."""
    seed: int = 0
    """Seed of torch's generator; only matters when sampling."""

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise UserError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1], got {self.top_p}")

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser, *, max_new_tokens: int = 256,
                      temperature: float = 0.0) -> None:
        """Declare --max-new-tokens, --temperature, --top-p and --seed in a "decoding" group of `parser`, with the
        command's own defaults of the first two (the reference's decoding of each evaluation)."""
        cls(max_new_tokens=max_new_tokens, temperature=temperature)  # the command's defaults must be valid
        group = parser.add_argument_group("decoding", "how answers are decoded")
        group.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                           help="answer length limit in tokens (for web and serve-api also the cap of a request's "
                           "max_tokens)")
        group.add_argument("--temperature", type=float, default=temperature, help="0 = greedy; > 0 samples")
        group.add_argument("--top-p", type=float, default=1.0,
                           help="nucleus sampling mass (with --temperature > 0; 1 = no nucleus cut)")
        group.add_argument("--seed", type=int, default=0, help="random seed; only matters with --temperature > 0")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> DecodingOptions:
        """The options parsed by `add_arguments`; a bad value raises a `UserError` naming its flag."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})
