"""Training the LLaVA-style ExGra-Med model (`ExGraMedForConditionalGeneration`): built from an LLM folder and a
vision tower (stage 1, stage 2), or loaded from an ExGra-Med checkpoint (stage 2 from a stage-1 projector,
fine-tuning).

Stage 1: `--tune_mm_mlp_adapter True` trains and saves only the projector and the `<im_start>`/`<im_end>` input
embeddings (`--tune_im_start_end False`: the projector alone). Stage 2: `--pretrain_mm_mlp_adapter DIR` loads both
and trains projector + LLM (+ the alignment GNN with `--contrastive True --multi_graph True --after_de True`).
Fine-tuning: `--model_name_or_path` an ExGra-Med checkpoint (e.g. the stage-2 output).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoConfig

from exgra_med.data.collate import DataCollator
from exgra_med.data.dataset import SupervisedDataset
from exgra_med.model.delimiters import delimiter_ids, train_only_rows
from exgra_med.model.hub import resolve_path
from exgra_med.model.liger import apply_liger
from exgra_med.model.loading import (
    ConnectorOptions,
    build_from_parts,
    is_exgra_med_checkpoint,
    load_pretrained,
    load_projector,
    save_projector,
)
from exgra_med.model.lora import merge_lora_checkpoint
from exgra_med.model.modeling import build_alignment
from exgra_med.model.packing import check_attention_packs, check_padding_free, packs_in_one_row
from exgra_med.model.quantization import bnb_config
from exgra_med.train.args import DataArguments, ModelArguments, TrainingArguments
from exgra_med.train.families import Built, TrainingFamily, train_dtype
from exgra_med.train.trainer import ExGraMedTrainer


class LlavaTraining(TrainingFamily):
    """The LLaVA-style model's parts of a training stage (see the module docstring)."""

    def check_flags(self, model_args: ModelArguments, training_args: TrainingArguments) -> None:
        check_padding_free_flags(model_args, training_args)

    def build(self, model_args: ModelArguments, training_args: TrainingArguments) -> Built:
        model, tokenizer, image_processor = build_model(model_args, training_args)
        return Built(model, tokenizer, image_processor)

    def record_settings(self, built: Built, data_args: DataArguments, training_args: TrainingArguments) -> None:
        super().record_settings(built, data_args, training_args)
        built.model.config.conv_template = data_args.conv_template  # the prompt template evaluation renders with

    def dataset(self, built: Built, data_args: DataArguments, training_args: TrainingArguments,
                records: list[dict], alignment: bool) -> SupervisedDataset:
        model = built.model
        return SupervisedDataset(
            data_args.data_path,
            data_args.image_folder,
            built.processing,
            built.image_processor,
            num_image_tokens=model.num_image_tokens,
            mm_use_im_start_end=model.config.mm_use_im_start_end,
            template=data_args.conv_template,
            image_aspect_ratio=data_args.image_aspect_ratio,
            max_length=training_args.model_max_length,
            alignment=model.alignment is not None,
            # validated with the flags' alignment setting; a checkpoint's own head may differ: read them again
            records=records if (model.alignment is not None) == alignment else None,
        )

    def collator(self, built: Built, training_args: TrainingArguments) -> DataCollator:
        # Padding-free rows: one row for attention that skips the other samples' keys, else rows of bounded length.
        one_row = packs_in_one_row(built.model.language_model.config._attn_implementation)
        return DataCollator(built.processing, padding_free=training_args.padding_free, one_row=one_row)

    def trainer_kwargs(self, built: Built, model_args: ModelArguments) -> dict:
        return {"projector_only": model_args.tune_mm_mlp_adapter, "image_processor": built.image_processor}

    def save_final(self, trainer: ExGraMedTrainer, model_args: ModelArguments) -> None:
        save_final(trainer, model_args)


def build_model(model_args: ModelArguments, training_args: TrainingArguments):
    """(model, tokenizer, image processor) from parts or from an ExGra-Med checkpoint, trainable parts set; with
    `--bits 4|8` the LLM loads quantised (projector and alignment head in float32), with `--use_liger_kernel` it
    runs Liger's kernels."""
    dtype = train_dtype(training_args)
    quant, device = None, None
    if model_args.bits < 16:
        quant = bnb_config(model_args.bits, dtype or torch.float32, model_args.double_quant, model_args.quant_type)
        device = training_args.device  # bitsandbytes quantises while placing the weights
    # The run's seed seeds the alignment's generator when the module is built (the checkpoint records it).
    alignment = model_args.alignment_config(seed=training_args.seed)
    if training_args.deepspeed and torch.distributed.is_available() and torch.distributed.is_initialized():
        # lazy: deepspeed is optional (the deepspeed extra)
        import deepspeed

        # ZeRO-3 partitions the weights while loading, with a DeepSpeed config that reads the world size from
        # DeepSpeed's own communicator: register the process group accelerate already started (on GPUs accelerate
        # does this itself; on CPU it does not, and ZeRO-3 then sees one rank).
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())
    model_path = resolve_path(model_args.model_name_or_path, "model", require=("config.json",))  # or a Hub id
    if training_args.padding_free:  # from the config alone, before any weights are read
        check_llm_packs(model_path, model_args.attn_implementation)
    if is_exgra_med_checkpoint(model_path):
        model, tokenizer, processor = load_pretrained(
            model_path, dtype=dtype, attn_implementation=model_args.attn_implementation,
            alignment_config=alignment,  # the flags replace the checkpoint's alignment options
            quantization_config=quant, device=device,
        )
        model.train()
        if model.alignment is None and alignment.enabled:
            # In the loaded weights' dtype: DeepSpeed ZeRO-3 flattens each parameter group into one buffer.
            model.alignment = build_alignment(model.config).to(device=device, dtype=model.dtype)
        if quant is not None:  # the trained parts in full precision next to the quantised LLM
            for part in (model.mm_projector, model.alignment):
                if part is not None:
                    part.float()
    else:
        if model_args.vision_tower is None:
            raise ValueError(f"--vision_tower is required when {model_args.model_name_or_path} is a plain LLM folder")
        options = ConnectorOptions(
            mm_projector_type=model_args.mm_projector_type,
            mm_dense_connector_type=model_args.mm_dense_connector_type,
            num_l=model_args.num_l,
            mm_spatial_pool_stride=model_args.mm_spatial_pool_stride,
            mm_vision_select_layer=model_args.mm_vision_select_layer,
            mm_vision_select_feature=model_args.mm_vision_select_feature,
            mm_use_im_start_end=model_args.mm_use_im_start_end,
            alignment=alignment,
        )
        model, tokenizer, processor = build_from_parts(
            model_path, model_args.vision_tower, options, dtype, model_args.attn_implementation,
            quantization_config=quant, device=device,
        )
    if model_args.pretrain_mm_mlp_adapter:
        load_projector(model, model_args.pretrain_mm_mlp_adapter)
    set_trainable(model, model_args, training_args.activation_checkpointing)
    if training_args.use_liger_kernel:
        apply_liger(model, **(training_args.liger_kernel_config or {}))
    return model, tokenizer, processor


