"""Whole documents laid out in rows of the batch contract, every target scored exactly once.

The training stream (`metatrain.data.packing`) cuts documents wherever a row ends. An
evaluation that compares variants of the same documents (`ablation.py`) or resamples
them (`stats.py`) needs every target of every document scored once, and needs to know
which document each scored position belongs to:

  * a document of at most `seq_len` positions (n - 1 targets for n tokens) goes whole
    into a row, next to others while they fit (its own `segment_ids`, positions from 0:
    attention never crosses documents, exactly as in training);
  * a longer one is read in windows of `seq_len` positions that start every `stride`
    positions; each target is scored in the first window that holds it with at least
    `seq_len - stride` positions of context before it (the first window scores all of
    its targets). `stride == seq_len` gives consecutive pieces with no shared context,
    as in training; `stride = seq_len // 2` gives every target at least half a row of
    context for twice the compute.

Unscored positions (context only) and padding have `target_roles` PAD, so the loss and
every statistic skip them; `doc_index` says which document a scored target belongs to
(-1 elsewhere).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np

from metatrain.roles import ROLE_DTYPE, Role
from metatrain.tokenizer.encoder import EncodedDocument


@dataclasses.dataclass(frozen=True)
class Rows:
    """Documents in rows: the batch contract plus the document of each scored target.

    Attributes:
        inputs, targets, segment_ids, positions: int32 [R, seq_len].
        target_roles: int8 [R, seq_len]; PAD on padding and on context-only positions.
        doc_index: int32 [R, seq_len], the document (index into the laid-out sequence)
            of each scored target; -1 elsewhere.
    """

    inputs: np.ndarray
    targets: np.ndarray
    segment_ids: np.ndarray
    positions: np.ndarray
    target_roles: np.ndarray
    doc_index: np.ndarray

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def batch(self, start: int, size: int) -> dict[str, np.ndarray]:
        """Rows `start .. start+size-1` as a batch-contract dict, padded with empty rows."""
        out = {}
        for name in ("inputs", "targets", "segment_ids", "positions", "target_roles"):
            part = getattr(self, name)[start:start + size]
            if len(part) < size:
                pad = np.zeros((size - len(part), part.shape[1]), part.dtype)
                part = np.concatenate([part, pad])
            out[name] = part
        return out

    def batches(self, size: int) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """`(first row, batch)` for every batch of `size` rows (the last one padded)."""
        for start in range(0, len(self), size):
            yield start, self.batch(start, size)


def _windows(n_targets: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """`(window start, first scored, end)` target offsets of a document with n targets."""
    out, scored, start = [], 0, 0
    while scored < n_targets:
        end = min(start + seq_len, n_targets)
        out.append((start, scored, end))
        scored, start = end, start + stride
    return out


class RowCounter:
    """Rows `layout_documents` needs for the documents added so far, without building them
    (to choose how many documents fit a budget while reading them one by one)."""

    def __init__(self, seq_len: int, stride: int | None = None):
        self.seq_len, self.stride = seq_len, seq_len if stride is None else stride
        self.rows, self._used = 0, 0  # rows closed, positions used in the open row

    def add(self, n_tokens: int) -> int:
        """Adds a document of `n_tokens` tokens; returns the rows needed so far."""
        n = n_tokens - 1
        if n < 1:
            return self.total
        if n <= self.seq_len:
            if self._used and self._used + n > self.seq_len:
                self.rows, self._used = self.rows + 1, 0
            self._used += n
        else:
            self.rows += (1 if self._used else 0) + len(_windows(n, self.seq_len, self.stride))
            self._used = 0
        return self.total

    @property
    def total(self) -> int:
        return self.rows + (1 if self._used else 0)


def layout_documents(documents: Sequence[EncodedDocument], seq_len: int, stride: int | None = None) -> Rows:
    """Lays out `documents` (in order) so that each target is scored once.

    Args:
        documents: encoded documents, `[BOS] body [EOS]`.
        seq_len: positions per row.
        stride: window step for documents longer than a row (default `seq_len`); must be
            in [1, seq_len].

    Returns:
        The rows; `doc_index` refers to positions in `documents`.
    """
    stride = seq_len if stride is None else stride
    if not 1 <= stride <= seq_len:
        raise ValueError(f"stride must be in [1, seq_len={seq_len}], got {stride}")
    pieces: list[list[tuple[int, np.ndarray, np.ndarray, np.ndarray]]] = []
    row: list = []
    used = 0

    def flush() -> None:
        nonlocal row, used
        if row:
            pieces.append(row)
        row, used = [], 0

    for d, doc in enumerate(documents):
        ids, roles = np.asarray(doc.ids, np.int32), np.asarray(doc.roles, ROLE_DTYPE)
        n = len(ids) - 1  # targets
        if n < 1:
            continue
        if n <= seq_len:
            if used + n > seq_len:
                flush()
            row.append((d, ids[:-1], ids[1:], roles[1:].copy()))
            used += n
            continue
        flush()
        for start, scored, end in _windows(n, seq_len, stride):
            target_roles = roles[1 + start:1 + end].copy()
            target_roles[: scored - start] = Role.PAD  # context only: scored by an earlier window
            pieces.append([(d, ids[start:end], ids[1 + start:1 + end], target_roles)])
    flush()
    return _to_rows(pieces, seq_len)


def _to_rows(pieces: list[list[tuple]], seq_len: int) -> Rows:
    r = len(pieces)
    inputs = np.zeros((r, seq_len), np.int32)
    targets = np.zeros((r, seq_len), np.int32)
    segment_ids = np.zeros((r, seq_len), np.int32)
    positions = np.zeros((r, seq_len), np.int32)
    target_roles = np.zeros((r, seq_len), ROLE_DTYPE)
    doc_index = np.full((r, seq_len), -1, np.int32)
    for i, row in enumerate(pieces):
        at = 0
        for segment, (d, x, y, roles) in enumerate(row, start=1):
            n = len(x)
            inputs[i, at:at + n], targets[i, at:at + n] = x, y
            segment_ids[i, at:at + n] = segment
            positions[i, at:at + n] = np.arange(n)
            target_roles[i, at:at + n] = roles
            doc_index[i, at:at + n] = np.where(roles != Role.PAD, d, -1)
            at += n
    return Rows(inputs, targets, segment_ids, positions, target_roles, doc_index)
