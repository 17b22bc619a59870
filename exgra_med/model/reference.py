"""Released checkpoints in the reference layout (METHOD section 8): what the format holds, and `convert`.

The reference (LLaVA-Med v0) saves `LlavaLlamaForCausalLM`: a LLaMA checkpoint whose weights are
`model.*` + `lm_head.*` plus `model.mm_projector.*`, whose config.json adds `mm_*` keys (and says
`model_type: "llava"`, which is not transformers' LLaVA), and whose tokenizer holds the added image
tokens. The vision tower is not stored; it comes from a separate local CLIP (or BiomedCLIP) folder.
Loading such a folder directly is `exgra_med.model.checkpoint.load_model`, which uses the translation here.

`exgra-med convert --from reference --in DIR --vision-tower DIR --out DIR` writes this project's format.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import LlamaConfig, PreTrainedConfig, PreTrainedTokenizerBase

from exgra_med.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_PATCH_TOKEN
from exgra_med.errors import HelpFormatter
from exgra_med.model.checkpoint import check_output_dir, load_model, staged_output_dir
from exgra_med.model.config import ExGraMedConfig
from exgra_med.model.connector import connector_input_dim
from exgra_med.model.hub import HubResolutionError, resolve_path, resolve_vision_tower

logger = logging.getLogger(__name__)

REFERENCE_ARCHITECTURES = ("LlavaLlamaForCausalLM",)
# config.json keys of the reference that are not LLaMA's.
_MM_KEYS = ("use_mm_proj", "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter", "sep_image_conv_front", "num_l")
PROJECTOR_MARKER = "mm_projector."


def read_reference_config(path: str | Path) -> dict:
    """The raw config.json of a reference checkpoint; raises ValueError naming the file when it is not one."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file}: not found (a reference checkpoint folder holds config.json)")
    try:
        cfg = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: invalid JSON: {e}") from e
    if not is_reference_config(cfg):
        raise ValueError(
            f"{file}: not a reference (LLaVA-Med v0 / ExGra-Med release) checkpoint: expected architectures "
            f"{list(REFERENCE_ARCHITECTURES)} or `mm_vision_tower`/`mm_hidden_size` keys, found "
            f"architectures={cfg.get('architectures')}, model_type={cfg.get('model_type')!r}"
        )
    return cfg


def is_reference_config(cfg: dict) -> bool:
    """True for a LlavaLlamaForCausalLM config (its architecture, or the `mm_*` keys on a LLaMA config)."""
    if any(a in REFERENCE_ARCHITECTURES for a in cfg.get("architectures") or []):
        return True
    return "mm_hidden_size" in cfg and "mm_vision_tower" in cfg and cfg.get("model_type") != "exgra_med"


def is_reference_checkpoint(path: str | Path) -> bool:
    """True when `path` is a folder holding a reference-layout config.json."""
    file = Path(path) / "config.json"
    if not file.is_file():
        return False
    try:
        return is_reference_config(json.loads(file.read_text()))
    except json.JSONDecodeError:
        return False


def llama_config_from_reference(cfg: dict, tokenizer: PreTrainedTokenizerBase | None = None) -> LlamaConfig:
    """The plain `LlamaConfig` inside a reference config (mm keys dropped; special ids taken from the tokenizer,
    since the v0 configs carry stale ones such as `pad_token_id: -1`)."""
    known = set(LlamaConfig().to_dict())
    kept = {k: v for k, v in cfg.items() if k in known and not k.startswith("mm_") and k not in _MM_KEYS}
    for key in ("model_type", "architectures", "transformers_version", "_name_or_path", "torch_dtype", "dtype"):
        kept.pop(key, None)
    if "max_sequence_length" in cfg and "max_position_embeddings" not in cfg:
        kept["max_position_embeddings"] = cfg["max_sequence_length"]
    config = LlamaConfig(**kept)
    if tokenizer is not None:
        config.bos_token_id = tokenizer.bos_token_id
        config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
    pad = config.pad_token_id
    if pad is not None and not 0 <= pad < config.vocab_size:
        config.pad_token_id = None
    return config


def vision_tower_path(cfg: dict, folder: str | Path, vision_tower: str | None = None) -> str:
    """The vision tower of a reference checkpoint in local form: `vision_tower` (a CLIP folder, `local-dir:DIR`,
    `hf-hub:owner/name` or a Hub id), else the config's `mm_vision_tower` (a local folder, or a Hub id such as
    `openai/clip-vit-large-patch14` that is in the Hugging Face cache or can be downloaded)."""
    if vision_tower:
        return resolve_vision_tower(vision_tower)
    tower_path = cfg.get("mm_vision_tower")
    reason = ""
    if tower_path:
        try:
            return resolve_vision_tower(str(tower_path))
        except HubResolutionError as e:
            reason = f" ({e})"
    raise ValueError(
        f"{Path(folder) / 'config.json'}: mm_vision_tower={tower_path!r} is not a local folder nor a usable Hub id"
        f"{reason}; pass --vision-tower DIR|HUB_ID"
    )


