"""Fixtures for the kernel tests: fresh random inputs and a float64 NumPy reference."""

from __future__ import annotations

import secrets

import numpy as np
import pytest


@pytest.fixture
def rng(request):
    """A generator with a fresh seed per test; the seed is printed in failure reports."""
    seed = secrets.randbits(32)
    request.node.user_properties.append(("seed", seed))
    print(f"random seed for {request.node.name}: {seed}")
    return np.random.default_rng(seed)


def _make_inputs(rng, rows, depth, vocab, dtype=np.float32, logit_scale=3.0, keep=0.8):
    """Random `hidden [N, D]`, `projection [D, V]`, targets, mask and cotangents (no zeros).

    Logits have standard deviation about `logit_scale`; about `keep` of the rows are
    unmasked; cotangents are random normals, so every term of the gradient is exercised.
    """
    hidden = rng.normal(size=(rows, depth)).astype(dtype)
    projection = (rng.normal(size=(depth, vocab)) * logit_scale / np.sqrt(depth)).astype(dtype)
    targets = rng.integers(0, vocab, rows).astype(np.int32)
    mask = rng.random(rows) < keep
    g_nll = rng.normal(size=rows).astype(np.float32)
    g_lse = rng.normal(size=rows).astype(np.float32)
    return hidden, projection, targets, mask, g_nll, g_lse


def _reference(hidden, projection, targets, mask, g_nll, g_lse):
    """float64 NumPy `(nll, lse, correct, d_hidden, d_projection)` from the full logits."""
    h = np.asarray(hidden, np.float64)
    p = np.asarray(projection, np.float64)
    rows = np.arange(len(targets))
    logits = h @ p
    top = logits.max(axis=1, keepdims=True)
    lse = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
    nll = lse - logits[rows, targets]
    correct = (logits.argmax(axis=1) == targets).astype(np.float64)
    softmax = np.exp(logits - lse[:, None])
    onehot = np.zeros_like(logits)
    onehot[rows, targets] = 1.0
    g_n = np.where(mask, g_nll, 0.0)[:, None]
    g_l = np.where(mask, g_lse, 0.0)[:, None]
    dlogits = (g_n + g_l) * softmax - g_n * onehot
    zero = lambda x: np.where(mask, x, 0.0)  # noqa: E731
    return zero(nll), zero(lse), zero(correct), dlogits @ p.T, h.T @ dlogits


def _decided(hidden, projection, margin=1e-4):
    """Rows whose top two logits differ by more than `margin` (relative): there argmax is
    the same in f32 and f64; a near tie may flip either way and is not a kernel error."""
    logits = np.asarray(hidden, np.float64) @ np.asarray(projection, np.float64)
    top2 = np.sort(logits, axis=1)[:, -2:] if logits.shape[1] > 1 else np.concatenate(
        [np.full_like(logits, -np.inf), logits], axis=1
    )
    return top2[:, 1] - top2[:, 0] > margin * np.maximum(1.0, np.abs(top2[:, 1]))


def _relative_error(actual, expected) -> float:
    """Max abs error over max abs value (a norm-wise relative error)."""
    expected = np.asarray(expected, np.float64)
    scale = max(np.abs(expected).max(), 1e-30)
    return float(np.abs(np.asarray(actual, np.float64) - expected).max() / scale)


@pytest.fixture
def make_inputs(rng):
    """`make_inputs(rows, depth, vocab, dtype=np.float32, logit_scale=3.0, keep=0.8)`."""
    return lambda *args, **kwargs: _make_inputs(rng, *args, **kwargs)


@pytest.fixture
def reference():
    return _reference


@pytest.fixture
def relative_error():
    return _relative_error


@pytest.fixture
def decided():
    return _decided
