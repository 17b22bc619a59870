"""Checkpoints: reading weights, writing files atomically, and loading a model from either checkpoint layout.

Layouts: this project's (config.json with model_type "exgra_med", written by `save_pretrained`) and the
reference's (LLaVA-Med v0 / ExGra-Med releases, format described in exgra_med.model.reference).

dtype policy (`resolve_dtype`), the same for every loader: an explicit dtype wins; otherwise bfloat16 on a
CUDA device, float32 on the CPU, and, when no device is named (conversion, training), the checkpoint's own
dtype. All parts (LLM, vision tower, projector) end in the one dtype.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers import AutoTokenizer, LlamaForCausalLM

from exgra_med.errors import UserError
from exgra_med.io import atomic_file, read_json
from exgra_med.model.config import ExGraMedConfig
from exgra_med.model.hub import resolve_path

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from exgra_med.model.modeling import ExGraMedForConditionalGeneration

logger = logging.getLogger(__name__)

WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


# --- reading -----------------------------------------------------------------------------------------------
def weight_files(folder: str | Path, keep: Callable[[str], bool] | None = None) -> list[Path]:
    """The weight files of a checkpoint folder: the shards of its index, else model.safetensors or
    pytorch_model.bin. With `keep`, only the shards the index says hold a kept key."""
    folder = Path(folder)
    for index in WEIGHT_INDEXES:
        if (folder / index).is_file():
            weight_map = read_json(folder / index)["weight_map"]
            names = {f for k, f in weight_map.items() if keep is None or keep(k)}
            return [folder / name for name in sorted(names)]
    files = [folder / n for n in WEIGHT_FILES if (folder / n).is_file()]
    if not files:
        raise FileNotFoundError(f"{folder}: no weights ({', '.join(WEIGHT_FILES)} or a sharded index)")
    return files[:1]


def check_weights(folder: str | Path) -> list[Path]:
    """The weight files of a model folder (`weight_files`), checked before anything loads them: every shard its index
    names exists, and every safetensors file is complete (its header read, a file cut short by an interrupted download
    or copy refused). Raises `FileNotFoundError` / `UserError` naming the file."""
    files = weight_files(folder)
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: weight files named by its index are missing: {', '.join(missing[:5])}")
    for file in files:
        if file.suffix != ".safetensors":
            continue
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except SafetensorError as e:
            raise UserError(f"{file}: not a complete safetensors file ({e}); an interrupted download or copy? "
                            "Fetch it again") from e
    return files


def weights_fingerprint(folder: str | Path, samples: int = 16, chunk: int = 1 << 16) -> str | None:
    """A digest of the weights in a model folder, cheap at any size: for every weight file at its top (`*.safetensors`,
    `*.bin`, `*.pt`: the model's shards, a projector, an alignment head), its name, its size and `samples` pieces of
    `chunk` bytes spread over it, the first holding a safetensors file's header. Retraining into the same folder
    changes the values everywhere, so it changes the digest; None when the folder holds no weight file."""

    files = sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin", ".pt"))
    if not files:
        return None
    digest = hashlib.blake2b(digest_size=12)
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.name}\0{size}\0".encode())
        with file.open("rb") as f:
            for k in range(samples):
                f.seek(size * k // samples)
                digest.update(f.read(chunk))
    return "blake2b:" + digest.hexdigest()


def read_weights(path: str | Path, keep: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """All tensors (or those whose key `keep` accepts) of a weights file (.safetensors, .bin/.pt) or a checkpoint
    folder (single file or sharded index), on the CPU. A filtered read loads only the kept tensors."""
    path = Path(path)
    if path.is_dir():
        files = weight_files(path, keep)
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(f"{path}: no such weights file or checkpoint folder")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open is not iterable
                    if keep is None or keep(key):
                        state[key] = f.get_tensor(key)
        elif keep is None:
            state.update(torch.load(file, map_location="cpu", weights_only=True))
        else:  # memory-mapped, so a filtered read of a large shard copies only what it keeps
            shard = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            state.update({k: v.clone() for k, v in shard.items() if keep(k)})
    return state


# --- writing -----------------------------------------------------------------------------------------------
def write_safetensors(state: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None) -> Path:
    """Write `state` as one safetensors file, atomically (tensors moved to the CPU and made contiguous)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", **(metadata or {})})
    return Path(path)


def write_json(obj: Any, path: str | Path) -> Path:
    """Write `obj` as indented JSON with sorted keys (as transformers writes config.json), atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return Path(path)


def write_weights(
    state: dict[str, torch.Tensor], folder: str | Path, max_shard_size: int | str = "5GB"
) -> list[Path]:
    """Write a model's weights into `folder` as transformers does: model.safetensors, or shards plus
    model.safetensors.index.json. Each file is atomic; use `staged_output_dir` for the folder as a whole."""
    folder = Path(folder)
    split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_size)
    written = [write_safetensors({k: state[k] for k in keys}, folder / filename)
               for filename, keys in split.filename_to_tensors.items()]
    if split.is_sharded:
        index = {"metadata": {}, "weight_map": split.tensor_to_filename}
        written.append(write_json(index, folder / WEIGHT_INDEXES[0]))
    return written


def check_output_dir(out_dir: str | Path) -> None:
    """Raise FileExistsError unless `out_dir` is absent or an empty folder (checked before any slow loading)."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: output folder exists and is not empty; choose another --out")


