"""`AlignedVLM`: the ExGra-Med alignment objective as a head on any transformers-native VLM.

The model itself stays what `AutoModelForImageTextToText` loaded; the head only adds the alignment loss to its LM
loss (METHOD section 4, `loss = lm_loss + alpha * align_loss`):
- image node of a sample: the model's own image features after its projector / merger (`image_outputs.pooler_output`
  of the forward that computes the LM loss, the output of `get_image_features`), mean over all tokens of all of that
  sample's images;
- text nodes and the loss: `exgra_med.model.alignment_head.AlignmentHead`, the one head of every model (the
  response and extended texts through the model's language model, pooled, and the configured objective).
The head's weights and options are saved beside the model in their own files (`ALIGNMENT_WEIGHTS`,
`ALIGNMENT_CONFIG`), so a trained folder is still a plain checkpoint of the base architecture.

Padding-free batches (`exgra_med.data.chat.pack_encoded`: rows of samples, `position_ids` restarting per sample, no
attention mask, images in `row_order`): the model runs without a KV cache (transformers finds the samples of a row
from the position ids only then); models with multimodal RoPE (`get_rope_index`, the Qwen2-VL family) get each
sample's own 3D positions in the 4-row packed form (`exgra_med.model.packing.packed_rope_positions`); the image
nodes go back to batch order, and the head's text pass packs too. Which architectures pack:
`exgra_med.model.packing.check_native_padding_free`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.utils import ModelOutput

from exgra_med.align.config import AlignmentConfig, build_alignment_loss
from exgra_med.io import atomic_file, read_json, write_json_atomic
from exgra_med.model.alignment_head import AlignmentHead, AlignmentTexts, sample_image_features
from exgra_med.model.packing import is_packed, packed_rope_positions

logger = logging.getLogger(__name__)

ALIGNMENT_WEIGHTS = "exgra_med_alignment.safetensors"
ALIGNMENT_CONFIG = "exgra_med_alignment.json"
# Batch keys that are the head's, not the model's.
HEAD_INPUTS = ("images_per_sample", "response_ids", "response_mask", "extended_ids", "extended_mask", "ids",
               "num_items_in_batch", "row_order")


@dataclass
class AlignedVLMOutput(ModelOutput):
    """`loss` is what the optimiser sees; `lm_loss` and `align_loss` are its parts, `align_parts` the alignment's."""

    loss: torch.FloatTensor | None = None
    lm_loss: torch.FloatTensor | None = None
    align_loss: torch.FloatTensor | None = None
    align_parts: dict[str, torch.FloatTensor] | None = None
    logits: torch.FloatTensor | None = None


def text_hidden_size(vlm: nn.Module) -> int:
    """The language model's hidden size D (the image features after the projector have it too)."""
    return int(vlm.config.get_text_config().hidden_size)


