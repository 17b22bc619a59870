"""Training entry point: `exgra-med train ...` or `torchrun -m exgra_med.train ...`.

One pipeline for every model: `train` runs a stage (pre-training, stage 2 with the alignment, fine-tuning) of the
LLaVA-style model (`exgra_med.train.llava`: the stages) or of a transformers-native VLM (`exgra_med.train.native`),
asking the model's family (`exgra_med.train.families`) only for the parts that differ.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import transformers
from transformers import HfArgumentParser, set_seed

from exgra_med.errors import HelpFormatter, UserError
from exgra_med.io import read_json
from exgra_med.model.auto import model_family, resolve_model_path
from exgra_med.model.liger import check_liger, llm_model_type
from exgra_med.model.quantization import check_bitsandbytes
from exgra_med.train.args import DataArguments, ModelArguments, TrainingArguments
from exgra_med.train.families import TrainingFamily, train_dtype
from exgra_med.train.inputs import check_output_dir, resume_arg, validate_inputs
from exgra_med.train.llava import LlavaTraining
from exgra_med.train.native import NativeTraining
from exgra_med.train.recipes import (
    RECIPE_SUFFIXES,
    RESOLVED_RECIPE,
    RecipeError,
    parse_with_recipe,
    write_resolved_recipe,
)
from exgra_med.train.trainer import ExGraMedTrainer
from exgra_med.train.vqa_eval import VQAGenerationSettings, check_eval_schedule, finish_with_test, vqa_splits

logger = logging.getLogger(__name__)


def parse_args(argv: Sequence[str] | None) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    """Parse the three argument groups from flags, or from a YAML recipe followed by overriding flags
    (`exgra_med.train.recipes`); `--resume_from_checkpoint True|auto` means the newest checkpoint. Unknown flags
    and invalid values end as argparse errors (usage + one line, exit code 2)."""
    return parse_args_and_recipe(argv)[0]


def parse_args_and_recipe(argv: Sequence[str] | None) -> tuple[tuple, dict]:
    """((model, data, training arguments), the resolved recipe to record in the output folder)."""
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments), prog="exgra-med train",
                              formatter_class=HelpFormatter)
    try:
        return parse_with_recipe(parser, list(argv) if argv is not None else sys.argv[1:])
    except RecipeError:  # a bad recipe file or an unknown flag: one line through the CLI's error handler
        raise
    except ValueError as e:  # a dataclass's __post_init__ (ours or TrainingArguments') refused a value
        if "bf16/gpu" in str(e):  # transformers advises use_cpu; the fix on a CPU is --bf16 False
            raise UserError("--bf16 True (bf16 mixed precision) needs a GPU that supports bf16, and none is visible; "
                            "pass --bf16 False to train on the CPU") from e
        parser.error(" ".join(str(e).split()))


def _zero_stage(training_args: TrainingArguments) -> int:
    config = training_args.deepspeed
    if not config:
        return 0
    if isinstance(config, (str, os.PathLike)):
        config = read_json(config)
    return int(config.get("zero_optimization", {}).get("stage", 0))


def check_environment(model_args: ModelArguments, training_args: TrainingArguments) -> None:
    """What the flags need from this machine and the installed extras, checked before any data or model is read:
    `--bits 4|8` (bitsandbytes with a backend that runs them; not with FSDP or ZeRO-3, which shard the weights
    that bitsandbytes packs) and `--use_liger_kernel` (liger-kernel, CUDA, an LLM type it has kernels for)."""
    if model_args.bits < 16:
        if training_args.fsdp or _zero_stage(training_args) == 3:
            raise UserError(f"--bits {model_args.bits} (QLoRA) runs with DDP or DeepSpeed ZeRO-2, not with FSDP or "
                            "ZeRO-3 (they shard the weights bitsandbytes packs); drop --fsdp or use zero2.json")
        check_bitsandbytes(model_args.bits, training_args.device, train_dtype(training_args) or torch.float32,
                           model_args.quant_type)
    if training_args.use_liger_kernel:
        path = model_args.model_name_or_path
        model_type = llm_model_type(path) if os.path.isdir(path) else None  # a Hub id: checked once it is loaded
        check_liger(training_args.device, model_type)


FAMILIES: dict[str, type[TrainingFamily]] = {"llava": LlavaTraining, "native": NativeTraining}


def training_family(model_name_or_path: str) -> TrainingFamily:
    """The family of the model a run trains (`model_family`: a transformers-native VLM folder, else LLaVA-style)."""
    family = model_family(model_name_or_path)
    path = resolve_model_path(model_name_or_path) if family == "native" else model_name_or_path
    return FAMILIES[family](path)


def train(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments) -> ExGraMedTrainer:
    """Run one training stage and save its result in `output_dir`: the one pipeline of every model family
    (`exgra_med.train.families`)."""
    family = training_family(model_args.model_name_or_path)
    set_seed(training_args.seed)
    family.check_flags(model_args, training_args)
    check_environment(model_args, training_args)
    alignment = model_args.alignment_config(seed=training_args.seed).enabled
    records = validate_inputs(model_args, data_args, alignment, multi_image=family.multi_image,
                              output_dir=training_args.output_dir)  # --drop_bad_records lists what it dropped there
    # Fine-tuning: VQA answers generated on val at each evaluation (eval_val_*), on test at the end (eval_test_*).
    val_split, test_split = vqa_splits(data_args, data_args.image_folder)
    check_eval_schedule(training_args, val_split)
    built = family.build(model_args, training_args)
    # Recorded in every checkpoint: evaluation and serving prompt and preprocess as in training.
    family.record_settings(built, data_args, training_args)
    dataset = family.dataset(built, data_args, training_args, records, alignment)
    n_train = sum(p.numel() for p in built.model.parameters() if p.requires_grad)
    logger.info("%s (%s): %d training records; %.2fM trainable parameters", model_args.model_name_or_path,
                built.model.config.model_type, len(dataset), n_train / 1e6)
    trainer = family.trainer_class(
        model=built.model,
        args=training_args,
        train_dataset=dataset,
        eval_dataset=val_split,
        data_collator=family.collator(built, training_args),
        processing_class=built.processing,
        vqa_settings=VQAGenerationSettings(
            batch_size=data_args.eval_batch_size,
            max_new_tokens=data_args.eval_max_new_tokens,
            image_aspect_ratio=data_args.image_aspect_ratio,
        ),
        **family.trainer_kwargs(built, model_args),
    )
    trainer.train(resume_from_checkpoint=resume_arg(training_args.resume_from_checkpoint, training_args.output_dir))
    trainer.save_state()
    family.save_final(trainer, model_args)
    if test_split is not None:
        finish_with_test(trainer, test_split)
    return trainer


def _shutdown_distributed() -> None:
    """Finish the collectives in flight and tear the process group down before the interpreter exits.

    DeepSpeed leaves asynchronous all-gathers behind; a gloo worker thread that frees the last of them needs the GIL
    for the tensors' Python objects, and if the interpreter is already shutting down by then it aborts the process
    ("terminate called without an active exception", seen in 1 of ~4 ZeRO-2 runs on CPU). The barrier waits for the
    work, the pause hands the GIL to the worker threads so that they release it, and destroying the group joins them.
    """
    torch.distributed.barrier()
    time.sleep(0.2)
    torch.distributed.destroy_process_group()


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: parse flags (or a YAML recipe + overriding flags), record the resolved recipe, train, save."""
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if int(os.environ.get("LOCAL_RANK", "0")) == 0 else logging.WARNING,
    )
    transformers.utils.logging.set_verbosity_warning()
    argv = list(argv) if argv is not None else sys.argv[1:]
    (model_args, data_args, training_args), resolved = parse_args_and_recipe(argv)
    check_output_dir(model_args, training_args)  # before the resolved recipe is written into it
    out = Path(training_args.output_dir)
    made_out, recipe, earlier = not out.exists(), out / RESOLVED_RECIPE, None
    writer = int(os.environ.get("RANK", "0")) == 0  # one writer under torchrun
    if writer:
        earlier = recipe.read_text(encoding="utf-8") if recipe.is_file() else None
        source = argv[0] if argv and argv[0].endswith(RECIPE_SUFFIXES) else None
        write_resolved_recipe(resolved, training_args.output_dir, source)
    try:
        train(model_args, data_args, training_args)
    except BaseException:
        # A run that failed before writing anything else (a refused flag or record, a model that did not load)
        # leaves the folder as it found it; a run that wrote checkpoints keeps the recipe that made them.
        if writer and out.is_dir() and [p.name for p in out.iterdir()] == [RESOLVED_RECIPE]:
            if earlier is not None:
                recipe.write_text(earlier, encoding="utf-8")
            else:
                recipe.unlink()
                if made_out:
                    out.rmdir()
        raise
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        _shutdown_distributed()
    return 0
