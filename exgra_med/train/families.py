"""`TrainingFamily`: what one training stage needs from a model family, behind one interface.

`exgra_med.train.main.train` is the one pipeline (checks, records, model, dataset, collator, trainer, resume, save,
test scoring); it asks the family of the model it trains, chosen once from the model folder
(`exgra_med.model.auto.model_family`), for the parts that differ: `exgra_med.train.llava.LlavaTraining` (the
LLaVA-style ExGra-Med model built from an LLM + vision tower or loaded from its checkpoint) and
`exgra_med.train.native.NativeTraining` (any transformers-native VLM).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from exgra_med.train.args import DataArguments, ModelArguments, TrainingArguments
from exgra_med.train.vqa_eval import VQAScoringTrainer


def train_dtype(training_args: TrainingArguments) -> torch.dtype | None:
    """The weights' dtype of a run: bfloat16 / float16 with `--bf16` / `--fp16`, else the checkpoint's own."""
    if training_args.bf16:
        return torch.bfloat16
    if training_args.fp16:
        return torch.float16
    return None


@dataclass
class Built:
    """A model ready to train, with what saves beside it: `processing` (the Trainer's processing_class: tokenizer or
    processor) and, for models whose processing is split, the `image_processor`."""

    model: nn.Module
    processing: Any
    image_processor: Any = None


class TrainingFamily(ABC):
    """The parts of a training stage that depend on the model family (see the module docstring)."""

    #: records may hold a list of images (the family's processor takes several per sample)
    multi_image: bool = False
    trainer_class: type[VQAScoringTrainer] = VQAScoringTrainer

    def __init__(self, path: str):
        self.path = path  # the model folder (or Hub id) being trained

    @abstractmethod
    def check_flags(self, model_args: ModelArguments, training_args: TrainingArguments) -> None:
        """Refuse, in one line and before anything is read, the flags this family cannot honour."""

    @abstractmethod
    def build(self, model_args: ModelArguments, training_args: TrainingArguments) -> Built:
        """The model with its trainable parts set (quantised with `--bits`, Liger kernels with
        `--use_liger_kernel`), and its processing."""

    def record_settings(self, built: Built, data_args: DataArguments, training_args: TrainingArguments) -> None:
        """Write the data settings the model is trained with into its config, so that evaluation and serving read
        them from the checkpoint (`exgra_med.model.auto.RECORDED_SETTINGS`; the maximum length bounds the prompts
        they accept, `Backend.context_length`)."""
        built.model.config.image_aspect_ratio = data_args.image_aspect_ratio
        built.model.config.tokenizer_model_max_length = training_args.model_max_length

    @abstractmethod
    def dataset(self, built: Built, data_args: DataArguments, training_args: TrainingArguments,
                records: list[dict], alignment: bool) -> Dataset:
        """The training records as model inputs (with the alignment texts when `alignment`)."""

    @abstractmethod
    def collator(self, built: Built, training_args: TrainingArguments):
        """Batches of dataset items: padded, or padding-free rows with `--padding_free True`."""

    def trainer_kwargs(self, built: Built, model_args: ModelArguments) -> dict[str, Any]:
        """Keyword arguments of `trainer_class` beyond the Trainer's own."""
        return {}

    def save_final(self, trainer: VQAScoringTrainer, model_args: ModelArguments) -> None:
        """Save the trained model in `output_dir` as a checkpoint loadable everywhere."""
        trainer.save_model(trainer.args.output_dir)
