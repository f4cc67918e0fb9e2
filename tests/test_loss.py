"""joint_loss against a float64 NumPy reference; gradients of every impl against naive."""

from __future__ import annotations

import secrets

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metatrain.loss import joint_loss
from metatrain.roles import LOSS_ROLES, NUM_ROLES, Role

B, T, D, V = 3, 37, 19, 131
IMPLS = ["naive", "chunked", "pallas_tpu", "pallas_gpu"]


@pytest.fixture
def rng():
    seed = secrets.randbits(32)
    print(f"random seed: {seed}")
    return np.random.default_rng(seed)


@pytest.fixture
def batch(rng):
    hidden = rng.normal(size=(B, T, D)).astype(np.float32)
    projection = (rng.normal(size=(D, V)) * 2 / np.sqrt(D)).astype(np.float32)
    targets = rng.integers(0, V, (B, T)).astype(np.int32)
    roles = rng.integers(0, NUM_ROLES, (B, T)).astype(np.int8)  # includes PAD
    weights = rng.uniform(0.5, 2.0, NUM_ROLES).astype(np.float32)
    return hidden, projection, targets, roles, weights


def reference(hidden, projection, targets, roles, weights, z_loss):
    """float64 `(loss, stats)` from the full logits."""
    logits = hidden.reshape(-1, D).astype(np.float64) @ projection
    t, r = targets.reshape(-1), roles.reshape(-1).astype(np.int64)
    top = logits.max(1)
    lse = top + np.log(np.exp(logits - top[:, None]).sum(1))
    nll = lse - logits[np.arange(len(t)), t]
    w = np.where(r == Role.PAD, 0.0, weights.astype(np.float64)[r])
    loss = (w * nll).sum() / w.sum() + z_loss * (w * lse**2).sum() / w.sum()
    stats = {"weight_sum": w.sum()}
    for role in LOSS_ROLES:
        sel = r == role
        stats[f"nll_sum/{role.label}"] = nll[sel].sum()
        stats[f"count/{role.label}"] = sel.sum()
        stats[f"correct/{role.label}"] = (logits.argmax(1) == t)[sel].sum()
    return loss, stats


@pytest.mark.parametrize("impl", IMPLS)
def test_loss_and_stats_match_reference(impl, batch):
    hidden, projection, targets, roles, weights = batch
    targets.reshape(-1)[::3] = (hidden.reshape(-1, D) @ projection).argmax(1)[::3]  # some correct
    weights[Role.PAD] = 7.0  # must be ignored
    loss, stats = jax.jit(
        lambda *a: joint_loss(*a, z_loss=1e-3, impl=impl)
    )(hidden, projection, targets, roles, weights)
    ref_loss, ref_stats = reference(hidden, projection, targets, roles, weights, 1e-3)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    assert set(stats) == set(ref_stats)
    # A near tie of the top two logits may flip argmax between f32 and f64.
    top2 = np.sort(hidden.reshape(-1, D).astype(np.float64) @ projection, axis=1)[:, -2:]
    near_ties = int(np.sum(top2[:, 1] - top2[:, 0] < 1e-4 * np.maximum(1, np.abs(top2[:, 1]))))
    for key, value in ref_stats.items():
        atol = near_ties + 1e-4 if key.startswith("correct/") else 1e-4
        np.testing.assert_allclose(stats[key], value, rtol=1e-5, atol=atol, err_msg=key)
    assert stats["correct/text"] > 0 or stats["count/text"] == 0


@pytest.mark.parametrize("impl", ["chunked", "pallas_tpu", "pallas_gpu"])
def test_gradient_matches_naive(impl, batch):
    hidden, projection, targets, roles, weights = batch

    def grads(impl):
        fn = lambda h, p: joint_loss(h, p, targets, roles, weights, z_loss=1e-2, impl=impl)[0]  # noqa: E731
        return jax.jit(jax.grad(fn, argnums=(0, 1)))(hidden, projection)

    for actual, expected in zip(grads(impl), grads("naive")):
        expected = np.asarray(expected, np.float64)
        assert np.abs(np.asarray(actual) - expected).max() <= 1e-5 * np.abs(expected).max()


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_weight_role_gives_exactly_zero_gradient(impl, batch, rng):
    hidden, projection, targets, roles, weights = batch
    weights[Role.THINKING] = 0.0
    roles[0, :5] = Role.THINKING
    roles[1, :5] = Role.TEXT
    off = (roles == Role.THINKING) | (roles == Role.PAD)

    def grads(targets):
        fn = lambda h, p: joint_loss(h, p, targets, roles, weights, z_loss=1e-2, impl=impl)  # noqa: E731
        return jax.jit(jax.grad(fn, argnums=(0, 1), has_aux=True))(hidden, projection)

    (d_hidden, d_proj), stats = grads(targets)
    d_hidden = np.asarray(d_hidden)
    assert np.all(d_hidden[off] == 0.0)
    assert np.all(np.any(d_hidden[~off] != 0.0, axis=-1))
    assert stats["count/thinking"] >= 5 and stats["nll_sum/thinking"] > 0  # still reported
    # Other targets for the zero-weight tokens change nothing in the projection's gradient.
    other = np.where(off, rng.integers(0, V, targets.shape), targets).astype(np.int32)
    (_, d_proj_other), _ = grads(other)
    np.testing.assert_allclose(d_proj_other, d_proj, rtol=1e-6, atol=1e-7)


def test_all_padding_gives_zero_loss_and_finite_gradient(batch):
    hidden, projection, targets, roles, weights = batch
    roles = np.zeros_like(roles)
    (loss, stats), grads = jax.jit(jax.value_and_grad(
        lambda h, p: joint_loss(h, p, targets, roles, weights, z_loss=1e-2), argnums=(0, 1), has_aux=True
    ))(hidden, projection)
    assert loss == 0.0 and stats["weight_sum"] == 0.0
    assert all(np.all(np.asarray(g) == 0.0) for g in grads)


def test_shape_errors_say_what_to_fix(batch):
    hidden, projection, targets, roles, weights = batch
    with pytest.raises(ValueError, match=r"hidden \[B, T, D\]"):
        joint_loss(hidden[0], projection, targets, roles, weights)
    with pytest.raises(ValueError, match="one entry per Role"):
        joint_loss(hidden, projection, targets, roles, weights[:4])
