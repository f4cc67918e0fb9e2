"""fused_cross_entropy against a float64 NumPy reference, for every implementation.

The Pallas kernels run in interpret mode here (both the TPU and the GPU kernels), with
small tiles so that every test crosses several row and vocabulary blocks and ragged
edges. Tolerances are fixed: f32 within 1e-5, bf16 within 1e-2 (relative).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metatrain.kernels import BlockSizes, fused_cross_entropy

IMPLS = ["naive", "chunked", "pallas_tpu", "pallas_gpu"]
SMALL = BlockSizes(rows=64, vocab=128, depth=16, chunk=128)


def evaluate(impl, hidden, projection, targets, mask, g_nll, g_lse, block_sizes=SMALL):
    """`(nll, lse, correct, d_hidden, d_projection)` as NumPy arrays, computed under jit."""

    @jax.jit
    def run(h, p, t, m, gn, gl):
        def f(h, p):
            return fused_cross_entropy(
                h, p, t, m, impl=impl, block_sizes=block_sizes, return_correct=True
            )

        out, vjp = jax.vjp(f, h, p)
        return (*out, *vjp((gn, gl, jnp.zeros_like(gn))))

    return [np.asarray(x.astype(jnp.float32)) for x in run(hidden, projection, targets, mask, g_nll, g_lse)]


def check_f32(result, expected, relative_error, decided, tol=1e-5):
    nll, lse, correct, d_hidden, d_proj = result
    ref_nll, ref_lse, ref_correct, ref_dh, ref_dp = expected
    np.testing.assert_allclose(nll, ref_nll, rtol=tol, atol=tol)
    np.testing.assert_allclose(lse, ref_lse, rtol=tol, atol=tol)
    np.testing.assert_array_equal(correct[decided], ref_correct[decided])
    assert relative_error(d_hidden, ref_dh) < tol
    assert relative_error(d_proj, ref_dp) < tol


@pytest.mark.parametrize("impl", IMPLS)
def test_ragged_shapes_and_dead_blocks(impl, make_inputs, reference, relative_error, decided):
    hidden, projection, targets, mask, g_nll, g_lse = make_inputs(1000, 72, 1003)
    mask[128:384] = False  # rows 128..383: whole row blocks of 64 (and of 128) are off
    blocks = BlockSizes(rows=128, vocab=128, depth=32, chunk=256)
    result = evaluate(impl, hidden, projection, targets, mask, g_nll, g_lse, blocks)
    expected = reference(hidden, projection, targets, mask, g_nll, g_lse)
    check_f32(result, expected, relative_error, decided(hidden, projection))
    nll, lse, correct, d_hidden, _ = result
    assert not np.any(nll[~mask]) and not np.any(lse[~mask]) and not np.any(d_hidden[~mask])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(211, 37, 397), (7, 5, 11), (1, 3, 2), (67, 19, 131)])
def test_prime_shapes(impl, shape, make_inputs, reference, relative_error, decided):
    hidden, projection, targets, mask, g_nll, g_lse = make_inputs(*shape)
    mask[0] = True
    result = evaluate(impl, hidden, projection, targets, mask, g_nll, g_lse)
    expected = reference(hidden, projection, targets, mask, g_nll, g_lse)
    check_f32(result, expected, relative_error, decided(hidden, projection))


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_inputs(impl, make_inputs, reference, relative_error):
    hidden, projection, targets, mask, g_nll, g_lse = make_inputs(211, 37, 397)
    hidden, projection = jnp.asarray(hidden, jnp.bfloat16), jnp.asarray(projection, jnp.bfloat16)
    nll, lse, _, d_hidden, d_proj = evaluate(impl, hidden, projection, targets, mask, g_nll, g_lse)
    # The reference sees exactly the bf16-rounded inputs, in float64.
    ref = reference(np.asarray(hidden, np.float32), np.asarray(projection, np.float32),
                    targets, mask, g_nll, g_lse)
    for actual, expected in zip((nll, lse, d_hidden, d_proj), (ref[0], ref[1], ref[3], ref[4])):
        assert relative_error(actual, expected) < 1e-2


@pytest.mark.parametrize("impl", IMPLS)
def test_large_logits_do_not_overflow(impl, make_inputs, reference, relative_error, decided):
    scale = 3e4  # exp(3e4) overflows f32 (and f64) by far
    hidden, projection, targets, mask, g_nll, g_lse = make_inputs(67, 19, 131, logit_scale=scale)
    # f32 logits of size ~scale are only known to ~1e-7 * scale, so the softmax of a row
    # whose top two logits nearly tie is not determined by f32 inputs; leave such rows out.
    top2 = np.sort(hidden.astype(np.float64) @ projection, axis=1)[:, -2:]
    mask &= top2[:, 1] - top2[:, 0] > 1e-3 * scale
    nll, lse, correct, d_hidden, d_proj = evaluate(impl, hidden, projection, targets, mask, g_nll, g_lse)
    ref = reference(hidden, projection, targets, mask, g_nll, g_lse)
    for value in (nll, lse, d_hidden, d_proj):
        assert np.all(np.isfinite(value))
    # f32 logits of size ~scale carry absolute rounding error ~ scale * 1e-7.
    np.testing.assert_allclose(lse, ref[1], rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_allclose(nll, ref[0], rtol=1e-5, atol=1e-5 * scale)
    sure = decided(hidden, projection)
    np.testing.assert_array_equal(correct[sure], ref[2][sure])
    assert relative_error(d_hidden, ref[3]) < 1e-5
    assert relative_error(d_proj, ref[4]) < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
def test_correct_is_argmax_equals_target(impl, make_inputs, decided):
    hidden, projection, targets, mask, g_nll, g_lse = make_inputs(211, 37, 397)
    logits = hidden.astype(np.float64) @ projection
    argmax = logits.argmax(axis=1)
    targets[::2] = argmax[::2]  # half the rows predicted right
    _, _, correct, _, _ = evaluate(impl, hidden, projection, targets, mask, g_nll, g_lse)
    sure = decided(hidden, projection)
    np.testing.assert_array_equal(correct[sure], np.where(mask, argmax == targets, 0.0)[sure])
    assert correct[::2][sure[::2]].sum() == mask[::2][sure[::2]].sum()


@pytest.mark.parametrize("impl", ["naive", "chunked", "pallas_tpu"])
def test_default_return_is_nll_and_lse(impl, make_inputs):
    hidden, projection, targets, mask, *_ = make_inputs(13, 7, 29)
    out = fused_cross_entropy(hidden, projection, targets, mask, impl=impl)
    assert len(out) == 2 and all(x.shape == (13,) and x.dtype == jnp.float32 for x in out)
    nll, lse = fused_cross_entropy(hidden, projection, targets, impl=impl)  # mask=None
    assert np.all(np.asarray(nll) > 0) and np.all(np.asarray(lse) != 0)


def test_auto_and_pallas_resolve_on_cpu(make_inputs):
    """On CPU, "auto" is the chunked path and "pallas" the TPU kernels in interpret mode."""
    hidden, projection, targets, mask, *_ = make_inputs(67, 19, 131)
    run = lambda impl: np.asarray(  # noqa: E731
        jax.jit(lambda h, p: fused_cross_entropy(h, p, targets, mask, impl=impl, block_sizes=SMALL)[0])(
            hidden, projection
        )
    )
    np.testing.assert_array_equal(run("auto"), run("chunked"))
    np.testing.assert_array_equal(run("pallas"), run("pallas_tpu"))


@settings(max_examples=6)
@given(
    rows=st.integers(1, 40), depth=st.integers(1, 24), vocab=st.integers(1, 300),
    chunk=st.sampled_from([1, 7, 128, 512]), seed=st.integers(0, 2**31),
)
def test_chunked_any_shape(rows, depth, vocab, chunk, seed):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(rows, depth)).astype(np.float32)
    projection = rng.normal(size=(depth, vocab)).astype(np.float32)
    targets = rng.integers(0, vocab, rows).astype(np.int32)
    nll, lse = fused_cross_entropy(
        hidden, projection, targets, impl="chunked", block_sizes=BlockSizes(chunk=chunk)
    )
    logits = hidden.astype(np.float64) @ projection
    ref_lse = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(nll, ref_lse - logits[np.arange(rows), targets], rtol=1e-5, atol=1e-5)


def test_input_errors_say_what_to_fix(make_inputs):
    hidden, projection, targets, mask, *_ = make_inputs(13, 7, 29)
    with pytest.raises(ValueError, match="D=7 but projection"):
        fused_cross_entropy(hidden, projection.T, targets)
    with pytest.raises(ValueError, match="flatten batch"):
        fused_cross_entropy(hidden[None], projection, targets)
    with pytest.raises(ValueError, match=r"targets must be an integer array of shape \[13\]"):
        fused_cross_entropy(hidden, projection, targets[:5])
    with pytest.raises(ValueError, match="mask must be a bool"):
        fused_cross_entropy(hidden, projection, targets, mask.astype(np.int32))
    with pytest.raises(ValueError, match="impl must be one of"):
        fused_cross_entropy(hidden, projection, targets, impl="fast")
    with pytest.raises(ValueError, match="positive int"):
        BlockSizes(rows=0)


def test_hardware_tile_rules_are_checked_before_interpret_mode_hides_them(make_inputs):
    hidden, projection, targets, mask, *_ = make_inputs(67, 19, 300)
    with pytest.raises(ValueError, match="multiple of 8"):
        fused_cross_entropy(hidden, projection, targets, impl="pallas", block_sizes=BlockSizes(rows=12))
    with pytest.raises(ValueError, match="multiple of 16 for bfloat16"):
        fused_cross_entropy(
            jnp.asarray(hidden, jnp.bfloat16), jnp.asarray(projection, jnp.bfloat16), targets,
            impl="pallas_tpu",
            block_sizes=BlockSizes(rows=24),
        )
    with pytest.raises(ValueError, match="multiple of 128"):
        fused_cross_entropy(hidden, projection, targets, impl="pallas_tpu", block_sizes=BlockSizes(vocab=100))
    with pytest.raises(ValueError, match="powers of two"):
        fused_cross_entropy(hidden, projection, targets, impl="pallas_gpu", block_sizes=BlockSizes(rows=48))
