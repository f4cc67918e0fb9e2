"""The training stream: sources -> encoded documents -> packed rows -> batches.

    make_batch_iterator(data, batch_size=B, seq_len=L, split="train")

per lane (one row of the global batch, see `sharding.py`), all grain:

    records (JSON Lines, Parquet, ArrayRecord | cache | seqio Task)
                                                        sources.py, formats.py, cache.py, seqio.py
      .shuffle(seed).repeat()[lane::B]  per source      mixture.py
      .map(read + split + encode + shift)               sources.py, packing.py
      MapDataset.mix(weights)                           (or, with data.schedule,
      .to_iter_dataset()                                 ScheduledMixIterDataset: mixture.py)
      ConcatThenSplitIterDataset(L)                     packing.py

then `LanesIterDataset` takes one row from each of this process's lanes per step
(`[B / process_count, L]`, the batch contract), and with `data.num_workers > 0` grain's
`mp_prefetch` runs all of that in worker processes.

Splits: "train" repeats forever, reshuffled each epoch. "eval" is finite: every
held-out document once, in source order; lanes that run out give all-padding rows
until the last lane is done, then iteration stops.

Bad input: a bad record is skipped and counted in `BatchIterator.skips` (the first few
logged with file:line, document id and reason), or with `data.strict` stops the run
with that message. Skips made in worker processes travel with the batches to the main
process. A source that is empty or has no valid document of the split is a `UserError`
before any batch is made.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grain
import jax
import numpy as np

from metatrain.data.cache import CacheReader, TokenCache, check_cache_matches, is_cache_dir
from metatrain.data.config import DataConfig, ScheduleStage, SourceConfig
from metatrain.data.mixture import Source, eval_lane, scheduled_train_lane, train_lane
from metatrain.data.packing import empty_row, pack_examples, rows_to_batch
from metatrain.data.sharding import LANES_KEY, gather_state, local_lanes, select_lanes
from metatrain.data.sources import (
    MIN_SKIPS_BEFORE_GIVING_UP,
    EncoderSpec,
    JsonlReader,
    SkipLog,
    expand_jsonl_paths,
    open_records,
)
from metatrain.data.split import check_split, in_split
from metatrain.documents import SkipCounter
from metatrain.errors import UserError

STATE_FORMAT = "metatrain-data-state"
STATE_VERSION = 1
_SKIPPED = "_skipped"  # batch key carrying skipped records from workers to the main process
_SYNC = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)  # parallelism is mp_prefetch's job


# -- lanes -> batches ---------------------------------------------------------------------


class LanesIterDataset(grain.IterDataset):
    """One packed row from each lane per step, stacked into a batch (batch contract).

    Args:
        lanes: the packed lanes of this process, in global order.
        lane_ids: their global indices (the keys of their state).
        seq_len: row length.
        finite: the lanes may end (eval); exhausted lanes give padding rows.
        skips: the `SkipLog` the lanes' readers write to; drained into each batch.
    """

    def __init__(
        self, lanes: Sequence[grain.IterDataset], lane_ids: Sequence[int], seq_len: int, finite: bool, skips: SkipLog
    ):
        super().__init__(list(lanes))
        self.lane_ids = list(lane_ids)
        self.seq_len = seq_len
        self.finite = finite
        self.skips = skips

    def __iter__(self) -> "_LanesIterator":
        return _LanesIterator(self)

    def __str__(self) -> str:
        return f"LanesIterDataset(lanes={self.lane_ids[0]}..{self.lane_ids[-1]}, seq_len={self.seq_len})"


def _json_safe_cts_state(state: dict[str, Any]) -> dict[str, Any]:
    """A concat-then-split state after a JSON round trip, with its slice tuples back.

    grain compares remainder slices to the tuple `(-1, -1)`; JSON turns tuples into lists.
    """
    state = dict(state)
    state["remainder_slices"] = {k: tuple(v) for k, v in state["remainder_slices"].items()}
    return state


class _LanesIterator(grain.DatasetIterator):
    def __init__(self, ds: LanesIterDataset):
        self._iters = [lane.__iter__() for lane in ds.parents]
        super().__init__(self._iters)
        self._ds = ds
        self._done = [False] * len(self._iters)

    def __next__(self) -> dict[str, np.ndarray]:
        rows, real = [], False
        for i, it in enumerate(self._iters):
            if not self._done[i]:
                try:
                    rows.append(next(it))
                    real = True
                    continue
                except StopIteration:
                    if not self._ds.finite:
                        raise RuntimeError(f"lane {self._ds.lane_ids[i]} of an infinite split ended") from None
                    self._done[i] = True
            rows.append(empty_row(self._ds.seq_len))
        if not real:
            raise StopIteration
        batch = rows_to_batch(rows)
        batch[_SKIPPED] = self._ds.skips.drain()
        return batch

    def get_state(self) -> dict[str, Any]:
        return {
            LANES_KEY: {
                str(r): {"packing": it.get_state(), "done": done}
                for r, it, done in zip(self._ds.lane_ids, self._iters, self._done)
            }
        }

    def set_state(self, state: dict[str, Any]) -> None:
        lanes = state[LANES_KEY]
        for i, (r, it) in enumerate(zip(self._ds.lane_ids, self._iters)):
            lane = lanes[str(r)]
            it.set_state(_json_safe_cts_state(lane["packing"]))
            self._done[i] = bool(lane["done"])
        self._ds.skips.drain()  # skips noted before the restore are not this run's


# -- the iterator the trainer sees ----------------------------------------------------------


class BatchIterator:
    """Host-local batches of the batch contract, with checkpointable state.

    Iterating yields dicts of `[batch_size // process_count, seq_len]` NumPy arrays:
    this process's rows of each global batch, in global order.

    Attributes:
        skips: bad records skipped so far (count and the first few messages).
        batch_size: global batch size.
        seq_len: row length.
        lanes: the global rows this process makes.
    """

    def __init__(self, dataset: grain.IterDataset, *, identity: dict[str, Any], lanes: range, gather: bool,
                 skips: SkipCounter | None = None):
        self._dataset = dataset
        self._iter = dataset.__iter__()
        self._identity = identity
        self._gather = gather
        self.lanes = lanes
        self.batch_size = identity["batch_size"]
        self.seq_len = identity["seq_len"]
        self.skips = SkipCounter() if skips is None else skips
        self._copy = identity["num_workers"] > 0

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._iter is None:
            raise RuntimeError("this BatchIterator was closed")
        batch = next(self._iter)
        for error in batch.pop(_SKIPPED):
            self.skips.add(error)
        # From worker processes the arrays live in shared memory; plain copies free it
        # at once instead of whenever the caller drops the batch.
        return {k: np.array(v) for k, v in batch.items()} if self._copy else batch

    def get_state(self) -> dict[str, Any]:
        """The stream's position, JSON-serialisable, for the checkpoint.

        In a run of several JAX processes this is a collective (every process must call
        it at the same step) and returns the state of all lanes on every process, so
        the checkpoint restores on any process count.
        """
        state = {"format": STATE_FORMAT, "version": STATE_VERSION, **self._identity, "grain": self._iter.get_state()}
        return gather_state(state) if self._gather else state

    def set_state(self, state: dict[str, Any]) -> None:
        """Continues the stream exactly where `state` (from `get_state`) left it.

        Raises:
            UserError: the state is not a data state, or was saved by a run whose data
                config, batch size or sequence length differ.
        """
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise UserError("the checkpoint's data state is not a metatrain data state (format missing)")
        if state.get("version") != STATE_VERSION:
            raise UserError(f"data state version {state.get('version')} is not supported (expected {STATE_VERSION})")
        changed = [k for k, v in self._identity.items() if state.get(k) != v]
        if changed:
            detail = ", ".join(f"{k}: saved {state.get(k)!r}, now {self._identity[k]!r}" for k in changed)
            raise UserError(
                f"cannot resume the data stream: the run changed ({detail}). "
                "Resume with the data settings of the checkpoint, or start a new run."
            )
        try:
            grain_state = select_lanes(state["grain"], self.lanes)
        except ValueError as e:
            raise UserError(f"cannot resume the data stream: {e}") from None
        self._iter.set_state(grain_state)

    def close(self) -> None:
        """Stops worker processes (if any); the iterator cannot be used afterwards."""
        if self._iter is not None:
            self._iter.close()
            # Dropped now, so grain's own cleanup in __del__ runs while modules are alive.
            self._iter = None

    def __enter__(self) -> "BatchIterator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- building -------------------------------------------------------------------------------


def _encoder_spec(data: DataConfig) -> EncoderSpec:
    return EncoderSpec(str(data.tokenizer), str(data.tags), data.mantra, data.mantra_policy)


def _open_source(data: DataConfig, index: int, split: str, skips: SkipLog) -> list[Source]:
    """The grain sources of one configured source: one, or one per Task of a seqio Mixture."""
    cfg = data.sources[index]
    spec = _encoder_spec(data)
    if cfg.seqio is not None:
        from metatrain.data.seqio import open_seqio_source  # the `seqio` extra: TensorFlow, only when asked

        return open_seqio_source(cfg, spec, split=split, eval_fraction=data.eval_fraction, strict=data.strict,
                                 skips=skips)
    name = str(cfg.path)
    if is_cache_dir(cfg.path):
        cache = TokenCache(cfg.path)
        check_cache_matches(cfg.path, cache.meta, spec)
        reader = CacheReader(cache, split=split, eval_fraction=data.eval_fraction)
        records = grain.MapDataset.range(len(cache))
    else:
        lines = open_records(expand_jsonl_paths(cfg.path), max_line_bytes=data.max_line_bytes)
        reader = JsonlReader(spec, split=split, eval_fraction=data.eval_fraction, strict=data.strict, skips=skips)
        records = grain.MapDataset.source(lines)
    if len(records) == 0:
        raise UserError(f"data source {name} is empty: it holds no documents")
    return [Source(name=name, records=records, reader=reader, weight=cfg.weight)]


def _expand_schedule(schedule: Sequence[ScheduleStage], owners: Sequence[int], shares: Sequence[float]):
    """The schedule over grain sources: a configured source's stage weight split by its shares
    (the rates of a seqio Mixture's Tasks; 1 for every other source)."""
    return tuple(ScheduleStage(stage.step, tuple(stage.weights[k] * share for k, share in zip(owners, shares)))
                 for stage in schedule)


def _has_document(source: Source, split: str, data: DataConfig) -> bool:
    """Whether the source holds a valid document of `split` (reads until it finds one).

    Raises:
        UserError: no valid document at all (naming the first bad records), or in
            strict mode the first bad record.
    """
    reader = source.reader
    if isinstance(reader, CacheReader):
        hashes = reader.cache.id_hashes
        return any(in_split(int(h), split, data.eval_fraction) for h in hashes)
    if not isinstance(reader, JsonlReader):  # a seqio Task's examples, checked when they were read
        return reader.has_document()
    log = SkipLog()
    probe = JsonlReader(reader.encoder_spec, split=None, eval_fraction=0.0, strict=data.strict, skips=log)
    probe._encoder = reader.encoder  # share the (already built) encoder
    valid = 0
    for i in range(len(source.records)):
        record = source.records[i]
        encoded = probe.encode_record(record)
        if encoded is None:
            continue
        valid += 1
        if reader.encode_record(record) is not None:  # valid and of this split
            return True
    if valid == 0:
        skipped = log.drain()
        first = "; ".join(str(e) for _, e in zip(range(3), skipped)) or "every line is blank"
        raise UserError(f"data source {source.name} has no valid document ({len(skipped)} bad records): {first}")
    return False


def _mark_absl_flags_parsed() -> None:
    """grain's worker processes read absl flags; outside an absl app nobody parsed them.

    Marking them parsed keeps every flag at its default (what grain assumes anyway).
    """
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _lane_examples(
    schedule: Sequence[ScheduleStage], sources: Sequence[Source], split: str, lane: int, num_lanes: int, seed: int,
    seq_len: int,
) -> grain.IterDataset:
    """The examples one lane packs: mixed by weight or by `schedule` (train), or one pass (eval)."""
    if split == "eval":
        return eval_lane(sources, lane, num_lanes).to_iter_dataset(_SYNC)
    if schedule:
        return scheduled_train_lane(sources, schedule, lane, num_lanes, seed, seq_len)
    return train_lane(sources, lane, num_lanes, seed).to_iter_dataset(_SYNC)


def _source_identity(source: SourceConfig) -> dict[str, Any]:
    if source.seqio is None:  # as states always had it
        return {"path": str(source.path), "weight": source.weight}
    return {"seqio": source.seqio, "module": source.module, "split": source.split, "feature": source.feature,
            "weight": source.weight}


def make_batch_iterator(
    data: DataConfig,
    *,
    batch_size: int,
    seq_len: int,
    split: str = "train",
    seed: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    skips: SkipCounter | None = None,
) -> BatchIterator:
    """The batch stream of one split, for this process.

    Args:
        data: sources and their schedule, tokenizer, split fraction, strictness, workers.
        batch_size: global batch size (rows over all processes).
        seq_len: positions per row.
        split: "train" (infinite, reshuffled each epoch) or "eval" (finite, one pass).
        seed: order of the train split; None uses `data.seed`.
        process_index: this process (default `jax.process_index()`).
        process_count: number of processes (default `jax.process_count()`).
        skips: the counter bad records go to (default: a new one); a trainer shares one
            between its train and eval streams, so each bad record is counted once.

    Returns:
        A `BatchIterator` yielding `[batch_size // process_count, seq_len]` batches.

    Raises:
        UserError: a missing, empty or all-invalid source; a split with no document; a
            token cache built with another tokenizer; a bad record in strict mode.
        ValueError: bad sizes.
    """
    check_split(split)
    if batch_size < 1 or seq_len < 2:
        raise ValueError(f"need batch_size >= 1 and seq_len >= 2, got batch_size={batch_size}, seq_len={seq_len}")
    seed = data.seed if seed is None else seed
    real_processes = jax.process_count()
    process_index = jax.process_index() if process_index is None else process_index
    process_count = real_processes if process_count is None else process_count
    try:
        lanes = local_lanes(batch_size, process_index, process_count)
    except ValueError as e:
        raise UserError(f"trainer.batch_size: {e}") from None

    log = SkipLog()
    opened = [_open_source(data, k, split, log) for k in range(len(data.sources))]
    sources = [src for group in opened for src in group]
    if split == "train":
        # The infinite stream repeats its sources: more bad records than a whole pass
        # holds between two batches, and no batch will come (see `SkipLog`).
        log.give_up_after = max(sum(len(src.records) for src in sources), MIN_SKIPS_BEFORE_GIVING_UP)
        log.batch = f"a batch of {batch_size}x{seq_len} positions"
    owners = [k for k, group in enumerate(opened) for _ in group]
    shares = [src.weight / data.sources[k].weight for k, src in zip(owners, sources)]
    schedule = _expand_schedule(data.schedule, owners, shares) if split == "train" else ()
    found = [_has_document(src, split, data) for src in sources]
    if split == "train" and not all(found):
        empty = [s.name for s, f in zip(sources, found) if not f]
        raise UserError(
            f"data source(s) {', '.join(empty)} have no training document: every valid document is held out "
            f"for eval (eval_fraction={data.eval_fraction}); add documents or lower data.eval_fraction"
        )
    if split == "eval" and not any(found):
        raise UserError(
            f"the eval split is empty: no document's id hashes below eval_fraction={data.eval_fraction}; "
            "raise data.eval_fraction or add documents"
        )

    packed = [pack_examples(_lane_examples(schedule, sources, split, lane, batch_size, seed, seq_len), seq_len)
              for lane in lanes]
    ds: grain.IterDataset = LanesIterDataset(packed, lanes, seq_len, finite=split == "eval", skips=log)
    # Records of the other split read as None and are dropped; that is by design, so
    # grain's "most elements were filtered" warning would only be noise for eval.
    ds = grain.experimental.WithOptionsIterDataset(
        ds, grain.experimental.DatasetOptions(filter_warn_threshold_ratio=None)
    )
    if data.num_workers > 0:
        _mark_absl_flags_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data.num_workers))

    identity = {
        "split": split,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "seed": seed,
        "num_workers": data.num_workers,
        "sources": [_source_identity(s) for s in data.sources],
        "eval_fraction": data.eval_fraction,
    }
    if split == "train" and data.schedule:  # absent without one: such states are as they always were
        identity["schedule"] = [{"step": stage.step, "weights": list(stage.weights)} for stage in data.schedule]
    gather = process_count == real_processes and real_processes > 1
    return BatchIterator(ds, identity=identity, lanes=lanes, gather=gather, skips=skips)
