"""`fused_cross_entropy`: output projection + cross entropy without `[N, V]` logits.

One function, several implementations chosen by `impl`:

  "naive"       full logits and plain autodiff; the reference.
  "chunked"     pure JAX loop over vocabulary chunks (`cross_entropy_chunked`).
  "pallas_tpu"  Pallas Mosaic kernels (`cross_entropy_pallas_tpu`).
  "pallas_gpu"  Pallas Triton kernels (`cross_entropy_pallas_gpu`).
  "pallas"      the Pallas kernels of the platform the program is compiled for: Mosaic on
                TPU, Triton on GPU, and the Mosaic kernels in interpret mode on CPU.
  "auto"        "pallas" on TPU and GPU, "chunked" on CPU.

The platform is chosen when the program is *lowered* (`lax.platform_dependent`), so a
program traced on a CPU host and compiled ahead of time for a TPU topology gets the
Mosaic kernels, and the Pallas kernels run in interpret mode only on CPU.

All but "naive" share one `jax.custom_vjp` whose residuals are the inputs and `lse`
(never the logits); the backward recomputes logit tiles. Under `sharding`, both passes
run in `shard_map`: each device handles its rows and its slice of the vocabulary, and
the row statistics are merged with a `pmax`/`psum` over the vocabulary axis.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from metatrain.kernels import cross_entropy_chunked as chunked
from metatrain.kernels import cross_entropy_pallas_gpu as gpu
from metatrain.kernels import cross_entropy_pallas_tpu as tpu
from metatrain.kernels import cross_entropy_tiles as tiles
from metatrain.kernels.cross_entropy_naive import naive_cross_entropy

IMPLS = ("auto", "pallas", "pallas_tpu", "pallas_gpu", "chunked", "naive")


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes; None means the implementation's default for the shapes at hand.

    Attributes:
        rows: rows per tile (Pallas). TPU: a multiple of 8 (16 for bf16); GPU: a power of 2.
        vocab: vocabulary columns per tile (Pallas). TPU: a multiple of 128; GPU: a power of 2.
        depth: slice of `D` per matmul step (GPU only; TPU tiles hold all of `D`).
        chunk: columns per step of the chunked path and of the GPU backward, which
            materialise `[N, chunk]` buffers.
        splits: vocabulary ranges per row block in the GPU forward (parallelism).
        num_warps, num_stages: Triton launch parameters (GPU only; num_stages None means
            4 for bf16 and 3 for f32).
    """

    rows: int | None = None
    vocab: int | None = None
    depth: int | None = None
    chunk: int | None = None
    splits: int | None = None
    num_warps: int = 8
    num_stages: int | None = None

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(
                    f"BlockSizes.{field.name} must be a positive int or None, got {value!r}"
                )


@dataclasses.dataclass(frozen=True)
class LossSharding:
    """How the loss inputs are laid out on a mesh (see `fused_cross_entropy`).

    Attributes:
        mesh: the device mesh.
        batch_axes: mesh axes the rows of `hidden` (and `targets`, `mask`) are split over.
        vocab_axis: mesh axis the columns of `projection` are split over, or None.
    """

    mesh: Mesh
    batch_axes: tuple[str, ...] = ("data",)
    vocab_axis: str | None = None

    def __post_init__(self):
        names = (*self.batch_axes, *([self.vocab_axis] if self.vocab_axis else []))
        unknown = [a for a in names if a not in self.mesh.axis_names]
        if unknown:
            raise ValueError(
                f"LossSharding names mesh axes {unknown} that the mesh does not have; "
                f"its axes are {self.mesh.axis_names}"
            )

    def shards(self, axes) -> int:
        return math.prod(self.mesh.shape[a] for a in axes)


# --------------------------------------------------------------------------- dispatch


def _tpu_blocks(bs: BlockSizes, shape: tuple[int, int, int], dtype, device) -> dict:
    """Tiles and VMEM for the chip the kernels are compiled for (`device`; None: the
    default device). Unset `BlockSizes` are chosen to fit that chip's VMEM at this D."""
    rows, depth, vocab = shape
    capacity = tpu.vmem_capacity_bytes(device)
    bn, bv = tpu.choose_blocks(rows, vocab, depth, dtype, capacity, bs.rows, bs.vocab)
    return dict(block_rows=bn, block_vocab=bv, vmem_capacity=capacity)


