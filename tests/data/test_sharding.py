"""Lanes per process, lane-wise state, and the global batch from process-local rows."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from metatrain.data.sharding import global_batch, local_lanes, merge_lane_states, select_lanes


def test_local_lanes_split_the_batch_contiguously():
    assert [list(local_lanes(6, p, 3)) for p in range(3)] == [[0, 1], [2, 3], [4, 5]]
    assert list(local_lanes(5, 0, 1)) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="not divisible"):
        local_lanes(5, 0, 2)
    with pytest.raises(ValueError, match="process_index"):
        local_lanes(4, 2, 2)


def test_select_and_merge_are_inverse():
    full = {"a": 1, "w": [{"lanes": {"0": {"n": 0}, "1": {"n": 1}, "2": {"n": 2}}, "k": 5}]}
    parts = [select_lanes(full, [0]), select_lanes(full, [1, 2])]
    assert parts[1] == {"a": 1, "w": [{"lanes": {"1": {"n": 1}, "2": {"n": 2}}, "k": 5}]}
    assert merge_lane_states(parts) == full
    with pytest.raises(ValueError, match="no lane 2"):
        select_lanes(parts[0], [2])
    with pytest.raises(ValueError, match="disagree"):
        merge_lane_states([parts[0], {**parts[1], "a": 2}])


def test_global_batch_places_local_rows_on_the_mesh():
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(8), ("data",))
    sharding = NamedSharding(mesh, PartitionSpec("data", None))
    local = {"inputs": np.arange(8 * 13, dtype=np.int32).reshape(8, 13),
             "target_roles": np.ones((8, 13), np.int8)}
    out = global_batch(local, sharding)
    for k, v in local.items():
        assert out[k].shape == v.shape and out[k].dtype == v.dtype and out[k].sharding == sharding
        np.testing.assert_array_equal(np.asarray(out[k]), v)
    assert len(out["inputs"].addressable_shards) == 8
