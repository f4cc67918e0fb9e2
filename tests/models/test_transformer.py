import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metatrain.models import (
    ModelConfig,
    Transformer,
    init_params_shape,
    logits,
    output_projection,
    weight_decay_mask,
)

CFG = ModelConfig(
    vocab_size=37, d_model=26, n_layers=3, n_heads=6, n_kv_heads=2, head_dim=10, d_ff=34,
    max_seq_len=16, dtype="float32",
)
SEGMENTS = np.array([[1, 1, 1, 1, 2, 2, 2, 3, 3, 3, 0], [1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2]], np.int32)


def _positions(segment_ids: np.ndarray) -> np.ndarray:
    pos = np.zeros_like(segment_ids)
    for b in range(segment_ids.shape[0]):
        for t in range(1, segment_ids.shape[1]):
            same = segment_ids[b, t] == segment_ids[b, t - 1]
            pos[b, t] = pos[b, t - 1] + 1 if same else 0
    return pos


def _batch(seed=0):
    ids = np.random.default_rng(seed).integers(0, CFG.vocab_size, SEGMENTS.shape).astype(np.int32)
    return jnp.asarray(ids), jnp.asarray(_positions(SEGMENTS)), jnp.asarray(SEGMENTS)


def _apply(cfg, params, ids, pos, seg):
    return jax.jit(Transformer(cfg).apply)({"params": params}, ids, pos, seg)


def _init(cfg=CFG, seed=0):
    """Random parameters of the right shapes, drawn by NumPy: no RNG kernels to compile."""
    rng = np.random.default_rng(seed)
    abstract = nn.unbox(init_params_shape(cfg))

    def draw(path, leaf):
        if jax.tree_util.keystr(path).endswith("['scale']"):
            return jnp.asarray(1 + 0.1 * rng.normal(size=leaf.shape), leaf.dtype)
        fan_in = leaf.shape[-2] if leaf.ndim >= 2 else 1
        return jnp.asarray(rng.normal(size=leaf.shape) / np.sqrt(fan_in), leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, abstract)


# -- float64 NumPy reference of the whole model -----------------------------------------

def _rms(x, scale, eps):
    return x / np.sqrt(np.mean(x**2, -1, keepdims=True) + eps) * scale


def _rope(x, pos, theta):
    half = x.shape[-1] // 2
    freq = theta ** (-np.arange(half) * 2.0 / x.shape[-1])
    ang = pos[:, :, None, None] * freq
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang)], -1)


def _reference_forward(p, cfg, ids, pos, seg):
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    x = p["embedding"]["table"][ids]
    T = ids.shape[1]
    allowed = (seg[:, :, None] == seg[:, None, :]) & np.tril(np.ones((T, T), bool))
    group = cfg.n_heads // cfg.n_kv_heads
    for layer in range(cfg.n_layers):
        lp = jax.tree.map(lambda a: a[layer], p["layers"])
        h = _rms(x, lp["attention_norm"]["scale"], cfg.norm_eps)
        a = lp["attention"]
        q = _rope(np.einsum("btd,dnh->btnh", h, a["query"]), pos, cfg.rope_theta)
        k = _rope(np.einsum("btd,dkh->btkh", h, a["key"]), pos, cfg.rope_theta)
        v = np.einsum("btd,dkh->btkh", h, a["value"])
        k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
        s = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(cfg.head_dim)
        s = np.where(allowed[:, None], s, -np.inf)
        w = np.exp(s - s.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        x = x + np.einsum("bnts,bsnh,nhd->btd", w, v, a["out"])
        h = _rms(x, lp["mlp_norm"]["scale"], cfg.norm_eps)
        m = lp["mlp"]
        g = h @ m["gate"]
        x = x + (g / (1 + np.exp(-g)) * (h @ m["up"])) @ m["down"]
    return _rms(x, p["final_norm"]["scale"], cfg.norm_eps)


def test_forward_matches_float64_numpy_reference():
    ids, pos, seg = _batch()
    params = _init()
    hidden = _apply(CFG, params, ids, pos, seg)
    assert hidden.shape == (2, 11, 26) and hidden.dtype == jnp.float32
    expected = _reference_forward(params, CFG, np.asarray(ids), np.asarray(pos), np.asarray(seg))
    np.testing.assert_allclose(np.asarray(hidden), expected, rtol=1e-4, atol=1e-4)


def test_bfloat16_compute_keeps_float32_params_and_stays_close():
    ids, pos, seg = _batch()
    cfg = dataclasses.replace(CFG, dtype="bfloat16")
    params = _init(cfg)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype("float32")}
    hidden = _apply(cfg, params, ids, pos, seg)
    assert hidden.dtype == jnp.bfloat16
    expected = _reference_forward(params, cfg, np.asarray(ids), np.asarray(pos), np.asarray(seg))
    # bf16 keeps ~3 significant digits: compare the RMS error with the RMS value.
    error = np.sqrt(np.mean((np.asarray(hidden, np.float64) - expected) ** 2))
    assert error < 0.02 * np.sqrt(np.mean(expected**2))


