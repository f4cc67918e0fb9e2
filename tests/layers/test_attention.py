import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metatrain.errors import UserError
from metatrain.layers import Attention, attention_mask, dot_product_attention

B, T, D, N, K, H = 3, 11, 13, 6, 2, 10


def _segments() -> np.ndarray:
    """Three packed rows: several documents, one row ending in padding (segment 0)."""
    return np.array(
        [
            [1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3],
            [1, 1, 1, 1, 1, 1, 2, 2, 0, 0, 0],
            [1, 2, 3, 4, 5, 5, 5, 5, 5, 6, 6],
        ],
        np.int32,
    )


def _attention_reference(q, k, v, segment_ids) -> np.ndarray:
    """Float64 loops: query head n reads kv head n // (N/K); same document, not future."""
    q, k, v = (a.astype(np.float64) for a in (q, k, v))
    batch, seq, n_heads, head_dim = q.shape
    group = n_heads // k.shape[2]
    out = np.zeros_like(q)
    for b in range(batch):
        for n in range(n_heads):
            for t in range(seq):
                allowed = [s for s in range(t + 1) if segment_ids[b, s] == segment_ids[b, t]]
                scores = np.array([q[b, t, n] @ k[b, s, n // group] for s in allowed]) / np.sqrt(head_dim)
                probs = np.exp(scores - scores.max())
                probs /= probs.sum()
                out[b, t, n] = sum(p * v[b, s, n // group] for p, s in zip(probs, allowed))
    return out


def test_mask_is_causal_and_within_documents():
    seg = _segments()
    mask = np.asarray(attention_mask(jnp.asarray(seg)))
    assert mask.shape == (B, 1, T, T)
    t = np.arange(T)
    expected = (seg[:, :, None] == seg[:, None, :]) & (t[None, :, None] >= t[None, None, :])
    np.testing.assert_array_equal(mask[:, 0], expected)
    assert mask.any(axis=-1).all(), "every query, padding included, sees at least itself"


def test_dot_product_attention_matches_float64_reference():
    rng = np.random.default_rng(3)
    q = rng.normal(size=(B, T, N, H)).astype(np.float32)
    k = rng.normal(size=(B, T, K, H)).astype(np.float32)
    v = rng.normal(size=(B, T, K, H)).astype(np.float32)
    seg = _segments()
    out = dot_product_attention(*map(jnp.asarray, (q, k, v)), attention_mask(jnp.asarray(seg)))
    np.testing.assert_allclose(np.asarray(out), _attention_reference(q, k, v, seg), atol=2e-5)


def test_grouped_query_attention_equals_mha_with_repeated_kv_heads():
    rng = np.random.default_rng(4)
    q = jnp.asarray(rng.normal(size=(B, T, N, H)).astype(np.float32))
    k = jnp.asarray(rng.normal(size=(B, T, K, H)).astype(np.float32))
    v = jnp.asarray(rng.normal(size=(B, T, K, H)).astype(np.float32))
    mask = attention_mask(jnp.asarray(_segments()))
    gqa = dot_product_attention(q, k, v, mask)
    group = N // K
    mha = dot_product_attention(q, jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2), mask)
    np.testing.assert_allclose(np.asarray(gqa), np.asarray(mha), atol=1e-6)


def _module(n_kv_heads=K):
    return Attention(d_model=D, n_heads=N, n_kv_heads=n_kv_heads, head_dim=H, dtype=jnp.float32)


def _inputs(seed=5):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(B, T, D)).astype(np.float32))
    seg = jnp.asarray(_segments())
    # positions restart at 0 in every document, as the packer writes them
    pos = np.zeros_like(_segments())
    for b in range(B):
        for t in range(1, T):
            pos[b, t] = pos[b, t - 1] + 1 if _segments()[b, t] == _segments()[b, t - 1] else 0
    return x, jnp.asarray(pos), seg


def test_attention_module_parameters_and_logical_axes():
    x, pos, seg = _inputs()
    params = _module().init(jax.random.key(0), x, pos, seg)["params"]
    shapes = {name: (p.value.shape, p.names) for name, p in params.items()}
    assert shapes == {
        "query": ((D, N, H), ("embed", "heads", "head_dim")),
        "key": ((D, K, H), ("embed", "kv_heads", "head_dim")),
        "value": ((D, K, H), ("embed", "kv_heads", "head_dim")),
        "out": ((N, H, D), ("heads", "head_dim", "embed")),
    }


def test_attention_module_never_crosses_documents():
    x, pos, seg = _inputs()
    model = _module()
    params = model.init(jax.random.key(0), x, pos, seg)
    out = model.apply(params, x, pos, seg)
    # Change every token of document 2 in row 0 (positions 3..6): documents 1 and 3 must not move.
    x2 = x.at[0, 3:7].set(jax.random.normal(jax.random.key(9), (4, D)))
    out2 = model.apply(params, x2, pos, seg)
    np.testing.assert_array_equal(np.asarray(out[0, :3]), np.asarray(out2[0, :3]))
    np.testing.assert_array_equal(np.asarray(out[0, 7:]), np.asarray(out2[0, 7:]))
    assert not np.allclose(np.asarray(out[0, 3:7]), np.asarray(out2[0, 3:7]))


@pytest.mark.parametrize("t", [0, 4, 9])
def test_attention_module_is_causal(t):
    x, pos, _ = _inputs()
    seg = jnp.ones((B, T), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    model = _module()
    params = model.init(jax.random.key(0), x, pos, seg)
    out = model.apply(params, x, pos, seg)
    out2 = model.apply(params, x.at[:, t + 1 :].multiply(-3.0), pos, seg)
    np.testing.assert_array_equal(np.asarray(out[:, : t + 1]), np.asarray(out2[:, : t + 1]))
    assert not np.allclose(np.asarray(out[:, t + 1 :]), np.asarray(out2[:, t + 1 :]))


def test_attention_module_gqa_equals_mha_with_repeated_kv_weights():
    x, pos, seg = _inputs()
    gqa = _module(K)
    params = gqa.init(jax.random.key(1), x, pos, seg)["params"]
    params = {name: p.value for name, p in params.items()}
    group = N // K
    mha_params = dict(params)
    mha_params["key"] = jnp.repeat(params["key"], group, axis=1)
    mha_params["value"] = jnp.repeat(params["value"], group, axis=1)
    out_gqa = gqa.apply({"params": params}, x, pos, seg)
    out_mha = _module(N).apply({"params": mha_params}, x, pos, seg)
    np.testing.assert_allclose(np.asarray(out_gqa), np.asarray(out_mha), atol=1e-5)


def test_packed_document_sees_what_it_would_see_alone():
    """Document 2 of row 0 packed between others == the same tokens as their own row."""
    x, pos, seg = _inputs()
    model = _module()
    params = model.init(jax.random.key(2), x, pos, seg)
    packed = model.apply(params, x, pos, seg)[0, 3:7]
    alone = model.apply(
        params, x[:1, 3:7], jnp.arange(4)[None], jnp.ones((1, 4), jnp.int32)
    )[0]
    np.testing.assert_allclose(np.asarray(packed), np.asarray(alone), atol=1e-5)


def test_cudnn_attention_is_refused_off_gpu_with_the_fix():
    x, pos, seg = _inputs()
    model = Attention(d_model=D, n_heads=N, n_kv_heads=K, head_dim=H, implementation="cudnn")
    with pytest.raises(UserError, match="model.attention=xla"):
        model.init(jax.random.key(0), x, pos, seg)
