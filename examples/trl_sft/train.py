"""Fine-tune a transformers-native VLM with TRL's `SFTTrainer` and the ExGra-Med alignment head.

    python -m examples.trl_sft.train --model DIR --data FILE --image-folder DIR --output-dir DIR [--max-steps N]

Every other `SFTConfig` flag (`--learning-rate`, `--per-device-train-batch-size`, `--bf16 False`, ...) applies too.
What the ExGra-Med alignment adds to a plain SFT run, and nothing else:
- the records (project format, with `conversations_long`) become TRL's vision dataset (`messages` + `images`) plus
  the two alignment texts of each record (METHOD section 3);
- `AlignmentTextCollator` wraps TRL's own collator and tokenizes those texts;
- `AlignedSFTTrainer.compute_loss` returns `lm_loss + alpha * align_loss` from `exgra_med.model.alignment_head`;
- the objective's GNN is saved beside the model (`save_alignment_head`), so `exgra-med` loads the folder.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset, Image, List
from torch import nn
from transformers import AutoModelForImageTextToText, AutoProcessor, HfArgumentParser

from exgra_med.align.config import AlignmentConfig, build_alignment_loss
from exgra_med.constants import DEFAULT_IMAGE_TOKEN, GPT
from exgra_med.data.dataset import alignment_text
from exgra_med.data.records import RecordError, load_records, record_images, record_label
from exgra_med.model.alignment_head import AlignmentHead, AlignmentTexts, sample_image_features
from exgra_med.model.native.aligned import save_alignment_head, text_hidden_size

try:
    from trl import SFTConfig, SFTTrainer
except ImportError as e:  # an optional extra of the project
    raise ImportError("examples/trl_sft needs TRL: pip install 'exgra-med[trl]'") from e

TEXT_COLUMNS = {"response": "response_text", "extended": "extended_text"}  # alignment texts: batch key -> column
HEAD_KEYS = ("response_ids", "response_mask", "extended_ids", "extended_mask", "images_per_sample")
PREFIX = "alignment."  # the objective's keys in the model's state dict


@dataclass
class ExampleArguments:
    """The example's own flags; the trainer's are `SFTConfig`'s."""

    model: str = field(metadata={"help": "folder of a transformers-native VLM (AutoModelForImageTextToText)"})
    data: str = field(metadata={"help": "JSON records with `conversations`, `conversations_long` and `image`"})
    image_folder: str = field(metadata={"help": "folder the records' image paths are relative to"})
    alpha: float = field(default=1.0, metadata={"help": "weight of the alignment loss (loss = lm + alpha * align)"})


def trl_dataset(data: str, image_folder: str) -> Dataset:
    """The records as TRL's conversational vision dataset (`messages`, `images`), with their alignment texts."""
    rows = []
    for i, record in enumerate(load_records(data, require_long=True, multi_image=True)):
        if not record_images(record):
            raise RecordError(f"{data}: {record_label(record, i)} has no image; the alignment needs one per sample")
        messages = [{"role": "assistant" if turn["from"] == GPT else "user",
                     "content": turn["value"].replace(DEFAULT_IMAGE_TOKEN, "").strip()}
                    for turn in record["conversations"]]  # TRL puts the images before the first user text
        rows.append({"messages": messages, "images": [str(Path(image_folder, p)) for p in record_images(record)],
                     "response_text": alignment_text(record["conversations"]),
                     "extended_text": alignment_text(record["conversations_long"])})
    return Dataset.from_list(rows).cast_column("images", List(Image(mode="RGB")))  # decoded when read


@dataclass
class AlignmentTextCollator:
    """TRL's collator (`collate`), plus each sample's image count and its alignment texts, tokenized and right padded
    (`response_ids`, `response_mask`, `extended_ids`, `extended_mask`: what `AlignmentTexts.from_batch` reads)."""

    collate: Callable[[list[dict]], dict]
    tokenizer: Callable
    max_length: int | None

    def __call__(self, examples: Sequence[dict]) -> dict:
        batch = self.collate([{k: v for k, v in ex.items() if k not in TEXT_COLUMNS.values()} for ex in examples])
        batch["images_per_sample"] = [len(ex["images"]) for ex in examples]
        for key, column in TEXT_COLUMNS.items():
            tokens = self.tokenizer([ex[column] for ex in examples], padding=True, padding_side="right",
                                    truncation=self.max_length is not None, max_length=self.max_length,
                                    return_tensors="pt")
            batch[f"{key}_ids"], batch[f"{key}_mask"] = tokens["input_ids"], tokens["attention_mask"]
        return batch


