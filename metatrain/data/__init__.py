"""The data pipeline (docs/design.md sections 3-5): documents in, batches of the batch contract out.

    config.py     `DataConfig`, `SourceConfig`
    sources.py    document sources (JSON Lines lines, Parquet rows, ArrayRecord records) and the record reader
    split.py      the train/eval split by document-id hash
    cache.py      the tensorstore token cache: write, read, stats
    packing.py    per-document shift and grain's concat-then-split packing
    mixture.py    per-lane shuffling and weighted mixing of sources
    sharding.py   lanes per process, lane-wise iterator state, `global_batch`
    pipeline.py   `make_batch_iterator`, `BatchIterator`
"""

from metatrain.data.config import DataConfig, SourceConfig
from metatrain.data.pipeline import BatchIterator, make_batch_iterator
from metatrain.data.sharding import global_batch, merge_lane_states, select_lanes

__all__ = [
    "BatchIterator",
    "DataConfig",
    "SourceConfig",
    "global_batch",
    "make_batch_iterator",
    "merge_lane_states",
    "select_lanes",
]