def _check_tpu_blocks(blocks: dict, rows: int, vocab: int, dtype) -> None:
    sublanes = 8 * (4 // jnp.dtype(dtype).itemsize)
    bn, bv = tpu.block_shape(rows, vocab, blocks["block_rows"], blocks["block_vocab"])
    if bn != rows and bn % sublanes:
        raise ValueError(
            f"TPU Pallas tiles need BlockSizes.rows to be a multiple of {sublanes} for "
            f"{jnp.dtype(dtype).name} (or at least the {rows} rows); got {bn}"
        )
    if bv != vocab and bv % 128:
        raise ValueError(
            f"TPU Pallas tiles need BlockSizes.vocab to be a multiple of 128 (or at least "
            f"the vocabulary size {vocab}); got {bv}"
        )


def _gpu_blocks(bs: BlockSizes, dtype) -> dict:
    bf16 = jnp.dtype(dtype).itemsize == 2
    # 128 x 256 x 64 bf16 tiles, 4 stages, were the fastest forward on an H100
    # (benchmarks/README.md).
    return dict(
        block_rows=bs.rows or 128,
        block_vocab=bs.vocab or (256 if bf16 else 128),
        block_depth=bs.depth or (64 if bf16 else 32),
        num_warps=bs.num_warps,
        num_stages=bs.num_stages if bs.num_stages is not None else (4 if bf16 else 3),
    )


def _check_gpu_blocks(blocks: dict) -> None:
    for name in ("block_rows", "block_vocab", "block_depth"):
        if not _is_power_of_two(blocks[name]):
            raise ValueError(
                f"GPU (Triton) Pallas tiles must be powers of two; "
                f"BlockSizes.{name.removeprefix('block_')}={blocks[name]}"
            )


#: Which variant runs for each impl, by the platform the program is lowered for.
_PLATFORM_VARIANTS = {
    "chunked": {"default": "chunked"},
    "pallas_tpu": {"cpu": "tpu_interpret", "default": "tpu"},
    "pallas_gpu": {"cpu": "gpu_interpret", "default": "gpu"},
    "pallas": {"cpu": "tpu_interpret", "tpu": "tpu", "cuda": "gpu", "rocm": "gpu", "default": "chunked"},
    "auto": {"cpu": "chunked", "tpu": "tpu", "cuda": "gpu", "rocm": "gpu", "default": "chunked"},
}

StatsFn = Callable[..., tiles.RowStats]  # (hidden, projection, targets, mask) -> (m, s, t)
GradsFn = Callable[..., tuple[jax.Array, jax.Array]]  # (..., mask, lse, g_nll, g_lse)


def _implementation(impl: str, bs: BlockSizes, shape: tuple[int, int, int], dtype, device=None):
    """`(stats_fn, grads_fn)` for local (per-shard) arrays of `shape = (N, D, V)` on
    `device`'s kind of chip."""
    rows, depth, vocab = shape
    chunk = bs.chunk or chunked.default_chunk(rows)
    # The GPU backward keeps only a bf16 dlogits chunk; wider chunks mean fewer passes
    # over the f32 d_hidden accumulator (4096 columns was fastest on an H100 at N=16384).
    gpu_chunk = bs.chunk or chunked.default_chunk(rows, budget_bytes=256 << 20)
    tpu_blocks = _tpu_blocks(bs, shape, dtype, device)
    gpu_blocks = _gpu_blocks(bs, dtype)
    # Interpret mode accepts any tile, so check the hardware's rules for the kernels that
    # will (or, on CPU, stand in for those that would) run here, with a clear message.
    backend = jax.default_backend()
    if impl == "pallas_tpu" or (impl, backend) in {("pallas", "tpu"), ("pallas", "cpu"), ("auto", "tpu")}:
        _check_tpu_blocks(tpu_blocks, rows, vocab, dtype)
    if impl == "pallas_gpu" or (impl in ("pallas", "auto") and backend == "gpu"):
        _check_gpu_blocks(gpu_blocks)

    def chunked_stats(h, p, t, mask):
        return chunked.chunked_stats(h, p, t, chunk)

    def chunked_grads(h, p, t, mask, lse, gn, gl):
        return chunked.chunked_grads(h, p, t, lse, gn, gl, chunk)

    def tpu_stats(h, p, t, mask, interpret):
        return tpu.mosaic_stats(h, p, t, mask, interpret=interpret, **tpu_blocks)

    def tpu_grads(h, p, t, mask, lse, gn, gl, interpret):
        return tpu.mosaic_grads(h, p, t, mask, lse, gn, gl, interpret=interpret, **tpu_blocks)

    def gpu_stats(h, p, t, mask, interpret):
        return gpu.triton_stats(h, p, t, mask, splits=bs.splits, interpret=interpret, **gpu_blocks)

    def gpu_grads(h, p, t, mask, lse, gn, gl, interpret):
        return gpu.triton_grads(
            h, p, t, mask, lse, gn, gl, chunk=gpu_chunk, interpret=interpret, **gpu_blocks
        )

    variants = {
        "chunked": (chunked_stats, chunked_grads),
        "tpu": (functools.partial(tpu_stats, interpret=False), functools.partial(tpu_grads, interpret=False)),
        "tpu_interpret": (functools.partial(tpu_stats, interpret=True), functools.partial(tpu_grads, interpret=True)),
        "gpu": (functools.partial(gpu_stats, interpret=False), functools.partial(gpu_grads, interpret=False)),
        "gpu_interpret": (functools.partial(gpu_stats, interpret=True), functools.partial(gpu_grads, interpret=True)),
    }
    table = _PLATFORM_VARIANTS[impl]

    def select(which: int):
        if len(table) == 1:
            return variants[table["default"]][which]
        fns = {platform: variants[name][which] for platform, name in table.items()}
        return lambda *args: lax.platform_dependent(*args, **fns)  # chosen at lowering

    return select(0), select(1)


# ------------------------------------------------------------------- custom VJP + sharding


def _on_mesh(fn, mesh: Mesh, in_specs: tuple, out_specs: tuple):
    """`shard_map(fn)`, first moving each argument to its spec (a no-op when it is there).

    Pallas kernels are not partitioned by XLA, so the per-device work is explicit here.
    """
    explicit = any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)
    mapped = jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)

    def place(x, spec):
        target = jax.sharding.NamedSharding(mesh, spec)
        return jax.sharding.reshard(x, target) if explicit else lax.with_sharding_constraint(x, target)

    return lambda *args: mapped(*map(place, args, in_specs))


