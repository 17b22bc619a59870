"""`ExGraMedForConditionalGeneration`: vision tower -> connector -> image tokens merged into any HF causal LM.

In stage 2 the same forward also computes the ExGra-Med alignment loss (METHOD section 4) and returns
`loss = lm_loss + alpha * align_loss`, both parts (and the alignment's own parts) as tensors for the trainer to log.
The alignment options are `config.alignment_config` (`exgra_med.align.AlignmentConfig`).

Batches come padded (`attention_mask` (B, T)) or padding-free (`exgra_med.model.packing`: samples side by side in
rows (R, C), `position_ids` restarting per sample, no mask); both give the same losses.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModelForCausalLM, Cache, PreTrainedModel
from transformers.utils import ModelOutput

from exgra_med.align.config import build_alignment_loss
from exgra_med.model.alignment_head import AlignmentHead, AlignmentTexts
from exgra_med.model.config import ExGraMedConfig
from exgra_med.model.connector import (
    build_projector,
    check_pool_stride,
    connector_input_dim,
    num_image_tokens,
    pool_patches,
    select_features,
)
from exgra_med.model.packing import images_in_row_order, is_packed, packs_in_one_row, segment_index
from exgra_med.model.vision import VisionTower

logger = logging.getLogger(__name__)


@dataclass
class ExGraMedOutput(ModelOutput):
    """Forward output: `loss` is what the optimiser sees; `lm_loss` and `align_loss` are its parts.

    `align_parts` holds the alignment loss's own parts by name (multi-graph: one per modality, `image`, `response`,
    `extended`, each the mean over both matching directions; contrastive: `image_response`).
    """

    loss: torch.FloatTensor | None = None
    lm_loss: torch.FloatTensor | None = None
    align_loss: torch.FloatTensor | None = None
    align_parts: dict[str, torch.FloatTensor] | None = None
    logits: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    image_hidden_states: torch.FloatTensor | None = None


def build_alignment(config: ExGraMedConfig) -> nn.Module | None:
    """The alignment objective `config.alignment_config` names, over LLM-sized features; None when it is off."""
    return build_alignment_loss(config.alignment_config, config.text_config.hidden_size)


def _mark_initialized(module: nn.Module) -> None:
    # Weights loaded elsewhere (from_pretrained of a part) must not be re-initialised by post_init().
    for m in module.modules():
        m._is_hf_initialized = True


class ExGraMedForConditionalGeneration(PreTrainedModel):
    """LLaVA-style medical VLM with the optional ExGra-Med alignment objective."""

    config_class = ExGraMedConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # A checkpoint trained with the alignment loss also loads into a model without it (e.g. for fine-tuning).
    _keys_to_ignore_on_load_unexpected = [r"^alignment\."]

    def __init__(
        self,
        config: ExGraMedConfig,
        language_model: PreTrainedModel | None = None,
        vision_tower: VisionTower | None = None,
    ):
        super().__init__(config)
        attn = getattr(config, "_attn_implementation", None)
        if vision_tower is None:
            vision_tower = VisionTower(config.vision_config, config.vision_tower_type, attn)
        else:
            _mark_initialized(vision_tower)
        self.vision_tower = vision_tower
        check_pool_stride(vision_tower.num_patches, config.mm_spatial_pool_stride)
        if config.mm_vision_select_feature != "patch" and not vision_tower.has_cls:
            raise ValueError(
                f"mm_vision_select_feature={config.mm_vision_select_feature!r} needs a vision tower with a CLS token "
                f"({config.vision_tower_type} {config.vision_config.get('model_type', '')} has none)"
            )
        in_dim = connector_input_dim(config.mm_dense_connector_type, vision_tower.hidden_size)
        self.mm_projector = build_projector(config.mm_projector_type, in_dim, config.text_config.hidden_size)
        if language_model is None:
            language_model = AutoModelForCausalLM.from_config(config.text_config)
        else:
            _mark_initialized(language_model)
        self.language_model = language_model
        self.alignment = build_alignment(config)
        if self.alignment is not None and not any(p.is_meta for p in self.alignment.parameters()):
            # Built with real weights here (from parts, or partitioned under ZeRO-3): keep the construction's
            # initialisation instead of drawing it again in post_init(). When transformers builds the model on
            # the meta device to load a checkpoint, the head stays unmarked and `_init_weights` initialises it.
            _mark_initialized(self.alignment)
        if config.freeze_vision_tower:
            self.vision_tower.requires_grad_(False)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # transformers initialises missing weights leaf by leaf through this method (fresh builds, and checkpoints
        # saved without the alignment head). Its generic rule knows torch's layers only; the alignment head holds
        # torch_geometric layers and plain parameters, so each of its modules with parameters of its own
        # re-initialises itself exactly as at construction.
        super()._init_weights(module)
        if (
            self.alignment is not None
            and hasattr(module, "reset_parameters")
            and next(module.parameters(recurse=False), None) is not None
            and any(module is m for m in self.alignment.modules())
        ):
            module.reset_parameters()

    # --- plumbing delegated to the language model -------------------------------------------------------
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def resize_token_embeddings(self, new_num_tokens: int | None = None, **kwargs) -> nn.Embedding:
        """Resize the LLM's vocabulary (e.g. after adding the image tokens) and record it in the config."""
        emb = self.language_model.resize_token_embeddings(new_num_tokens, **kwargs)
        self.config.text_config.vocab_size = emb.num_embeddings
        return emb

    @property
    def num_image_tokens(self) -> int:
        """Image tokens each image occupies in the LLM input."""
        cfg = self.config
        return num_image_tokens(
            cfg.mm_dense_connector_type, self.vision_tower.num_patches, cfg.mm_spatial_pool_stride,
            cfg.mm_vision_select_feature,
        )

    # --- image features ----------------------------------------------------------------------------------
    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images -> (B, N, D) projected image tokens."""
        tower_dtype = next(self.vision_tower.parameters()).dtype
        frozen = not any(p.requires_grad for p in self.vision_tower.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            out = self.vision_tower(pixel_values.to(tower_dtype))
            feats = select_features(
                out,
                self.config.mm_vision_select_layer,
                self.config.mm_dense_connector_type,
                self.config.num_l,
                open_clip=self.config.vision_tower_type == "open_clip",
                select_feature=self.config.mm_vision_select_feature,
            )
            feats = pool_patches(feats, self.config.mm_spatial_pool_stride)
        proj_dtype = next(self.mm_projector.parameters(), feats).dtype
        return self.mm_projector(feats.to(proj_dtype))  # (B, N, D)

    def merge_image_features(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, segments: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token embeddings with every `<im_patch>` position replaced by an image feature, in order.

        Returns (inputs_embeds (B, T, D), image_features (B_img, N, D) or None). Each sample either holds no image
        token or exactly N of them; images are matched to the samples that hold tokens, in batch order. Packed rows
        (R, C) give `segments` (R * C,), the sample of each token (`exgra_med.model.packing.segment_index`).
        """
        embeds = self.get_input_embeddings()(input_ids)  # (B, T, D)
        image_mask = input_ids == self.config.image_token_id  # (B, T)
        if segments is None:
            per_sample = image_mask.sum(dim=1)
        else:  # rows of packed samples: count each sample's image tokens
            per_sample = torch.bincount(segments[image_mask.flatten()], minlength=int(segments[-1]) + 1)
        if pixel_values is None:
            if bool(image_mask.any()):
                raise ValueError(
                    f"input holds {int(per_sample.sum())} image tokens but no pixel_values were given"
                )
            if self.training:
                # Keep the projector in the graph so that DDP/ZeRO see every trainable parameter used.
                embeds = embeds + 0.0 * sum(p.sum() for p in self.mm_projector.parameters())
            return embeds, None
        features = self.get_image_features(pixel_values)  # (B_img, N, D)
        n = features.shape[1]
        with_image = per_sample > 0
        if int(with_image.sum()) != features.shape[0] or bool((per_sample[with_image] != n).any()):
            raise ValueError(
                "image tokens and image features disagree: samples hold "
                f"{per_sample.tolist()} image tokens, but {features.shape[0]} images of {n} features each were given "
                "(check mm_use_im_start_end, the number of image tokens of the tokenizer/dataset and the tower)"
            )
        embeds = embeds.masked_scatter(image_mask.unsqueeze(-1), features.to(embeds.dtype))
        return embeds, features

    # --- forward -----------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        row_order: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        image_mask: torch.BoolTensor | None = None,
        response_ids: torch.LongTensor | None = None,
        response_mask: torch.Tensor | None = None,
        extended_ids: torch.LongTensor | None = None,
        extended_mask: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> ExGraMedOutput:
        """LM forward on merged image+text embeddings; adds `alpha * align_loss` when alignment inputs are given.

        `pixel_values` holds one image per sample holding image tokens, or one per sample with `image_mask`
        (B,) marking the real ones (the collator's layout). A padding-free batch (rows of samples, `position_ids`
        restarting per sample, no `attention_mask`) keeps its images and alignment texts per sample in batch order;
        `row_order` (B,) lists the samples in the order the rows hold them (default: batch order).
        """
        kwargs.pop("num_items_in_batch", None)  # the trainer averages per step; see ExGraMedTrainer
        kwargs.pop("ids", None)
        packed = is_packed(position_ids, attention_mask)
        segments = segment_index(position_ids) if packed else None  # (L,) sample of each token
        if packed:
            if use_cache or cache is not None:
                raise ValueError("a padding-free batch cannot use a KV cache")
            impl = self.language_model.config._attn_implementation
            if position_ids.shape[0] > 1 and packs_in_one_row(impl):
                raise ValueError(f"{impl} reads packed samples from one row only; got {position_ids.shape[0]} rows "
                                 "(DataCollator(..., padding_free=True, one_row=True))")
            # transformers detects the packed samples from the position ids only when no cache is given: the
            # LLM's config default (use_cache=True) would build one and give a causal mask ACROSS the samples.
            use_cache = False
        reordered = packed and row_order is not None and pixel_values is not None
        if reordered:  # the images go into the rows in row order; their features come back in batch order below
            pixel_values, image_mask, image_rows = images_in_row_order(pixel_values, image_mask, row_order)
        if pixel_values is not None and image_mask is not None:
            # The collator pads image-less samples with zero images; keep only the real ones.
            pixel_values = pixel_values[image_mask] if bool(image_mask.any()) else None
        image_features = None
        if inputs_embeds is None:
            inputs_embeds, image_features = self.merge_image_features(input_ids, pixel_values, segments)
            if reordered and image_features is not None:
                image_features = image_features[torch.argsort(image_rows)]  # (B_img, N, D) in batch order
        out = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            labels=labels,
            cache=cache,
            use_cache=use_cache,
            **kwargs,
        )
        lm_loss = out.loss
        align = None
        if self.alignment is not None and response_ids is not None and labels is not None:
            num_samples = response_ids.shape[0] if packed else input_ids.shape[0]  # packed: fillers are segments too
            if image_features is None or image_features.shape[0] != num_samples:
                raise ValueError("the alignment loss needs exactly one image per sample in the batch")
            texts = AlignmentTexts(response_ids, response_mask, extended_ids, extended_mask)
            align = self.alignment_head(image_features, texts, self.language_model, packed=packed)
        loss = lm_loss if align is None else lm_loss + self.config.alignment_config.alpha * align.loss
        return ExGraMedOutput(
            loss=loss,
            lm_loss=lm_loss,
            align_loss=None if align is None else align.loss,
            align_parts=None if align is None else dict(align.parts),
            logits=out.logits,
            cache=out.cache,
            hidden_states=out.hidden_states,
            image_hidden_states=image_features,
        )

    @property
    def alignment_head(self) -> AlignmentHead | None:
        """The alignment head over this model's objective (`self.alignment`), None when the alignment is off."""
        return None if self.alignment is None else AlignmentHead(self.alignment, self.config.alignment_config)

    # --- generation --------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **generate_kwargs,
    ) -> torch.LongTensor:
        """Greedy/sampled decoding with the LLM's KV cache; returns only the newly generated token ids.

        Batches must be LEFT padded so that every prompt ends at the last position.
        """
        embeds, _ = self.merge_image_features(input_ids, pixel_values)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self.language_model.generate(inputs_embeds=embeds, attention_mask=attention_mask, **generate_kwargs)

