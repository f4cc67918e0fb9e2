"""What the compiled programs contain, on this CPU, for CPU, TPU and GPU targets.

- No `[N, V]` buffer in the compiled chunked or Pallas programs (the naive one has it).
- TPU: with libtpu installed (the `tpu` extra), the Pallas forward and backward are
  compiled ahead of time for a v5e 2x2 topology, inside `shard_map`, so a tile shape
  that breaks TPU tiling rules fails here rather than on a pod.
- GPU: the Triton kernels are lowered for CUDA (Triton IR is produced in Python, no GPU
  needed), which enforces Triton's power-of-two tile rule.
"""

from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from metatrain.kernels import BlockSizes, LossSharding, fused_cross_entropy
from metatrain.kernels import cross_entropy_pallas_gpu as gpu
from metatrain.kernels import cross_entropy_pallas_tpu as tpu
from metatrain.loss import joint_loss
from metatrain.roles import NUM_ROLES

ROWS, DEPTH, VOCAB = 131, 17, 1031


def value_and_grad(impl, sharding=None, block_sizes=None):
    def loss(hidden, projection, targets, mask):
        nll, lse = fused_cross_entropy(
            hidden, projection, targets, mask, impl=impl, block_sizes=block_sizes, sharding=sharding
        )
        return jnp.sum(nll) + 1e-4 * jnp.sum(lse * lse)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def abstract_args(rows, depth, vocab, dtype, shardings=(None,) * 4):
    shapes = [((rows, depth), dtype), ((depth, vocab), dtype), ((rows,), jnp.int32), ((rows,), jnp.bool_)]
    return [jax.ShapeDtypeStruct(s, d, sharding=sh) for (s, d), sh in zip(shapes, shardings)]


def logits_sized_buffers(hlo: str, rows: int, vocab: int) -> list[str]:
    """Shapes in the HLO text with one dim >= rows and another >= vocab."""
    found = []
    for match in re.finditer(r"\b[a-z]+\d*\[(\d+),(\d+)\]", hlo):
        a, b = int(match.group(1)), int(match.group(2))
        if (a >= rows and b >= vocab) or (a >= vocab and b >= rows):
            found.append(match.group(0))
    return found


@pytest.mark.parametrize("impl", ["naive", "chunked", "pallas_tpu", "pallas_gpu"])
def test_no_logits_sized_buffer(impl):
    blocks = BlockSizes(rows=32, vocab=128, depth=16, chunk=256)
    compiled = value_and_grad(impl, block_sizes=blocks).lower(
        *abstract_args(ROWS, DEPTH, VOCAB, jnp.float32)
    ).compile()
    found = logits_sized_buffers(compiled.as_text(), ROWS, VOCAB)
    if impl == "naive":
        assert found, "the check should see the naive path's [N, V] logits"
    else:
        assert not found, f"{impl} materialises logits-sized buffers: {sorted(set(found))}"


# ----------------------------------------------------------------------------- TPU


@pytest.fixture(scope="module")
def tpu_mesh():
    # pytest-xdist workers each load libtpu; without this the second one finds it locked.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        from jax.experimental import topologies

        topology = topologies.get_topology_desc("v5e:2x2", "tpu")
    except Exception as err:  # libtpu missing or unloadable: nothing to compile for
        pytest.skip(f"libtpu not available for ahead-of-time TPU compiles ({err!s:.120})")
    return topologies.make_mesh(topology, (2, 2), ("data", "tensor"))


def tpu_args(mesh, rows, depth, vocab, dtype):
    specs = [P("data", None), P(None, "tensor"), P("data"), P("data")]
    return abstract_args(rows, depth, vocab, dtype, [NamedSharding(mesh, s) for s in specs])


