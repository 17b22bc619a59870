"""Offline factory for tiny random models (tests, demo, benchmarks): `exgra-med make-tiny-model`.

`--arch qwen2_5_vl|gemma3|llava_onevision` writes a transformers-native VLM (`model.native.tiny`); the default,
`llava`, writes three loadable folders, so that tiny runs exercise exactly the paths real checkpoints take:
  OUT/llm/      a causal LM + its tokenizer (plain, like a Vicuna folder)
  OUT/vision/   a CLIP vision model + image processor, or an open_clip (BiomedCLIP-style) folder
  OUT/          the assembled ExGra-Med model (tokenizer with image tokens, image processor)
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from exgra_med.errors import HelpFormatter
from exgra_med.model.loading import ConnectorOptions, build_from_parts
from exgra_med.model.native.tiny import ARCHES, TinySize, make_tiny_vlm
from exgra_med.model.tokenizer import build_word_tokenizer, default_corpus
from exgra_med.model.vision import _build_open_clip_trunk

logger = logging.getLogger(__name__)

LLM_TYPES = ("llama", "mistral", "qwen2")
VISION_TYPES = ("clip", "biomedclip")


def _llm_config(kind: str, vocab_size: int, hidden: int, layers: int, heads: int, tokenizer) -> object:
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    if kind == "llama":
        return LlamaConfig(**common)
    if kind == "mistral":
        return MistralConfig(**common, sliding_window=None)
    if kind == "qwen2":
        return Qwen2Config(**common)
    raise ValueError(f"--llm must be one of {LLM_TYPES}, got {kind!r}")


def write_tiny_llm(out: Path, kind: str, texts: Iterable[str], hidden: int, layers: int, heads: int) -> None:
    """A random causal LM with a word-level tokenizer trained on `texts`."""
    tokenizer = build_word_tokenizer(texts)
    config = _llm_config(kind, len(tokenizer), hidden, layers, heads, tokenizer)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def write_tiny_clip(out: Path, image_size: int, patch_size: int, hidden: int, layers: int, heads: int) -> None:
    """A random CLIP vision model and its image processor."""
    config = CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=hidden,
    )
    CLIPVisionModel(config).save_pretrained(out)
    CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
    ).save_pretrained(out)


def write_tiny_biomedclip(out: Path, image_size: int) -> None:
    """A random BiomedCLIP-shaped open_clip folder (timm `test_vit` trunk), loadable as `local-dir:OUT`."""

    model_cfg = {
        "embed_dim": 64,
        "vision_cfg": {
            "timm_model_name": "test_vit",
            "timm_model_pretrained": False,
            "timm_pool": "",
            "timm_proj": "linear",
            "image_size": image_size,
        },
        "text_cfg": {
            "hf_model_name": "none",
            "hf_tokenizer_name": "none",
            "hf_proj_type": "mlp",
            "hf_pooler_type": "cls_last_hidden_state",
            "context_length": 64,
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    trunk = _build_open_clip_trunk(model_cfg)
    state = {f"visual.trunk.{k}": v.contiguous() for k, v in trunk.state_dict().items()}
    save_file(state, str(out / "open_clip_model.safetensors"))
    cfg = {"model_cfg": model_cfg, "preprocess_cfg": {"mean": list(OPENAI_CLIP_MEAN), "std": list(OPENAI_CLIP_STD)}}
    (out / "open_clip_config.json").write_text(json.dumps(cfg, indent=2))


def make_tiny_model(
    out: str | Path,
    vision: str = "clip",
    llm: str = "llama",
    image_size: int = 32,
    patch_size: int = 8,
    hidden: int = 128,
    layers: int = 2,
    vision_hidden: int = 128,
    vision_layers: int = 2,
    heads: int = 4,
    seed: int = 0,
    corpus: Sequence[str] | None = None,
    options: ConnectorOptions | None = None,
) -> Path:
    """Write OUT/llm, OUT/vision and the assembled model in OUT; returns OUT."""
    if vision not in VISION_TYPES:
        raise ValueError(f"--vision must be one of {VISION_TYPES}, got {vision!r}")
    out = Path(out)
    torch.manual_seed(seed)
    write_tiny_llm(out / "llm", llm, corpus or default_corpus(), hidden, layers, heads)
    if vision == "clip":
        write_tiny_clip(out / "vision", image_size, patch_size, vision_hidden, vision_layers, heads)
        tower_path = str(out / "vision")
    else:
        write_tiny_biomedclip(out / "vision", image_size if image_size >= 32 else 64)
        tower_path = f"local-dir:{out / 'vision'}"
    model, tokenizer, processor = build_from_parts(str(out / "llm"), tower_path, options)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: exgra-med make-tiny-model --out DIR [--arch llava|qwen2_5_vl|gemma3|llava_onevision]
    [--vision clip|biomedclip] [--llm llama|mistral|qwen2]."""
    p = argparse.ArgumentParser(
        prog="exgra-med make-tiny-model", description=__doc__.splitlines()[0],
        formatter_class=HelpFormatter,
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--arch", choices=("llava", *ARCHES), default="llava",
                   help="llava: this project's LLaVA-style model from parts (OUT/llm, OUT/vision); the others: a "
                   "transformers-native VLM folder with its processor and chat template")
    p.add_argument("--vision", choices=VISION_TYPES, default="clip", help="(llava)")
    p.add_argument("--llm", choices=LLM_TYPES, default="llama", help="(llava)")
    p.add_argument("--image-size", type=int, default=None,
                   help="the vision tower's image side (llava: default 32; llava_onevision: the tile side, default 16)")
    p.add_argument("--patch-size", type=int, default=None,
                   help="vision patch size (llava: default 8; qwen2_5_vl: 14; llava_onevision: 4; not gemma3)")
    p.add_argument("--merge-size", type=int, default=None,
                   help="(qwen2_5_vl) patches merged per image token along each side (default 2)")
    p.add_argument("--anyres-grid", type=int, default=None,
                   help="(llava_onevision) the largest anyres grid, N x N tiles (default 2; the released models: 6)")
    p.add_argument("--hidden", type=int, default=None, help="LLM hidden size (default: 128 llava, 64 native)")
    p.add_argument("--layers", type=int, default=2, help="LLM layers")
    p.add_argument("--vision-hidden", type=int, default=None, help="vision hidden size (default: 128 llava, 32 native)")
    p.add_argument("--vision-layers", type=int, default=2, help="vision layers")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--projector", default="mlp2x_gelu", help="mm_projector_type of the assembled model")
    p.add_argument("--dense-connector", default="none", choices=("none", "sti", "sci", "dci"),
                   help="mm_dense_connector_type of the assembled model")
    p.add_argument("--no-im-start-end", action="store_true", help="plain image placeholder (no <im_start>/<im_end>)")
    args = p.parse_args(argv)
    if args.arch == "llava" and args.merge_size is not None:
        p.error("--merge-size sets the image tokens of qwen2_5_vl; the llava model has one token per patch")
    if args.arch == "llava" and args.anyres_grid is not None:
        p.error("--anyres-grid sets the tiles of llava_onevision; the llava model sees one image")
    if args.arch != "llava":
        size = TinySize(hidden=args.hidden or 64, layers=args.layers, heads=args.heads,
                        vision_hidden=args.vision_hidden or 32, vision_layers=args.vision_layers,
                        patch_size=args.patch_size, merge_size=args.merge_size or TinySize.merge_size,
                        image_size=args.image_size,
                        anyres_grid=TinySize.anyres_grid if args.anyres_grid is None else args.anyres_grid)
        out = make_tiny_vlm(args.out, args.arch, args.seed, size)
        print(f"tiny {args.arch} model written to {out} (loads with AutoModelForImageTextToText / AutoProcessor)")
        return 0
    options = ConnectorOptions(
        mm_projector_type=args.projector,
        mm_dense_connector_type=args.dense_connector,
        mm_use_im_start_end=not args.no_im_start_end,
    )
    out = make_tiny_model(
        args.out,
        args.vision,
        args.llm,
        args.image_size or 32,
        args.patch_size or 8,
        args.hidden or 128,
        args.layers,
        args.vision_hidden or 128,
        args.vision_layers,
        args.heads,
        args.seed,
        options=options,
    )
    print(f"tiny model written to {out} (LLM: {out / 'llm'}, vision tower: {out / 'vision'})")
    return 0
