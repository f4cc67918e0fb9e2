import jax
import jax.numpy as jnp
import numpy as np

from metatrain.layers import Embedding


def test_embedding_lookup_matches_numpy():
    ids = np.array([[0, 36, 5, 5], [1, 2, 3, 31]], np.int32)
    emb = Embedding(vocab_size=37, d_model=11, dtype=jnp.float32)
    boxed = emb.init(jax.random.key(0), jnp.asarray(ids))["params"]["table"]
    assert boxed.value.shape == (37, 11) and boxed.names == ("vocab", "embed")
    table = np.asarray(boxed.value, np.float64)
    params = {"params": {"table": boxed.value}}

    looked_up = emb.apply(params, jnp.asarray(ids))
    np.testing.assert_array_equal(np.asarray(looked_up), table[ids].astype(np.float32))


def test_embedding_rows_have_unit_norm_in_expectation():
    emb = Embedding(vocab_size=4001, d_model=64)
    table = emb.init(jax.random.key(1), jnp.zeros((1, 1), jnp.int32))["params"]["table"].value
    mean_sq_norm = float(jnp.mean(jnp.sum(table**2, axis=-1)))
    assert abs(mean_sq_norm - 1.0) < 0.05
