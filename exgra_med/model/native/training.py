"""Building, saving and reloading a transformers-native VLM for training (`exgra-med train` on a native folder).

Trainable by default: the language model and the projector / merger (+ the alignment head); the vision encoder stays
frozen unless `--tune_vision_tower True`. `--freeze_backbone True` freezes the language model, `--lora_enable True`
trains LoRA adapters on its linear layers instead (folded into the weights when saved); `--bits 4|8` (QLoRA) loads
the language model quantised by bitsandbytes under those adapters, and `--use_liger_kernel True` patches Liger's
kernels onto the VLM. Every save writes the model in its own format, full precision (loadable with
`AutoModelForImageTextToText`), its processor, and the alignment head beside it (`head.ALIGNMENT_WEIGHTS`).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from torch import nn
from transformers import AutoModelForImageTextToText, AutoProcessor

from exgra_med.errors import UserError
from exgra_med.model.liger import apply_liger
from exgra_med.model.lora import merge_lora_state_dict
from exgra_med.model.native.aligned import AlignedVLM, load_alignment_head, save_alignment_head, text_hidden_size
from exgra_med.model.native.backend import QUANT_SKIP_MODULES
from exgra_med.model.quantization import bnb_config, skip_at_any_depth

logger = logging.getLogger(__name__)

# Modules (last name component) that map image features into the language model's space: trained with the LLM.
PROJECTOR_NAMES = ("multi_modal_projector", "merger", "deepstack_merger_list", "mm_projector", "connector",
                   "image_newline")
_PEFT_PREFIX = "base_model.model."
# Unquantised under --bits 4|8: the vision encoder, the projectors (trained in full) and the output head.
QLORA_SKIP_MODULES = tuple(dict.fromkeys((*QUANT_SKIP_MODULES, *PROJECTOR_NAMES)))


def check_native_flags(model_args) -> None:
    """Refuse the LLaVA-only flags, one line naming the flag, before anything is loaded."""
    fixed = {"vision_tower": None, "pretrain_mm_mlp_adapter": None, "tune_mm_mlp_adapter": False,
             "mm_dense_connector_type": "none"}
    for flag, default in fixed.items():
        if getattr(model_args, flag) != default:
            raise UserError(f"--{flag} {getattr(model_args, flag)}: {model_args.model_name_or_path} is a "
                            "transformers-native VLM with its own vision encoder and projector; drop the flag")


def projector_modules(vlm: nn.Module) -> list[tuple[str, nn.Module | nn.Parameter]]:
    """The projector / merger modules (and LLaVA-OneVision's `image_newline`) of a native VLM, by name."""
    found: list[tuple[str, nn.Module | nn.Parameter]] = []
    for name, module in vlm.named_modules():
        if name.split(".")[-1] in PROJECTOR_NAMES and not any(name.startswith(f + ".") for f, _ in found):
            found.append((name, module))
    found += [(n, p) for n, p in vlm.named_parameters() if n.split(".")[-1] in PROJECTOR_NAMES]
    return found


def lora_targets(vlm: nn.Module) -> list[str]:
    """Full names of the language model's linear layers (the LoRA targets; the output head excluded)."""
    decoder = vlm.get_decoder()
    prefix = next(n for n, m in vlm.named_modules() if m is decoder)
    return [f"{prefix}.{n}" for n, m in decoder.named_modules() if isinstance(m, nn.Linear)]


def vision_side_parameters(vlm: nn.Module) -> list[nn.Parameter]:
    """The parameters of a native VLM outside its language model (decoder, input embeddings, output head): the vision
    encoder, the projector / merger and whatever else lies between the image and the language model."""
    language = {id(p) for m in (vlm.get_decoder(), vlm.get_input_embeddings(), vlm.get_output_embeddings())
                if m is not None for p in m.parameters()}
    return [p for p in vlm.parameters() if id(p) not in language]


def set_native_trainable(model: AlignedVLM, model_args, activation_checkpointing: bool = False) -> None:
    """Projector (+ alignment head) always; the language model fully, or LoRA adapters on it (on its quantised
    weights with `--bits 4|8`), unless frozen; with `--tune_vision_tower` the vision encoder too."""
    model.requires_grad_(False)
    if model_args.lora_enable:
        quantized = is_quantized(model.vlm)
        if quantized:  # as QLoRA (and the LLaVA path): the unquantised weights in float32, the head too
            model.vlm = prepare_model_for_kbit_training(model.vlm, use_gradient_checkpointing=activation_checkpointing)
            if model.alignment is not None:
                model.alignment.float()
        lora = LoraConfig(r=model_args.lora_r, lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout,
                          target_modules=lora_targets(model.vlm))
        # Adapters in the weights' dtype: ZeRO-3 flattens each parameter group into one buffer of one dtype. QLoRA
        # (no ZeRO-3) keeps float32 adapters.
        model.vlm = get_peft_model(model.vlm, lora, autocast_adapter_dtype=quantized)
    elif not model_args.freeze_backbone:
        model.language_model.requires_grad_(True)
        model.get_output_embeddings().requires_grad_(True)
    projectors = projector_modules(model.base_vlm)
    if not projectors:
        logger.warning("%s: no projector module (%s) found; only the language model trains",
                       type(model.base_vlm).__name__, ", ".join(PROJECTOR_NAMES))
    for _, part in projectors:
        part.requires_grad_(True)
    if model_args.tune_vision_tower:
        for p in vision_side_parameters(model.base_vlm):
            p.requires_grad_(True)
    if model.alignment is not None:
        model.alignment.requires_grad_(True)


def build_native_model(path: str, model_args, training_args, dtype: torch.dtype | None):
    """(AlignedVLM with the trainable parts set, processor) from a native VLM folder, its weights in `dtype` (None: the
    folder's own); a head saved in the folder (a previous stage-2 run) is loaded when the alignment is on and it fits.
    `--bits 4|8`: the language model loads quantised onto the training device (the rest unquantised);
    `--use_liger_kernel True`: Liger's kernels on the VLM."""
    alignment = model_args.alignment_config(seed=training_args.seed)
    kernels = liger_kernels(training_args, alignment.enabled) if training_args.use_liger_kernel else None
    quantized = {}
    if model_args.bits < 16:
        if training_args.load_best_model_at_end:
            raise UserError(f"--bits {model_args.bits} with --load_best_model_at_end: a native VLM's checkpoints hold "
                            "merged full-precision weights, which do not load back into its quantised layers; drop "
                            "--load_best_model_at_end and pick the checkpoint by its logged score")

        config = bnb_config(model_args.bits, dtype or torch.float32, model_args.double_quant, model_args.quant_type)
        config.llm_int8_skip_modules = skip_at_any_depth(QLORA_SKIP_MODULES)
        # bitsandbytes quantises while placing the weights
        quantized = {"quantization_config": config, "device_map": {"": training_args.device}}
    if training_args.deepspeed and torch.distributed.is_available() and torch.distributed.is_initialized():
        # lazy: deepspeed is optional (the deepspeed extra)
        import deepspeed

        # As the LLaVA path: ZeRO-3 reads the world size from DeepSpeed's own communicator while loading.
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())
    vlm = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype,
                                                      attn_implementation=model_args.attn_implementation, **quantized)
    processor = AutoProcessor.from_pretrained(path)
    model = AlignedVLM(vlm, alignment)
    if model.alignment is not None:
        load_alignment_head(model, path)
    set_native_trainable(model, model_args, training_args.activation_checkpointing)
    if kernels is not None:
        apply_liger(model, **kernels)
    return model, processor