class AlignedVLM(nn.Module):
    """A native VLM (`vlm`, possibly wrapped by PEFT) and the alignment head `config` names (None when it is off)."""

    def __init__(self, vlm: nn.Module, config: AlignmentConfig):
        super().__init__()
        if config.enabled and not config.multi_graph and config.simi_type != "average":
            raise ValueError(f"--simi_type {config.simi_type} needs image tokens of one length per sample; native "
                             "VLMs (dynamic resolution, several images) support the contrastive ablation with "
                             "--simi_type average")
        self.vlm = vlm
        self.alignment_config = config
        with torch.random.fork_rng(devices=[]):
            # Seeded by the run's seed: the same initial head whatever loading drew before (ZeRO-3, FSDP, DDP).
            torch.manual_seed(config.seed)
            self.alignment = build_alignment_loss(config, text_hidden_size(vlm))
        if self.alignment is not None:
            self.alignment.to(next(vlm.parameters()).dtype)
        # FSDP wraps these layer classes (accelerate reads them from the model it is given).
        self._no_split_modules = sorted(getattr(self.base_vlm, "_no_split_modules", None) or [])

    # --- what the Trainer and PEFT read from a model -------------------------------------------------------
    @property
    def base_vlm(self) -> nn.Module:
        """The transformers model (PEFT's wrapping removed)."""
        get_base = getattr(self.vlm, "get_base_model", None)
        return get_base() if callable(get_base) else self.vlm

    @property
    def config(self):
        return self.base_vlm.config

    @property
    def generation_config(self):
        return self.base_vlm.generation_config

    @property
    def language_model(self) -> nn.Module:
        """The decoder the text nodes go through (with LoRA layers when PEFT wraps the model)."""
        return self.base_vlm.get_decoder()

    def get_input_embeddings(self) -> nn.Module:
        return self.base_vlm.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.base_vlm.get_output_embeddings()

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, every_n_layers: int = 1,
                                        offload: bool = False) -> None:
        """The model's activation checkpointing; the extra text pass goes through the same layers, so it applies."""
        self.base_vlm.activation_checkpointing_enable(activation_checkpointing_kwargs, every_n_layers=every_n_layers,
                                                      offload=offload)

    def enable_input_require_grads(self) -> None:
        self.base_vlm.enable_input_require_grads()

    # --- forward -------------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, images_per_sample: list[int] | None = None,
                response_ids: torch.LongTensor | None = None, response_mask: torch.Tensor | None = None,
                extended_ids: torch.LongTensor | None = None, extended_mask: torch.Tensor | None = None,
                row_order: list[int] | None = None, **model_inputs: Any) -> AlignedVLMOutput:
        """The model's forward (LM loss with `labels`), plus `alpha * align_loss` when alignment texts are given.
        A padding-free batch (see the module docstring) lists its samples' batch indices in row order in
        `row_order`; `images_per_sample` and the alignment texts stay in batch order."""
        for key in ("ids", "num_items_in_batch"):
            model_inputs.pop(key, None)
        packed = is_packed(model_inputs.get("position_ids"), attention_mask)
        num_samples = len(images_per_sample) if images_per_sample is not None else input_ids.shape[0]
        order = list(row_order) if packed and row_order is not None else list(range(num_samples))
        if packed:
            if model_inputs.get("use_cache"):
                raise ValueError("a padding-free batch cannot use a KV cache")
            model_inputs["use_cache"] = False  # a cache would hide the samples' boundaries from the attention mask
            model_inputs["position_ids"] = self.packed_position_ids(input_ids, **model_inputs)
        out = self.vlm(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **model_inputs)
        align = None
        if self.alignment is not None and response_ids is not None and labels is not None:
            counts = None if images_per_sample is None else [images_per_sample[i] for i in order]
            image = self.image_nodes(getattr(out, "image_outputs", None), counts, num_samples)  # (B, D), row order
            image = image[torch.tensor(order, device=image.device).argsort()]  # (B, D), batch order
            texts = AlignmentTexts(response_ids, response_mask, extended_ids, extended_mask)
            align = self.alignment_head(image[:, None, :], texts, self.base_vlm, packed=packed)
        loss = out.loss if align is None else out.loss + self.alignment_config.alpha * align.loss
        return AlignedVLMOutput(loss=loss, lm_loss=out.loss, align_loss=None if align is None else align.loss,
                                align_parts=None if align is None else dict(align.parts), logits=out.logits)

    @property
    def rope_index(self):
        """The model's multimodal RoPE index (`get_rope_index` of the Qwen2-VL family), None for 1-D positions."""
        return getattr(getattr(self.base_vlm, "model", None), "get_rope_index", None)

    def packed_position_ids(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                            **model_inputs: Any) -> torch.Tensor:
        """The position ids a packed batch gives the model: the restarting (R, C) positions, or under multimodal RoPE
        the (4, R, C) form with each sample's own 3D positions."""
        if self.rope_index is None or position_ids.dim() != 2:
            return position_ids
        if model_inputs.get("mm_token_type_ids") is None:
            raise ValueError(f"{type(self.base_vlm).__name__}: a padding-free batch needs mm_token_type_ids (the "
                             "processor's token types) to place each sample's 3D positions")
        return packed_rope_positions(self.rope_index, input_ids, position_ids, model_inputs["mm_token_type_ids"],
                                     model_inputs.get("image_grid_thw"))

    def image_nodes(self, image_outputs, images_per_sample: list[int] | None, batch_size: int) -> torch.Tensor:
        """(B, D): each sample's image features (after the projector), mean over the tokens of all its images."""
        if image_outputs is None or getattr(image_outputs, "pooler_output", None) is None:
            raise ValueError(f"{type(self.base_vlm).__name__} returned no image features (image_outputs); the "
                             "alignment needs every sample of the batch to hold an image")
        counts = images_per_sample or [1] * batch_size
        if len(counts) != batch_size:
            raise ValueError(f"images per sample {list(counts)} for a batch of {batch_size} samples")
        return sample_image_features(image_outputs.pooler_output, counts)[:, 0]  # (B, D)

    @property
    def alignment_head(self) -> AlignmentHead | None:
        """The alignment head over this model's objective (`self.alignment`), None when the alignment is off."""
        return None if self.alignment is None else AlignmentHead(self.alignment, self.alignment_config)


# --- the head's files --------------------------------------------------------------------------------------
def save_alignment_head(state: dict[str, torch.Tensor], out_dir: str | Path, config: AlignmentConfig,
                        hidden_size: int) -> None:
    """Write the head's weights (`alignment.*` keys stripped) and options beside a saved model."""
    out_dir = Path(out_dir)
    with atomic_file(out_dir / ALIGNMENT_WEIGHTS) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp), metadata={"format": "pt"})
    write_json_atomic(out_dir / ALIGNMENT_CONFIG, {"alignment_config": config.to_dict(), "hidden_size": hidden_size})


def read_head_config(folder: str | Path) -> dict | None:
    """The saved head's options (`alignment_config`, `hidden_size`), None when the folder holds no head."""
    path = Path(folder) / ALIGNMENT_CONFIG
    return read_json(path) if path.is_file() else None


def load_alignment_head(model: AlignedVLM, folder: str | Path) -> bool:
    """Load a saved head into `model.alignment` when both exist and fit; returns whether it was loaded."""
    path = Path(folder) / ALIGNMENT_WEIGHTS
    if model.alignment is None or not path.is_file():
        return False

    state = load_file(str(path))
    try:
        model.alignment.load_state_dict(state, strict=True)
    except RuntimeError as e:
        logger.warning("%s: the saved alignment head does not fit the configured one (%s); starting it afresh",
                       path, str(e).splitlines()[0])
        return False
    logger.info("alignment head loaded from %s", path)
    return True
