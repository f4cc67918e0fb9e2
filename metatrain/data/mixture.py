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

With a schedule (`DataConfig.schedule`), lane r reads the same per-source streams
through `ScheduledMixIterDataset` instead of grain's mix:

    step of a document  = (positions of the lane's earlier documents) // seq_len
    its stage           = the stage with the largest start <= that step
    its source          = grain's interleave of the stage's weights, at the stage's n-th draw

Packing concatenates a lane's examples end to end and cuts rows of exactly `seq_len`
positions, and the trainer takes one row per lane per step, so that step is the row the
document's first position lands in. At a boundary, a document that started in the
last step of one stage and runs on into the next stage's first step was drawn by the
earlier stage; every document that starts in the new stage's first step or later is
drawn by the new one. Each source keeps one position per lane for the whole run, so a
stage change neither repeats nor skips a document of any source. The interleave is
grain's mix (same rounding, same every-window exactness as above) restarted at each
stage's first draw, over the stage's sources of positive weight. All of this depends
on the lane alone (any process count gives the same batches); its state is a position
per source, the positions packed, the stage and its draws so far. With `data.num_workers = W`, worker w reads every
W-th document of each source stream and makes the rows of steps w, w + W, ...

Eval split: the sources are concatenated in order, unshuffled, and read once (lane r
takes records r, r + B, ...); the split is finite. Schedules do not apply to it.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np

from metatrain.data.config import ScheduleStage
from metatrain.data.packing import EXAMPLE


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


def _lane_streams(sources: Sequence[Source], lane: int, num_lanes: int, seed: int) -> list[grain.MapDataset]:
    """Each source's infinite stream of examples for one lane (None where a record is skipped)."""
    return [
        src.records.shuffle(seed=source_seed(seed, k)).repeat()[lane::num_lanes].map(src.reader)
        for k, src in enumerate(sources)
    ]


def train_lane(sources: Sequence[Source], lane: int, num_lanes: int, seed: int) -> grain.MapDataset:
    """The infinite, mixed stream of examples of one lane of the train split."""
    parts = _lane_streams(sources, lane, num_lanes, seed)
    if len(parts) == 1:
        return parts[0]
    return grain.MapDataset.mix(parts, weights=[src.weight for src in sources])


def scheduled_train_lane(
    sources: Sequence[Source], schedule: Sequence[ScheduleStage], lane: int, num_lanes: int, seed: int, seq_len: int
) -> grain.IterDataset:
    """The infinite stream of examples of one lane of the train split, mixed by `schedule`."""
    return ScheduledMixIterDataset(_lane_streams(sources, lane, num_lanes, seed), schedule, seq_len)


def _stage_interleave(weights: Sequence[float]) -> tuple[list[int], grain.MapDataset | None]:
    """The sources a stage reads, and which of them each draw of the stage takes.

    grain's mix of constant streams (stream i always yields i) is grain's interleave
    itself: element n says which source gives the stage's n-th document. None when the
    stage reads one source only. Sources of weight 0 are left out (grain refuses 0).
    """
    used = [k for k, w in enumerate(weights) if w > 0]
    if len(used) == 1:
        return used, None
    labels = [grain.MapDataset.source([i]).repeat() for i in range(len(used))]
    return used, grain.MapDataset.mix(labels, weights=[weights[k] for k in used])


class ScheduledMixIterDataset(grain.IterDataset):
    """One lane's documents, each drawn from the sources by the weights of its step's stage.

    Args:
        streams: each source's infinite stream of examples for this lane (None: skipped).
        schedule: the stages (validated by `DataConfig`: the first starts at step 0).
        seq_len: row length, which turns positions packed into the step of a row.
    """

    def __init__(self, streams: Sequence[grain.MapDataset], schedule: Sequence[ScheduleStage], seq_len: int):
        super().__init__(list(streams))
        self.starts = [stage.step for stage in schedule]
        self.stages = [_stage_interleave(stage.weights) for stage in schedule]
        self.seq_len = seq_len
        # Row k of this dataset is training step `first_step + k * step_stride`; grain's
        # worker w of W makes batches w, w + W, ... (see `set_slice`).
        self.first_step, self.step_stride = 0, 1

    def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
        """What grain calls in worker w of W with `slice(w, None, W)`: this worker reads
        every W-th document of each source and makes every W-th row of the lane."""
        if sequential_slice or sl.stop is not None:
            raise ValueError(f"a mixture schedule supports grain's strided worker slices only, got {sl}")
        start, stride = sl.start or 0, sl.step or 1
        self._parents = tuple(stream[sl] for stream in self._parents)
        self.first_step += start * self.step_stride
        self.step_stride *= stride

    def source_of(self, stage: int, draw: int) -> int:
        """The source of the `draw`-th document of `stage` (counted from the stage's first)."""
        used, interleave = self.stages[stage]
        return used[0] if interleave is None else used[interleave[draw]]

    def __iter__(self) -> "_ScheduledMixIterator":
        return _ScheduledMixIterator(self)

    def __str__(self) -> str:
        return f"ScheduledMixIterDataset(starts={self.starts}, seq_len={self.seq_len})"


class _ScheduledMixIterator(grain.DatasetIterator):
    def __init__(self, ds: ScheduledMixIterDataset):
        super().__init__()
        self._ds = ds
        self._positions = [0] * len(ds.parents)  # next index into each source's stream
        self._tokens = 0  # positions of the documents returned so far
        self._stage, self._drawn = 0, 0  # the stage of the last draw, and its draws so far

    def __next__(self) -> dict[str, np.ndarray]:
        ds = self._ds
        while True:  # a skipped record keeps its draw, as in grain's mix
            step = ds.first_step + (self._tokens // ds.seq_len) * ds.step_stride
            stage = bisect.bisect_right(ds.starts, step) - 1
            if stage != self._stage:
                self._stage, self._drawn = stage, 0
            k = ds.source_of(stage, self._drawn)
            self._drawn += 1
            example = ds.parents[k][self._positions[k]]
            self._positions[k] += 1
            if example is not None:
                self._tokens += len(example[EXAMPLE])
                return example

    def get_state(self) -> dict[str, Any]:
        return {"positions": list(self._positions), "tokens": self._tokens, "stage": self._stage, "drawn": self._drawn}

    def set_state(self, state: dict[str, Any]) -> None:
        self._positions = [int(p) for p in state["positions"]]
        self._tokens, self._stage, self._drawn = int(state["tokens"]), int(state["stage"]), int(state["drawn"])


def eval_lane(sources: Sequence[Source], lane: int, num_lanes: int) -> grain.MapDataset:
    """The finite stream of examples of one lane of the eval split (every record once)."""
    records = grain.MapDataset.concatenate([src.records.map(src.reader) for src in sources])
    return records[lane::num_lanes]
