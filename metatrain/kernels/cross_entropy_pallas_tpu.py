"""Pallas TPU (Mosaic) kernels for the fused cross entropy; on CPU they run in interpret mode.

Three kernels, each a grid of `[block_rows, D] x [D, block_vocab]` logit tiles that
live only in VMEM:

  `_stats_kernel`  grid (row blocks, vocab blocks): online log-sum-exp, accumulated in
                   the `[block_rows, 1]` output blocks that stay resident across the
                   vocabulary axis ("arbitrary", innermost).
  `_dh_kernel`     grid (row blocks, vocab blocks): recompute the tile, form dlogits,
                   accumulate `dlogits @ projection_tile^T` into a `[block_rows, D]` f32
                   VMEM accumulator.
  `_dp_kernel`     grid (vocab blocks, row blocks): recompute the tile, accumulate
                   `hidden_tile^T @ dlogits` into a `[D, block_vocab]` f32 accumulator.

Row blocks whose rows are all masked are skipped (a scalar-prefetched flag per block).
Ragged edges: the last row/vocab block reads past the array (garbage on TPU, NaN in
interpret mode), so out-of-range columns get logit `-inf`, and out-of-range rows and
columns are zeroed before they enter a contraction; their outputs are dropped on write.
TPU tiling: block_rows must be a multiple of 8 (16 for bf16) and block_vocab a multiple
of 128, unless the block covers the whole axis; `D` is never split.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from metatrain.kernels import cross_entropy_tiles as tiles

_VMEM_FLOOR = 32 << 20  # scoped VMEM we always ask for; every TPU since v4 has more
_VMEM_CEIL = 100 << 20  # stay below v5e/v6e physical VMEM (128 MiB)


def block_shape(rows: int, vocab: int, block_rows: int, block_vocab: int) -> tuple[int, int]:
    """The blocks actually used: a whole axis when it is shorter than the block."""
    return min(block_rows, rows), min(block_vocab, vocab)


def _live_blocks(mask: jax.Array, block_rows: int) -> jax.Array:
    """`[num_row_blocks]` int32: 1 where the block has at least one unmasked row."""
    rows = mask.shape[0]
    padded = jnp.pad(mask, (0, pl.cdiv(rows, block_rows) * block_rows - rows))
    return padded.reshape(-1, block_rows).any(axis=1).astype(jnp.int32)


def _params(semantics: tuple[str, str], vmem_bytes: int) -> pltpu.CompilerParams:
    limit = int(min(max(_VMEM_FLOOR, 2 * vmem_bytes), _VMEM_CEIL))
    return pltpu.CompilerParams(dimension_semantics=semantics, vmem_limit_bytes=limit)


def _tile_vmem(bn: int, bv: int, depth: int, itemsize: int) -> int:
    """Double-buffered input tiles plus a few f32 `[bn, bv]` temporaries."""
    return 2 * (bn + bv) * depth * itemsize + 6 * bn * bv * 4


def _logits(h, p, col0, tgt, vocab: int, ragged_v: bool):
    """`(logits, hit, cols)` for one tile: f32 logits (-inf past the vocabulary), where
    the column is the row's target `tgt [bn, 1]`, and the global column ids."""
    logits = tiles.dot_nn(h, p)  # [bn, bv]
    cols = col0 + lax.broadcasted_iota(jnp.int32, logits.shape, 1)
    hit = cols == tgt
    if ragged_v:  # a target past this shard's vocabulary must not hit the padding
        inside = cols < vocab
        logits, hit = jnp.where(inside, logits, -jnp.inf), hit & inside
    return logits, hit, cols


def _stats_kernel(live_ref, h_ref, p_ref, t_ref, m_ref, s_ref, tl_ref, *, vocab, ragged_v):
    i, j = pl.program_id(0), pl.program_id(1)
    bv = p_ref.shape[1]

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
        s_ref[...] = jnp.zeros(s_ref.shape, jnp.float32)
        tl_ref[...] = jnp.zeros(tl_ref.shape, jnp.float32)

    @pl.when(live_ref[i] > 0)
    def _accumulate():
        logits, hit, _ = _logits(h_ref[...], p_ref[...], j * bv, t_ref[...], vocab, ragged_v)
        m, s, t = tiles.update_stats((m_ref[...], s_ref[...], tl_ref[...]), logits, hit)
        m_ref[...], s_ref[...], tl_ref[...] = m, s, t


