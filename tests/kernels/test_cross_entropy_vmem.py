"""The Mosaic kernels fit every TPU generation's VMEM at every preset width and at 8192.

Kernel-only programs (forward stats and both backward kernels, inside `shard_map` on
one chip) compiled ahead of time with libtpu for v4 (16 MiB of VMEM per core), v5e and
v6e (128 MiB) and v5p (64 MiB), in float32 and bfloat16, with the tiles
`choose_blocks` picks for that chip.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from metatrain.kernels import BlockSizes, LossSharding, fused_cross_entropy
from metatrain.kernels import cross_entropy_pallas_tpu as tpu

pytestmark = pytest.mark.tpu

#: Chip generation -> a topology holding it, and its per-core VMEM (JAX's table).
CHIPS = {"v4": ("v4:2x2x1", 16), "v5e": ("v5e:1x1", 128), "v5p": ("v5p:2x2x1", 64), "v6e": ("v6e:1x1", 128)}
#: d_model of the presets (tiny, default, 125m, 1b, 7b) and 8192.
WIDTHS = (64, 128, 768, 2048, 4096, 8192)
ROWS, VOCAB = 2048, 32768


@pytest.fixture(scope="module")
def chip_devices():
    from metatrain.errors import UserError
    from metatrain.launch.compile import tpu_topology  # v4 in megacore mode, as `compile` uses it

    try:
        return {name: tpu_topology(topo).devices[0] for name, (topo, _) in CHIPS.items()}
    except UserError as err:  # libtpu missing
        pytest.skip(f"libtpu not available for ahead-of-time TPU compiles ({err!s:.120})")


def compile_loss(device, depth: int, dtype, block_sizes: BlockSizes | None = None) -> str:
    mesh = Mesh(np.array([device]), ("data",))
    sharding = LossSharding(mesh, ("data",), None)

    def loss(hidden, projection, targets, mask):
        nll, lse = fused_cross_entropy(hidden, projection, targets, mask, impl="pallas", sharding=sharding,
                                       block_sizes=block_sizes)
        return jnp.sum(nll) + 1e-4 * jnp.sum(lse * lse)

    def arg(shape, dt, spec):
        return jax.ShapeDtypeStruct(shape, dt, sharding=NamedSharding(mesh, spec))

    args = [arg((ROWS, depth), dtype, P("data", None)), arg((depth, VOCAB), dtype, P()),
            arg((ROWS,), jnp.int32, P("data")), arg((ROWS,), jnp.bool_, P("data"))]
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*args).compile().as_text()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("depth", WIDTHS)
@pytest.mark.parametrize("chip", sorted(CHIPS))
def test_the_three_kernels_fit_the_chip(chip_devices, chip, depth, dtype):
    device = chip_devices[chip]
    assert tpu.vmem_capacity_bytes(device) == CHIPS[chip][1] << 20
    hlo = compile_loss(device, depth, jnp.dtype(dtype))
    assert hlo.count("tpu_custom_call") == 3  # stats, d_hidden, d_projection


def test_tiles_too_large_for_the_chip_fail_to_compile(chip_devices):
    """The compile check can fail: v4's 16 MiB do not hold 512 x 1024 f32 tiles at D=8192."""
    with pytest.raises(Exception, match="(?i)vmem"):
        compile_loss(chip_devices["v4"], 8192, jnp.float32, BlockSizes(rows=512, vocab=1024))


def test_tiles_shrink_with_the_chip_and_the_width():
    big, small = 128 << 20, 16 << 20
    assert tpu.choose_blocks(ROWS, VOCAB, 2048, jnp.bfloat16, big) == (256, 512)
    bn, bv = tpu.choose_blocks(ROWS, VOCAB, 8192, jnp.float32, small)
    assert bn * bv < 256 * 512 and bn % 8 == 0 and bv % 128 == 0
    # Tiles a user sets are kept.
    assert tpu.choose_blocks(ROWS, VOCAB, 8192, jnp.float32, small, 64, 256) == (64, 256)
    # Where a candidate fits, its estimated footprint is within half the VMEM; where none
    # does (f32 at 8192 on v4) the smallest is used, and the compile test above shows it fits.
    bn, bv = tpu.choose_blocks(ROWS, VOCAB, 2048, jnp.float32, small)
    need = max(tpu.kernel_vmem_bytes(k, bn, bv, 2048, 4) for k in ("stats", "d_hidden", "d_projection"))
    assert (bn, bv) != (8, 128) and need <= small // 2
    assert tpu.choose_blocks(ROWS, VOCAB, 8192, jnp.float32, small) == (8, 128)
