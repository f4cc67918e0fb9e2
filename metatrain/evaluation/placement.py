"""Where evaluation's device work runs when the parameters are sharded over a mesh.

`metatrain eval` restores a checkpoint onto a mesh of every visible device, which in a
multi-process run (`metatrain launch local -- eval ...`, `jax.distributed`) spans the
devices of every process. Each process then runs the same batches in lockstep: a host
value (a batch of rows, the same on every process) goes in as a global array whole on
every device of the mesh (`to_mesh`), and what the host reads back is constrained to be
whole on every device too (`replicated`), so each process can read it (a process can
read only the shards of its own devices). Parameters on one device (no mesh) leave both
as they were. Only process 0 writes files (`writes_files`).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec


def replicated(params: Any) -> NamedSharding | None:
    """The sharding that puts a value whole on every device of the mesh `params` live
    on; None when they are not on a mesh (one device, or host arrays)."""
    for leaf in jax.tree.leaves(params):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return NamedSharding(sharding.mesh, PartitionSpec())
    return None


def to_mesh(values: Any, sharding: NamedSharding | None) -> Any:
    """Host arrays (a tree of them, the same on every process) as global arrays whole
    on every device of `sharding` (`replicated`); unchanged when `sharding` is None."""
    if sharding is None:
        return values

    def put(value: Any) -> jax.Array:
        array = np.asarray(value)
        return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])

    return jax.tree.map(put, values)


def writes_files() -> bool:
    """Whether this process writes the outputs: process 0 of a multi-process run (or the
    only process); the others compute the same and write nothing."""
    return jax.process_index() == 0
