"""fused_cross_entropy on 8 simulated devices: rows over "data", vocabulary over "tensor".

With `sharding=LossSharding(...)` every implementation runs in `shard_map` and must
match the single-device reference without gathering the projection or the hidden states.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from metatrain.kernels import BlockSizes, LossSharding, fused_cross_entropy

SMALL = BlockSizes(rows=32, vocab=128, depth=16, chunk=64)


@pytest.fixture(scope="module")
def mesh():
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (tests/conftest.py sets 8 simulated CPU devices)")
    return jax.make_mesh((4, 2), ("data", "tensor"), devices=jax.devices()[:8])


def sharded_value_and_grads(mesh, impl, sharding, hidden, projection, targets, mask, g_nll, g_lse):
    def loss(h, p):
        nll, lse = fused_cross_entropy(h, p, targets, mask, impl=impl, block_sizes=SMALL, sharding=sharding)
        return jnp.sum(nll * g_nll) + jnp.sum(lse * g_lse), (nll, lse)

    rows = NamedSharding(mesh, P("data"))
    put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))  # noqa: E731
    hidden, projection = put(hidden, P("data", None)), put(projection, P(None, "tensor"))
    targets, mask, g_nll, g_lse = (jax.device_put(x, rows) for x in (targets, mask, g_nll, g_lse))
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    compiled = step.lower(hidden, projection).compile()
    (_, (nll, lse)), (d_hidden, d_proj) = compiled(hidden, projection)
    return compiled.as_text(), [np.asarray(x) for x in (nll, lse, d_hidden, d_proj)]


@pytest.mark.parametrize("impl", ["chunked", "pallas_tpu", "pallas_gpu"])
def test_sharded_rows_and_vocabulary_match_reference(mesh, impl, make_inputs, reference, relative_error):
    hidden, projection, targets, mask, g_nll, g_lse = make_inputs(4 * 53, 37, 2 * 131)
    mask[:53] = False  # the first data shard has no live row at all
    sharding = LossSharding(mesh, batch_axes=("data",), vocab_axis="tensor")
    hlo, (nll, lse, d_hidden, d_proj) = sharded_value_and_grads(
        mesh, impl, sharding, hidden, projection, targets, mask, g_nll, g_lse
    )
    ref = reference(hidden, projection, targets, mask, g_nll, g_lse)
    np.testing.assert_allclose(nll, ref[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, ref[1], rtol=1e-5, atol=1e-5)
    assert relative_error(d_hidden, ref[3]) < 1e-5
    assert relative_error(d_proj, ref[4]) < 1e-5
    # Row statistics are merged with all-reduces; nothing is gathered.
    assert "all-gather" not in hlo and "all-reduce" in hlo


def test_rows_only_sharding(mesh, make_inputs, reference, relative_error):
    hidden, projection, targets, mask, g_nll, g_lse = make_inputs(8 * 17, 11, 97)
    sharding = LossSharding(mesh, batch_axes=("data", "tensor"))
    put = lambda x: jax.device_put(x, NamedSharding(mesh, P(("data", "tensor"))))  # noqa: E731
    nll, lse = jax.jit(
        lambda h, t, m: fused_cross_entropy(h, projection, t, m, impl="pallas_tpu", sharding=sharding)
    )(jax.device_put(hidden, NamedSharding(mesh, P(("data", "tensor"), None))), put(targets), put(mask))
    ref = reference(hidden, projection, targets, mask, g_nll, g_lse)
    np.testing.assert_allclose(nll, ref[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, ref[1], rtol=1e-5, atol=1e-5)


def test_sharding_errors_say_what_to_fix(mesh, make_inputs):
    hidden, projection, targets, *_ = make_inputs(10, 7, 30)
    with pytest.raises(ValueError, match="pad the batch or the vocabulary"):
        fused_cross_entropy(
            hidden, projection, targets, impl="chunked",
            sharding=LossSharding(mesh, ("data",), "tensor"),
        )
    with pytest.raises(ValueError, match="does not have"):
        LossSharding(mesh, ("batch",), "tensor")