def _token_id(tokenizer: PreTrainedTokenizerBase, token: str, folder: Path) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"{folder}: the tokenizer lacks the image token {token!r} that the reference adds")
    return token_id


def exgra_med_config(
    cfg: dict,
    folder: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    text_config: PreTrainedConfig,
    vision_config: dict,
    tower_type: str,
    tower_hidden_size: int,
    tower_path: str,
    **overrides,
) -> ExGraMedConfig:
    """The `ExGraMedConfig` equivalent to a reference config, with the reference's defaults for missing keys;
    raises ValueError when `mm_hidden_size` does not fit the vision tower."""
    folder = Path(folder)
    dense = cfg.get("mm_dense_connector_type") or "none"
    expected = connector_input_dim(dense, tower_hidden_size)
    if cfg.get("mm_hidden_size") not in (None, expected):
        raise ValueError(
            f"{folder / 'config.json'}: mm_hidden_size={cfg['mm_hidden_size']} but the vision tower {tower_path} "
            f"with mm_dense_connector_type={dense!r} gives {expected}: wrong --vision-tower?"
        )
    use_start_end = bool(cfg.get("mm_use_im_start_end", False))
    return ExGraMedConfig(
        text_config=text_config,
        vision_config=vision_config,
        vision_tower_type=tower_type,
        mm_vision_tower=str(cfg.get("mm_vision_tower") or tower_path),
        mm_vision_select_layer=int(cfg.get("mm_vision_select_layer", -1)),
        # The reference's default when the key is missing is a linear projector.
        mm_projector_type=cfg.get("mm_projector_type") or "linear",
        mm_dense_connector_type=dense,
        num_l=int(cfg.get("num_l", 6)),
        mm_use_im_start_end=use_start_end,
        image_token_id=_token_id(tokenizer, DEFAULT_IMAGE_PATCH_TOKEN, folder),
        im_start_token_id=_token_id(tokenizer, DEFAULT_IM_START_TOKEN, folder) if use_start_end else None,
        im_end_token_id=_token_id(tokenizer, DEFAULT_IM_END_TOKEN, folder) if use_start_end else None,
        **overrides,
    )


def projector_state(weights: dict[str, torch.Tensor], source: str | Path) -> dict[str, torch.Tensor]:
    """The projector weights among `weights`, keyed as `mm_projector`'s own state dict: this project's keys
    (`mm_projector.0.weight`) and the reference's (`model.mm_projector.0.weight`)."""
    state = {k[k.index(PROJECTOR_MARKER) + len(PROJECTOR_MARKER):]: v for k, v in weights.items()
             if PROJECTOR_MARKER in k}
    if not state:
        raise ValueError(f"{source}: no '{PROJECTOR_MARKER}*' weights found (keys: {list(weights)[:5]})")
    return state


def convert_reference(path: str | Path, vision_tower: str | None, out_dir: str | Path) -> Path:
    """Write a reference-layout checkpoint in this project's format (loadable by `checkpoint.load_model`)."""
    path = resolve_path(path, "reference checkpoint", require=("config.json",))
    read_reference_config(path)  # a reference folder, not just any loadable one
    check_output_dir(out_dir)
    model, tokenizer, processor = load_model(path, vision_tower=vision_tower)
    with staged_output_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    logger.info("converted %s -> %s", path, out_dir)
    return Path(out_dir)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: exgra-med convert --from reference --in DIR --vision-tower DIR --out DIR."""
    p = argparse.ArgumentParser(
        prog="exgra-med convert", description=__doc__.splitlines()[0],
        formatter_class=HelpFormatter,
    )
    p.add_argument("--from", dest="source", choices=("reference",), default="reference", help="source layout")
    p.add_argument("--in", dest="src", required=True, help="reference checkpoint folder (LlavaLlamaForCausalLM)")
    p.add_argument("--vision-tower", default=None, help="local CLIP folder or local-dir:BIOMEDCLIP_DIR")
    p.add_argument("--out", required=True, help="output folder (ExGra-Med format)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if Path(args.out).resolve() == Path(args.src).resolve():
        p.error("--out must differ from --in")
    out = convert_reference(args.src, args.vision_tower, args.out)
    print(f"converted {args.src} -> {out}")
    return 0