def _fused(stats_fn: StatsFn, grads_fn: GradsFn, sharding: LossSharding | None, vocab: int):
    """The differentiable `(hidden, projection, targets, mask) -> (nll, lse, correct)`."""
    vocab_axis = sharding.vocab_axis if sharding else None
    batch_axes = tuple(sharding.batch_axes) if sharding else ()

    def local_targets(targets):
        if vocab_axis is None:
            return targets
        return targets - lax.axis_index(vocab_axis) * vocab  # `vocab` is the local width

    def forward(hidden, projection, targets, mask):
        m, s, t = stats_fn(hidden, projection, local_targets(targets), mask)
        if vocab_axis is not None:
            m_all = lax.pmax(m, vocab_axis)
            s = lax.psum(s * jnp.exp(m - m_all), vocab_axis)
            m, t = m_all, lax.psum(t, vocab_axis)
        nll, lse, correct = tiles.finish_stats((m, s, t), mask[:, None])
        return nll[:, 0], lse[:, 0], correct[:, 0]

    def backward(hidden, projection, targets, mask, lse, g_nll, g_lse):
        valid = mask[:, None]
        lse = jnp.where(valid, lse[:, None], jnp.inf)  # softmax of masked rows is exactly 0
        g_nll = jnp.where(valid, g_nll[:, None].astype(jnp.float32), 0.0)
        g_lse = jnp.where(valid, g_lse[:, None].astype(jnp.float32), 0.0)
        d_hidden, d_proj = grads_fn(hidden, projection, local_targets(targets), mask, lse, g_nll, g_lse)
        if vocab_axis is not None:
            d_hidden = lax.psum(d_hidden.astype(jnp.float32), vocab_axis).astype(hidden.dtype)
        if batch_axes:
            d_proj = lax.psum(d_proj.astype(jnp.float32), batch_axes).astype(projection.dtype)
        return d_hidden, d_proj

    if sharding is not None:
        rows_spec, hidden_spec = P(batch_axes or None), P(batch_axes or None, None)
        proj_spec = P(None, vocab_axis)
        forward = _on_mesh(
            forward, sharding.mesh,
            (hidden_spec, proj_spec, rows_spec, rows_spec), (rows_spec, rows_spec, rows_spec),
        )
        backward = _on_mesh(
            backward, sharding.mesh,
            (hidden_spec, proj_spec, *[rows_spec] * 5), (hidden_spec, proj_spec),
        )

    @jax.custom_vjp
    def fused(hidden, projection, targets, mask):
        return forward(hidden, projection, targets, mask)

    def fused_fwd(hidden, projection, targets, mask):
        nll, lse, correct = forward(hidden, projection, targets, mask)
        return (nll, lse, correct), (hidden, projection, targets, mask, lse)

    def fused_bwd(residuals, cotangents):
        hidden, projection, targets, mask, lse = residuals
        g_nll, g_lse, _ = cotangents
        d_hidden, d_proj = backward(hidden, projection, targets, mask, lse, g_nll, g_lse)
        return d_hidden, d_proj, None, None

    fused.defvjp(fused_fwd, fused_bwd)
    return fused


# --------------------------------------------------------------------------- public API