@pytest.mark.tpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_pallas_compiles_for_tpu(tpu_mesh, dtype):
    # Per device: 1000 rows, 2006 vocabulary columns: ragged for the default tiles.
    sharding = LossSharding(tpu_mesh, ("data",), "tensor")
    compiled = value_and_grad("pallas", sharding).lower(
        *tpu_args(tpu_mesh, 2000, 384, 4012, dtype)
    ).compile()
    hlo = compiled.as_text()
    assert hlo.count("tpu_custom_call") == 3  # stats, d_hidden, d_projection
    assert not logits_sized_buffers(hlo, 1000, 2006)


@pytest.mark.tpu
def test_joint_loss_auto_uses_mosaic_on_tpu(tpu_mesh):
    sharding = LossSharding(tpu_mesh, ("data",), "tensor")
    rows = NamedSharding(tpu_mesh, P("data"))

    def loss(hidden, projection, targets, roles):
        weights = jnp.ones((NUM_ROLES,), jnp.float32)
        return joint_loss(hidden, projection, targets, roles, weights, z_loss=1e-4, sharding=sharding)[0]

    args = [
        jax.ShapeDtypeStruct((4, 256, 256), jnp.bfloat16, sharding=NamedSharding(tpu_mesh, P("data"))),
        jax.ShapeDtypeStruct((256, 1024), jnp.bfloat16, sharding=NamedSharding(tpu_mesh, P(None, "tensor"))),
        jax.ShapeDtypeStruct((4, 256), jnp.int32, sharding=rows),
        jax.ShapeDtypeStruct((4, 256), jnp.int8, sharding=rows),
    ]
    hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*args).compile().as_text()
    assert hlo.count("tpu_custom_call") == 3


@pytest.mark.tpu
def test_tpu_compile_rejects_tiles_that_break_tpu_tiling(tpu_mesh):
    """The compile test can fail: a 64-wide vocabulary tile is refused by Mosaic."""
    device = SingleDeviceSharding(tpu_mesh.devices.flat[0])
    args = abstract_args(256, 128, 1024, jnp.float32, [device] * 4)

    def stats(hidden, projection, targets, mask):
        return tpu.mosaic_stats(
            hidden, projection, targets, mask, block_rows=64, block_vocab=64, interpret=False
        )

    with pytest.raises(Exception, match="divisible by 8 and 128"):
        jax.jit(stats).lower(*args).compile()


# ----------------------------------------------------------------------------- GPU


@pytest.fixture
def verified_triton(monkeypatch):
    """Run the MLIR verifier on every Triton module (the GPU would reject invalid IR)."""
    from jax._src.pallas.triton import lowering

    lower = lowering.lower_jaxpr_to_triton_module

    def lower_and_verify(*args, **kwargs):
        result = lower(*args, **kwargs)
        result.module.operation.verify()
        return result

    monkeypatch.setattr(lowering, "lower_jaxpr_to_triton_module", lower_and_verify)


def cuda_hlo(fn, *args) -> str:
    return fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_triton_kernels_lower_for_cuda(dtype, verified_triton):
    hlo = cuda_hlo(value_and_grad("pallas"), *abstract_args(ROWS, DEPTH, VOCAB, dtype))
    # "pallas" picks per platform: Triton for CUDA (forward stats + backward dlogits).
    assert hlo.count("__gpu$xla.gpu.triton") >= 2
    assert "tpu_custom_call" not in hlo


def test_triton_lowering_rejects_non_power_of_two_tiles():
    args = abstract_args(ROWS, DEPTH, VOCAB, jnp.float32)

    def stats(hidden, projection, targets, mask):
        return gpu.triton_stats(
            hidden, projection, targets, mask, block_rows=48, block_vocab=128, block_depth=16,
            splits=None, num_warps=4, num_stages=2, interpret=False,
        )

    with pytest.raises(ValueError, match="power of 2"):
        cuda_hlo(jax.jit(stats), *args)


def test_interpret_mode_is_only_used_on_cpu():
    """The CPU program runs the kernels as loops of XLA ops (no Mosaic or Triton call)."""
    hlo = value_and_grad("pallas").lower(*abstract_args(ROWS, DEPTH, VOCAB, jnp.float32)).as_text()
    assert "tpu_custom_call" not in hlo and "triton" not in hlo