@contextlib.contextmanager
def staged_output_dir(out_dir: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder to write into; on success it replaces `out_dir` (which must be absent
    or empty), on failure it is removed, so a crash never leaves a half-written checkpoint behind."""
    out = Path(out_dir)
    check_output_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --- loading -----------------------------------------------------------------------------------------------
def resolve_dtype(dtype: torch.dtype | None, device: str | torch.device | None) -> torch.dtype | None:
    """The dtype a model loads in: `dtype` when given, else bfloat16 on CUDA and float32 on the CPU; None (keep
    the checkpoint's own dtype) when no device is named."""
    if dtype is not None:
        return dtype
    if device is None:
        return None
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def is_exgra_med_checkpoint(path: str | Path) -> bool:
    """True when `path` holds a config.json of this project's model type."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    return read_json(cfg).get("model_type") == ExGraMedConfig.model_type


def recorded_conv_template(path: str | Path) -> str | None:
    """The prompt template a checkpoint was trained with (`conv_template` of its config.json), read without loading
    the model; None when the folder does not record one (older checkpoints, released reference-layout folders)."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return None
    value = read_json(cfg).get("conv_template")
    return value if isinstance(value, str) and value else None


def load_model(
    path: str | Path,
    *,
    vision_tower: str | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    attn_implementation: str = "sdpa",
    quantization_config: object | None = None,
    **config_overrides,
) -> tuple[ExGraMedForConditionalGeneration, PreTrainedTokenizerBase, object]:
    """(model in eval mode, tokenizer, image processor) from an ExGra-Med checkpoint or a reference-layout folder
    (a local folder or a Hub id, `exgra_med.model.hub.resolve_path`).

    `vision_tower` is needed by reference-layout folders whose config does not name a local tower folder.
    `dtype` follows `resolve_dtype`. With `quantization_config` (bitsandbytes) the LLM weights load quantised
    straight onto `device`; the vision tower and projector stay unquantised. `config_overrides` set config fields.
    """
    # The model modules are imported where they are used: they themselves read weights through this module.
    # lazy: import cycle: reference, vision and modeling import this module, and the loaders here sit above them
    from exgra_med.model.reference import is_reference_checkpoint

    path = resolve_path(path, "model", require=("config.json",))
    if not Path(path).is_dir():
        raise FileNotFoundError(f"{path}: model folder not found")
    check_weights(path)
    if quantization_config is not None and device is None:
        raise ValueError("quantised loading needs a device (bitsandbytes places the weights while loading)")
    dtype = resolve_dtype(dtype, device)
    if is_exgra_med_checkpoint(path):
        model, tokenizer, processor = _load_exgra_med(
            Path(path), dtype, device, attn_implementation, quantization_config, config_overrides
        )
    elif is_reference_checkpoint(path):
        model, tokenizer, processor = _load_reference(
            Path(path), vision_tower, dtype, device, attn_implementation, quantization_config, config_overrides
        )
    else:
        raise ValueError(
            f"{path}: neither an ExGra-Med checkpoint (config.json model_type 'exgra_med') nor a reference "
            "LLaVA-Med checkpoint (architectures ['LlavaLlamaForCausalLM'])"
        )
    if quantization_config is None:
        # Every part in one dtype: from_pretrained builds the vision tower from its own sub-config, whose saved
        # dtype would otherwise win, and the reference's projector comes from the raw weights.
        model.to(device=device, dtype=dtype or model.language_model.dtype)
    else:  # quantised weights are placed by from_pretrained and must not be cast
        for part in (model.vision_tower, model.mm_projector, model.alignment):
            if part is not None:
                part.to(device=device, dtype=dtype)
    logger.info("loaded %s (%s, %s%s)", path, device or "cpu", model.language_model.dtype,
                ", quantised" if quantization_config is not None else "")
    return model.eval(), tokenizer, processor


def _quantized(quantization_config: object | None, device: str | torch.device | None) -> dict:
    if quantization_config is None:
        return {}
    return {"quantization_config": quantization_config, "device_map": {"": device}}


def _load_exgra_med(path: Path, dtype, device, attn_implementation, quantization_config, config_overrides):
    # lazy: import cycle: reference, vision and modeling import this module, and the loaders here sit above them
    from exgra_med.model.modeling import ExGraMedForConditionalGeneration
    from exgra_med.model.vision import load_image_processor

    model = ExGraMedForConditionalGeneration.from_pretrained(
        str(path), dtype=dtype, attn_implementation=attn_implementation,
        **_quantized(quantization_config, device), **config_overrides,
    )
    tokenizer = AutoTokenizer.from_pretrained(str(path), use_fast=True)
    return model, tokenizer, load_image_processor(str(path))


def _load_reference(path: Path, vision_tower, dtype, device, attn_implementation, quantization_config,
                    config_overrides):
    # lazy: import cycle: reference, vision and modeling import this module, and the loaders here sit above them
    from exgra_med.model import reference
    from exgra_med.model.modeling import ExGraMedForConditionalGeneration

    # lazy: import cycle: reference, vision and modeling import this module, and the loaders here sit above them
    from exgra_med.model.vision import load_image_processor, load_vision_tower

    cfg = reference.read_reference_config(path)
    tower_path = reference.vision_tower_path(cfg, path, vision_tower)
    tokenizer = AutoTokenizer.from_pretrained(str(path), use_fast=True)
    if tokenizer.pad_token is None:  # no resize: the embedding matrix of a release is fixed
        tokenizer.pad_token = tokenizer.unk_token
    # The folder is a valid LlamaForCausalLM checkpoint apart from its config; from_pretrained handles the
    # shards, meta-device init and dtype. The projector keys are read separately below.
    llm = LlamaForCausalLM.from_pretrained(
        str(path), config=reference.llama_config_from_reference(cfg, tokenizer), dtype=dtype,
        attn_implementation=attn_implementation, **_quantized(quantization_config, device),
    )
    tower, vision_config, tower_type = load_vision_tower(tower_path, attn_implementation)
    config = reference.exgra_med_config(
        cfg, path, tokenizer, llm.config, vision_config, tower_type, tower.hidden_size, tower_path,
        **config_overrides,
    )
    config._attn_implementation = attn_implementation
    model = ExGraMedForConditionalGeneration(config, language_model=llm, vision_tower=tower)
    projector = read_weights(path, keep=lambda key: reference.PROJECTOR_MARKER in key)
    try:
        model.mm_projector.load_state_dict(reference.projector_state(projector, path), strict=True)
    except RuntimeError as e:
        raise ValueError(
            f"{path}: projector weights do not fit mm_projector_type={config.mm_projector_type!r}: {e}"
        ) from e
    logger.info("reference checkpoint %s with vision tower %s", path, tower_path)
    return model, tokenizer, load_image_processor(tower_path)