def mosaic_stats(
    hidden: jax.Array,
    projection: jax.Array,
    targets: jax.Array,
    mask: jax.Array,
    *,
    block_rows: int,
    block_vocab: int,
    interpret: bool,
) -> tiles.RowStats:
    """Online log-sum-exp state `(m, s, t)`, each `[N, 1]` f32 (see `cross_entropy_tiles`).

    Args:
        hidden: `[N, D]`; projection: `[D, V]` (same dtype).
        targets: `[N]` int32 (a target outside `[0, V)` contributes no target logit).
        mask: `[N]` bool; row blocks with no True row are not computed.
        block_rows, block_vocab: tile shape (clipped to the array).
        interpret: run the kernel in Pallas interpret mode (CPU).
    """
    (rows, depth), vocab = hidden.shape, projection.shape[1]
    bn, bv = block_shape(rows, vocab, block_rows, block_vocab)
    grid = (pl.cdiv(rows, bn), pl.cdiv(vocab, bv))
    row_spec = pl.BlockSpec((bn, 1), lambda i, j, live: (i, 0))
    kernel = functools.partial(_stats_kernel, vocab=vocab, ragged_v=vocab % bv != 0)
    out = jax.ShapeDtypeStruct((rows, 1), jnp.float32)
    return pl.pallas_call(
        kernel,
        out_shape=(out, out, out),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=grid,
            in_specs=[
                pl.BlockSpec((bn, depth), lambda i, j, live: (i, 0)),
                # Dead row blocks keep the projection block index still: no DMA.
                pl.BlockSpec((depth, bv), lambda i, j, live: (0, j * live[i])),
                row_spec,
            ],
            out_specs=(row_spec, row_spec, row_spec),
        ),
        compiler_params=_params(
            ("parallel", "arbitrary"), _tile_vmem(bn, bv, depth, hidden.dtype.itemsize)
        ),
        interpret=interpret,
        name="cross_entropy_stats",
    )(_live_blocks(mask, bn), hidden, projection, targets[:, None])


