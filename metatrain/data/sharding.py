"""Per-host sharding: which rows of the global batch a process makes, and their state.

The global batch has one *lane* per row. Lane r is its own packed stream: it reads
documents r, r + B, r + 2B, ... of every source's shuffled order (B = global batch
size) and packs them into rows, so row r of the batch at step s is the s-th row of
lane r. What a lane produces depends on the seed, B and `seq_len`, never on the number
of processes. Process p of P makes the contiguous lanes
`[p * B / P, (p + 1) * B / P)`, its rows of every global batch, in global order, and
reads only those lanes' documents, disjoint from every other process's.

Iterator state is kept per lane under a `"lanes"` key (`{"<lane>": state}`), wherever
grain nests it. A state of all lanes restores any process count: each process picks
its lanes (`select_lanes`); the states of several processes join into one
(`merge_lane_states`). In a multi-process run `gather_state` does the join across
processes, so every process, and the checkpoint, holds the state of all lanes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

LANES_KEY = "lanes"


def local_lanes(batch_size: int, process_index: int, process_count: int) -> range:
    """The global lanes (batch rows) process `process_index` of `process_count` makes.

    Raises:
        ValueError: the batch does not divide evenly, or the index is out of range.
    """
    if process_count < 1 or not (0 <= process_index < process_count):
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
    if batch_size % process_count:
        raise ValueError(
            f"batch_size={batch_size} is not divisible by the number of processes ({process_count}); "
            "each process makes an equal share of the global batch"
        )
    per = batch_size // process_count
    return range(process_index * per, (process_index + 1) * per)


def select_lanes(state: Any, lanes: Sequence[int]) -> Any:
    """`state` with every `"lanes"` mapping reduced to `lanes`.

    Raises:
        ValueError: the state has no entry for one of `lanes`.
    """
    if isinstance(state, Mapping):
        out = {}
        for key, value in state.items():
            if key == LANES_KEY and isinstance(value, Mapping):
                missing = [r for r in lanes if str(r) not in value]
                if missing:
                    raise ValueError(
                        f"the data state has no lane {missing[0]} (it holds lanes {sorted(map(int, value))}); "
                        "it was saved by a run with another batch size, or is one process's partial state"
                    )
                out[key] = {str(r): value[str(r)] for r in lanes}
            else:
                out[key] = select_lanes(value, lanes)
        return out
    if isinstance(state, list):
        return [select_lanes(v, lanes) for v in state]
    return state


def merge_lane_states(states: Sequence[Any]) -> Any:
    """One state holding the lanes of all `states` (the states of disjoint processes).

    Everything outside `"lanes"` must agree (it is the same on all processes that took
    the same number of steps).

    Raises:
        ValueError: the states disagree outside their lanes (different steps or configs).
    """
    first = states[0]
    if isinstance(first, Mapping):
        if any(not isinstance(s, Mapping) or set(s) != set(first) for s in states):
            raise ValueError("data states of the processes have different structure; were they saved at one step?")
        out = {}
        for key in first:
            if key == LANES_KEY and isinstance(first[key], Mapping):
                merged: dict[str, Any] = {}
                for s in states:
                    merged.update(s[key])
                out[key] = dict(sorted(merged.items(), key=lambda kv: int(kv[0])))
            else:
                out[key] = merge_lane_states([s[key] for s in states])
        return out
    if isinstance(first, list):
        if any(not isinstance(s, list) or len(s) != len(first) for s in states):
            raise ValueError("data states of the processes have different structure; were they saved at one step?")
        return [merge_lane_states([s[i] for s in states]) for i in range(len(first))]
    if any(s != first for s in states):
        raise ValueError(f"data states of the processes disagree ({[s for s in states]}); were they saved at one step?")
    return first


def gather_state(state: dict[str, Any]) -> dict[str, Any]:
    """The merged state of all JAX processes (a collective: every process must call it)."""
    if jax.process_count() == 1:
        return state
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(state, sort_keys=True).encode(), dtype=np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.int64(len(data)))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: len(data)] = data
    gathered = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    states = [json.loads(gathered[i, : sizes[i]].tobytes()) for i in range(len(sizes))]
    return merge_lane_states(states)


def global_batch(local_batch: Mapping[str, np.ndarray], sharding: jax.sharding.NamedSharding) -> dict[str, jax.Array]:
    """The global batch as `jax.Array`s from this process's rows of it.

    Args:
        local_batch: this process's rows (`batch_size // process_count` of them), as
            made by `make_batch_iterator`.
        sharding: how the global batch is laid out (batch axis over the data axes).

    Returns:
        Every field as a global `[batch_size, seq_len]` array.
    """
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}
