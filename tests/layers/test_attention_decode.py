"""Attention over a KV cache (`Attention.decode`, `cache_attention_mask`) against full attention."""

import jax
import jax.numpy as jnp
import numpy as np

from metatrain.layers import Attention, LayerCache, attention_mask, cache_attention_mask, write_slots

B, T, D, N, K, H = 2, 11, 13, 6, 2, 10
S = 17  # cache slots: more than the tokens written


def _module() -> Attention:
    return Attention(d_model=D, n_heads=N, n_kv_heads=K, head_dim=H, dtype=jnp.float32)


def _empty_cache() -> LayerCache:
    zeros = jnp.zeros((B, S, K, H), jnp.float32)
    return LayerCache(zeros, zeros)


def test_cache_mask_is_the_training_mask_on_slots():
    seg = jnp.asarray(np.array([[1] * 7 + [2] * 4, [0] * 3 + [1] * 8], np.int32))
    slots = jnp.zeros((B, S), jnp.int32).at[:, :T].set(seg)
    full = np.asarray(cache_attention_mask(seg, slots, jnp.zeros((B,), jnp.int32)))
    assert full.shape == (B, 1, T, S)
    np.testing.assert_array_equal(full[..., :T], np.asarray(attention_mask(seg)))
    assert not full[..., T:].any(), "slots after the last query are never visible"
    # A query written later (start 4) sees exactly the earlier slots of its document.
    late = np.asarray(cache_attention_mask(seg[:, 4:6], slots, jnp.full((B,), 4, jnp.int32)))
    np.testing.assert_array_equal(late, full[:, :, 4:6])


def test_prefill_then_one_token_at_a_time_equals_full_attention():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(B, T, D)).astype(np.float32))
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    seg = jnp.ones((B, T), jnp.int32)
    model = _module()
    shapes = {"query": (D, N, H), "key": (D, K, H), "value": (D, K, H), "out": (N, H, D)}
    params = {"params": {k: jnp.asarray(rng.normal(size=v).astype(np.float32) / np.sqrt(D)) for k, v in shapes.items()}}
    expected = np.asarray(model.apply(params, x, pos, seg))

    @jax.jit
    def decode(x_new, pos_new, cache, slots, index):
        t = x_new.shape[1]
        slots = write_slots(slots, jnp.ones((B, t), jnp.int32), index)
        mask = cache_attention_mask(jnp.ones((B, t), jnp.int32), slots, index)
        y, cache = model.apply(params, x_new, pos_new, mask, index, cache, method=Attention.decode)
        return y, cache, slots

    prefill = 5
    slots = jnp.zeros((B, S), jnp.int32)
    y, cache, slots = decode(x[:, :prefill], pos[:, :prefill], _empty_cache(), slots, jnp.zeros((B,), jnp.int32))
    outputs = [np.asarray(y)]
    for t in range(prefill, T):
        y, cache, slots = decode(x[:, t : t + 1], pos[:, t : t + 1], cache, slots, jnp.full((B,), t, jnp.int32))
        outputs.append(np.asarray(y))
    np.testing.assert_allclose(np.concatenate(outputs, axis=1), expected, atol=2e-5)
    # The cache holds the rotated keys of every written token, zeros after them.
    _, keys, _ = model.apply(params, x, pos, method=Attention.project_qkv)
    np.testing.assert_allclose(np.asarray(cache.key[:, :T]), np.asarray(keys), atol=1e-6)
    assert not np.asarray(cache.key[:, T:]).any()