def _dh_kernel(
    live_ref, h_ref, p_ref, t_ref, lse_ref, gn_ref, gl_ref, dh_ref, acc_ref, *, vocab, ragged_v
):
    i, j = pl.program_id(0), pl.program_id(1)
    bv = p_ref.shape[1]

    @pl.when(j == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(live_ref[i] > 0)
    def _accumulate():
        p = p_ref[...]
        logits, hit, cols = _logits(h_ref[...], p, j * bv, t_ref[...], vocab, ragged_v)
        d = tiles.dlogits(logits, hit, lse_ref[...], gn_ref[...], gl_ref[...])
        if ragged_v:  # padded projection columns may be NaN: 0 * NaN would leak into dh
            p = jnp.where(cols[:1] < vocab, p, jnp.zeros_like(p))
        acc_ref[...] += tiles.dot_nt(d.astype(p.dtype), p)  # [bn, D]

    @pl.when(j == pl.num_programs(1) - 1)
    def _write():
        dh_ref[...] = acc_ref[...].astype(dh_ref.dtype)


def _dp_kernel(
    live_ref, h_ref, p_ref, t_ref, lse_ref, gn_ref, gl_ref, dp_ref, acc_ref,
    *, rows, vocab, ragged_n, ragged_v,
):
    j, i = pl.program_id(0), pl.program_id(1)
    bn, bv = h_ref.shape[0], p_ref.shape[1]

    @pl.when(i == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(live_ref[i] > 0)
    def _accumulate():
        h = h_ref[...]
        logits, hit, _ = _logits(h, p_ref[...], j * bv, t_ref[...], vocab, ragged_v)
        d = tiles.dlogits(logits, hit, lse_ref[...], gn_ref[...], gl_ref[...])
        if ragged_n:  # padded rows may be NaN: keep them out of the row contraction
            row_in = i * bn + lax.broadcasted_iota(jnp.int32, (bn, 1), 0) < rows
            d = jnp.where(row_in, d, 0.0)
            h = jnp.where(row_in, h, jnp.zeros_like(h))
        acc_ref[...] += tiles.dot_tn(h, d.astype(h.dtype))  # [D, bv]

    @pl.when(i == pl.num_programs(1) - 1)
    def _write():
        dp_ref[...] = acc_ref[...].astype(dp_ref.dtype)


def mosaic_grads(
    hidden: jax.Array,
    projection: jax.Array,
    targets: jax.Array,
    mask: jax.Array,
    lse: jax.Array,
    g_nll: jax.Array,
    g_lse: jax.Array,
    *,
    block_rows: int,
    block_vocab: int,
    interpret: bool,
) -> tuple[jax.Array, jax.Array]:
    """`(d_hidden [N, D], d_projection [D, V])` from two kernels that recompute the logits.

    Args:
        hidden, projection, targets, mask, block_rows, block_vocab, interpret: as for
            `mosaic_stats`.
        lse: `[N, 1]` f32, `+inf` on masked rows; g_nll, g_lse: `[N, 1]` f32, 0 there.
    """
    (rows, depth), vocab = hidden.shape, projection.shape[1]
    bn, bv = block_shape(rows, vocab, block_rows, block_vocab)
    nb, nv = pl.cdiv(rows, bn), pl.cdiv(vocab, bv)
    live = _live_blocks(mask, bn)
    row_args = (targets[:, None], lse, g_nll, g_lse)
    tile_bytes = _tile_vmem(bn, bv, depth, hidden.dtype.itemsize)

    row_spec = pl.BlockSpec((bn, 1), lambda i, j, live: (i, 0))
    d_hidden = pl.pallas_call(
        functools.partial(_dh_kernel, vocab=vocab, ragged_v=vocab % bv != 0),
        out_shape=jax.ShapeDtypeStruct(hidden.shape, hidden.dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(nb, nv),
            in_specs=[
                pl.BlockSpec((bn, depth), lambda i, j, live: (i, 0)),
                pl.BlockSpec((depth, bv), lambda i, j, live: (0, j * live[i])),
                *[row_spec] * 4,
            ],
            out_specs=pl.BlockSpec((bn, depth), lambda i, j, live: (i, 0)),
            scratch_shapes=[pltpu.VMEM((bn, depth), jnp.float32)],
        ),
        compiler_params=_params(("parallel", "arbitrary"), tile_bytes + 8 * bn * depth),
        interpret=interpret,
        name="cross_entropy_d_hidden",
    )(live, hidden, projection, *row_args)

    row_spec_t = pl.BlockSpec((bn, 1), lambda j, i, live: (i, 0))
    d_projection = pl.pallas_call(
        functools.partial(
            _dp_kernel, rows=rows, vocab=vocab, ragged_n=rows % bn != 0, ragged_v=vocab % bv != 0
        ),
        out_shape=jax.ShapeDtypeStruct(projection.shape, projection.dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(nv, nb),
            in_specs=[
                pl.BlockSpec((bn, depth), lambda j, i, live: (i, 0)),
                pl.BlockSpec((depth, bv), lambda j, i, live: (0, j)),
                *[row_spec_t] * 4,
            ],
            out_specs=pl.BlockSpec((depth, bv), lambda j, i, live: (0, j)),
            scratch_shapes=[pltpu.VMEM((depth, bv), jnp.float32)],
        ),
        compiler_params=_params(("parallel", "arbitrary"), tile_bytes + 8 * depth * bv),
        interpret=interpret,
        name="cross_entropy_d_projection",
    )(live, hidden, projection, *row_args)
    return d_hidden, d_projection
