"""`exgra-med train --model_name_or_path <native VLM folder>`: stage 2 (with the alignment) and fine-tuning of a
transformers-native VLM, with the same flags, recipes, back ends (DDP, DeepSpeed ZeRO-2/3, FSDP with the model's
`_no_split_modules` as wrap classes) and outputs as the LLaVA path (`exgra_med.model.native.training` builds and
saves the model).
"""

from __future__ import annotations

import logging
import os

import torch
from transformers import set_seed

from exgra_med.data.chat import ChatEncoder, NativeCollator, NativeDataset, stop_strings
from exgra_med.errors import UserError
from exgra_med.model.native.training import build_native_model, check_native_flags, load_native_weights, save_native
from exgra_med.train.args import DataArguments, ModelArguments, TrainingArguments
from exgra_med.train.inputs import resume_arg, validate_inputs
from exgra_med.train.vqa_eval import (
    VQAGenerationSettings,
    VQAScoringTrainer,
    check_eval_schedule,
    finish_with_test,
    vqa_splits,
)

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


def train_native(path: str, model_args: ModelArguments, data_args: DataArguments,
                 training_args: TrainingArguments) -> NativeTrainer:
    """One training stage of the native VLM in `path`; saves its result in `output_dir` (see the module docstring)."""
    set_seed(training_args.seed)
    check_native_flags(model_args, training_args)
    alignment = model_args.alignment_config(seed=training_args.seed)
    if alignment.enabled and not alignment.multi_graph and alignment.simi_type != "average":
        raise UserError(f"--simi_type {alignment.simi_type}: native VLMs support the contrastive ablation with "
                        "--simi_type average (image tokens differ in number between samples)")
    records = validate_inputs(model_args, data_args, alignment.enabled, multi_image=True)
    val_split, test_split = vqa_splits(data_args, data_args.image_folder)
    check_eval_schedule(training_args, val_split)
    model, processor = build_native_model(path, model_args, training_args)
    model.config.image_aspect_ratio = data_args.image_aspect_ratio  # recorded: evaluation and serving read it
    if data_args.conv_template != "llava_med":
        logger.warning("--conv_template %s is not used: %s renders records with its own chat template",
                       data_args.conv_template, path)
    encoder = ChatEncoder(processor, stop_strings(processor, model.generation_config), data_args.image_aspect_ratio)
    dataset = NativeDataset(data_args.data_path, data_args.image_folder, encoder,
                            max_length=training_args.model_max_length, alignment=model.alignment is not None,
                            records=records)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("%s (%s): %d training records; %.2fM trainable parameters", path, model.config.model_type,
                len(dataset), n_train / 1e6)
    trainer = NativeTrainer(
        model=model, args=training_args, train_dataset=dataset, eval_dataset=val_split,
        data_collator=NativeCollator(_pad_id(processor.tokenizer)), processing_class=processor,
        lora_alpha=model_args.lora_alpha,
        vqa_settings=VQAGenerationSettings(batch_size=data_args.eval_batch_size,
                                           max_new_tokens=data_args.eval_max_new_tokens,
                                           image_aspect_ratio=data_args.image_aspect_ratio),
    )
    trainer.train(resume_from_checkpoint=resume_arg(training_args.resume_from_checkpoint, training_args.output_dir))
    trainer.save_state()
    trainer.save_model(training_args.output_dir)
    if test_split is not None:
        finish_with_test(trainer, test_split)
    return trainer
