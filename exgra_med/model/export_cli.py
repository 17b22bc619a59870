"""`exgra-med export-hf`: write a checkpoint in transformers' native LLaVA format (vLLM, SGLang, transformers).

Besides the weights (exgra_med.model.export) the export carries a `LlavaProcessor` (tokenizer + image
processor + image token + chat template), so `AutoProcessor` and the serving engines take it as is.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import LlavaImageProcessor, LlavaProcessor

from exgra_med.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_PATCH_TOKEN
from exgra_med.conversation import get_template
from exgra_med.data.images import ASPECT_RATIOS, DEFAULT_ASPECT_RATIO
from exgra_med.errors import HelpFormatter, one_line
from exgra_med.model.auto import choose_setting, recorded_settings
from exgra_med.model.checkpoint import check_output_dir, load_model, staged_output_dir
from exgra_med.model.export import check_exportable, to_hf_llava
from exgra_med.model.options import ModelOptions

logger = logging.getLogger(__name__)

# The flags of the shared model group that apply to an export (it loads on no device, for no answers).
EXPORT_FLAGS = ("vision_tower", "dtype", "image_aspect_ratio", "conv_template")


def llava_image_processor(processor, image_aspect_ratio: str = DEFAULT_ASPECT_RATIO) -> object:
    """A `LlavaImageProcessor` with `processor`'s settings that preprocesses as `exgra_med.data.images`: "square"
    (the reference) is the processor's own resize + centre crop; "pad" sets `do_pad`, a square of the mean colour
    first (exgra_med.data.images.expand2square)."""
    keys = ("size", "crop_size", "image_mean", "image_std", "resample", "do_resize", "do_center_crop",
            "do_rescale", "rescale_factor", "do_normalize", "do_convert_rgb")
    settings = {k: getattr(processor, k) for k in keys if getattr(processor, k, None) is not None}
    if image_aspect_ratio not in ASPECT_RATIOS:
        raise ValueError(f"image_aspect_ratio must be one of {ASPECT_RATIOS}, got {image_aspect_ratio!r}")
    return LlavaImageProcessor(**settings, do_pad=image_aspect_ratio == "pad")


def export_hf(
    src: str | Path, out_dir: str | Path, dtype: torch.dtype | None = None, vision_tower: str | None = None,
    image_aspect_ratio: str = DEFAULT_ASPECT_RATIO, template: str = "llava_med",
) -> Path:
    """Load an ExGra-Med checkpoint (or a reference-layout folder + its vision tower) and write it as
    transformers LLaVA, in `dtype` (default: the checkpoint's own), its image processor set to
    `image_aspect_ratio` and its chat template to the prompt `template` (what the model was trained with); the
    settings the checkpoint recorded (`exgra_med.model.auto.RECORDED_SETTINGS`, the trained maximum length) are
    written into the exported config.json as they are read from ours.

    Raises ValueError (before writing anything) when the connector has no LLaVA counterpart.
    """

    check_output_dir(out_dir)
    model, tokenizer, processor = load_model(src, vision_tower=vision_tower, dtype=dtype)
    check_exportable(model)
    llava = to_hf_llava(model)
    llava.generation_config.pad_token_id = tokenizer.pad_token_id
    llava.config.conv_template, llava.config.image_aspect_ratio = template, image_aspect_ratio
    max_length = getattr(model.config, "tokenizer_model_max_length", None)
    if max_length is not None:
        llava.config.tokenizer_model_max_length = max_length
    patch = model.vision_tower.patch_size
    image_text = DEFAULT_IMAGE_PATCH_TOKEN
    if model.config.mm_use_im_start_end:
        image_text = f"{DEFAULT_IM_START_TOKEN}{image_text}{DEFAULT_IM_END_TOKEN}"
    llava_processor = LlavaProcessor(
        image_processor=llava_image_processor(processor, image_aspect_ratio),
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        image_token=DEFAULT_IMAGE_PATCH_TOKEN,
        num_additional_image_tokens=1 if model.vision_tower.has_cls else 0,
        chat_template=get_template(template).chat_template(image_text),
    )
    with staged_output_dir(out_dir) as tmp:
        llava.save_pretrained(tmp)
        llava_processor.save_pretrained(tmp)
    logger.info("exported %s -> %s (transformers LLaVA)", src, out_dir)
    return Path(out_dir)


def build_parser() -> argparse.ArgumentParser:
    """The flags of `exgra-med export-hf`: --vision-tower, --dtype and --image-aspect-ratio are those of the shared
    model group (`exgra_med.model.options.ModelOptions`)."""
    p = argparse.ArgumentParser(
        prog="exgra-med export-hf", description=__doc__.splitlines()[0],
        formatter_class=HelpFormatter,
    )
    p.add_argument("--in", dest="src", required=True, help="ExGra-Med checkpoint (or reference-layout) folder")
    p.add_argument("--out", required=True, help="output folder (transformers LlavaForConditionalGeneration)")
    ModelOptions.add_arguments(p, only=EXPORT_FLAGS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: exgra-med export-hf --in DIR --out DIR [--dtype float16|bfloat16|float32]."""
    args = build_parser().parse_args(argv)
    options = ModelOptions.from_args(args, model=args.src)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # The preprocessing the model was trained with travels in its checkpoint; a flag that disagrees wins.
    recorded = recorded_settings(options.model)
    aspect = choose_setting("image_aspect_ratio", options.image_aspect_ratio, recorded, DEFAULT_ASPECT_RATIO,
                            options.model)
    template = choose_setting("conv_template", options.conv_template, recorded, "llava_med", options.model)
    try:
        export_hf(options.model, args.out, options.torch_dtype, options.vision_tower, aspect, template)
    except ValueError as e:
        print(f"exgra-med export-hf: error: {one_line(e)}", file=sys.stderr)
        return 2
    print(f"exported {args.src} -> {args.out} (load with transformers.LlavaForConditionalGeneration)")
    return 0
