"""`ExGraMedProcessor`: the image processor and tokenizer of a checkpoint as one transformers processor, so that
`AutoProcessor.from_pretrained` loads an ExGra-Med checkpoint like any other model (registered in
`exgra_med.model`). `<image>` in the text becomes the image tokens the model expects (`<im_start>` + N x
`<im_patch>` + `<im_end>`, as in training); images are preprocessed exactly as the dataset does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import BatchFeature, ProcessorMixin

from exgra_med.constants import DEFAULT_IMAGE_TOKEN
from exgra_med.data.dataset import image_placeholder
from exgra_med.data.images import preprocess_image
from exgra_med.model.config import ExGraMedConfig
from exgra_med.model.connector import num_image_tokens
from exgra_med.model.vision import VisionTower

_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision")


def image_token_count(config) -> int:
    """Tokens one image takes in the LLM input for an `ExGraMedConfig` (its vision tower built on the meta device,
    so nothing is allocated)."""
    with torch.device("meta"):
        tower = VisionTower(config.vision_config, config.vision_tower_type)
    return num_image_tokens(
        config.mm_dense_connector_type, tower.num_patches, config.mm_spatial_pool_stride,
        config.mm_vision_select_feature,
    )


class ExGraMedProcessor(ProcessorMixin):
    """Image processor + tokenizer; `processor(text=..., images=...)` gives `input_ids`, `attention_mask` and
    `pixel_values` ready for `ExGraMedForConditionalGeneration`. Prompts keep their template's text (e.g.
    `exgra_med.conversation.get_template("llava_med").render(...)`); only `<image>` is expanded."""

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        num_image_tokens: int = 256,
        mm_use_im_start_end: bool = True,
        image_aspect_ratio: str = "square",  # exgra_med.data.images.DEFAULT_ASPECT_RATIO, the reference's
        chat_template: str | None = None,
        **kwargs,
    ):
        self.num_image_tokens = num_image_tokens
        self.mm_use_im_start_end = mm_use_im_start_end
        self.image_aspect_ratio = image_aspect_ratio
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """As `ProcessorMixin.from_pretrained`; the image-token count and `<im_start>`/`<im_end>` use come from the
        checkpoint's config.json unless given."""
        if "num_image_tokens" not in kwargs or "mm_use_im_start_end" not in kwargs:
            hub = {k: kwargs[k] for k in _HUB_KWARGS if kwargs.get(k) is not None}
            config = ExGraMedConfig.from_pretrained(pretrained_model_name_or_path, **hub)
            kwargs.setdefault("num_image_tokens", image_token_count(config))
            kwargs.setdefault("mm_use_im_start_end", config.mm_use_im_start_end)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def expand_image_tokens(self, text: str) -> str:
        """`text` with each `<image>` replaced by the model's image tokens."""
        return text.replace(DEFAULT_IMAGE_TOKEN, image_placeholder(self.num_image_tokens, self.mm_use_im_start_end))

    def __call__(self, images=None, text: str | Sequence[str] | None = None, return_tensors: str = "pt",
                 **kwargs) -> BatchFeature:
        """Tokenize `text` (a prompt or a batch, padded) with `<image>` expanded; preprocess `images` (one per
        `<image>`, in order) into `pixel_values` (B, 3, H, W)."""
        if text is None:
            raise ValueError("ExGraMedProcessor needs text (a prompt with <image> where the image goes)")
        texts = [text] if isinstance(text, str) else list(text)
        if images is None:
            images = []
        elif not isinstance(images, (list, tuple)):
            images = [images]
        n_slots = sum(t.count(DEFAULT_IMAGE_TOKEN) for t in texts)
        if n_slots != len(images):
            raise ValueError(f"the text holds {n_slots} {DEFAULT_IMAGE_TOKEN} marker(s) but {len(images)} image(s) "
                             "were given; put one marker per image")
        kwargs.setdefault("padding", len(texts) > 1)
        data = dict(self.tokenizer([self.expand_image_tokens(t) for t in texts], return_tensors=return_tensors,
                                   **kwargs))
        if images:
            data["pixel_values"] = torch.stack(
                [preprocess_image(img.convert("RGB"), self.image_processor, self.image_aspect_ratio) for img in images]
            )
        return BatchFeature(data=data, tensor_type=return_tensors)
