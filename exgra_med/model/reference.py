"""Released checkpoints in the reference layout (METHOD section 8): load them directly, or convert them.

The reference (LLaVA-Med v0) saves `LlavaLlamaForCausalLM`: a LLaMA checkpoint whose weights are
`model.*` + `lm_head.*` plus `model.mm_projector.*`, whose config.json adds `mm_*` keys (and says
`model_type: "llava"`, which is not transformers' LLaVA), and whose tokenizer holds the added image
tokens. The vision tower is not stored; it comes from a separate local CLIP (or BiomedCLIP) folder.

`exgra-med convert --from reference --in DIR --vision-tower DIR --out DIR` writes this project's format.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from exgra_med.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_PATCH_TOKEN
from exgra_med.model.config import ExGraMedConfig
from exgra_med.model.connector import connector_input_dim
from exgra_med.model.modeling import ExGraMedForConditionalGeneration
from exgra_med.model.vision import load_image_processor, load_vision_tower

logger = logging.getLogger(__name__)

REFERENCE_ARCHITECTURES = ("LlavaLlamaForCausalLM",)
# config.json keys of the reference that are not LLaMA's.
_MM_KEYS = ("use_mm_proj", "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter", "sep_image_conv_front", "num_l")
PROJECTOR_MARKER = "mm_projector."
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


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


def _weight_files(folder: Path) -> list[Path]:
    for index in WEIGHT_INDEXES:
        if (folder / index).is_file():
            weight_map = json.loads((folder / index).read_text())["weight_map"]
            return [folder / name for name in sorted(set(weight_map.values()))]
    files = [folder / n for n in WEIGHT_FILES if (folder / n).is_file()]
    if not files:
        raise FileNotFoundError(f"{folder}: no weights ({WEIGHT_FILES[0]}, {WEIGHT_FILES[1]} or a sharded index)")
    return files[:1]


def _projector_files(folder: Path) -> list[Path]:
    """The weight files that hold `mm_projector` keys (from the shard index when there is one)."""
    for index in WEIGHT_INDEXES:
        if (folder / index).is_file():
            weight_map = json.loads((folder / index).read_text())["weight_map"]
            return [folder / n for n in sorted({f for k, f in weight_map.items() if PROJECTOR_MARKER in k})]
    return _weight_files(folder)


def read_projector_state(folder: str | Path) -> dict[str, torch.Tensor]:
    """`model.mm_projector.*` weights of a reference checkpoint, keyed as `mm_projector`'s own state dict."""
    folder = Path(folder)
    state: dict[str, torch.Tensor] = {}
    for file in _projector_files(folder):
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open is not iterable
                    if PROJECTOR_MARKER in key:
                        state[key] = f.get_tensor(key)
        else:
            shard = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            state.update({k: v.clone() for k, v in shard.items() if PROJECTOR_MARKER in k})
    if not state:
        raise ValueError(f"{folder}: no '{PROJECTOR_MARKER}*' weights in the checkpoint (is this a LLaVA checkpoint?)")
    return {k[k.index(PROJECTOR_MARKER) + len(PROJECTOR_MARKER):]: v for k, v in state.items()}


def _token_id(tokenizer: PreTrainedTokenizerBase, token: str, folder: Path) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"{folder}: the tokenizer lacks the image token {token!r} that the reference adds")
    return token_id


def load_reference(
    path: str | Path,
    vision_tower: str | None = None,
    dtype: torch.dtype | None = None,
    attn_implementation: str = "sdpa",
    device: str | torch.device | None = None,
    quantization_config: object | None = None,
) -> tuple[ExGraMedForConditionalGeneration, PreTrainedTokenizerBase, object]:
    """Load a reference-layout folder as (model, tokenizer, image processor), model in eval mode.

    `vision_tower` is a local CLIP folder or `local-dir:BIOMEDCLIP_DIR`; without it the config's
    `mm_vision_tower` is used when that names an existing local folder.
    """
    folder = Path(path)
    cfg = read_reference_config(folder)
    tower_path = vision_tower or cfg.get("mm_vision_tower")
    if not tower_path or not (Path(str(tower_path).removeprefix("local-dir:")).is_dir()):
        raise ValueError(
            f"{folder / 'config.json'}: mm_vision_tower={cfg.get('mm_vision_tower')!r} is not a local folder; "
            "download the vision tower (e.g. openai/clip-vit-large-patch14) and pass --vision-tower DIR"
        )
    tokenizer = AutoTokenizer.from_pretrained(str(folder), use_fast=True)
    if tokenizer.pad_token is None:  # no resize: the embedding matrix of a release is fixed
        tokenizer.pad_token = tokenizer.unk_token
    use_start_end = bool(cfg.get("mm_use_im_start_end", False))
    text_config = llama_config_from_reference(cfg, tokenizer)
    kwargs = {"quantization_config": quantization_config} if quantization_config is not None else {}
    # The folder is a valid LlamaForCausalLM checkpoint apart from its config; from_pretrained handles the
    # shards, meta-device init and dtype. The projector keys are read separately below.
    llm = LlamaForCausalLM.from_pretrained(
        str(folder), config=text_config, dtype=dtype, attn_implementation=attn_implementation, **kwargs
    )
    tower, vision_config, tower_type = load_vision_tower(str(tower_path), attn_implementation)
    dense = cfg.get("mm_dense_connector_type") or "none"
    expected = connector_input_dim(dense, tower.hidden_size)
    if cfg.get("mm_hidden_size") not in (None, expected):
        raise ValueError(
            f"{folder / 'config.json'}: mm_hidden_size={cfg['mm_hidden_size']} but the vision tower {tower_path} "
            f"with mm_dense_connector_type={dense!r} gives {expected}: wrong --vision-tower?"
        )
    config = ExGraMedConfig(
        text_config=llm.config,
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
    )
    config._attn_implementation = attn_implementation
    model = ExGraMedForConditionalGeneration(config, language_model=llm, vision_tower=tower)
    try:
        model.mm_projector.load_state_dict(read_projector_state(folder), strict=True)
    except RuntimeError as e:
        raise ValueError(
            f"{folder}: projector weights do not fit mm_projector_type={config.mm_projector_type!r}: {e}"
        ) from e
    dtype = dtype or next(llm.parameters()).dtype
    if dtype.is_floating_point:
        model.mm_projector.to(dtype)
        model.vision_tower.to(dtype)
    if device is not None and quantization_config is None:
        model.to(device)
    logger.info("loaded reference checkpoint %s with vision tower %s", folder, tower_path)
    return model.eval(), tokenizer, load_image_processor(str(tower_path))


def convert_reference(path: str | Path, vision_tower: str | None, out_dir: str | Path) -> Path:
    """Write a reference-layout checkpoint in this project's format (loadable by `load_pretrained`)."""
    from exgra_med.model.export_cli import check_output_dir, staged_output_dir

    check_output_dir(out_dir)
    model, tokenizer, processor = load_reference(path, vision_tower)
    with staged_output_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    logger.info("converted %s -> %s", path, out_dir)
    return Path(out_dir)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: exgra-med convert --from reference --in DIR --vision-tower DIR --out DIR."""
    p = argparse.ArgumentParser(prog="exgra-med convert", description=__doc__.splitlines()[0])
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
