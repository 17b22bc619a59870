"""`exgra-med merge-lora`: turn a checkpoint saved during a LoRA run into a plain, merged ExGra-Med checkpoint.

With `--lora_enable` the trainer wraps `model.language_model` with PEFT, so `checkpoint-N` folders hold
PEFT names: `language_model.base_model.model.<llm key>` with `<module>.base_layer.weight` and the
adapter pair `<module>.lora_A.default.weight` (r, in) / `<module>.lora_B.default.weight` (out, r).
Merging computes W = W_base + (lora_alpha / r) * B @ A (PEFT's scaling; `--rslora` for alpha / sqrt(r)). The
4-/8-bit base weights of a QLoRA run (`--bits 4|8`) are dequantised first: the result is a full-precision checkpoint.
Checkpoints of this project's LoRA runs record lora_alpha in config.json; for others pass `--lora-alpha` (the value
the run used; `exgra-med train` defaults to 16).
"""

from __future__ import annotations

import argparse
import logging
import math
import re
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from exgra_med.errors import HelpFormatter, one_line
from exgra_med.io import read_json
from exgra_med.model.checkpoint import check_output_dir, read_weights, staged_output_dir, write_json, write_weights
from exgra_med.model.quantization import dequantize_bnb_state
from exgra_med.model.vision import load_image_processor

logger = logging.getLogger(__name__)

PEFT_PREFIX = "language_model.base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>A|B)\.(?P<adapter>[^.]+)\.weight$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "chat_template.jinja")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def merge_lora_state_dict(
    state: dict[str, torch.Tensor], lora_alpha: float, use_rslora: bool = False
) -> tuple[dict[str, torch.Tensor], int]:
    """Fold every LoRA pair into its base weight and drop PEFT's name wrapping.

    Returns (plain state dict with `language_model.*` keys, number of merged modules). Raises ValueError on
    unpaired adapters, several adapters, or LoRA on modules other than linear weights. Base weights of a QLoRA run
    (bitsandbytes 4-/8-bit) are dequantised to float32 first, so the merged weights are full precision.
    """
    state, _ = dequantize_bnb_state(state)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    adapters: set[str] = set()
    plain: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        match = _LORA_KEY.match(key)
        if match:
            pairs.setdefault(match["module"], {})[match["which"]] = value
            adapters.add(match["adapter"])
        elif ".lora_" in key:
            raise ValueError(f"unsupported LoRA weight {key!r}: only lora_A/lora_B on linear layers can be merged")
        else:
            plain[key] = value
    if not pairs:
        raise ValueError("no LoRA weights (`*.lora_A.<adapter>.weight`) found: is this a checkpoint of a LoRA run?")
    if len(adapters) > 1:
        raise ValueError(f"several LoRA adapters in one checkpoint ({sorted(adapters)}); merge them one at a time")
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"LoRA module {module!r} has lora_{''.join(ab)} but not its pair")
        base_key = f"{module}.base_layer.weight"
        if base_key not in plain:
            raise ValueError(f"LoRA module {module!r} has no base weight {base_key!r}")
        a, b = ab["A"].float(), ab["B"].float()  # (r, in), (out, r)
        rank = a.shape[0]
        scale = lora_alpha / (math.sqrt(rank) if use_rslora else rank)
        base = plain[base_key]
        plain[base_key] = (base.float() + scale * (b @ a)).to(base.dtype)
    merged: dict[str, torch.Tensor] = {}
    for key, value in plain.items():
        new = key.replace(".base_layer.", ".")
        if new.startswith(PEFT_PREFIX):
            new = "language_model." + new[len(PEFT_PREFIX):]
        if new in merged:
            raise ValueError(f"two weights map onto {new!r} after unwrapping PEFT names")
        merged[new] = value.contiguous()
    return merged, len(pairs)


