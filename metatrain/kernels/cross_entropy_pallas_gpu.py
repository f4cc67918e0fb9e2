"""Pallas GPU (Triton) kernels for the fused cross entropy; on CPU they run in interpret mode.

Forward (`triton_stats`): program `(i, split)` owns `block_rows` rows and a contiguous
range of vocabulary blocks; for each `[block_rows, block_vocab]` tile it runs a K loop
over `block_depth` slices of `D` (bf16 operands, f32 accumulation), masks the ragged
edges and folds the tile into the online log-sum-exp. Partial states from the splits
are merged outside (a few `[N]` vectors). Logits never leave registers.

Backward (`triton_grads`): a GPU cannot hold a `[block_rows, D]` f32 accumulator on
chip for D in the thousands (TPU VMEM can, see `cross_entropy_pallas_tpu`), so the
backward walks the vocabulary in chunks (`cross_entropy_chunked`): a kernel recomputes
each logit tile and writes only dlogits `[N, chunk]` in the input dtype, and cuBLAS
does the two contractions. Peak extra memory is one such chunk.

Triton needs power-of-two tile sizes; edges are handled with masked loads and stores
(reads past an array are not padded on GPU). Rows whose cotangents (backward) or mask
(forward) are all zero in a block skip their matmuls.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from metatrain.kernels import cross_entropy_chunked as chunked
from metatrain.kernels import cross_entropy_tiles as tiles

#: Programs to aim for in the forward grid: about two waves on an H100 (132 SMs).
_TARGET_PROGRAMS = 264


def _live_blocks(live_rows: jax.Array, block_rows: int) -> jax.Array:
    """`[num_row_blocks]` int32: 1 where any row of the block is live."""
    rows = live_rows.shape[0]
    padded = jnp.pad(live_rows, (0, pl.cdiv(rows, block_rows) * block_rows - rows))
    return padded.reshape(-1, block_rows).any(axis=1).astype(jnp.int32)


def _load(ref, r0, nr: int, c0, nc: int, r_limit, c_limit, other):
    """Load `ref[r0:r0+nr, c0:c0+nc]`; entries at or past `(r_limit, c_limit)` read `other`.

    A limit of None means that axis needs no mask (statically in range).
    """
    block = ref.at[pl.ds(r0, nr), pl.ds(c0, nc)]
    if r_limit is None and c_limit is None:
        return block[...]
    ok = jnp.ones((nr, nc), jnp.bool_)
    if r_limit is not None:
        ok = ok & (r0 + lax.broadcasted_iota(jnp.int32, (nr, nc), 0) < r_limit)
    if c_limit is not None:
        ok = ok & (c0 + lax.broadcasted_iota(jnp.int32, (nr, nc), 1) < c_limit)
    return plgpu.load(block, mask=ok, other=other)


def _logit_tile(h_ref, p_ref, row0, col0, num_k, *, bn, bv, bk, rows, depth, col_limit):
    """f32 `[bn, bv]` tile of `hidden @ projection`, summing `num_k` slices of width bk."""
    r_lim = rows if rows % bn else None
    k_lim = depth if depth % bk else None

    def k_step(k, acc):
        h = _load(h_ref, row0, bn, k * bk, bk, r_lim, k_lim, 0)
        p = _load(p_ref, k * bk, bk, col0, bv, k_lim, col_limit, 0)
        return acc + tiles.dot_nn(h, p)

    return lax.fori_loop(0, num_k, k_step, jnp.zeros((bn, bv), jnp.float32))


def _stats_kernel(
    live_ref, h_ref, p_ref, t_ref, m_ref, s_ref, tl_ref, *, bn, bv, bk, per_split
):
    (rows, depth), vocab = h_ref.shape, p_ref.shape[1]
    i, split = pl.program_id(0), pl.program_id(1)
    row0 = i * bn
    r_lim = rows if rows % bn else None
    tgt = _load(t_ref, row0, bn, 0, 1, r_lim, None, -1)  # [bn, 1]
    num_v = pl.cdiv(vocab, bv)
    j0 = split * per_split
    j1 = jnp.where(live_ref[i] > 0, jnp.minimum(j0 + per_split, num_v), j0)
    col_lim = vocab if vocab % bv else None

    def v_step(j, stats):
        logits = _logit_tile(
            h_ref, p_ref, row0, j * bv, pl.cdiv(depth, bk),
            bn=bn, bv=bv, bk=bk, rows=rows, depth=depth, col_limit=col_lim,
        )
        cols = j * bv + lax.broadcasted_iota(jnp.int32, (bn, bv), 1)
        hit = cols == tgt
        if col_lim is not None:  # a target past this shard's vocabulary must not hit padding
            inside = cols < vocab
            logits, hit = jnp.where(inside, logits, -jnp.inf), hit & inside
        return tiles.update_stats(stats, logits, hit)

    stats = lax.fori_loop(j0, j1, v_step, tiles.initial_stats(bn))
    row_ok = None
    if r_lim is not None:
        row_ok = row0 + lax.broadcasted_iota(jnp.int32, (bn,), 0) < rows
    for ref, value in zip((m_ref, s_ref, tl_ref), stats):
        plgpu.store(ref.at[split, pl.ds(row0, bn)], value.reshape(bn), mask=row_ok)


def triton_stats(
    hidden: jax.Array,
    projection: jax.Array,
    targets: jax.Array,
    mask: jax.Array,
    *,
    block_rows: int,
    block_vocab: int,
    block_depth: int,
    splits: int | None,
    num_warps: int,
    num_stages: int,
    interpret: bool,
) -> tiles.RowStats:
    """Online log-sum-exp state `(m, s, t)`, each `[N, 1]` f32 (see `cross_entropy_tiles`).

    Args:
        hidden: `[N, D]`; projection: `[D, V]` (same dtype); targets: `[N]` int32.
        mask: `[N]` bool; row blocks with no True row are not computed.
        block_rows, block_vocab, block_depth: powers of two (Triton tile sizes).
        splits: vocabulary ranges per row block (None: enough programs to fill the GPU).
        num_warps, num_stages: Triton launch parameters.
        interpret: run in Pallas interpret mode (CPU).
    """
    (rows, _), vocab = hidden.shape, projection.shape[1]
    bn, bv, bk = block_rows, block_vocab, block_depth
    nb, nv = pl.cdiv(rows, bn), pl.cdiv(vocab, bv)
    if splits is None:
        splits = max(1, min(nv, pl.cdiv(_TARGET_PROGRAMS, nb)))
    per_split = pl.cdiv(nv, splits)
    splits = pl.cdiv(nv, per_split)
    out = jax.ShapeDtypeStruct((splits, rows), jnp.float32)
    m, s, t = pl.pallas_call(
        functools.partial(_stats_kernel, bn=bn, bv=bv, bk=bk, per_split=per_split),
        out_shape=(out, out, out),
        grid=(nb, splits),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="cross_entropy_stats",
    )(_live_blocks(mask, bn), hidden, projection, targets[:, None])
    m, s, t = tiles.merge_stats(m, s, t, axis=0)
    return m[:, None], s[:, None], t[:, None]


def _dlogits_kernel(
    live_ref, off_ref, h_ref, p_ref, t_ref, lse_ref, gn_ref, gl_ref, out_ref, *, bn, bv, bk
):
    (rows, depth), width = h_ref.shape, out_ref.shape[1]
    i, jj = pl.program_id(0), pl.program_id(1)
    row0, local0 = i * bn, jj * bv
    # Chunks start at multiples of the tile width; saying so lets Triton vectorise the
    # projection loads (an offset read from memory has unknown alignment otherwise).
    offset = pl.multiple_of(off_ref[0], bv)
    col0 = offset + local0
    r_lim = rows if rows % bn else None
    ragged_c = width % bv != 0
    num_k = live_ref[i] * pl.cdiv(depth, bk)  # 0 for a block of zero cotangents (int32)
    logits = _logit_tile(
        h_ref, p_ref, row0, col0, num_k, bn=bn, bv=bv, bk=bk, rows=rows, depth=depth,
        col_limit=offset + width if ragged_c else None,
    )
    local = local0 + lax.broadcasted_iota(jnp.int32, (bn, bv), 1)
    tgt = _load(t_ref, row0, bn, 0, 1, r_lim, None, -1)
    hit = col0 - local0 + local == tgt
    if ragged_c:
        inside = local < width
        logits, hit = jnp.where(inside, logits, -jnp.inf), hit & inside
    row_vecs = [_load(ref, row0, bn, 0, 1, r_lim, None, 0) for ref in (lse_ref, gn_ref, gl_ref)]
    d = tiles.dlogits(logits, hit, *row_vecs)
    block = out_ref.at[pl.ds(row0, bn), pl.ds(local0, bv)]
    if r_lim is None and not ragged_c:
        block[...] = d.astype(out_ref.dtype)
        return
    ok = jnp.ones((bn, bv), jnp.bool_)
    if r_lim is not None:
        ok = ok & (row0 + lax.broadcasted_iota(jnp.int32, (bn, bv), 0) < rows)
    if ragged_c:
        ok = ok & (local < width)
    plgpu.store(block, d.astype(out_ref.dtype), mask=ok)


def triton_grads(
    hidden: jax.Array,
    projection: jax.Array,
    targets: jax.Array,
    mask: jax.Array,
    lse: jax.Array,
    g_nll: jax.Array,
    g_lse: jax.Array,
    *,
    chunk: int,
    block_rows: int,
    block_vocab: int,
    block_depth: int,
    num_warps: int,
    num_stages: int,
    interpret: bool,
) -> tuple[jax.Array, jax.Array]:
    """`(d_hidden, d_projection)`: dlogits chunks from a kernel, contractions by XLA.

    Args:
        hidden, projection, targets, mask and the block/launch parameters: as for
            `triton_stats` (`mask` is unused: rows with zero cotangents are skipped).
        lse: `[N, 1]` f32, `+inf` on masked rows; g_nll, g_lse: `[N, 1]` f32, 0 there.
        chunk: columns of dlogits materialised at a time.
    """
    del mask
    rows = hidden.shape[0]
    bn, bv, bk = block_rows, block_vocab, block_depth
    chunk = pl.cdiv(chunk, bv) * bv  # every chunk offset a multiple of the tile width
    live = _live_blocks(((g_nll != 0) | (g_lse != 0))[:, 0], bn)
    params = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    kernel = functools.partial(_dlogits_kernel, bn=bn, bv=bv, bk=bk)

    def dlogits_fn(hidden, projection, offset, width, tgt, lse, g_nll, g_lse):
        return pl.pallas_call(
            kernel,
            out_shape=jax.ShapeDtypeStruct((rows, width), hidden.dtype),
            grid=(pl.cdiv(rows, bn), pl.cdiv(width, bv)),
            compiler_params=params,
            interpret=interpret,
            name="cross_entropy_dlogits",
        )(live, jnp.reshape(offset, (1,)).astype(jnp.int32), hidden, projection, tgt, lse,
          g_nll, g_lse)

    return chunked.chunked_grads(
        hidden, projection, targets, lse, g_nll, g_lse, chunk, dlogits_fn=dlogits_fn
    )
