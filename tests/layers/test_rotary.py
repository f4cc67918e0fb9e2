import jax.numpy as jnp
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from metatrain.layers import apply_rotary


def _rotary_reference(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
    """Complex-number RoPE in float64: pair i = x[i] + 1j*x[i+H/2], times exp(1j*p*w_i)."""
    half = x.shape[-1] // 2
    freq = theta ** (-np.arange(half, dtype=np.float64) * 2 / x.shape[-1])
    z = x[..., :half].astype(np.float64) + 1j * x[..., half:].astype(np.float64)
    z = z * np.exp(1j * positions[:, :, None, None] * freq)
    return np.concatenate([z.real, z.imag], axis=-1)


def test_rotary_matches_complex_reference():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 7, 3, 10)).astype(np.float32)
    positions = rng.integers(0, 50, size=(2, 7)).astype(np.int32)
    out = apply_rotary(jnp.asarray(x), jnp.asarray(positions), theta=10000.0)
    np.testing.assert_allclose(np.asarray(out), _rotary_reference(x, positions, 10000.0), atol=1e-5)


def test_rotary_is_identity_at_position_zero_and_keeps_norms():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(1, 5, 2, 14)).astype(np.float32)
    zero = apply_rotary(jnp.asarray(x), jnp.zeros((1, 5), jnp.int32))
    np.testing.assert_allclose(np.asarray(zero), x, atol=1e-6)
    moved = apply_rotary(jnp.asarray(x), jnp.arange(5)[None] * 13)
    np.testing.assert_allclose(
        np.linalg.norm(np.asarray(moved), axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5
    )


@given(
    p=st.integers(0, 500),
    s=st.integers(0, 500),
    shift=st.integers(-200, 500),
    seed=st.integers(0, 2**16),
)
def test_rotary_scores_depend_only_on_relative_position(p, s, shift, seed):
    shift = max(shift, -min(p, s))  # keep positions non-negative
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(1, 1, 1, 6)).astype(np.float32))
    k = jnp.asarray(rng.normal(size=(1, 1, 1, 6)).astype(np.float32))

    def score(qp, kp):
        rq = apply_rotary(q, jnp.array([[qp]], jnp.int32))
        rk = apply_rotary(k, jnp.array([[kp]], jnp.int32))
        return float(jnp.sum(rq * rk))

    assert abs(score(p, s) - score(p + shift, s + shift)) < 1e-3 * (1 + abs(score(p, s)))
