"""Tile math shared by every cross-entropy implementation (naive, chunked, Pallas).

The same few lines run inside a Pallas kernel on one `[rows, cols]` logit tile, inside
a `lax.fori_loop` body over vocabulary chunks, and in the combine step after a
vocabulary-sharded `shard_map`. Row statistics are kept as `[rows, 1]` columns (not
`[rows]`), the natural layout of a row reduction on TPU and GPU.

The per-row state of the online log-sum-exp is `(m, s, t)`:
  m: running max of the logits seen so far (`-inf` before the first tile);
  s: sum of `exp(logit - m)` over the logits seen so far;
  t: the target's logit if the target column was seen, else 0.
After every column was seen, `lse = m + log(s)`, `nll = lse - t`, and the prediction is
correct when `t >= m` (the target logit is the row max; ties count as correct).

Nothing here reads or writes memory; callers load tiles and store results.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

RowStats = tuple[jax.Array, jax.Array, jax.Array]


def matmul_precision(dtype) -> lax.Precision:
    """Full precision for f32 operands (no TF32 on GPU); native MXU/tensor-core for bf16."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


def dot_nn(a: jax.Array, b: jax.Array) -> jax.Array:
    """`[m, k] @ [k, n] -> [m, n]` in float32 accumulation."""
    return lax.dot_general(
        a, b, (((1,), (0,)), ((), ())),
        precision=matmul_precision(a.dtype), preferred_element_type=jnp.float32,
    )


def dot_nt(a: jax.Array, b: jax.Array) -> jax.Array:
    """`[m, k] @ [n, k]^T -> [m, n]` in float32 accumulation (dlogits @ projection^T)."""
    return lax.dot_general(
        a, b, (((1,), (1,)), ((), ())),
        precision=matmul_precision(a.dtype), preferred_element_type=jnp.float32,
    )


def dot_tn(a: jax.Array, b: jax.Array) -> jax.Array:
    """`[k, m]^T @ [k, n] -> [m, n]` in float32 accumulation (hidden^T @ dlogits)."""
    return lax.dot_general(
        a, b, (((0,), (0,)), ((), ())),
        precision=matmul_precision(a.dtype), preferred_element_type=jnp.float32,
    )


def initial_stats(rows: int) -> RowStats:
    """The online log-sum-exp state before any column: `(m, s, t)`, each `[rows, 1]` f32."""
    shape = (rows, 1)
    return (
        jnp.full(shape, -jnp.inf, jnp.float32),
        jnp.zeros(shape, jnp.float32),
        jnp.zeros(shape, jnp.float32),
    )


def update_stats(stats: RowStats, logits: jax.Array, hit: jax.Array) -> RowStats:
    """Fold one logit tile into the running state.

    Args:
        stats: `(m, s, t)`, each `[rows, 1]` f32.
        logits: `[rows, cols]` f32; columns outside the vocabulary must be `-inf`.
        hit: `[rows, cols]` bool, True where the column is the row's target.

    Returns:
        The updated `(m, s, t)`. The first tile of every row must hold at least one
        finite logit (otherwise `m` stays `-inf` and the rescale is NaN).
    """
    m, s, t = stats
    m_new = jnp.maximum(m, jnp.max(logits, axis=1, keepdims=True))
    s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(logits - m_new), axis=1, keepdims=True)
    t = t + jnp.sum(jnp.where(hit, logits, 0.0), axis=1, keepdims=True)
    return m_new, s, t


def merge_stats(m: jax.Array, s: jax.Array, t: jax.Array, axis: int) -> RowStats:
    """Merge partial states computed over disjoint column ranges, stacked on `axis`."""
    m_all = jnp.max(m, axis=axis)
    s_all = jnp.sum(s * jnp.exp(m - jnp.expand_dims(m_all, axis)), axis=axis)
    return m_all, s_all, jnp.sum(t, axis=axis)


def finish_stats(stats: RowStats, valid: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`(nll, lse, correct)` from a complete state; rows where `valid` is False give zeros.

    Args:
        stats: `(m, s, t)` after every column of the vocabulary.
        valid: bool, broadcastable to the stats' shape.

    Returns:
        `nll`, `lse` and `correct` (1.0 where the target logit is the row max), f32.
    """
    m, s, t = stats
    lse = m + jnp.log(s)
    nll = lse - t
    correct = (t >= m).astype(jnp.float32)
    zero = jnp.zeros_like(lse)
    return jnp.where(valid, nll, zero), jnp.where(valid, lse, zero), jnp.where(valid, correct, zero)


def dlogits(
    logits: jax.Array, hit: jax.Array, lse: jax.Array, g_nll: jax.Array, g_lse: jax.Array
) -> jax.Array:
    """Cotangent of one logit tile: `(g_nll + g_lse) * softmax - g_nll * onehot(target)`.

    Args:
        logits: `[rows, cols]` f32, `-inf` outside the vocabulary.
        hit: `[rows, cols]` bool, True at the target column.
        lse: `[rows, 1]` f32; `+inf` on masked rows, so their softmax is exactly 0.
        g_nll, g_lse: `[rows, 1]` f32 cotangents of `nll` and `lse`; 0 on masked rows.

    Returns:
        `[rows, cols]` f32. Exactly zero on rows whose cotangents are zero.
    """
    probs = jnp.exp(logits - lse)
    return (g_nll + g_lse) * probs - jnp.where(hit, g_nll, 0.0)
