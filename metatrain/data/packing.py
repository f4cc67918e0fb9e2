"""From encoded documents to rows of the batch contract (docs/design.md section 4).

Each encoded document `[BOS] body [EOS]` (ids and roles, length n) becomes one
training example of n - 1 positions *before* packing:

    inputs       = ids[:-1]
    targets      = ids[1:]
    target_roles = roles[1:]

so a target is always the next token of the same document, and packing can never
create a target that crosses a document boundary. Examples are then packed end to end
by grain's concat-then-split packing (`grain.experimental.ConcatThenSplitIterDataset`),
which fills each row of `seq_len` positions completely and gives every piece its
`segment_ids` (1, 2, ... within the row; 0 is padding) and `positions`.

Documents longer than a row, and the document that does not fit at the end of a row,
are split: the rest continues at the start of the next row, as a new segment whose
positions restart at 0. Restarting is deliberate: attention never crosses rows, so the
piece can see nothing of what came before it, and positions that continued would tell
the model about context it cannot see (and would exceed `seq_len` for very long
documents). Each piece keeps its own targets, so every token of a long document is
still trained on. A thinking block cut by a split continues in the next piece *without*
its `<thinking>` tag and mantra in view: its tokens keep role THINKING (and are weighted
as thinking in the loss), but the model predicts them from the middle of the block.

Padding (only ever at the end of a finite stream, i.e. the eval split) has
`segment_ids` 0, role PAD (no loss) and id 0 in `inputs` and `targets`.

The three per-position fields travel through packing as one `[n, 3]` int32 feature
(`example`), so packing does its bookkeeping once instead of three times.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import grain
import numpy as np

from metatrain.roles import ROLE_DTYPE, Role

#: The batch contract: field name -> dtype, every field `[batch, seq_len]`.
BATCH_FIELDS: dict[str, np.dtype] = {
    "inputs": np.dtype(np.int32),
    "targets": np.dtype(np.int32),
    "segment_ids": np.dtype(np.int32),
    "positions": np.dtype(np.int32),
    "target_roles": np.dtype(ROLE_DTYPE),
}

EXAMPLE = "example"  # the packed feature: [n, 3] int32 of (input, target, target role)
_SEGMENT_IDS = f"{EXAMPLE}_segment_ids"
_POSITIONS = f"{EXAMPLE}_positions"


def shift_document(ids: np.ndarray, roles: np.ndarray) -> dict[str, np.ndarray]:
    """The training example of one encoded document, ready for packing.

    Args:
        ids: int [n], the document's token ids (n >= 2: at least BOS and EOS).
        roles: int [n], the role of each token.

    Returns:
        `{"example": int32 [n - 1, 3]}`: columns input id, target id, target role.

    Raises:
        ValueError: fewer than two tokens, or ids and roles of different lengths.
    """
    n = len(ids)
    if n < 2 or len(roles) != n:
        raise ValueError(f"an encoded document needs >= 2 tokens and one role per token, got {n} ids, {len(roles)} roles")
    example = np.empty((n - 1, 3), dtype=np.int32)
    example[:, 0] = ids[:-1]
    example[:, 1] = ids[1:]
    example[:, 2] = roles[1:]
    return {EXAMPLE: example}


def pack_examples(examples: grain.IterDataset, seq_len: int) -> grain.IterDataset:
    """Packs shifted examples end to end into rows of `seq_len` positions.

    Args:
        examples: elements `{"example": int32 [n, 3]}` from `shift_document`.
        seq_len: positions per row.

    Returns:
        Elements `{"example": [seq_len, 3], "example_segment_ids": [seq_len],
        "example_positions": [seq_len]}`; turn them into batch rows with `rows_to_batch`.
    """
    return grain.experimental.ConcatThenSplitIterDataset(
        examples, length_struct={EXAMPLE: seq_len}, split_full_length_features=True
    )


def empty_row(seq_len: int) -> dict[str, np.ndarray]:
    """A packed row that is all padding (for lanes of a finite split that ran out)."""
    return {
        EXAMPLE: np.zeros((seq_len, 3), np.int32),
        _SEGMENT_IDS: np.zeros(seq_len, np.int32),
        _POSITIONS: np.zeros(seq_len, np.int32),
    }


def rows_to_batch(rows: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stacks packed rows into a batch of the batch contract.

    Args:
        rows: packed rows from `pack_examples` (or `empty_row`), all of one length.

    Returns:
        The batch: `BATCH_FIELDS`, each `[len(rows), seq_len]`.
    """
    example = np.stack([r[EXAMPLE] for r in rows])  # [B, L, 3]
    segment_ids = np.stack([r[_SEGMENT_IDS] for r in rows]).astype(np.int32, copy=False)
    # grain fills padding with zeros already; forcing PAD where segment is 0 keeps the
    # contract true even if a future packer pads differently.
    roles = np.where(segment_ids > 0, example[..., 2], int(Role.PAD)).astype(ROLE_DTYPE)
    return {
        "inputs": np.ascontiguousarray(example[..., 0]),
        "targets": np.ascontiguousarray(example[..., 1]),
        "segment_ids": segment_ids,
        "positions": np.stack([r[_POSITIONS] for r in rows]).astype(np.int32, copy=False),
        "target_roles": roles,
    }


def check_batch(batch: Mapping[str, np.ndarray], batch_size: int, seq_len: int) -> None:
    """Raises ValueError unless `batch` follows the batch contract (fields, shapes, dtypes)."""
    if set(batch) != set(BATCH_FIELDS):
        raise ValueError(f"batch fields {sorted(batch)} != contract {sorted(BATCH_FIELDS)}")
    for name, dtype in BATCH_FIELDS.items():
        a = batch[name]
        if a.shape != (batch_size, seq_len) or a.dtype != dtype:
            raise ValueError(f"batch[{name!r}] is {a.dtype}{list(a.shape)}, expected {dtype}{[batch_size, seq_len]}")
