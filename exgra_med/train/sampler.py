"""`--group_by_modality_length`: batches of one modality (image or text-only) and similar lengths, as LLaVA's flag.

The sampler yields the order of ONE epoch over the whole data set, for all processes, as consecutive "steps" of
`world_size x batch_size` indices: each step holds one modality, records of similar length (taken from a
length-sorted megabatch of up to 50 steps, as transformers' LengthGroupedSampler), dealt into `world_size`
micro-batches of balanced total length. accelerate hands micro-batch k of the epoch to process k mod
num_processes, so every process gets its slice of each step. The steps come in a random order drawn from
`seed + epoch` (the Trainer calls `set_epoch`), so a run and its resumption see the same order. Every index
appears exactly once per epoch; only the short last step of each modality goes to the end (image first), so at
most one micro-batch of the epoch mixes modalities.

Lengths are LLaVA's: the number of whitespace-separated words of all turns, positive for records with an image and
negative for text-only ones; they need no tokenization, so the order is ready before the first step.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

MEGABATCH_STEPS = 50  # at most this many steps' worth of records are sorted by length together (as transformers)


def modality_lengths(records: Sequence[dict]) -> list[int]:
    """Per record: words of all turns (at least 1), negated for records without an image (LLaVA's convention)."""
    lengths = []
    for record in records:
        words = max(1, sum(len(turn["value"].split()) for turn in record["conversations"]))
        lengths.append(words if "image" in record else -words)
    return lengths


def split_to_even_chunks(indices: list[int], lengths: Sequence[int], num_chunks: int) -> list[list[int]]:
    """Deal `indices` (longest first) into `num_chunks` chunks of equal size and similar total length: each index
    goes to the chunk with the smallest total so far. When the sizes cannot be equal, deal them round robin."""
    if len(indices) % num_chunks:
        return [indices[i::num_chunks] for i in range(num_chunks)]
    per_chunk = len(indices) // num_chunks
    chunks: list[list[int]] = [[] for _ in range(num_chunks)]
    totals = [0.0] * num_chunks
    for index in indices:
        shortest = min(range(num_chunks), key=totals.__getitem__)
        chunks[shortest].append(index)
        totals[shortest] += lengths[index]
        if len(chunks[shortest]) == per_chunk:
            totals[shortest] = float("inf")
    return chunks


def length_grouped_steps(
    lengths: Sequence[int], batch_size: int, world_size: int, generator: torch.Generator
) -> list[list[int]]:
    """A random permutation of `range(len(lengths))` cut into megabatches of up to `MEGABATCH_STEPS` steps (fewer
    for small data, at least 4 steps' worth per megabatch); each megabatch sorted by length, longest first, and cut
    into steps of `world_size * batch_size` indices, each dealt into `world_size` micro-batches of balanced total
    length. Returns the steps in order; only the last may be short. `lengths` are positive."""
    step = world_size * batch_size
    n_steps = max(1, min(len(lengths) // (4 * step), MEGABATCH_STEPS))
    order = torch.randperm(len(lengths), generator=generator).tolist()
    steps: list[list[int]] = []
    for start in range(0, len(order), n_steps * step):
        megabatch = sorted(order[start:start + n_steps * step], key=lambda i: lengths[i], reverse=True)
        for first in range(0, len(megabatch), step):
            chunks = split_to_even_chunks(megabatch[first:first + step], lengths, world_size)
            steps.append([i for chunk in chunks for i in chunk])
    return steps


def modality_length_grouped_indices(
    lengths: Sequence[int], batch_size: int, world_size: int, generator: torch.Generator
) -> list[int]:
    """One epoch's order: the full steps of both modalities (sign of `lengths`: > 0 image, < 0 text-only), each
    length-grouped, in random order; then the short last step of each modality (image first)."""
    full: list[list[int]] = []
    leftover: list[int] = []
    for group in ([i for i, n in enumerate(lengths) if n > 0], [i for i, n in enumerate(lengths) if n < 0]):
        if not group:
            continue
        for step in length_grouped_steps([abs(lengths[i]) for i in group], batch_size, world_size, generator):
            indices = [group[i] for i in step]
            if len(indices) == world_size * batch_size:
                full.append(indices)
            else:
                leftover += indices
    shuffled = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
    return [i for step in shuffled for i in step] + leftover


class ModalityLengthGroupedSampler(Sampler[int]):
    """Indices of one epoch grouped by modality and length (module docstring); seeded with `seed + epoch`.

    `world_size` is the number of micro-batches a megabatch is dealt into: processes x gradient accumulation steps
    (as LLaVA), so that each optimizer step's micro-batches on all processes come from one megabatch.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, world_size: int = 1, seed: int = 0) -> None:
        if batch_size < 1 or world_size < 1:
            raise ValueError(f"batch_size and world_size must be positive, got {batch_size} and {world_size}")
        if any(n == 0 for n in lengths):
            raise ValueError("lengths must be non-zero (positive: with image, negative: text-only)")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.world_size = world_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """The Trainer calls this at the start of every epoch; the order is a function of `seed + epoch`."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(modality_length_grouped_indices(self.lengths, self.batch_size, self.world_size, generator))
