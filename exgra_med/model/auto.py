"""Choosing the back end, once: from a folder's config.json when a model is loaded, from the model when one is built.

`load_backend(path, LoadOptions(...))` is how eval and serve load any model; `backend_for(model, ...)` wraps a model
already in memory (training's in-loop VQA scoring); `model_family(path)` names the family of a folder without loading
it (training picks its builder with it). The settings a model was trained with (prompt template, image aspect ratio)
are read from its checkpoint (`recorded_settings`); a flag that disagrees wins, with a one-line warning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import ProcessorMixin
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
from transformers.utils import is_flash_attn_2_available

from exgra_med.conversation import get_template
from exgra_med.data.images import ASPECT_RATIOS, DEFAULT_ASPECT_RATIO
from exgra_med.errors import UserError
from exgra_med.io import read_json
from exgra_med.model.backend import Backend
from exgra_med.model.checkpoint import check_weights, load_model, resolve_dtype
from exgra_med.model.config import ExGraMedConfig
from exgra_med.model.hub import resolve_path
from exgra_med.model.llava_backend import LlavaBackend
from exgra_med.model.native.aligned import AlignedVLM
from exgra_med.model.native.backend import CHAT_TEMPLATE_NAME, NativeBackend, load_native
from exgra_med.model.native.backend import QUANT_SKIP_MODULES as NATIVE_QUANT_SKIP
from exgra_med.model.quantization import QUANT_BITS, QUANT_SKIP_MODULES, inference_bnb_config
from exgra_med.model.reference import is_reference_config

logger = logging.getLogger(__name__)

FAMILIES = ("llava", "native")
# The --dtype choices of the commands that load a model (default: `checkpoint.resolve_dtype`).
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Preprocessing and prompting choices a training run records in its checkpoint's config.json.
RECORDED_SETTINGS = ("conv_template", "image_aspect_ratio")


def native_model_type(path: str | Path) -> str | None:
    """The `model_type` of a folder that `AutoModelForImageTextToText` loads in its own format (qwen2_5_vl, gemma3,
    llava_onevision, llava, ...), None for anything else: this project's checkpoints, released reference-layout
    LLaVA-Med folders (whose model_type is also "llava"), plain LLM folders, or a folder without config.json."""
    return _native_type(_config(path))


def _native_type(config: dict) -> str | None:
    model_type = config.get("model_type")
    if (model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES or model_type == ExGraMedConfig.model_type
            or is_reference_config(config)):
        return None
    return model_type


def _config(path: str | Path) -> dict:
    file = Path(path) / "config.json"
    try:
        config = read_json(file) if file.is_file() else {}
    except ValueError:
        return {}
    return config if isinstance(config, dict) else {}


def resolve_model_path(name: str | Path) -> str:
    """The local folder of `name` (a folder, or a Hub id in the cache / downloadable)."""
    return resolve_path(str(name), "model", require=("config.json",))


def model_family(name: str | Path) -> str:
    """"native" for a transformers-native VLM folder (or Hub id), "llava" for everything else (this project's
    checkpoints, reference-layout folders, plain LLM folders built into a LLaVA-style model)."""
    try:
        folder = resolve_model_path(name)
    except (OSError, ValueError):  # the LLaVA loaders report a missing folder in their own words
        return "llava"
    return "native" if native_model_type(folder) is not None else "llava"


def recorded_settings(path: str | Path) -> dict[str, str]:
    """The settings a checkpoint was trained with (`RECORDED_SETTINGS` found in its config.json), read without
    loading it; empty for folders that record none (older checkpoints, released models)."""
    try:
        return _recorded(_config(resolve_model_path(path)))
    except (OSError, ValueError):
        return {}


def _recorded(config: dict) -> dict[str, str]:
    return {k: config[k] for k in RECORDED_SETTINGS if isinstance(config.get(k), str) and config[k]}


def choose_setting(name: str, given: str | None, recorded: dict[str, str], default: str, where: str) -> str:
    """An explicit flag (`given`), else the checkpoint's recorded value, else `default`; a flag that disagrees with
    the recorded value wins, with one warning line."""
    found = recorded.get(name)
    if given is None:
        return found or default
    if found is not None and given != found:
        logger.warning("%s was trained with %s=%s; using %s=%s as asked", where, name, found, name, given)
    return given


@dataclass
class LoadOptions:
    """How to load a model for answering: placement, precision, quantisation and the prompt / image settings
    (None: what the checkpoint recorded, else the command's default)."""

    device: str | None = None  # default: cuda when a GPU is visible, else cpu
    dtype: torch.dtype | None = None  # default: bfloat16 on CUDA, float32 on the CPU
    attn_implementation: str = "sdpa"
    bits: int = 16  # 4 or 8: bitsandbytes weights (CUDA)
    vision_tower: str | None = None  # reference-layout LLaVA-Med folders whose config names no local tower
    template: str | None = None
    image_aspect_ratio: str | None = None

    def __post_init__(self):
        if self.bits not in QUANT_BITS:
            raise ValueError(f"bits must be one of {QUANT_BITS}, got {self.bits}")
        if self.image_aspect_ratio is not None and self.image_aspect_ratio not in ASPECT_RATIOS:
            raise ValueError(f"image_aspect_ratio must be one of {ASPECT_RATIOS}, got {self.image_aspect_ratio!r}")


def default_device() -> str:
    """`cuda` when a GPU is visible, else `cpu`."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str) -> None:
    """Refuse (`UserError`, naming --device) a CUDA device that torch cannot see, before any weights load."""
    try:
        where = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise UserError(f"--device {device!r}: not a device (auto, cpu, cuda, cuda:N)") from e
    if where.type != "cuda":
        return
    if not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA GPU is visible to torch; use --device cpu (or auto)")
    if where.index is not None and where.index >= torch.cuda.device_count():
        raise UserError(f"--device {device}: torch sees {torch.cuda.device_count()} CUDA GPU(s), numbered from 0")


def flash_attention_available() -> bool:
    """Whether transformers can run flash_attention_2 here (the flash-attn package and a CUDA GPU)."""
    return is_flash_attn_2_available()


def check_attn_implementation(name: str) -> None:
    """Refuse (`UserError`, naming --attn-implementation) flash_attention_2 where it cannot run, before loading."""
    if name == "flash_attention_2" and not flash_attention_available():
        raise UserError("--attn-implementation flash_attention_2 needs the flash-attn package "
                        "(pip install 'exgra-med[flash]') and a CUDA GPU; use sdpa")


def load_backend(path: str, options: LoadOptions | None = None, default_template: str = "llava_med") -> Backend:
    """The back end of the model in `path` (a folder or a Hub id), loaded as `options` say, in eval mode.
    `default_template` is the prompt template of a LLaVA-style checkpoint that records none. A device, attention
    kernel or weights folder that cannot work is refused in one line before any weights load."""
    options = options or LoadOptions()
    if options.device is not None:
        check_device(options.device)
    check_attn_implementation(options.attn_implementation)
    device = options.device or default_device()
    dtype = resolve_dtype(options.dtype, device)
    folder = resolve_model_path(path)
    check_weights(folder)
    config = _config(folder)
    recorded = _recorded(config)
    aspect = choose_setting("image_aspect_ratio", options.image_aspect_ratio, recorded, DEFAULT_ASPECT_RATIO, path)
    if _native_type(config) is not None:
        if options.vision_tower:
            raise UserError(f"--vision-tower: {path} is a transformers-native VLM with its own vision encoder")
        if options.template not in (None, CHAT_TEMPLATE_NAME):
            logger.warning("prompt template %s ignored: %s is a transformers-native VLM, prompted with its own chat "
                           "template", options.template, path)
        quant = inference_bnb_config(options.bits, dtype, NATIVE_QUANT_SKIP)
        model, processor = load_native(folder, dtype, device, options.attn_implementation, quant)
        return NativeBackend(model.eval(), processor, aspect)
    template = choose_setting("conv_template", options.template, recorded, default_template, path)
    quant = inference_bnb_config(options.bits, dtype, QUANT_SKIP_MODULES)
    model, tokenizer, processor = load_model(folder, vision_tower=options.vision_tower, dtype=dtype, device=device,
                                             attn_implementation=options.attn_implementation,
                                             quantization_config=quant)
    return LlavaBackend(model, tokenizer, processor, get_template(template), aspect)


def backend_for(model, processing, image_processor=None, template: str = "simple",
                image_aspect_ratio: str = DEFAULT_ASPECT_RATIO) -> Backend:
    """The back end of a model in memory: a native VLM (bare, or under training with its alignment head) with its
    processor (a `ProcessorMixin`), or the LLaVA-style model with its tokenizer and image processor. A `Backend` is
    returned as is."""
    if isinstance(model, Backend):
        return model
    if isinstance(model, AlignedVLM):
        model = model.base_vlm
    if isinstance(processing, ProcessorMixin):
        return NativeBackend(model, processing, image_aspect_ratio)
    return LlavaBackend(model, processing, image_processor, get_template(template), image_aspect_ratio)