def check_padding_free_flags(model_args: ModelArguments, training_args: TrainingArguments) -> None:
    """`--padding_free True` needs an attention implementation that confines attention to each packed sample."""

    if training_args.padding_free:
        check_attention_packs(model_args.attn_implementation)


def check_llm_packs(model_path: str, attn_implementation: str) -> None:
    """Refuse `--padding_free True` for an LLM (plain folder or inside an ExGra-Med checkpoint) that cannot pack."""


    config = AutoConfig.from_pretrained(model_path)
    check_padding_free(getattr(config, "text_config", config), attn_implementation)


def set_trainable(model, model_args: ModelArguments, activation_checkpointing: bool = False) -> None:
    """Stage 1: the projector (and, as the reference, the `<im_start>`/`<im_end>` input embeddings). Otherwise
    projector + LLM (+ alignment), or LoRA adapters on the LLM (on its quantised weights with `--bits 4|8`)."""
    model.requires_grad_(False)
    model.mm_projector.requires_grad_(True)
    if model.alignment is not None:
        model.alignment.requires_grad_(True)
    if model_args.tune_mm_mlp_adapter:
        ids = delimiter_ids(model)
        if model_args.tune_im_start_end and ids:
            train_only_rows(model.get_input_embeddings(), ids)
        return
    if model_args.lora_enable:
        quantized = model_args.bits < 16
        if quantized:  # LLM frozen, its unquantised parts (norms, embeddings, head) in float32, as QLoRA does
            model.language_model = prepare_model_for_kbit_training(
                model.language_model, use_gradient_checkpointing=activation_checkpointing
            )

        lora = LoraConfig(
            r=model_args.lora_r,
            lora_alpha=model_args.lora_alpha,
            lora_dropout=model_args.lora_dropout,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
        # Adapters in the base weights' dtype (PEFT would upcast them to float32 under bf16): ZeRO-3 flattens each
        # parameter group into one buffer and refuses mixed dtypes. QLoRA (no ZeRO-3) keeps float32 adapters.
        model.language_model = get_peft_model(model.language_model, lora, autocast_adapter_dtype=quantized)
        model.config.lora_alpha = model_args.lora_alpha  # recorded in every checkpoint for `merge-lora`
    elif not model_args.freeze_backbone:
        model.language_model.requires_grad_(True)
    if model_args.tune_vision_tower or not model.config.freeze_vision_tower:
        model.vision_tower.requires_grad_(True)


def save_final(trainer: ExGraMedTrainer, model_args: ModelArguments) -> None:
    """Stage 1: `mm_projector.safetensors` only (projector + delimiter embeddings). Otherwise a full checkpoint (LoRA
    merged) loadable everywhere."""
    out = trainer.args.output_dir
    if model_args.lora_enable:
        save_merged_lora(trainer, Path(out), model_args.lora_alpha)
        return
    if model_args.tune_mm_mlp_adapter:
        if trainer.args.should_save:
            model = trainer.accelerator.unwrap_model(trainer.model)
            save_projector(model, out)
            model.config.save_pretrained(out)
        return
    trainer.save_model(out)  # with the tokenizer and image processor (ExGraMedTrainer._save)


def save_merged_lora(trainer: ExGraMedTrainer, out: Path, lora_alpha: float) -> None:
    """Save a LoRA run as a plain checkpoint with the adapters folded in, under any back end.

    Every rank takes part in saving the adapter-carrying model (ZeRO-3 and FSDP gather their shards collectively);
    the writing process (global rank 0) then merges the saved weights file by file (`merge-lora`'s code) and moves
    the result into `out`.
    """


    unmerged, merged = out / "lora-unmerged", out / ".lora-merged"
    trainer.save_model(str(unmerged))
    trainer.accelerator.wait_for_everyone()
    if trainer.args.should_save:  # the process that saved `unmerged` (the Trainer's writer) merges it
        shutil.rmtree(merged, ignore_errors=True)
        merge_lora_checkpoint(unmerged, merged, float(lora_alpha))
        for item in merged.iterdir():
            os.replace(item, out / item.name)
        merged.rmdir()
        shutil.rmtree(unmerged)
    trainer.accelerator.wait_for_everyone()