def liger_kernels(training_args, alignment: bool) -> dict[str, bool]:
    """`--liger_kernel_config` for a native VLM. With the alignment on, not Liger's fused linear cross-entropy: its
    forward of the VLM drops the image features the alignment's image nodes are made of."""
    kernels = dict(training_args.liger_kernel_config or {})
    if alignment:
        if kernels.get("fused_linear_cross_entropy"):
            raise UserError("--liger_kernel_config fused_linear_cross_entropy: Liger's fused forward of a native VLM "
                            "returns no image features, which the alignment needs; leave it out (the other kernels "
                            "apply)")
        kernels["fused_linear_cross_entropy"] = False
    return kernels


def is_quantized(vlm: nn.Module) -> bool:
    """Whether `vlm` (possibly PEFT-wrapped) holds bitsandbytes-quantised weights (`--bits 4|8`)."""
    get_base = getattr(vlm, "get_base_model", None)
    base = get_base() if callable(get_base) else vlm
    return getattr(base, "hf_quantizer", None) is not None


def save_native(model: AlignedVLM, state: dict[str, torch.Tensor], out_dir: str | Path, processor,
                lora_alpha: float) -> None:
    """Write the model in its own format (LoRA adapters folded in), the processor, and the alignment head beside."""
    vlm_state = {k[len("vlm."):]: v for k, v in state.items() if k.startswith("vlm.")}
    head_state = {k[len("alignment."):]: v for k, v in state.items() if k.startswith("alignment.")}
    if any(".lora_A." in k for k in vlm_state):
        # A QLoRA run's 4-/8-bit base weights are dequantised (float32) before the adapters are folded in.
        merged, n = merge_lora_state_dict(vlm_state, lora_alpha)
        vlm_state = {k.removeprefix(_PEFT_PREFIX): v for k, v in merged.items()}
        logger.info("folded %d LoRA adapters into the saved weights", n)
    base = model.base_vlm
    # A quantised model's save_pretrained writes its own packed weights and quantization_config: save through a
    # weightless dense copy instead.
    (dense_twin(base) if is_quantized(base) else base).save_pretrained(out_dir, state_dict=vlm_state)
    processor.save_pretrained(out_dir)
    if model.alignment is not None and head_state:
        save_alignment_head(head_state, out_dir, model.alignment_config, text_hidden_size(model.base_vlm))


def dense_twin(vlm: nn.Module) -> nn.Module:
    """A weightless (meta) float32 copy of a quantised model, its config without the quantisation: what the dense
    weights of a QLoRA run are saved through."""
    config = copy.deepcopy(vlm.config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    with torch.device("meta"):
        twin = type(vlm)._from_config(config, dtype=torch.float32)
    twin.generation_config = copy.deepcopy(vlm.generation_config)
    return twin


def load_native_weights(model: AlignedVLM, folder: str | Path) -> None:
    """Load a saved native folder (weights in the model's own format, head file) into `model`. Under LoRA the saved
    weights hold the adapters folded in: they go to the base layers and the adapters are zeroed (the same model)."""
    base = model.base_vlm
    saved = type(base).from_pretrained(folder, dtype=base.dtype).state_dict()
    own = base.state_dict()
    state = {k: saved[k.replace(".base_layer.", ".")] for k in own if ".lora_" not in k}
    missing = [k for k in own if ".lora_" not in k and k.replace(".base_layer.", ".") not in saved]
    if missing:
        raise ValueError(f"{folder}: the saved weights lack {missing[:3]} ... of this model")
    base.load_state_dict(state, strict=False)
    with torch.no_grad():
        for name, param in base.named_parameters():
            if ".lora_B." in name:
                param.zero_()
    load_alignment_head(model, folder)