def build_objective(config: AlignmentConfig, hidden_size: int) -> nn.Module:
    """The alignment objective (its GNN) for D = `hidden_size`, initialised from `config.seed` alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return build_alignment_loss(config, hidden_size)


class AlignedSFTTrainer(SFTTrainer):
    """`SFTTrainer` whose loss is `lm_loss + alpha * align_loss`; the model holds the objective as `model.alignment`."""

    # Both parts are means over this micro-batch: the Trainer divides their sum by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(self, *args, alignment_config: AlignmentConfig, **kwargs):
        super().__init__(*args, **kwargs)
        self.alignment_head = AlignmentHead(self.model.alignment, alignment_config)
        self.data_collator = AlignmentTextCollator(self.data_collator, self.processing_class.tokenizer,
                                                   self.args.max_length)
        self._parts: dict[str, list[torch.Tensor]] = defaultdict(list)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        texts = AlignmentTexts.from_batch(inputs)
        images_per_sample = inputs["images_per_sample"]
        # The model's own forward, not SFTTrainer's fused LM head (its output holds no image features): the LM loss
        # from the labels, and the image features after the projector / merger in `image_outputs`.
        out = model(**{k: v for k, v in inputs.items() if k not in HEAD_KEYS}, use_cache=False)
        image = sample_image_features(out.image_outputs.pooler_output, images_per_sample)  # (B, 1, D)
        align = self.alignment_head(image, texts, self.accelerator.unwrap_model(model))
        loss = out.loss + self.alignment_head.config.alpha * align.loss
        if model.training:
            parts = {"lm_loss": out.loss, "align_loss": align.loss,
                     **{f"align_loss/{name}": value for name, value in align.parts.items()}}  # as `exgra-med train`
            for name, value in parts.items():
                self._parts[name].append(value.detach())
        return (loss, out) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.model.training and self._parts:  # the mean over the steps since the last log, over all ranks
            logs.update({k: self.accelerator.gather(torch.stack(v).mean()[None]).mean().item()
                         for k, v in self._parts.items()})
            self._parts.clear()
        super().log(logs, start_time)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # Every save (save_model, checkpoints, DeepSpeed / FSDP gathered states) comes here: the model without the
        # objective's keys, so the folder stays a plain checkpoint of its architecture, and the head beside it.
        output_dir = output_dir or self.args.output_dir
        state = self.model.state_dict() if state_dict is None else state_dict
        super()._save(output_dir, {k: v for k, v in state.items() if not k.startswith(PREFIX)})
        if self.args.should_save:
            head = {k.removeprefix(PREFIX): v for k, v in state.items() if k.startswith(PREFIX)}
            save_alignment_head(head, output_dir, self.alignment_head.config, text_hidden_size(self.model))


def main(argv: Sequence[str] | None = None) -> int:
    example, sft = HfArgumentParser((ExampleArguments, SFTConfig)).parse_args_into_dataclasses(argv)
    sft.remove_unused_columns = False  # the collator reads the alignment-text columns
    # Every batch uses every parameter (the alignment needs an image per sample), and the objective's GNN is used
    # outside the model's forward, which DDP's search for unused parameters would count as unused.
    sft.ddp_find_unused_parameters = False
    model = AutoModelForImageTextToText.from_pretrained(example.model)
    processor = AutoProcessor.from_pretrained(example.model)
    config = AlignmentConfig(contrastive=True, multi_graph=True, after_de=True, alpha=example.alpha, seed=sft.seed)
    # Registered on the model, the objective's GNN is trained like any other weight: the Trainer's optimizer, device
    # placement, gradient clipping and DDP gradient averaging all see it (a separate optimizer would need each by
    # hand). `_save` keeps it out of the model's own weights file.
    model.alignment = build_objective(config, text_hidden_size(model)).to(model.dtype)
    trainer = AlignedSFTTrainer(model=model, args=sft, train_dataset=trl_dataset(example.data, example.image_folder),
                                processing_class=processor, alignment_config=config)
    trainer.train()
    trainer.save_model()
    trainer.save_state()  # trainer_state.json: the logged lm_loss / align_loss of every logging step
    print(f"saved the model, its processor and the alignment head to {sft.output_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
