"""`--group_by_modality_length`: the modality- and length-grouped sampler, alone, sharded as accelerate shards it,
and inside the Trainer."""

from __future__ import annotations

import random

import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from torch.utils.data import BatchSampler

from exgra_med.train.sampler import ModalityLengthGroupedSampler, modality_lengths


def _lengths(n: int, share_text: float = 0.3, seed: int = 0) -> list[int]:
    """Word counts from 5 to 400, a share of them text-only (negative)."""
    rng = random.Random(seed)
    return [rng.randint(5, 400) * (-1 if rng.random() < share_text else 1) for _ in range(n)]


def _micro_batches(order: list[int], batch_size: int) -> list[list[int]]:
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _rank_batches(sampler, batch_size: int, num_processes: int, rank: int) -> list[list[int]]:
    """The micro-batches process `rank` gets: accelerate's sharding of the Trainer's DataLoader batches."""
    batches = BatchSampler(sampler, batch_size, drop_last=False)
    return list(BatchSamplerShard(batches, num_processes=num_processes, process_index=rank, even_batches=True))


def _mixed(batch: list[int], lengths: list[int]) -> bool:
    return len({lengths[i] > 0 for i in batch}) > 1


def test_seeded_by_seed_plus_epoch_and_reproducible():
    lengths = _lengths(203)
    a = ModalityLengthGroupedSampler(lengths, batch_size=4, world_size=2, seed=7)
    b = ModalityLengthGroupedSampler(lengths, batch_size=4, world_size=2, seed=7)
    first = list(a)
    assert first == list(b) == list(a)  # same seed and epoch: same order, every time it is drawn
    a.set_epoch(1)
    second = list(a)
    assert second != first
    b.set_epoch(1)
    assert list(b) == second
    other = ModalityLengthGroupedSampler(lengths, batch_size=4, world_size=2, seed=8)
    assert list(other) != first
    # seed 7 at epoch 1 is seed 8 at epoch 0: the order is a function of seed + epoch
    assert second == list(other)


@pytest.mark.parametrize("n, batch_size, world_size", [(203, 4, 2), (64, 2, 4), (17, 3, 1), (12, 8, 2)])
def test_every_sample_exactly_once_per_epoch(n, batch_size, world_size):
    lengths = _lengths(n, seed=n)
    sampler = ModalityLengthGroupedSampler(lengths, batch_size, world_size, seed=3)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert len(order) == len(sampler) == n
        assert sorted(order) == list(range(n))


