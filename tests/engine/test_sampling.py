"""Sampling on masked logits: greedy, temperature, top-k, top-p, and never a forbidden token."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from metatrain.engine.sampling import SamplingConfig, filter_top_p, sample_tokens
from metatrain.errors import UserError

V = 11


ROWS = 4000  # one batch shape for every test: each sampling config compiles once
GREEDY, WARM = SamplingConfig(0.0), SamplingConfig(0.5)
TOP_K, TOP_P = SamplingConfig(1.0, 3), SamplingConfig(1.0, 0, 0.7)
_SAMPLE = jax.jit(sample_tokens, static_argnums=3)


def _draw(logits, config, allowed=None, seed=0):
    """Token frequencies over `ROWS` rows with the same logits, [V]."""
    logits = np.broadcast_to(np.pad(logits, (0, V - len(logits)), constant_values=-np.inf), (ROWS, V))
    allowed = np.ones((ROWS, V), bool) if allowed is None else np.broadcast_to(allowed, (ROWS, V))
    tokens = np.asarray(_SAMPLE(jnp.asarray(logits, jnp.float32), jnp.asarray(allowed), jax.random.key(seed), config))
    return np.bincount(tokens, minlength=V)[: V] / ROWS


LOGITS = np.array([2.0, 1.0, 0.5, 3.0, -1.0, 0.0, 1.5, 2.5, -2.0, 0.25, 1.25], np.float32)


def test_greedy_is_the_best_allowed_token():
    allowed = np.ones(V, bool)
    assert _draw(LOGITS, GREEDY)[3] == 1
    allowed[3] = False
    assert _draw(LOGITS, GREEDY, allowed)[7] == 1


def test_temperature_sampling_follows_the_softmax():
    expected = np.exp(LOGITS / 0.5) / np.exp(LOGITS / 0.5).sum()
    np.testing.assert_allclose(_draw(LOGITS, WARM), expected, atol=0.025)


def test_top_k_keeps_the_k_best_renormalised():
    freq = _draw(LOGITS, TOP_K)
    best = [3, 7, 0]
    expected = np.zeros(V)
    expected[best] = np.exp(LOGITS[best]) / np.exp(LOGITS[best]).sum()
    np.testing.assert_allclose(freq, expected, atol=0.025)
    assert freq[[i for i in range(V) if i not in best]].sum() == 0


def test_top_k_counts_only_allowed_tokens():
    allowed = np.ones(V, bool)
    allowed[[3, 7]] = False
    freq = _draw(LOGITS, TOP_K, allowed=allowed)
    assert set(np.flatnonzero(freq)) == {0, 6, 10}


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    scores = jnp.log(jnp.asarray([probs], jnp.float32))
    for p, kept in [(0.49, 1), (0.51, 2), (0.79, 2), (0.81, 3), (0.96, 4), (1.0, 4)]:
        assert np.isfinite(np.asarray(filter_top_p(scores, p))[0]).sum() == kept, p
    freq = _draw(np.log(probs), TOP_P)
    np.testing.assert_allclose(freq[:4], [0.5 / 0.8, 0.3 / 0.8, 0, 0], atol=0.025)


def test_top_p_keeps_ties_and_the_best_token():
    scores = jnp.asarray([[1.0, 3.0, 3.0, 0.0]])
    np.testing.assert_array_equal(np.isfinite(np.asarray(filter_top_p(scores, 1e-6)))[0], [0, 1, 1, 0])


def test_same_key_same_tokens_other_key_other_tokens():
    a, b, c = (_draw(LOGITS, WARM, seed=s) for s in (1, 1, 2))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_bad_settings_are_user_errors():
    for kwargs in ({"temperature": -1}, {"top_k": -2}, {"top_p": 0.0}, {"top_p": 1.5}):
        with pytest.raises(UserError):
            SamplingConfig(**kwargs)


_SPECIAL = st.sampled_from([np.nan, np.inf, -np.inf, 3e38, -3e38, 1e30, 0.0])


@given(
    seed=st.integers(0, 2**32 - 1),
    specials=st.lists(st.tuples(st.integers(0, ROWS - 1), st.integers(0, V - 1), _SPECIAL), max_size=40),
    config=st.sampled_from([GREEDY, WARM, TOP_K, TOP_P, SamplingConfig(1e-30, 1, 1e-7), SamplingConfig(1e6, 0, 0.9)]),
)
def test_a_forbidden_token_is_never_drawn_whatever_the_logits(seed, specials, config):
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=rng.choice([1.0, 1e20]), size=(ROWS, V)).astype(np.float32)
    for row, col, value in specials:
        logits[row, col] = value
    logits[rng.random((ROWS, V)) < 0.05] = np.nan
    allowed = rng.random((ROWS, V)) < rng.uniform(0.05, 0.95)
    allowed[np.arange(ROWS), rng.integers(0, V, ROWS)] = True  # at least one per row
    # The forbidden tokens are the most tempting ones.
    logits = np.where(allowed, logits, np.float32(np.inf))
    tokens = np.asarray(_SAMPLE(jnp.asarray(logits), jnp.asarray(allowed), jax.random.key(seed), config))
    assert allowed[np.arange(ROWS), tokens].all()
