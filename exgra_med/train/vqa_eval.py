"""VQA scoring during fine-tuning: answers generated on val at each evaluation, test scored at the end.

`VQAScoringTrainer.evaluate()` generates answers (the `simple` eval prompt, greedy, batched) for a
`VQASplit` and returns the reference's in-training metrics as `eval_{split}_open_recall`,
`eval_{split}_closed_accuracy` and `eval_{split}_average` (percent), so that
`--metric_for_best_model eval_val_average --load_best_model_at_end True` keeps the best epoch.

Several ranks: each rank answers every world_size-th question and the answers are gathered, so all
ranks log the same metrics. DDP generates with the unwrapped model; FSDP (v1) inside
`summon_full_params`; ZeRO-3 and FSDP2, whose forward gathers parameters collectively, with
`synced_gpus=True` and shards padded to the same length so that every rank makes the same calls.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist
from torch.distributed.fsdp import FullyShardedDataParallel

from exgra_med.data.images import DEFAULT_ASPECT_RATIO
from exgra_med.eval.generate import answer_line, generate_answers, load_questions
from exgra_med.eval.metrics import vqa_train_metrics
from exgra_med.io import write_jsonl_atomic
from exgra_med.train.trainer import ExGraMedTrainer

logger = logging.getLogger(__name__)


@dataclass
class VQASplit:
    """VQA records to score (`name` becomes part of the metric keys) and their image folder."""

    name: str
    records: list[dict]
    image_folder: str | None

    def __len__(self) -> int:
        return len(self.records)

    @classmethod
    def load(cls, name: str, path: str | os.PathLike, image_folder: str | None) -> VQASplit:
        """Read a VQA record file (ids unique, answer types OPEN/CLOSED)."""
        records = load_questions(path)
        for r in records:
            if r.get("answer_type") not in ("OPEN", "CLOSED"):
                raise ValueError(f"{path}: record {r['id']!r} answer_type must be OPEN or CLOSED")
        return cls(name, records, image_folder)


@dataclass
class VQAGenerationSettings:
    """How answers are generated during training (the image processor is the trainer's)."""

    batch_size: int = 16
    max_new_tokens: int = 1024  # the reference's; generation stops at "###"
    conv_mode: str = "simple"
    image_aspect_ratio: str = DEFAULT_ASPECT_RATIO


def split_path(data_path: str, given: str | None, split: str) -> str:
    """`given`, else the reference's convention: the training file name with its leading "train" replaced
    by `split` (train_w_options_new.json -> val_w_options_new.json), which must exist."""
    if given:
        return given
    folder, name = os.path.split(data_path)
    candidate = os.path.join(folder, split + name[len("train") :]) if name.startswith("train") else None
    if candidate is None or not os.path.isfile(candidate):
        raise ValueError(
            f"--evaluate_on_{split} True needs --{split}_data_path "
            f"(no {candidate or split + '*.json'} next to {data_path})"
        )
    return candidate


class VQAScoringTrainer(ExGraMedTrainer):
    """`ExGraMedTrainer` whose `evaluate()` scores a `VQASplit` by generating answers; other eval sets go
    through the usual loss evaluation."""

    def __init__(self, *args, vqa_settings: VQAGenerationSettings | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.vqa_settings = vqa_settings

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """VQA metrics (`{prefix}_{split}_average`, ...) for a `VQASplit`, else the Trainer's evaluation."""
        target = eval_dataset if eval_dataset is not None else self.eval_dataset
        if not isinstance(target, VQASplit):
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        metrics = self.score_split(target, metric_key_prefix)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def score_split(
        self, split: VQASplit, metric_key_prefix: str = "eval", answers_file: str | os.PathLike | None = None
    ) -> dict[str, float]:
        """Generate answers for `split` on all ranks, gather them, score; rank 0 writes `answers_file`."""
        if self.vqa_settings is None:
            raise ValueError("VQAScoringTrainer needs vqa_settings to score a VQA split")
        answers = self._generate(split)
        metrics = vqa_train_metrics(split.records, answers)
        out = {f"{metric_key_prefix}_{split.name}_{k}": round(float(v), 4) for k, v in metrics.items()}
        out["epoch"] = self.state.epoch or 0.0
        if answers_file is not None and self.is_world_process_zero():
            model_id = Path(self.args.output_dir).name
            write_jsonl_atomic(answers_file, [answer_line(r, answers[str(r["id"])], model_id) for r in split.records])
            logger.info("%s answers written to %s", split.name, answers_file)
        return out

    def _generate(self, split: VQASplit) -> dict[str, str]:
        s = self.vqa_settings
        world, rank = self.args.world_size, self.args.process_index
        shard = split.records[rank::world]
        synced = world > 1 and self._needs_synced_generation()
        if synced and shard:
            # Same number of batches on every rank: pad with repeats (their answers overwrite themselves).
            longest = -(-len(split.records) // world)
            shard = shard + [shard[0]] * (longest - len(shard))
        model = self.accelerator.unwrap_model(self.model)
        with self._full_parameters(), self.autocast_smart_context_manager():
            answers = generate_answers(
                model,
                self.processing_class,
                self.image_processor,
                shard,
                s.batch_size,
                s.conv_mode,
                s.max_new_tokens,
                image_folder=split.image_folder,
                image_aspect_ratio=s.image_aspect_ratio,
                generate_kwargs={"synced_gpus": True} if synced else None,
            )
        if world > 1:
            gathered: list[dict[str, str] | None] = [None] * world
            dist.all_gather_object(gathered, answers)
            answers = {k: v for part in gathered for k, v in (part or {}).items()}
        return answers

    def _is_fsdp_v1(self) -> bool:
        return any(isinstance(m, FullyShardedDataParallel) for m in self.model_wrapped.modules())

    def _needs_synced_generation(self) -> bool:
        zero3 = self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3
        fsdp2 = self.is_fsdp_enabled and not self._is_fsdp_v1()
        return zero3 or fsdp2

    def _full_parameters(self):
        if self.is_fsdp_enabled and self._is_fsdp_v1():
            return FullyShardedDataParallel.summon_full_params(self.model_wrapped, writeback=False, recurse=True)
        return contextlib.nullcontext()


def vqa_splits(data_args, image_folder: str | None) -> tuple[VQASplit | None, VQASplit | None]:
    """(val, test) splits asked for by `--evaluate_on_val` / `--evaluate_on_test` (None when off)."""
    val = test = None
    if data_args.evaluate_on_val:
        val = VQASplit.load("val", split_path(data_args.data_path, data_args.val_data_path, "val"), image_folder)
    if data_args.evaluate_on_test:
        test = VQASplit.load("test", split_path(data_args.data_path, data_args.test_data_path, "test"), image_folder)
    return val, test


def check_eval_schedule(args, val: VQASplit | None) -> None:
    """Fail early on settings under which val scoring cannot work; warn when it would never run."""
    strategy = str(getattr(args.eval_strategy, "value", args.eval_strategy))
    if val is None:
        if args.load_best_model_at_end and "val" in str(args.metric_for_best_model):
            raise ValueError(f"--metric_for_best_model {args.metric_for_best_model} needs --evaluate_on_val True")
        return
    if strategy == "no":
        logger.warning("--evaluate_on_val True but --eval_strategy no: val is never scored during training")


def finish_with_test(trainer: VQAScoringTrainer, test: VQASplit) -> dict[str, float]:
    """Score `test` with the final (or best) model: log `eval_test_*`, save `test_results.json` and
    the answers as `test_answers.jsonl` in output_dir."""
    answers_file = Path(trainer.args.output_dir) / "test_answers.jsonl"
    metrics = trainer.score_split(test, "eval", answers_file=answers_file)
    trainer.log(metrics)
    trainer.save_metrics("test", {k: v for k, v in metrics.items() if k != "epoch"}, combined=False)
    trainer.save_state()  # trainer_state.json's log history now ends with the test scores
    return metrics
