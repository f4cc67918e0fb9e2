"""`Transformer.decode` with a KV cache against recomputing the whole sequence (`__call__`)."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metatrain.models import (
    ModelConfig,
    Transformer,
    init_cache,
    init_params_shape,
    logits,
)

CFG = ModelConfig(
    vocab_size=37, d_model=26, n_layers=3, n_heads=6, n_kv_heads=2, head_dim=10, d_ff=34,
    max_seq_len=32, dtype="float32",
)
LENGTHS = (13, 7)  # two prompts of different lengths, right-aligned in one batch
PROMPT_LEN, NEW = 13, 6


def _params(cfg):
    rng = np.random.default_rng(0)
    abstract = nn.unbox(init_params_shape(cfg))
    return jax.tree.map(
        lambda a: jnp.asarray(rng.normal(size=a.shape) / np.sqrt(a.shape[-2] if a.ndim >= 2 else 1), a.dtype),
        abstract,
    )


def _full_logits(cfg, params, rows):
    """Logits of every position of each row, recomputed from scratch in one batch.

    Rows are left-aligned and padded at the end (segment 0), as the trainer packs them.
    """
    width = max(len(r) for r in rows)
    ids, seg = np.zeros((len(rows), width), np.int32), np.zeros((len(rows), width), np.int32)
    for b, r in enumerate(rows):
        ids[b, : len(r)], seg[b, : len(r)] = r, 1
    pos = np.broadcast_to(np.arange(width), ids.shape)

    @jax.jit
    def forward(params, ids, pos, seg):
        return logits(Transformer(cfg).apply({"params": params}, ids, pos, seg), params, cfg)

    return np.asarray(forward(params, ids, pos, seg))


@pytest.mark.parametrize("scan_layers", [True, False])
def test_cached_decoding_equals_recomputing_the_prefix(scan_layers):
    cfg = dataclasses.replace(CFG, scan_layers=scan_layers)
    params = _params(CFG)
    if not scan_layers:
        params = {k: v for k, v in params.items() if k != "layers"} | {
            f"layers_{i}": jax.tree.map(lambda a, i=i: a[i], params["layers"]) for i in range(cfg.n_layers)
        }
    rng = np.random.default_rng(1)
    rows = [rng.integers(0, cfg.vocab_size, n + NEW).astype(np.int32) for n in LENGTHS]
    # Prompts right-aligned: padding (segment 0) first, positions from 0 at each prompt's start.
    ids = np.zeros((2, PROMPT_LEN), np.int32)
    seg = np.zeros_like(ids)
    pos = np.zeros_like(ids)
    for b, n in enumerate(LENGTHS):
        ids[b, PROMPT_LEN - n:] = rows[b][:n]
        seg[b, PROMPT_LEN - n:] = 1
        pos[b, PROMPT_LEN - n:] = np.arange(n)

    model = Transformer(cfg)
    decode = jax.jit(lambda p, i, q, s, c: model.apply({"params": p}, i, q, s, c, method=Transformer.decode))
    cache = init_cache(cfg, 2, PROMPT_LEN + NEW)
    hidden, cache = decode(params, jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(seg), cache)
    got = [np.asarray(logits(hidden[:, -1:], params, cfg))[:, 0]]
    for t in range(NEW - 1):
        new = np.array([[rows[b][n + t]] for b, n in enumerate(LENGTHS)], np.int32)
        step_pos = np.array([[n + t] for n in LENGTHS], np.int32)
        hidden, cache = decode(params, jnp.asarray(new), jnp.asarray(step_pos), jnp.ones((2, 1), jnp.int32), cache)
        got.append(np.asarray(logits(hidden, params, cfg))[:, 0])
    assert cache.index.tolist() == [PROMPT_LEN + NEW - 1] * 2
    full = _full_logits(cfg, params, [r[:-1] for r in rows])
    for b, n in enumerate(LENGTHS):
        expected = full[b, n - 1 : n + NEW - 1]
        np.testing.assert_allclose(np.stack([g[b] for g in got]), expected, rtol=1e-4, atol=1e-4)


def test_decode_reads_the_training_parameters():
    """No parameter exists only for decoding: the trees of init via either path agree."""
    ids = jnp.ones((1, 3), jnp.int32)
    model = Transformer(CFG)
    train_tree = jax.eval_shape(lambda k: model.init(k, ids, ids, ids)["params"], jax.random.key(0))
    cache = init_cache(CFG, 1, 5)
    decode_tree = jax.eval_shape(
        lambda k: model.init(k, ids, ids, ids, cache, method=Transformer.decode)["params"], jax.random.key(0)
    )
    assert jax.tree.structure(train_tree) == jax.tree.structure(decode_tree)
    assert jax.tree.map(lambda a: a.shape, train_tree) == jax.tree.map(lambda a: a.shape, decode_tree)
