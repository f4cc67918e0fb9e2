import jax
import jax.numpy as jnp
import numpy as np

from metatrain.layers import RMSNorm


def test_rmsnorm_matches_float64_reference():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 5, 13)).astype(np.float32) * 3.0
    scale = rng.normal(size=(13,)).astype(np.float32)
    norm = RMSNorm(eps=1e-5, dtype=jnp.float32)
    out = norm.apply({"params": {"scale": scale}}, x)

    x64 = x.astype(np.float64)
    expected = x64 / np.sqrt(np.mean(x64**2, axis=-1, keepdims=True) + 1e-5) * scale
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)


def test_rmsnorm_initialises_scale_to_one_and_casts_to_compute_dtype():
    x = jnp.ones((2, 7, 11), jnp.float32) * 4.0
    norm = RMSNorm(dtype=jnp.bfloat16)
    params = norm.init(jax.random.key(0), x)["params"]
    assert params["scale"].value.shape == (11,)
    assert params["scale"].value.dtype == jnp.float32
    assert params["scale"].names == ("norm",)
    out = norm.apply({"params": params}, x)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), 1.0, rtol=1e-2)
