"""Training a transformers-native VLM (`exgra-med train --model_name_or_path <native VLM folder>`): stage 2 (with the
alignment) and fine-tuning, through the one pipeline of `exgra_med.train.main.train` with the same flags, recipes,
back ends (DDP, DeepSpeed ZeRO-2/3, FSDP with the model's `_no_split_modules` as wrap classes) and outputs as the
LLaVA-style model. Records go through the model's own processor and chat template (`exgra_med.data.chat`);
`exgra_med.model.native.training` builds and saves the model.
"""

from __future__ import annotations

import logging
import os

import torch
from transformers import AutoConfig

from exgra_med.data.chat import ChatEncoder, NativeCollator, NativeDataset, stop_strings
from exgra_med.errors import UserError
from exgra_med.model.native.training import build_native_model, check_native_flags, load_native_weights, save_native
from exgra_med.model.packing import check_native_padding_free, packs_in_one_row
from exgra_med.train.args import DataArguments, ModelArguments, TrainingArguments
from exgra_med.train.families import Built, TrainingFamily, train_dtype
from exgra_med.train.vqa_eval import VQAScoringTrainer

logger = logging.getLogger(__name__)


class NativeTrainer(VQAScoringTrainer):
    """`VQAScoringTrainer` for an `AlignedVLM`: saves the native format + head; resumes from such a folder."""

    def __init__(self, *args, lora_alpha: float = 16.0, **kwargs):
        super().__init__(*args, projector_only=False, image_processor=None, **kwargs)
        self.lora_alpha = lora_alpha

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model)
        save_native(model, state_dict if state_dict is not None else model.state_dict(), output_dir,
                    self.processing_class, self.lora_alpha)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
        model = self.accelerator.unwrap_model(model or self.model)
        if model.base_vlm is not model.vlm:
            raise UserError(f"{resume_from_checkpoint}: resuming a LoRA run of a native VLM is not supported (its "
                            "checkpoints hold merged weights); start a new run from it with --model_name_or_path")
        load_native_weights(model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        """`--load_best_model_at_end` without DeepSpeed / FSDP (whose own checkpoints the Trainer reads): the best
        checkpoint's native weights and head (a LoRA run: merged weights, adapters zeroed)."""
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            super()._load_best_model()
            return
        logger.info("loading the best model from %s (score %s)", self.state.best_model_checkpoint,
                    self.state.best_metric)
        load_native_weights(self.accelerator.unwrap_model(self.model), self.state.best_model_checkpoint)


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise UserError("the model's tokenizer has neither a pad nor an end-of-sequence token to pad batches with")
    return int(pad)


class NativeTraining(TrainingFamily):
    """A transformers-native VLM's parts of a training stage (see the module docstring)."""

    multi_image = True
    trainer_class = NativeTrainer

    def check_flags(self, model_args: ModelArguments, training_args: TrainingArguments) -> None:
        check_native_flags(model_args)
        if training_args.padding_free:  # from the config alone, before any weights are read
            check_native_padding_free(AutoConfig.from_pretrained(self.path), model_args.attn_implementation)
        alignment = model_args.alignment_config(seed=training_args.seed)
        if alignment.enabled and not alignment.multi_graph and alignment.simi_type != "average":
            raise UserError(f"--simi_type {alignment.simi_type}: native VLMs support the contrastive ablation with "
                            "--simi_type average (image tokens differ in number between samples)")

    def build(self, model_args: ModelArguments, training_args: TrainingArguments) -> Built:
        model, processor = build_native_model(self.path, model_args, training_args, train_dtype(training_args))
        return Built(model, processor)

    def record_settings(self, built: Built, data_args: DataArguments, training_args: TrainingArguments) -> None:
        super().record_settings(built, data_args, training_args)
        if data_args.conv_template != "llava_med":
            logger.warning("--conv_template %s is not used: %s renders records with its own chat template",
                           data_args.conv_template, self.path)

    def dataset(self, built: Built, data_args: DataArguments, training_args: TrainingArguments,
                records: list[dict], alignment: bool) -> NativeDataset:
        processor = built.processing
        encoder = ChatEncoder(processor, stop_strings(processor, built.model.generation_config),
                              data_args.image_aspect_ratio)
        return NativeDataset(data_args.data_path, data_args.image_folder, encoder,
                             max_length=training_args.model_max_length, alignment=built.model.alignment is not None,
                             records=records)

    def collator(self, built: Built, training_args: TrainingArguments) -> NativeCollator:
        # Padding-free rows: one row for attention that skips the other samples' keys, else rows of bounded length.
        one_row = packs_in_one_row(built.model.config._attn_implementation)
        return NativeCollator(_pad_id(built.processing.tokenizer), padding_free=training_args.padding_free,
                              one_row=one_row)

    def trainer_kwargs(self, built: Built, model_args: ModelArguments) -> dict:
        return {"lora_alpha": model_args.lora_alpha}
