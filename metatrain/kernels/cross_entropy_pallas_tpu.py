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

VMEM: every kernel keeps whole `[block_rows, D]` and `[D, block_vocab]` tiles (and a
`[*, D]` f32 accumulator) in VMEM, so the tiles that fit depend on the chip (per-core
VMEM: 16 MiB on v4, 64 MiB on v5p and v7x, 128 MiB on v5e and v6e; the table is JAX's,
`pltpu.get_tpu_info_for_chip`, so later chips come with their reported size), on `D`
and on the dtype. `choose_blocks` picks the largest tiles whose estimated footprint
(`kernel_vmem_bytes`, checked against Mosaic by ahead-of-time compiles of every chip
generation in the tests) fits half the chip's VMEM, and each kernel asks for
`vmem_limit(capacity)` of scoped VMEM.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from metatrain.kernels import cross_entropy_tiles as tiles

#: Per-core VMEM assumed where the chip is unknown (interpret mode, CPU): v4's, the smallest.
DEFAULT_VMEM_BYTES: int = 16 << 20
#: Tiles are chosen so the estimated footprint stays within this share of the VMEM...
_TILE_BUDGET = 0.5
#: ...and each kernel's scoped-VMEM limit is this share of it (the rest is Mosaic's).
_LIMIT_SHARE = 0.85
#: Tile shapes `(block_rows, block_vocab)` in order of preference (largest MXU work first).
_CANDIDATE_BLOCKS: tuple[tuple[int, int], ...] = (
    (256, 512), (256, 256), (128, 512), (128, 256), (128, 128), (64, 256), (64, 128), (32, 128), (16, 128), (8, 128),
)


def vmem_capacity_bytes(device=None) -> int:
    """Per-core VMEM of a TPU device (`DEFAULT_VMEM_BYTES` for anything else)."""
    from jax._src.pallas.mosaic import tpu_info

    kind = getattr(device, "device_kind", None) if device is not None else jax.devices()[0].device_kind
    chip = tpu_info.chip_version_from_device_kind(kind or "")
    if chip is None:
        return DEFAULT_VMEM_BYTES
    cores = getattr(device, "num_cores", 1) or 1
    try:
        return int(pltpu.get_tpu_info_for_chip(chip, cores).vmem_capacity_bytes)
    except ValueError:  # a single-core chip asked with 2 cores
        return int(pltpu.get_tpu_info_for_chip(chip, 1).vmem_capacity_bytes)


def vmem_limit(capacity: int) -> int:
    """The scoped-VMEM limit every kernel asks for on a chip with `capacity` bytes per core."""
    return int(capacity * _LIMIT_SHARE)


def kernel_vmem_bytes(kernel: str, bn: int, bv: int, depth: int, itemsize: int) -> int:
    """Estimated scoped VMEM of one kernel with `[bn, D]` / `[D, bv]` tiles.

    The tile that streams along the inner grid axis is double-buffered, the resident one
    (and the output) single-buffered (`_resident`); then the tiles' loaded values (Mosaic
    copies or transposes them for the contraction), the f32 accumulator update (and a
    scratch accumulator for a bf16 output), and f32 `[bn, bv]` temporaries.
    """
    rows_tile, vocab_tile = bn * depth * itemsize, depth * bv * itemsize
    temporaries = 8 * bn * bv * 4
    chunk = max(hi - lo for lo, hi in _depth_chunks(depth))
    scratch = 0 if itemsize == 4 else 1  # a bf16 output accumulates in an f32 scratch
    if kernel == "stats":
        return rows_tile + 2 * vocab_tile + (rows_tile + vocab_tile) + temporaries
    if kernel == "d_hidden":
        inputs = rows_tile + 2 * vocab_tile + (rows_tile + 2 * vocab_tile)
        return inputs + temporaries + rows_tile + (scratch * depth + chunk) * bn * 4
    if kernel == "d_projection":
        inputs = 2 * rows_tile + vocab_tile + (2 * rows_tile + vocab_tile)
        return inputs + temporaries + vocab_tile + (scratch * depth + chunk) * bv * 4
    raise ValueError(f"unknown kernel {kernel!r}")