def test_packed_documents_equal_documents_alone():
    ids, pos, seg = _batch()
    params = _init()
    packed = _apply(CFG, params, ids, pos, seg)
    # Each document of row 0 alone at the start of its own row, the rest padding.
    spans = [(0, 4), (4, 7), (7, 10)]
    alone_ids = np.zeros((3, ids.shape[1]), np.int32)
    alone_seg = np.zeros_like(alone_ids)
    for row, (start, stop) in enumerate(spans):
        alone_ids[row, : stop - start] = ids[0, start:stop]
        alone_seg[row, : stop - start] = 1
    alone = _apply(CFG, params, jnp.asarray(alone_ids), jnp.asarray(_positions(alone_seg)), jnp.asarray(alone_seg))
    for row, (start, stop) in enumerate(spans):
        np.testing.assert_allclose(
            np.asarray(packed[0, start:stop]), np.asarray(alone[row, : stop - start]), atol=1e-5
        )


def _unstack(params, n_layers):
    out = {k: v for k, v in params.items() if k != "layers"}
    for i in range(n_layers):
        out[f"layers_{i}"] = jax.tree.map(lambda a: a[i], params["layers"])
    return out


def test_unrolled_and_rematerialised_models_compute_the_same():
    ids, pos, seg = _batch()
    cfg = dataclasses.replace(CFG, n_layers=2)
    params = _init(cfg)
    # A random readout: sum(hidden**2) would be constant after the final RMSNorm.
    readout = np.random.default_rng(3).normal(size=(*ids.shape, cfg.d_model)).astype(np.float32)

    def loss(p, c):
        return jnp.sum(Transformer(c).apply({"params": p}, ids, pos, seg) * readout)

    value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    ref_loss, ref_grads = value_and_grad(params, cfg)
    # Each variant is a fresh compile (~3 s here): unrolled + full remat, scanned + "dots".
    for remat, scan in [("full", False), ("dots", True)]:
        variant = dataclasses.replace(cfg, remat=remat, scan_layers=scan)
        p = params if scan else _unstack(params, cfg.n_layers)
        got_loss, got_grads = value_and_grad(p, variant)
        np.testing.assert_allclose(float(got_loss), float(ref_loss), atol=1e-5)
        if not scan:
            got_grads = {**{k: v for k, v in got_grads.items() if not k.startswith("layers_")},
                         "layers": jax.tree.map(lambda *xs: jnp.stack(xs),
                                                *[got_grads[f"layers_{i}"] for i in range(cfg.n_layers)])}
        for a, b in zip(jax.tree.leaves(ref_grads), jax.tree.leaves(got_grads), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_output_projection_and_logits_tied_and_untied():
    ids, pos, seg = _batch()
    params = _init()
    w = output_projection(params, CFG)
    np.testing.assert_array_equal(np.asarray(w), np.asarray(params["embedding"]["table"]).T)
    hidden = _apply(CFG, params, ids, pos, seg)
    np.testing.assert_allclose(
        np.asarray(logits(hidden, params, CFG)),
        np.asarray(hidden, np.float64) @ np.asarray(w, np.float64), rtol=1e-4, atol=1e-4,
    )

    untied = dataclasses.replace(CFG, tie_embeddings=False)
    boxed = init_params_shape(untied)
    assert boxed["output_projection"].names == ("embed", "vocab")
    assert output_projection(boxed, untied).shape == (26, 37)  # boxed works too
    untied_params = _init(untied)
    assert output_projection(untied_params, untied) is untied_params["output_projection"]


def test_every_parameter_has_logical_axes_and_count_matches_closed_form():
    for cfg in (CFG, dataclasses.replace(CFG, tie_embeddings=False, scan_layers=False)):
        abstract = init_params_shape(cfg)
        leaves = jax.tree.leaves(abstract, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
        assert all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
        assert all(len(x.names) == len(x.value.shape) for x in leaves)
        assert sum(int(np.prod(x.value.shape)) for x in leaves) == cfg.num_params
    names = {n for x in jax.tree.leaves(
        init_params_shape(CFG), is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)) for n in x.names}
    assert names == {"vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "layers", "norm"}


def test_weight_decay_mask_excludes_norm_scales_even_when_stacked():
    params = _init()
    mask = weight_decay_mask(params)
    flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(mask)}
    assert params["layers"]["attention_norm"]["scale"].ndim == 2  # [L, D]: rank alone misleads
    assert [k for k, v in flat.items() if not v] == [
        "['final_norm']['scale']", "['layers']['attention_norm']['scale']", "['layers']['mlp_norm']['scale']"
    ]
    assert flat["['layers']['attention']['query']"] and flat["['embedding']['table']"]