def _check_inputs(hidden, projection, targets, mask) -> None:
    if hidden.ndim != 2 or projection.ndim != 2:
        raise ValueError(
            f"fused_cross_entropy expects hidden [N, D] and projection [D, V]; got "
            f"hidden{list(hidden.shape)} and projection{list(projection.shape)} "
            "(flatten batch and sequence axes into N first)"
        )
    if hidden.shape[1] != projection.shape[0]:
        raise ValueError(
            f"hidden is [N, D] with D={hidden.shape[1]} but projection is [D, V] with "
            f"D={projection.shape[0]}; pass the projection as [model_dim, vocab]"
        )
    for name, x in (("hidden", hidden), ("projection", projection)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{name} must be a float array (bf16 or f32), got {x.dtype}")
    if targets.shape != hidden.shape[:1] or not jnp.issubdtype(targets.dtype, jnp.integer):
        raise ValueError(
            f"targets must be an integer array of shape [{hidden.shape[0]}] (one per row of "
            f"hidden); got {targets.dtype}{list(targets.shape)}"
        )
    if mask is not None and (mask.shape != hidden.shape[:1] or mask.dtype != jnp.bool_):
        raise ValueError(
            f"mask must be a bool array of shape [{hidden.shape[0]}] or None; got "
            f"{mask.dtype}{list(mask.shape)}"
        )


def fused_cross_entropy(
    hidden: jax.Array,
    projection: jax.Array,
    targets: jax.Array,
    mask: jax.Array | None = None,
    *,
    impl: str = "auto",
    block_sizes: BlockSizes | None = None,
    return_correct: bool = False,
    sharding: LossSharding | None = None,
):
    """Per-row cross entropy of `hidden @ projection`, never materialising the logits.

    Args:
        hidden: `[N, D]` bf16 or f32.
        projection: `[D, V]`; both operands are cast to their common dtype, and the
            matmuls keep that dtype with f32 accumulation.
        targets: `[N]` int, in `[0, V)` on unmasked rows.
        mask: `[N]` bool, or None for all rows. False rows return 0 for everything,
            get zero gradient and, on the Pallas paths, skip compute by row block.
        impl: "auto", "pallas", "pallas_tpu", "pallas_gpu", "chunked" or "naive"
            (see the module docstring).
        block_sizes: tile sizes; None for defaults.
        return_correct: also return `correct [N]` f32, 1.0 where the target's logit is
            the row's maximum (argmax accuracy; ties count as correct), from the same pass.
        sharding: run under `shard_map` with rows split over `batch_axes` and the
            vocabulary over `vocab_axis`: no device gathers the projection or the
            hidden states; the merge costs a few `[N_local]` all-reduces. Without it,
            "naive" is partitioned by XLA, "chunked" makes each device gather the
            projection over the vocabulary axis (`D * V` elements), and the Pallas
            kernels (which XLA cannot partition) run on gathered, replicated inputs.

    Returns:
        `(nll, lse)`, each `[N]` f32, with `nll = lse - logit[target]` and `lse` the
        log-sum-exp over the vocabulary; `(nll, lse, correct)` with `return_correct`.
        Differentiable in `hidden` and `projection` for any cotangents on `nll` and `lse`.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    hidden, projection, targets = jnp.asarray(hidden), jnp.asarray(projection), jnp.asarray(targets)
    _check_inputs(hidden, projection, targets, mask)
    dtype = jnp.promote_types(hidden.dtype, projection.dtype)
    hidden, projection = hidden.astype(dtype), projection.astype(dtype)
    targets = targets.astype(jnp.int32)
    mask = jnp.ones(targets.shape, jnp.bool_) if mask is None else mask

    if impl == "naive":
        nll, lse, correct = naive_cross_entropy(hidden, projection, targets, mask)
    else:
        (rows, depth), vocab = hidden.shape, projection.shape[1]
        if sharding is not None:
            row_shards = sharding.shards(sharding.batch_axes)
            vocab_shards = sharding.shards([sharding.vocab_axis] if sharding.vocab_axis else [])
            if rows % row_shards or vocab % vocab_shards:
                raise ValueError(
                    f"with sharding, N={rows} must divide by the {row_shards} devices on "
                    f"{sharding.batch_axes} and V={vocab} by the {vocab_shards} devices on "
                    f"{sharding.vocab_axis!r}; pad the batch or the vocabulary"
                )
            rows, vocab = rows // row_shards, vocab // vocab_shards
        device = sharding.mesh.devices.flat[0] if sharding is not None else None
        stats_fn, grads_fn = _implementation(
            impl, block_sizes or BlockSizes(), (rows, depth, vocab), dtype, device
        )
        nll, lse, correct = _fused(stats_fn, grads_fn, sharding, vocab)(
            hidden, projection, targets, mask
        )
    return (nll, lse, correct) if return_correct else (nll, lse)
