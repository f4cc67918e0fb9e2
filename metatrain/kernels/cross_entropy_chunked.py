"""Cross entropy in pure JAX, one vocabulary chunk at a time (the fast path on CPU).

The forward pass folds `[N, chunk]` logit tiles into an online log-sum-exp; the
backward pass recomputes each tile, turns it into dlogits and immediately contracts it
into `d_hidden` (accumulated) and one `[D, chunk]` slice of `d_projection`. Peak
temporary memory is a few `[N, chunk]` buffers plus the `[N, D]` f32 accumulator,
whatever the vocabulary size; no `[N, V]` buffer exists.

The chunk loop also drives the GPU Pallas backward (`cross_entropy_pallas_gpu`), which
swaps in a kernel that produces each dlogits chunk without materialising its logits.
A ragged last chunk (`V % chunk != 0`) is handled as one extra step of static width,
so neither the projection nor its gradient is ever padded or copied.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from metatrain.kernels import cross_entropy_tiles as tiles

#: `(hidden [N, D], projection [D, V], offset, width, targets [N, 1], lse, g_nll, g_lse)`
#: -> dlogits `[N, width]` for the columns `[offset, offset + width)` (hidden's dtype).
DlogitsFn = Callable[..., jax.Array]


def default_chunk(rows: int, budget_bytes: int = 64 << 20) -> int:
    """Columns per chunk so that one `[rows, chunk]` f32 buffer fits `budget_bytes`.

    A power of two in [256, 8192]: large enough that every chunk is an efficient matmul,
    small enough that temporaries stay far below the `[N, V]` logits.
    """
    chunk = 8192
    while chunk > 256 and rows * chunk * 4 > budget_bytes:
        chunk //= 2
    return chunk


def _over_chunks(vocab: int, chunk: int, step: Callable, carry):
    """`carry = step(carry, offset, width)` over `[0, vocab)`: full chunks, then the tail."""
    full, tail = divmod(vocab, chunk)
    if full:
        carry = lax.fori_loop(0, full, lambda j, c: step(c, j * chunk, chunk), carry)
    if tail:
        carry = step(carry, full * chunk, tail)
    return carry


def chunked_stats(
    hidden: jax.Array, projection: jax.Array, targets: jax.Array, chunk: int
) -> tiles.RowStats:
    """Online log-sum-exp state `(m, s, t)`, each `[N, 1]` f32, over every column.

    Args:
        hidden: `[N, D]`.
        projection: `[D, V]`, same dtype as `hidden`.
        targets: `[N]` int32; a target outside `[0, V)` contributes no target logit.
        chunk: columns per step.
    """
    tgt = targets[:, None]

    def step(stats, offset, width):
        proj = lax.dynamic_slice_in_dim(projection, offset, width, axis=1)  # [D, width]
        logits = tiles.dot_nn(hidden, proj)  # [N, width]
        cols = offset + lax.broadcasted_iota(jnp.int32, logits.shape, 1)
        return tiles.update_stats(stats, logits, cols == tgt)

    return _over_chunks(projection.shape[1], chunk, step, tiles.initial_stats(hidden.shape[0]))


def xla_dlogits(hidden, projection, offset, width, tgt, lse, g_nll, g_lse) -> jax.Array:
    """dlogits for one chunk with XLA ops (the chunked path's `DlogitsFn`)."""
    proj = lax.dynamic_slice_in_dim(projection, offset, width, axis=1)
    logits = tiles.dot_nn(hidden, proj)  # [N, width]
    cols = offset + lax.broadcasted_iota(jnp.int32, logits.shape, 1)
    return tiles.dlogits(logits, cols == tgt, lse, g_nll, g_lse).astype(hidden.dtype)


def chunked_grads(
    hidden: jax.Array,
    projection: jax.Array,
    targets: jax.Array,
    lse: jax.Array,
    g_nll: jax.Array,
    g_lse: jax.Array,
    chunk: int,
    dlogits_fn: DlogitsFn = xla_dlogits,
) -> tuple[jax.Array, jax.Array]:
    """`(d_hidden [N, D], d_projection [D, V])` for cotangents on `nll` and `lse`.

    Args:
        hidden, projection, targets, chunk: as for `chunked_stats`.
        lse: `[N, 1]` f32 from the forward pass; `+inf` on masked rows.
        g_nll, g_lse: `[N, 1]` f32 cotangents; 0 on masked rows.
        dlogits_fn: computes one dlogits chunk (XLA ops by default, a Pallas kernel
            on GPU); its result is cast to `hidden.dtype` before the two matmuls, so
            bf16 inputs keep bf16 operands with f32 accumulation.
    """
    tgt = targets[:, None]
    d_hidden = jnp.zeros(hidden.shape, jnp.float32)
    d_proj = jnp.zeros(projection.shape, projection.dtype)

    def step(carry, offset, width):
        d_hidden, d_proj = carry
        proj = lax.dynamic_slice_in_dim(projection, offset, width, axis=1)  # [D, width]
        dl = dlogits_fn(hidden, projection, offset, width, tgt, lse, g_nll, g_lse)
        dl = dl.astype(hidden.dtype)  # [N, width]
        d_hidden = d_hidden + tiles.dot_nt(dl, proj)  # [N, D]
        d_chunk = tiles.dot_tn(hidden, dl).astype(projection.dtype)  # [D, width]
        d_proj = lax.dynamic_update_slice_in_dim(d_proj, d_chunk, offset, axis=1)
        return d_hidden, d_proj

    d_hidden, d_proj = _over_chunks(projection.shape[1], chunk, step, (d_hidden, d_proj))
    return d_hidden.astype(hidden.dtype), d_proj
