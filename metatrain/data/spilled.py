"""Encoded documents spilled to local disk, read back with random access (no TensorFlow here).

A seqio Task is read once, in order, into two flat files under a private directory of
`$TMPDIR` (int32 ids, int8 roles; offsets, split hashes and example numbers in memory),
removed when the process that made it exits (`metatrain.io.spill.spill_directory`). `SpilledExamples` serves `examples[i]` from
memory maps, pickles as paths and small arrays (so grain's worker processes need not
import TensorFlow), and `TaskReader` turns an index into a training example of its split.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from metatrain.data.packing import shift_document
from metatrain.data.split import in_split
from metatrain.io.spill import spill_directory
from metatrain.roles import ROLE_DTYPE


def _content_hash(ids: np.ndarray, roles: np.ndarray) -> int:
    """The example's split hash: seqio examples have no id, so their tokens stand for one."""
    digest = hashlib.sha256(ids.tobytes() + roles.tobytes()).digest()
    return int.from_bytes(digest[:8], "little")


class SpillWriter:
    """Appends encoded documents to two flat files (ids, roles); offsets stay in memory."""

    def __init__(self, task_name: str):
        directory = spill_directory()
        prefix = "".join(c if c.isalnum() else "_" for c in task_name)[:64]
        self.base = Path(tempfile.mkdtemp(dir=directory, prefix=prefix + "."))
        self._ids = open(self.base / "ids.bin", "wb")
        self._roles = open(self.base / "roles.bin", "wb")
        self._lengths: list[int] = []
        self._hashes: list[int] = []
        self._numbers: list[int] = []

    def add(self, ids: np.ndarray, roles: np.ndarray, number: int) -> None:
        self._ids.write(ids.tobytes())
        self._roles.write(roles.tobytes())
        self._lengths.append(len(ids))
        self._hashes.append(_content_hash(ids, roles))
        self._numbers.append(number)

    def finish(self) -> "SpilledExamples":
        self._ids.close()
        self._roles.close()
        offsets = np.concatenate([[0], np.cumsum(self._lengths, dtype=np.int64)]).astype(np.int64)
        return SpilledExamples(str(self.base), offsets, np.array(self._hashes, np.uint64),
                               np.array(self._numbers, np.int64))

    def discard(self) -> None:
        self._ids.close()
        self._roles.close()
        shutil.rmtree(self.base, ignore_errors=True)


class SpilledExamples:
    """Random access to the encoded documents of one Task split: `examples[i]` is `(ids, roles)`.

    Pickles as paths and small arrays; the files are memory-mapped in each process.

    Attributes:
        hashes: uint64 [n], the split hash of each document.
        numbers: int64 [n], the 1-based position of each document among the Task's examples.
    """

    def __init__(self, base: str, offsets: np.ndarray, hashes: np.ndarray, numbers: np.ndarray):
        self.base = base
        self.offsets = offsets
        self.hashes = hashes
        self.numbers = numbers
        self._maps: tuple[np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if self._maps is None:
            base = Path(self.base)
            total = int(self.offsets[-1])
            self._maps = (np.memmap(base / "ids.bin", np.int32, "r", shape=(total,)),
                          np.memmap(base / "roles.bin", ROLE_DTYPE, "r", shape=(total,)))
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        ids, roles = self._maps
        return np.array(ids[start:end]), np.array(roles[start:end])

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_maps"] = None  # reopened in each process
        return state


class TaskReader:
    """Document index -> training example of the split, or None (held out for the other split)."""

    def __init__(self, examples: SpilledExamples, *, split: str, eval_fraction: float):
        self.examples = examples
        self.split = split
        self.eval_fraction = eval_fraction

    def __call__(self, index: int) -> dict[str, np.ndarray] | None:
        if not in_split(int(self.examples.hashes[index]), self.split, self.eval_fraction):
            return None
        return shift_document(*self.examples[index])

    def has_document(self) -> bool:
        """Whether any document belongs to this reader's split."""
        return any(in_split(int(h), self.split, self.eval_fraction) for h in self.examples.hashes)
