"""Growing embedding and output tables when a vocabulary gains tokens.

After `metatrain tokenizer extend`, every old id keeps its meaning, so a checkpoint
trained with the old vocabulary stays valid once its vocab-sized tables get rows for
the new ids. Each new row starts at the mean of the existing rows plus small noise:
close to an average token, so the new tokens neither dominate the softmax nor
start out identical to each other (Hewitt 2021, "Initializing new word embeddings
for pretrained language models"). Old rows are returned unchanged, bit for bit.

Pure functions on arrays; wiring them into checkpoint restore lives with the trainer.
"""

from __future__ import annotations

import numpy as np

#: Standard deviation of the noise, as a fraction of each column's spread over old rows.
DEFAULT_NOISE_SCALE: float = 0.01


def grow_vocab_axis(
    table: np.ndarray,
    new_vocab_size: int,
    *,
    axis: int = 0,
    noise_scale: float = DEFAULT_NOISE_SCALE,
    seed: int = 0,
) -> np.ndarray:
    """Adds entries along the vocabulary axis of `table` for ids `old_vocab..new_vocab-1`.

    Args:
        table: [..., V_old, ...], e.g. an embedding [V, D] (axis 0) or an output
            projection [D, V] (axis 1).
        new_vocab_size: V_new >= V_old.
        axis: the vocabulary axis.
        noise_scale: noise standard deviation as a fraction of the per-feature standard
            deviation of the old entries; 0 gives exactly the mean.
        seed: seed of the noise, so a resize is reproducible.

    Returns:
        [..., V_new, ...], same dtype; entries `< V_old` along `axis` equal `table`.

    Raises:
        ValueError: `new_vocab_size` is smaller than the table's vocabulary, or the
            table has no rows to average.
    """
    table = np.asarray(table)
    axis = axis % table.ndim
    old = table.shape[axis]
    if new_vocab_size < old:
        raise ValueError(f"cannot shrink the vocabulary axis from {old} to {new_vocab_size}: "
                         "old ids must keep their rows")
    if new_vocab_size == old:
        return table.copy()
    if old == 0:
        raise ValueError("cannot grow an empty table: there are no rows to average")
    moved = np.moveaxis(table, axis, 0).astype(np.float64)  # [V_old, ...]
    mean = moved.mean(axis=0)
    std = moved.std(axis=0)
    rng = np.random.default_rng(seed)
    added = new_vocab_size - old
    noise = rng.standard_normal((added,) + mean.shape) * (noise_scale * std)
    new_rows = (mean + noise).astype(table.dtype)  # [V_add, ...]
    return np.concatenate([table, np.moveaxis(new_rows, 0, axis)], axis=axis)
