"""Splash attention (JAX's TPU Pallas kernel) against the XLA attention, in interpret mode
on CPU: values and gradients, packed documents never attending across `segment_ids`;
and compiled ahead of time for v5e and v5p inside the sharded train step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metatrain.layers.attention import _splash_attention, attention_mask, dot_product_attention

B, T, N, K, H = 2, 256, 4, 2, 64


def packed_segments(rng) -> np.ndarray:
    """[B, T] documents of random lengths end to end, padding (0) at the end of row 0."""
    rows = []
    for b in range(B):
        cuts = np.sort(rng.choice(np.arange(1, T), size=4, replace=False))
        seg = np.zeros(T, np.int32)
        for i, (lo, hi) in enumerate(zip([0, *cuts], [*cuts, T])):
            seg[lo:hi] = i + 1
        if b == 0:
            seg[-20:] = 0
        rows.append(seg)
    return np.stack(rows)


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(7)
    q, k, v = (rng.standard_normal(shape).astype(np.float32) for shape in ((B, T, N, H), (B, T, K, H), (B, T, K, H)))
    return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(packed_segments(rng))


def xla(q, k, v, seg):
    return dot_product_attention(q, k, v, attention_mask(seg))


def splash(q, k, v, seg):
    return _splash_attention(q, k, v, seg, interpret=True)


def test_values_and_gradients_match_xla_attention(inputs):
    q, k, v, seg = inputs
    np.testing.assert_allclose(splash(q, k, v, seg), xla(q, k, v, seg), atol=2e-5, rtol=2e-5)
    cotangent = jnp.asarray(np.random.default_rng(1).standard_normal((B, T, N, H)), jnp.float32)

    def grads(fn):
        return jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v, seg) * cotangent), argnums=(0, 1, 2))(q, k, v)

    for got, want in zip(grads(splash), grads(xla)):
        np.testing.assert_allclose(got, want, atol=5e-5, rtol=5e-5)


def test_no_token_attends_across_documents(inputs):
    """Changing one document's keys and values changes no other document's outputs."""
    q, k, v, seg = inputs
    doc = seg == 2
    k2 = jnp.where(doc[..., None, None], k + 3.0, k)
    v2 = jnp.where(doc[..., None, None], v * -2.0, v)
    before, after = np.asarray(splash(q, k, v, seg)), np.asarray(splash(q, k2, v2, seg))
    outside = ~np.asarray(doc)
    np.testing.assert_array_equal(before[outside], after[outside])
    assert not np.allclose(before[np.asarray(doc)], after[np.asarray(doc)])  # the test can fail


@pytest.mark.tpu
@pytest.mark.parametrize("topology", ["v5e:2x2", "v5p:2x2x1"])
def test_the_sharded_train_step_compiles_with_splash_for_tpu(topology):
    """`model.attention: auto` (the default) picks splash when compiled for TPU."""
    pytest.importorskip("libtpu")
    from metatrain.config import load_config
    from metatrain.io.paths import CONFIGS_DIR
    from metatrain.launch.compile import lower_train_step, tpu_topology

    config = load_config(CONFIGS_DIR / "default.yaml", ["mesh.data=2", "mesh.fsdp=-1"])
    assert config.model.attention == "auto"
    lowered, _, _ = lower_train_step(config, list(tpu_topology(topology).devices))
    # The TPU branch of the lowered program (libtpu's compiled-HLO text fails to print for
    # v5p's async collectives, so the kernels are read before compiling).
    text = lowered.as_text()
    for kernel in ("splash_mha_fwd_segmented", "splash_mha_dq_segmented", "splash_mha_dkv_segmented"):
        assert kernel in text, kernel
    memory = lowered.compile().memory_analysis()
    assert memory.temp_size_in_bytes > 0