def test_each_rank_gets_its_slice_and_the_slices_cover_the_epoch():
    lengths = _lengths(160, seed=1)  # 160 = 20 steps of 2 processes x 4
    sampler = ModalityLengthGroupedSampler(lengths, batch_size=4, world_size=2, seed=0)
    ranks = [[i for batch in _rank_batches(sampler, 4, 2, r) for i in batch] for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 80
    assert not set(ranks[0]) & set(ranks[1])
    assert sorted(ranks[0] + ranks[1]) == list(range(160))
    # micro-batch k of rank 0 and of rank 1 form one step: the same modality on both processes
    steps = zip(_rank_batches(sampler, 4, 2, 0), _rank_batches(sampler, 4, 2, 1))
    mixed_steps = [b0 + b1 for b0, b1 in steps if _mixed(b0 + b1, lengths)]
    assert len(mixed_steps) <= 1


@pytest.mark.parametrize("batch_size, world_size", [(4, 1), (4, 2), (3, 4)])
def test_micro_batches_hold_one_modality_but_at_most_one(batch_size, world_size):
    lengths = _lengths(301, share_text=0.4, seed=5)
    sampler = ModalityLengthGroupedSampler(lengths, batch_size, world_size, seed=11)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = _micro_batches(list(sampler), batch_size)
        mixed = [b for b in batches if _mixed(b, lengths)]
        assert len(mixed) <= 1, mixed
        # both modalities really are interleaved over the epoch (the steps are shuffled, not image first)
        kinds = [lengths[b[0]] > 0 for b in batches[:-3]]
        assert sum(a != b for a, b in zip(kinds, kinds[1:])) > 5


def _padding_share(batches: list[list[int]], lengths: list[int]) -> float:
    """Share of padded positions when every micro-batch is padded to its longest record."""
    padded = sum(len(b) * max(abs(lengths[i]) for i in b) for b in batches)
    real = sum(abs(lengths[i]) for b in batches for i in b)
    return 1 - real / padded


def test_lengths_are_grouped():
    lengths = _lengths(4000, seed=2)  # megabatches of the full 50 steps
    sampler = ModalityLengthGroupedSampler(lengths, batch_size=8, world_size=2, seed=0)
    grouped = _padding_share(_micro_batches(list(sampler), 8), lengths)
    generator = torch.Generator().manual_seed(0)
    shuffled = _padding_share(_micro_batches(torch.randperm(4000, generator=generator).tolist(), 8), lengths)
    assert shuffled > 0.3
    assert grouped < 0.25 * shuffled, (grouped, shuffled)
    # the micro-batches of one step (one per process) have balanced total lengths
    order = list(sampler)
    totals = [sum(abs(lengths[i]) for i in b) for b in _micro_batches(order, 8)]
    step_gaps = [abs(a - b) / max(a, b) for a, b in zip(totals[0:-1:2], totals[1::2])]
    assert sorted(step_gaps)[len(step_gaps) // 2] < 0.05


def test_one_modality_only_is_length_grouping():
    lengths = [abs(n) for n in _lengths(1000, seed=4)]
    order = list(ModalityLengthGroupedSampler(lengths, batch_size=4, seed=0))
    assert sorted(order) == list(range(1000))
    assert _padding_share(_micro_batches(order, 4), lengths) < 0.05


def test_modality_lengths_follow_llava():
    records = [
        {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                             {"from": "gpt", "value": "A red circle."}]},
        {"conversations": [{"from": "human", "value": "Hello there"}, {"from": "gpt", "value": "Hi"}]},
    ]
    assert modality_lengths(records) == [7, -3]  # "<image>" counts as a word, as in LLaVA
    with pytest.raises(ValueError, match="non-zero"):
        ModalityLengthGroupedSampler([3, 0], batch_size=1)


def test_trainer_draws_its_batches_from_the_grouped_sampler(tmp_path):
    from exgra_med.train.args import TrainingArguments
    from exgra_med.train.trainer import ExGraMedTrainer

    class Records(torch.utils.data.Dataset):
        def __init__(self, lengths):
            self.records = [
                {"conversations": [{"from": "gpt", "value": " ".join(["w"] * abs(n))}],
                 **({"image": "x.png"} if n > 0 else {})}
                for n in lengths
            ]

        def __len__(self):
            return len(self.records)

        def __getitem__(self, i):
            return {"index": torch.tensor(i)}

    lengths = _lengths(64, share_text=0.5, seed=9)
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, group_by_modality_length=True, seed=5,
        use_cpu=True, report_to="none", dataloader_num_workers=0,
    )
    trainer = ExGraMedTrainer(model=torch.nn.Linear(1, 1), args=args, train_dataset=Records(lengths))
    loader = trainer.get_train_dataloader()
    batches = [b["index"].tolist() for b in loader]
    assert sorted(i for b in batches for i in b) == list(range(64))
    assert sum(_mixed(b, lengths) for b in batches) <= 1
    expected = ModalityLengthGroupedSampler(lengths, batch_size=4, world_size=1, seed=5)
    assert [i for b in batches for i in b] == list(expected)
    with pytest.raises(ValueError, match="--group_by_modality_length"):
        TrainingArguments(output_dir=str(tmp_path), group_by_modality_length=True,
                          train_sampling_strategy="group_by_length")
