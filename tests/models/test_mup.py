"""μP in the model: initialisation, the output multiplier, the parameter labels, and
that at the base width μP is the standard model exactly."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metatrain.errors import UserError
from metatrain.hf.convert import check_exportable
from metatrain.models import ModelConfig, Transformer, logits, output_projection
from metatrain.models.transformer import hidden_matrix_mask

# Odd-ish sizes so that a transposed or swapped axis cannot pass (head_dim must be even).
STANDARD = ModelConfig(
    vocab_size=37, d_model=26, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=10, d_ff=34,
    max_seq_len=16, dtype="float32",
)


def _mup(cfg: ModelConfig, base: int) -> ModelConfig:
    return dataclasses.replace(cfg, parametrization="mup", mup_base_width=base)


def _init(cfg: ModelConfig, seed: int = 0):
    ids = jnp.zeros((1, 4), jnp.int32)
    return nn.unbox(Transformer(cfg).init(jax.random.key(seed), ids, jnp.arange(4)[None], ids + 1)["params"])


def _batch():
    rng = np.random.default_rng(3)
    ids = jnp.asarray(rng.integers(0, STANDARD.vocab_size, (2, 7)), jnp.int32)
    return ids, jnp.broadcast_to(jnp.arange(7), (2, 7)), jnp.ones((2, 7), jnp.int32)


def test_width_multiplier_and_embedding_std():
    assert STANDARD.mup_width_multiplier == 1.0
    assert STANDARD.embedding_init_std == 26**-0.5
    wide = _mup(dataclasses.replace(STANDARD, d_model=52, n_heads=4, n_kv_heads=2), base=13)
    assert wide.mup_width_multiplier == 4.0
    assert wide.embedding_init_std == 13**-0.5  # the base width's, not 52's


def test_mup_needs_a_base_width():
    with pytest.raises(UserError, match="mup_base_width"):
        dataclasses.replace(STANDARD, parametrization="mup")


@pytest.mark.parametrize("tied", [True, False])
def test_at_the_base_width_mup_is_the_standard_model(tied):
    standard = dataclasses.replace(STANDARD, tie_embeddings=tied)
    mup = _mup(standard, base=standard.d_model)
    p_standard, p_mup = _init(standard), _init(mup)
    jax.tree.map(np.testing.assert_array_equal, p_standard, p_mup)
    np.testing.assert_array_equal(output_projection(p_mup, mup), output_projection(p_standard, standard))
    ids, pos, seg = _batch()
    hidden = Transformer(mup).apply({"params": p_mup}, ids, pos, seg)
    np.testing.assert_array_equal(logits(hidden, p_mup, mup), logits(hidden, p_standard, standard))


@pytest.mark.parametrize("tied", [True, False])
def test_output_projection_is_divided_by_the_width_multiplier(tied):
    standard = dataclasses.replace(STANDARD, tie_embeddings=tied)
    mup = _mup(standard, base=13)  # m = 26 / 13 = 2
    params = _init(standard)
    np.testing.assert_allclose(output_projection(params, mup), output_projection(params, standard) / 2, rtol=1e-7)
    # Gradients flow through the multiplier: the table's gradient from the logits halves too.
    hidden = jnp.asarray(np.random.default_rng(1).normal(size=(1, 3, 26)), jnp.float32)

    def total(p, cfg):
        return jnp.sum(logits(hidden, p, cfg) ** 2)

    g_standard = jax.grad(total)(params, standard)
    g_mup = jax.grad(total)(params, mup)
    name = ("embedding", "table") if tied else ("output_projection",)
    pick = (lambda g: g[name[0]][name[1]]) if tied else (lambda g: g[name[0]])
    np.testing.assert_allclose(pick(g_mup), pick(g_standard) / 4, rtol=1e-5)  # (W/2)^2: 1/4


@pytest.mark.parametrize("tied", [True, False])
def test_mup_embedding_and_readout_init_do_not_shrink_with_width(tied):
    wide = dataclasses.replace(
        STANDARD, vocab_size=401, d_model=160, n_layers=1, n_heads=16, n_kv_heads=8, d_ff=432, tie_embeddings=tied
    )
    params = _init(_mup(wide, base=40))
    assert abs(float(jnp.std(params["embedding"]["table"])) / 40**-0.5 - 1) < 0.02
    if not tied:
        assert abs(float(jnp.std(params["output_projection"])) / 40**-0.5 - 1) < 0.02
    standard = _init(wide)
    assert abs(float(jnp.std(standard["embedding"]["table"])) / 160**-0.5 - 1) < 0.02
    # Hidden matrices keep their fan-in initialisation under both.
    jax.tree.map(np.testing.assert_array_equal, params["layers"], standard["layers"])


@pytest.mark.parametrize("scan", [True, False])
def test_hidden_matrices_are_attention_and_mlp_weights(scan):
    cfg = dataclasses.replace(STANDARD, scan_layers=scan, tie_embeddings=False)
    ids = jnp.zeros((1, 2), jnp.int32)
    boxed = Transformer(cfg).init(jax.random.key(0), ids, ids, ids + 1)["params"]
    for tree in (boxed, nn.unbox(boxed)):  # optax calls masks on both
        mask = hidden_matrix_mask(tree)
        flat = {
            jax.tree_util.keystr(path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(mask)[0]
        }
        hidden = sorted(k for k, v in flat.items() if v)
        assert len(hidden) == (7 if scan else 14), hidden  # q, k, v, out, gate, up, down per stack
        assert all(("['attention']" in k or "['mlp']" in k) and "scale" not in k for k in hidden)
        assert not any(flat[k] for k in flat if "embedding" in k or "output_projection" in k or "norm" in k)


def test_hugging_face_export_refuses_mup_but_not_an_unused_base_width():
    with pytest.raises(UserError, match="parametrization=mup"):
        check_exportable(_mup(STANDARD, base=13))
    check_exportable(dataclasses.replace(STANDARD, mup_base_width=13))  # standard: the base width is unused
