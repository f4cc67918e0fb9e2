import jax
import jax.numpy as jnp
import numpy as np

from metatrain.layers import SwiGLU


def test_swiglu_matches_float64_reference_and_names_axes():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(2, 7, 13)).astype(np.float32)
    mlp = SwiGLU(d_model=13, d_ff=17, dtype=jnp.float32)
    boxed = mlp.init(jax.random.key(0), jnp.asarray(x))["params"]
    assert {k: (v.value.shape, v.names) for k, v in boxed.items()} == {
        "gate": ((13, 17), ("embed", "mlp")),
        "up": ((13, 17), ("embed", "mlp")),
        "down": ((17, 13), ("mlp", "embed")),
    }
    p = {k: np.asarray(v.value, np.float64) for k, v in boxed.items()}
    out = mlp.apply({"params": {k: v.value for k, v in boxed.items()}}, jnp.asarray(x))

    x64 = x.astype(np.float64)
    gate = x64 @ p["gate"]
    expected = (gate / (1 + np.exp(-gate)) * (x64 @ p["up"])) @ p["down"]
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)
