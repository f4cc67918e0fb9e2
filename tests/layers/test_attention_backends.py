"""Every attention backend this platform has keeps packed documents apart.

On CPU: `xla` and `splash` (interpret mode). On an NVIDIA GPU (`benchmarks/gpu_suite.sh`
runs this file there with JAX_PLATFORMS=cuda) also `cudnn`. A token's output may depend
only on the keys and values of its own document: changing every other document's keys
and values must leave it unchanged, while changing its own must not.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metatrain.layers import Attention

B, T, D, N, K, H = 2, 256, 128, 4, 2, 32


def backends() -> list[str]:
    found = ["xla", "splash"]
    if jax.default_backend() == "gpu":
        found.append("cudnn")
    return found


def segments() -> np.ndarray:
    seg = np.zeros((B, T), np.int32)
    seg[0, :100], seg[0, 100:230] = 1, 2  # then padding
    seg[1, :60], seg[1, 60:] = 1, 2
    return seg


@pytest.mark.parametrize("implementation", backends())
def test_no_backend_attends_across_segment_ids(implementation):
    dtype = jnp.bfloat16 if implementation == "cudnn" else jnp.float32
    model = Attention(d_model=D, n_heads=N, n_kv_heads=K, head_dim=H, implementation=implementation, dtype=dtype)
    seg = jnp.asarray(segments())
    positions = jnp.asarray(np.concatenate([np.arange(100), np.arange(130), np.arange(26)])[None].repeat(B, 0))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((B, T, D)), jnp.float32)
    params = model.init(jax.random.key(0), x, positions, seg)
    apply = jax.jit(lambda x: model.apply(params, x, positions, seg).astype(jnp.float32))
    doc = np.asarray(seg) == 2
    changed = jnp.where(jnp.asarray(doc)[..., None], x * -3.0 + 1.0, x)
    before, after = np.asarray(apply(x)), np.asarray(apply(changed))
    atol = 2e-2 if dtype == jnp.bfloat16 else 1e-5
    np.testing.assert_allclose(before[~doc], after[~doc], atol=atol, err_msg=f"{implementation} leaks across documents")
    assert np.abs(before[doc] - after[doc]).max() > 10 * atol  # the document itself did change