def _find_files(folder: Path, names: Sequence[str]) -> Path | None:
    """`folder` when it holds one of `names`, else its parent (a run's output_dir) when that does."""
    for candidate in (folder, folder.parent):
        if any((candidate / n).is_file() for n in names):
            return candidate
    return None


def merge_lora_checkpoint(
    src: str | Path, out_dir: str | Path, lora_alpha: float | None = None, use_rslora: bool = False,
    image_processor: str | None = None,
) -> Path:
    """Write `src` (a LoRA-run checkpoint folder) as a plain ExGra-Med checkpoint in `out_dir`.

    lora_alpha None: the value recorded in src's config.json, else 16 (the trainer's default) with a warning.
    """
    src = Path(src)
    check_output_dir(out_dir)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src}: config.json not found")
    config = read_json(src / "config.json")
    if lora_alpha is None:
        lora_alpha = config.get("lora_alpha")
        if lora_alpha is None:
            lora_alpha = 16.0
            logger.warning("%s records no lora_alpha; using 16 (pass --lora-alpha if the run used another)", src)
    merged, n = merge_lora_state_dict(read_weights(src), float(lora_alpha), use_rslora)
    tok_dir = _find_files(src, ("tokenizer_config.json",))
    if tok_dir is None:
        raise FileNotFoundError(f"{src}: no tokenizer files here or in {src.parent}")
    proc_dir = Path(image_processor) if image_processor else _find_files(src, ("preprocessor_config.json",))
    if proc_dir is None and config.get("mm_vision_tower") and Path(config["mm_vision_tower"]).is_dir():
        proc_dir = Path(config["mm_vision_tower"])
    if proc_dir is None:
        raise FileNotFoundError(
            f"{src}: no preprocessor_config.json here or in {src.parent}, and mm_vision_tower is not a local "
            "folder; pass --image-processor DIR (e.g. the vision tower folder)"
        )
    with staged_output_dir(out_dir) as tmp:
        write_weights(merged, tmp)
        config["lora_alpha"] = None  # merged: no adapters left
        # A QLoRA run's LLM config records its bitsandbytes settings; the merged weights are dense.
        config.pop("quantization_config", None)
        if isinstance(config.get("text_config"), dict):
            config["text_config"].pop("quantization_config", None)
        write_json(config, tmp / "config.json")
        for name in TOKENIZER_FILES:
            if (tok_dir / name).is_file():
                shutil.copy2(tok_dir / name, tmp / name)
        if (proc_dir / "preprocessor_config.json").is_file():
            for name in PROCESSOR_FILES:
                if (proc_dir / name).is_file():
                    shutil.copy2(proc_dir / name, tmp / name)
        else:
            load_image_processor(str(proc_dir)).save_pretrained(tmp)
    logger.info("merged %d LoRA modules of %s (alpha %s) -> %s", n, src, lora_alpha, out_dir)
    return Path(out_dir)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: exgra-med merge-lora --in CHECKPOINT_DIR --out DIR [--lora-alpha 16] [--rslora]."""
    p = argparse.ArgumentParser(
        prog="exgra-med merge-lora", description=__doc__.splitlines()[0],
        formatter_class=HelpFormatter,
    )
    p.add_argument("--in", dest="src", required=True, help="checkpoint-N folder of a --lora_enable run")
    p.add_argument("--out", required=True, help="output folder (plain ExGra-Med checkpoint)")
    p.add_argument("--lora-alpha", type=float, default=None,
                   help="--lora_alpha of the run (default: recorded in config.json, else 16)")
    p.add_argument("--rslora", action="store_true", help="the run used rank-stabilised LoRA (alpha / sqrt(r))")
    p.add_argument("--image-processor", default=None, help="folder with preprocessor_config.json, if not found")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        out = merge_lora_checkpoint(args.src, args.out, args.lora_alpha, args.rslora, args.image_processor)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"exgra-med merge-lora: error: {one_line(e)}", file=sys.stderr)
        return 2
    print(f"merged LoRA checkpoint written to {out}")
    return 0
