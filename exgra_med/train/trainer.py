"""`ExGraMedTrainer`: HF Trainer that logs `lm_loss` / `align_loss` (and the alignment's parts, `align_loss/<part>`)
and saves only the projector (with the `<im_start>`/`<im_end>` embeddings) in stage 1."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from exgra_med.io import atomic_file
from exgra_med.model.delimiters import delimiter_ids
from exgra_med.model.loading import PROJECTOR_FILES, load_projector, save_projector
from exgra_med.train.sampler import ModalityLengthGroupedSampler, modality_lengths

logger = logging.getLogger(__name__)

LOSS_PARTS = ("lm_loss", "align_loss")
ALIGN_PART_PREFIX = "align_loss/"  # + the part's name: image, response, extended (multi-graph); image_response
ALIGN_RNG_PREFIX = "align_rng_state_"  # + process index + .pth, in every checkpoint-N of a run with the alignment


class SaveAtSteps(TrainerCallback):
    """`--save_at_steps`: a checkpoint at each listed optimizer step, beside whatever `--save_strategy` writes (the
    points of a learning curve, which no fixed `--save_steps` interval gives)."""

    def __init__(self, steps):
        self.steps = frozenset(steps)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in self.steps:
            control.should_save = True
        return control


class ExGraMedTrainer(Trainer):
    """Trainer for all stages. `projector_only=True` (stage 1) checkpoints and saves just `mm_projector`."""

    def __init__(self, *args, projector_only: bool = False, image_processor=None, **kwargs):
        super().__init__(*args, **kwargs)
        if getattr(self.args, "save_at_steps", None):
            self.add_callback(SaveAtSteps(self.args.save_at_steps))
        self.projector_only = projector_only
        # Saved beside the weights, so that every checkpoint-N is a complete model for evaluation and serving.
        self.image_processor = image_processor
        # The model returns a per-step mean; let the Trainer divide by gradient_accumulation_steps so that the
        # LM and alignment parts keep their relative weight alpha.
        self.model_accepts_loss_kwargs = False
        self._part_sums: dict[str, torch.Tensor] = {}
        self._part_count = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Forward; remember the detached loss parts for the next log line (no host sync: summed on the device)."""
        alignment = self._alignment()
        if model.training and getattr(alignment, "undo_loss_scale", False):
            alignment.loss_scale = self._loss_scale()  # the scale this step's backward multiplies the loss by
        outputs = model(**inputs)
        if model.training:  # evaluation losses are not training log values
            values = {name: getattr(outputs, name, None) for name in LOSS_PARTS}
            for part, value in (getattr(outputs, "align_parts", None) or {}).items():
                values[ALIGN_PART_PREFIX + part] = value
            for name, value in values.items():
                if value is not None:
                    value = value.detach().float()
                    self._part_sums[name] = self._part_sums.get(name, torch.zeros_like(value)) + value
            self._part_count += 1
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def _get_train_sampler(self, train_dataset=None):
        """`--group_by_modality_length`: micro-batches of one modality and similar lengths (`train.sampler`), the
        order drawn from the run's data seed + epoch; otherwise the Trainer's own sampler."""
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if not getattr(self.args, "group_by_modality_length", False):
            return super()._get_train_sampler(train_dataset)
        if not hasattr(dataset, "records"):
            raise ValueError("--group_by_modality_length needs a dataset of records (SupervisedDataset)")
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return ModalityLengthGroupedSampler(
            modality_lengths(dataset.records),
            batch_size=self._train_batch_size,
            world_size=self.args.world_size * self.args.gradient_accumulation_steps,
            seed=seed,
        )

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the means of `lm_loss` / `align_loss` / `align_loss/<part>` since the previous training log (averaged
        over ranks; every rank holds the same names, as the model and its alignment are the same on every rank)."""
        if "loss" in logs and self._part_count:
            for name, total in sorted(self._part_sums.items()):
                mean = self.accelerator.reduce(total / self._part_count, reduction="mean")
                logs[name] = round(float(mean), 6)
            self._part_sums, self._part_count = {}, 0
        super().log(logs, start_time)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir or self.args.output_dir
        if not self.projector_only:
            super()._save(output_dir, state_dict)  # weights, config and the tokenizer (processing_class)
            if self.image_processor is not None and self.args.should_save:
                self.image_processor.save_pretrained(output_dir)
            return
        # The Trainer calls _save on every process; only the writer (global rank 0, or each node's first process
        # with --save_on_each_node) writes, so that the other nodes of a multi-node run leave no files behind.
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model)
        embed_rows = None
        if state_dict is not None:  # ZeRO-3 hands over gathered weights
            projector = {k.split("mm_projector.", 1)[1]: v for k, v in state_dict.items() if "mm_projector." in k}
            model.mm_projector.load_state_dict(projector)
            embed = [v for k, v in state_dict.items() if k.endswith("embed_tokens.weight")]
            ids = delimiter_ids(model)
            embed_rows = embed[0][ids] if embed and ids else None
        save_projector(model, output_dir, embed_rows)
        model.config.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def get_decay_parameter_names(self, model) -> list[str]:
        """Stage 1 trains only the `<im_start>`/`<im_end>` rows of the input embeddings (their gradient is zero
        elsewhere); without weight decay on that matrix, AdamW leaves every other row exactly unchanged."""
        names = super().get_decay_parameter_names(model)
        if not self.projector_only:
            return names
        unwrapped = self.accelerator.unwrap_model(model)
        embedding = unwrapped.get_input_embeddings().weight
        skip = {n for n, p in unwrapped.named_parameters() if p is embedding}
        return [n for n in names if n not in skip]

    def _loss_scale(self) -> float:
        """The factor the loss is multiplied by before backward: the fp16 GradScaler's (native AMP, FSDP) or
        DeepSpeed's fp16 loss scale; 1 without loss scaling (bf16, fp32)."""
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            return float(scaler.get_scale())
        optimizer = getattr(getattr(self, "deepspeed", None), "optimizer", None)
        scale = getattr(optimizer, "cur_scale", None)
        return float(scale) if scale is not None else 1.0

    def _alignment(self):
        return getattr(self.accelerator.unwrap_model(self.model), "alignment", None)

    def _save_rng_state(self, output_dir: str) -> None:
        """The Trainer's RNG states, plus the alignment's own generators (its edge noise and GNN dropout), so that a
        resumed run draws what the uninterrupted run would have drawn."""
        super()._save_rng_state(output_dir)
        alignment = self._alignment()
        if alignment is not None and hasattr(alignment, "get_rng_state"):
            with atomic_file(Path(output_dir) / f"{ALIGN_RNG_PREFIX}{self.args.process_index}.pth") as tmp:
                torch.save(alignment.get_rng_state(), tmp)

    def _load_rng_state(self, checkpoint: str | None) -> None:
        super()._load_rng_state(checkpoint)
        alignment = self._alignment()
        if checkpoint is None or alignment is None or not hasattr(alignment, "set_rng_state"):
            return
        path = Path(checkpoint) / f"{ALIGN_RNG_PREFIX}{self.args.process_index}.pth"
        if path.is_file():
            alignment.set_rng_state(torch.load(path, weights_only=True))
        else:
            logger.warning("%s: no alignment generator state; the resumed run draws other noise than the "
                           "uninterrupted one", checkpoint)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if self.projector_only and any((Path(resume_from_checkpoint) / n).is_file() for n in PROJECTOR_FILES):
            load_projector(self.accelerator.unwrap_model(model or self.model), resume_from_checkpoint)
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)
