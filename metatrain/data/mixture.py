"""What each lane (row of the global batch) reads: sources, shuffled and mixed by weight.

Train split, lane r of B:

    for each source k:  records_k.shuffle(seed_k).repeat()[r::B].map(reader_k)
    mixed:              grain's MapDataset.mix(..., weights)

Each source is reshuffled every epoch (grain derives the epoch's permutation from the
seed and the epoch number) and repeats forever; its lanes take disjoint strides of that
infinite order. Mixing is grain's deterministic interleave in proportion to the
weights, counted in *records* (documents), not tokens. grain scales the weights so the
smallest becomes 100 and rounds down (0.7/0.3 -> 233/100, i.e. 69.97% / 30.03%) and
then interleaves exactly: every 333 consecutive records of a lane hold 233 of the
first source. The proportions therefore hold in every lane and every batch, not only
on average. Records that are skipped (bad, or of the other split) keep their slot, so
the proportions are of records read, and token proportions follow document lengths.

Eval split: the sources are concatenated in order, unshuffled, and read once (lane r
takes records r, r + B, ...); the split is finite.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import grain
import numpy as np


@dataclasses.dataclass(frozen=True)
class Source:
    """One source ready for grain.

    Attributes:
        name: the path it was read from (for messages).
        records: random-access records (JSON Lines lines, or cache document indices).
        reader: record -> packed-ready example, or None to skip it.
        weight: mixture weight.
    """

    name: str
    records: grain.MapDataset
    reader: Callable
    weight: float


def source_seed(seed: int, source_index: int) -> int:
    """The shuffle seed of one source: independent per source, fixed by the run seed."""
    return int(np.random.SeedSequence([seed, source_index]).generate_state(1)[0])


def train_lane(sources: Sequence[Source], lane: int, num_lanes: int, seed: int) -> grain.MapDataset:
    """The infinite, mixed stream of examples of one lane of the train split."""
    parts = [
        src.records.shuffle(seed=source_seed(seed, k)).repeat()[lane::num_lanes].map(src.reader)
        for k, src in enumerate(sources)
    ]
    if len(parts) == 1:
        return parts[0]
    return grain.MapDataset.mix(parts, weights=[src.weight for src in sources])


def eval_lane(sources: Sequence[Source], lane: int, num_lanes: int) -> grain.MapDataset:
    """The finite stream of examples of one lane of the eval split (every record once)."""
    records = grain.MapDataset.concatenate([src.records.map(src.reader) for src in sources])
    return records[lane::num_lanes]
