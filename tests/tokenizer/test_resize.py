"""Growing vocab-sized tables: old rows untouched, new rows at the mean plus small noise."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from metatrain.tokenizer.resize import grow_vocab_axis

V_OLD, V_NEW, D = 37, 43, 11


def _table(shape, dtype=np.float32, seed=0):
    return np.random.default_rng(seed).normal(0.3, 2.0, shape).astype(dtype)


def test_embedding_rows_grow_and_old_rows_stay_bit_identical():
    table = _table((V_OLD, D))
    grown = grow_vocab_axis(table, V_NEW, noise_scale=0.01, seed=5)
    assert grown.shape == (V_NEW, D) and grown.dtype == np.float32
    np.testing.assert_array_equal(grown[:V_OLD], table)
    reference = table.astype(np.float64)
    mean, std = reference.mean(axis=0), reference.std(axis=0)
    deviation = (grown[V_OLD:].astype(np.float64) - mean) / std  # in units of noise_scale * std
    assert np.abs(deviation).max() < 0.01 * 6  # six sigma of the noise
    assert np.abs(deviation).max() > 0.01 * 0.01  # but there is noise: new rows differ
    assert len({row.tobytes() for row in grown[V_OLD:]}) == V_NEW - V_OLD


def test_zero_noise_gives_exactly_the_mean():
    table = _table((V_OLD, D))
    grown = grow_vocab_axis(table, V_NEW, noise_scale=0.0)
    expected = table.astype(np.float64).mean(axis=0).astype(np.float32)
    np.testing.assert_array_equal(grown[V_OLD:], np.broadcast_to(expected, (V_NEW - V_OLD, D)))


def test_output_projection_grows_along_axis_one():
    table = _table((D, V_OLD))
    grown = grow_vocab_axis(table, V_NEW, axis=1, noise_scale=0.0)
    assert grown.shape == (D, V_NEW)
    np.testing.assert_array_equal(grown[:, :V_OLD], table)
    np.testing.assert_allclose(grown[:, V_OLD:], table.astype(np.float64).mean(axis=1, keepdims=True)
                               .repeat(V_NEW - V_OLD, axis=1), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(grow_vocab_axis(table, V_NEW, axis=-1, noise_scale=0.0), grown)


def test_bfloat16_tables_keep_their_dtype():
    table = _table((V_OLD, D), dtype=ml_dtypes.bfloat16)
    grown = grow_vocab_axis(table, V_NEW)
    assert grown.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(grown[:V_OLD].view(np.uint16), table.view(np.uint16))


def test_same_seed_same_rows_and_same_size_is_a_copy():
    table = _table((V_OLD, D))
    np.testing.assert_array_equal(grow_vocab_axis(table, V_NEW, seed=3), grow_vocab_axis(table, V_NEW, seed=3))
    assert not np.array_equal(grow_vocab_axis(table, V_NEW, seed=3), grow_vocab_axis(table, V_NEW, seed=4))
    same = grow_vocab_axis(table, V_OLD)
    np.testing.assert_array_equal(same, table)
    assert same is not table


def test_refuses_to_shrink_or_to_grow_from_nothing():
    with pytest.raises(ValueError, match="cannot shrink the vocabulary axis from 37 to 31"):
        grow_vocab_axis(_table((V_OLD, D)), 31)
    with pytest.raises(ValueError, match="no rows to average"):
        grow_vocab_axis(np.zeros((0, D), np.float32), 5)