def choose_blocks(
    rows: int, vocab: int, depth: int, dtype, capacity: int,
    block_rows: int | None = None, block_vocab: int | None = None,
) -> tuple[int, int]:
    """`(block_rows, block_vocab)`: the ones given, else the first candidate whose three
    kernels fit `_TILE_BUDGET` of `capacity` (the smallest candidate if none does)."""
    itemsize = jnp.dtype(dtype).itemsize
    sublanes = 8 * (4 // itemsize)
    budget = _TILE_BUDGET * capacity
    candidates = [
        (block_rows or bn, block_vocab or bv)
        for bn, bv in _CANDIDATE_BLOCKS
        if bn % sublanes == 0 or bn >= rows
    ]
    for bn, bv in dict.fromkeys(candidates):
        bn_used, bv_used = block_shape(rows, vocab, bn, bv)
        need = max(kernel_vmem_bytes(k, bn_used, bv_used, depth, itemsize) for k in ("stats", "d_hidden", "d_projection"))
        if need <= budget:
            return bn, bv
    return candidates[-1]


def block_shape(rows: int, vocab: int, block_rows: int, block_vocab: int) -> tuple[int, int]:
    """The blocks actually used: a whole axis when it is shorter than the block."""
    return min(block_rows, rows), min(block_vocab, vocab)


def _live_blocks(mask: jax.Array, block_rows: int) -> jax.Array:
    """`[num_row_blocks]` int32: 1 where the block has at least one unmasked row."""
    rows = mask.shape[0]
    padded = jnp.pad(mask, (0, pl.cdiv(rows, block_rows) * block_rows - rows))
    return padded.reshape(-1, block_rows).any(axis=1).astype(jnp.int32)


#: Accumulator updates go in D chunks of this size when D is a larger multiple of it.
_DEPTH_CHUNK = 1024


def _depth_chunks(depth: int) -> list[tuple[int, int]]:
    """`[(lo, hi)]` slices of D for the accumulator updates (all of D when it is small)."""
    if depth <= 2 * _DEPTH_CHUNK or depth % _DEPTH_CHUNK:
        return [(0, depth)]
    return [(lo, lo + _DEPTH_CHUNK) for lo in range(0, depth, _DEPTH_CHUNK)]


def _resident(block: tuple[int, int], index_map) -> pl.BlockSpec:
    """A block whose index changes only with the outer grid axis: one VMEM buffer is
    enough (its next block is fetched once per outer step), half the VMEM of two."""
    return pl.BlockSpec(block, index_map, pipeline_mode=pl.Buffered(1))


def _accumulator(shape: tuple[int, int], out_dtype) -> list:
    """An f32 VMEM accumulator, unless the output itself is f32 (then it accumulates)."""
    return [] if jnp.dtype(out_dtype) == jnp.float32 else [pltpu.VMEM(shape, jnp.float32)]


def _params(semantics: tuple[str, str], capacity: int) -> pltpu.CompilerParams:
    return pltpu.CompilerParams(dimension_semantics=semantics, vmem_limit_bytes=vmem_limit(capacity))


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
    vmem_capacity: int = DEFAULT_VMEM_BYTES,
) -> tiles.RowStats:
    """Online log-sum-exp state `(m, s, t)`, each `[N, 1]` f32 (see `cross_entropy_tiles`).

    Args:
        hidden: `[N, D]`; projection: `[D, V]` (same dtype).
        targets: `[N]` int32 (a target outside `[0, V)` contributes no target logit).
        mask: `[N]` bool; row blocks with no True row are not computed.
        block_rows, block_vocab: tile shape (clipped to the array); see `choose_blocks`.
        interpret: run the kernel in Pallas interpret mode (CPU).
        vmem_capacity: per-core VMEM of the chip (`vmem_capacity_bytes`).
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
                _resident((bn, depth), lambda i, j, live: (i, 0)),
                # Dead row blocks keep the projection block index still: no DMA.
                pl.BlockSpec((depth, bv), lambda i, j, live: (0, j * live[i])),
                row_spec,
            ],
            out_specs=(row_spec, row_spec, row_spec),
        ),
        compiler_params=_params(("parallel", "arbitrary"), vmem_capacity),
        interpret=interpret,
        name="cross_entropy_stats",
    )(_live_blocks(mask, bn), hidden, projection, targets[:, None])


def _dh_kernel(live_ref, h_ref, p_ref, t_ref, lse_ref, gn_ref, gl_ref, dh_ref, *scratch, vocab, ragged_v):
    i, j = pl.program_id(0), pl.program_id(1)
    bv = p_ref.shape[1]
    # An f32 output block stays resident across the vocabulary axis: accumulate in it.
    acc_ref = scratch[0] if scratch else dh_ref

    @pl.when(j == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(live_ref[i] > 0)
    def _accumulate():
        logits, hit, cols = _logits(h_ref[...], p_ref[...], j * bv, t_ref[...], vocab, ragged_v)
        d = tiles.dlogits(logits, hit, lse_ref[...], gn_ref[...], gl_ref[...]).astype(p_ref.dtype)
        # [bn, D] in D chunks, each reloading its slice of the tile: a smaller f32 update,
        # and no whole [D, bv] value kept live (it would spill to VMEM at large D).
        for lo, hi in _depth_chunks(p_ref.shape[0]):
            p = p_ref[lo:hi, :]
            if ragged_v:  # padded projection columns may be NaN: 0 * NaN would leak into dh
                p = jnp.where(cols[:1] < vocab, p, jnp.zeros_like(p))
            acc_ref[:, lo:hi] += tiles.dot_nt(d, p)

    if scratch:
        @pl.when(j == pl.num_programs(1) - 1)
        def _write():
            dh_ref[...] = acc_ref[...].astype(dh_ref.dtype)


def _dp_kernel(
    live_ref, h_ref, p_ref, t_ref, lse_ref, gn_ref, gl_ref, dp_ref, *scratch,
    rows, vocab, ragged_n, ragged_v,
):
    j, i = pl.program_id(0), pl.program_id(1)
    bn, bv = h_ref.shape[0], p_ref.shape[1]
    acc_ref = scratch[0] if scratch else dp_ref  # as in `_dh_kernel`

    @pl.when(i == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(live_ref[i] > 0)
    def _accumulate():
        logits, hit, _ = _logits(h_ref[...], p_ref[...], j * bv, t_ref[...], vocab, ragged_v)
        d = tiles.dlogits(logits, hit, lse_ref[...], gn_ref[...], gl_ref[...])
        row_in = None
        if ragged_n:  # padded rows may be NaN: keep them out of the row contraction
            row_in = i * bn + lax.broadcasted_iota(jnp.int32, (bn, 1), 0) < rows
            d = jnp.where(row_in, d, 0.0)
        d = d.astype(h_ref.dtype)
        for lo, hi in _depth_chunks(h_ref.shape[1]):  # [D, bv] in D chunks, as in `_dh_kernel`
            h = h_ref[:, lo:hi]
            if row_in is not None:
                h = jnp.where(row_in, h, jnp.zeros_like(h))
            acc_ref[lo:hi, :] += tiles.dot_tn(h, d)

    if scratch:
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
    vmem_capacity: int = DEFAULT_VMEM_BYTES,
) -> tuple[jax.Array, jax.Array]:
    """`(d_hidden [N, D], d_projection [D, V])` from two kernels that recompute the logits.

    Args:
        hidden, projection, targets, mask, block_rows, block_vocab, interpret,
            vmem_capacity: as for `mosaic_stats`.
        lse: `[N, 1]` f32, `+inf` on masked rows; g_nll, g_lse: `[N, 1]` f32, 0 there.
    """
    (rows, depth), vocab = hidden.shape, projection.shape[1]
    bn, bv = block_shape(rows, vocab, block_rows, block_vocab)
    nb, nv = pl.cdiv(rows, bn), pl.cdiv(vocab, bv)
    live = _live_blocks(mask, bn)
    row_args = (targets[:, None], lse, g_nll, g_lse)

    row_spec = pl.BlockSpec((bn, 1), lambda i, j, live: (i, 0))
    d_hidden = pl.pallas_call(
        functools.partial(_dh_kernel, vocab=vocab, ragged_v=vocab % bv != 0),
        out_shape=jax.ShapeDtypeStruct(hidden.shape, hidden.dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(nb, nv),
            in_specs=[
                _resident((bn, depth), lambda i, j, live: (i, 0)),
                pl.BlockSpec((depth, bv), lambda i, j, live: (0, j * live[i])),
                *[row_spec] * 4,
            ],
            out_specs=_resident((bn, depth), lambda i, j, live: (i, 0)),
            scratch_shapes=_accumulator((bn, depth), hidden.dtype),
        ),
        compiler_params=_params(("parallel", "arbitrary"), vmem_capacity),
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
                _resident((depth, bv), lambda j, i, live: (0, j)),
                *[row_spec_t] * 4,
            ],
            out_specs=_resident((depth, bv), lambda j, i, live: (0, j)),
            scratch_shapes=_accumulator((depth, bv), projection.dtype),
        ),
        compiler_params=_params(("parallel", "arbitrary"), vmem_capacity),
        interpret=interpret,
        name="cross_entropy_d_projection",
    )(live, hidden, projection, *row_args)
    return d_hidden, d_projection
