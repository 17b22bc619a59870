"""`NativeInferenceEngine`: the serving engine (`chat`, `web`, `serve-api`) for a transformers-native VLM.

The same engine as for the LLaVA model (bounded queue, batched decoding, per-row streaming, prompt limits); only the
prompt (the model's chat template and processor, `inference.NativeVLM`) and the end of an answer (the model's own
end-of-sequence tokens instead of a stop string) differ.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch
from PIL import Image

from exgra_med.data.images import DEFAULT_ASPECT_RATIO, load_image
from exgra_med.errors import UserError
from exgra_med.serve.batching import Job
from exgra_med.serve.engine import GenerationSettings, InferenceEngine, Message
from exgra_med.vlm.inference import CHAT_TEMPLATE, CHAT_TEMPLATE_NAME, NativeVLM

logger = logging.getLogger(__name__)

# Kept unquantised under --load-4bit / --load-8bit: the vision encoders (Qwen's `visual`, SigLIP `vision_tower`), the
# projectors / mergers and the output head.
QUANT_SKIP_MODULES = ("visual", "vision_tower", "multi_modal_projector", "merger", "lm_head")


class NativeInferenceEngine(InferenceEngine):
    """An `InferenceEngine` over a `NativeVLM`; at most one image per conversation, as the LLaVA engine."""

    def __init__(self, native: NativeVLM, name: str = "exgra-med", **limits):
        self.native = native
        super().__init__(native.model, native.tokenizer, native.processor.image_processor, template=CHAT_TEMPLATE,
                         image_aspect_ratio=native.encoder.image_aspect_ratio, name=name, **limits)

    @classmethod
    def load(cls, path: str, folder: str, vision_tower: str | None = None, template: str | None = None,
             load_4bit: bool = False, load_8bit: bool = False, device: str | None = None,
             dtype: torch.dtype | None = None, image_aspect_ratio: str = DEFAULT_ASPECT_RATIO,
             **limits) -> NativeInferenceEngine:
        """Load the native VLM in `folder` (resolved from `path`, the name it is served under) as the serving flags
        say; the LLaVA-only flags are refused."""
        from exgra_med.model.checkpoint import resolve_dtype
        from exgra_med.serve.loading import default_device, quantization_config

        if vision_tower:
            raise UserError(f"--vision-tower: {path} is a transformers-native VLM with its own vision encoder")
        if template not in (None, CHAT_TEMPLATE_NAME):
            logger.warning("--conv-template %s ignored: %s is a transformers-native VLM, prompted with its own chat "
                           "template", template, path)
        device = device or default_device()
        dtype = resolve_dtype(dtype, device)
        quant = quantization_config(load_4bit, load_8bit, compute_dtype=dtype)
        if quant is not None:  # the vision encoder, projector and output head stay in full precision
            quant.llm_int8_skip_modules = list(QUANT_SKIP_MODULES)
        native = NativeVLM.load(folder, dtype, device, quantization_config=quant,
                                image_aspect_ratio=image_aspect_ratio)
        name = (os.path.basename(os.path.normpath(path)) if os.path.exists(path) else path) or "exgra-med"
        return cls(native, name=name, **limits)

    @property
    def eos_token_ids(self) -> set[int]:
        """The model's end-of-sequence tokens (e.g. `<end_of_turn>` besides `<eos>`)."""
        return set(self.native.eos_token_ids)

    def _images(self, image: Image.Image | str | os.PathLike | None) -> list[Image.Image]:
        if image is None:
            return []
        return [image.convert("RGB") if isinstance(image, Image.Image) else load_image(image)]

    def encode_request(self, messages: Sequence[Message], image, system: str | None = None):
        """The processor's encoding of a conversation (and its image)."""
        images = self._images(image)
        if not images:
            messages = [(role, text.replace("<image>", "")) for role, text in messages]
        return self.native.encode_conversation(messages, images, system)

    def build_prompt(self, messages: Sequence[Message], has_image: bool, system: str | None = None) -> str:
        """The chat template's rendering of the conversation (one image item when `has_image`)."""
        image = Image.new("RGB", (1, 1)) if has_image else None
        return self.tokenizer.decode(self.encode_request(messages, image, system).input_ids)

    def encode(self, messages: Sequence[Message], has_image: bool, system: str | None = None) -> torch.LongTensor:
        """Prompt token ids (1, T) without an image's tokens (the LLaVA engine's interface)."""
        if has_image:
            raise ValueError("a native VLM's prompt ids depend on the image; use submit() with the image")
        return self.encode_request(messages, None, system).input_ids[None].to(self.device)

    def submit(self, messages: Sequence[Message], image=None, settings: GenerationSettings | None = None,
               system: str | None = None) -> Job:
        """As `InferenceEngine.submit`: checked against the limits (image tokens included), then queued."""
        settings = settings or GenerationSettings()
        self.check_prompt_text(messages, settings, system)
        encoded = self.encode_request(messages, image, system)
        self.check_prompt_ids(int(encoded.input_ids.shape[0]), settings)
        job = Job(encoded.input_ids.tolist(), None, settings, self.template, encoded=encoded)
        return self.scheduler.submit(job)

    def generate_kwargs(self, settings: GenerationSettings) -> dict:
        kwargs = super().generate_kwargs(settings)
        kwargs.update(eos_token_id=self.native.eos_token_ids, pad_token_id=self.native.pad_token_id)
        return kwargs

    def generate_rows(self, jobs: Sequence[Job], **generate_kwargs) -> None:
        """Decode `jobs` together: their processor outputs collated with left padding."""
        self.model.generate(**self.native.batch_inputs([j.encoded for j in jobs]), **generate_kwargs)
