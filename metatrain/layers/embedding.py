"""Token embedding table, optionally reused (tied) as the output projection."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class Embedding(nn.Module):
    """A [V, D] table; rows initialised with standard deviation 1/sqrt(D).

    With that scale a row has unit norm in expectation, so a tied output projection
    applied to the (unit-RMS) final normalised hidden state gives logits of order 1.

    Attributes:
        vocab_size: V.
        d_model: D.
        dtype: compute dtype of the looked-up vectors.
        param_dtype: dtype of the table.
    """

    vocab_size: int
    d_model: int
    dtype: jnp.dtype = jnp.bfloat16
    param_dtype: jnp.dtype = jnp.float32

    def setup(self) -> None:
        init = nn.initializers.normal(stddev=self.d_model**-0.5)
        self.table = self.param(
            "table",
            nn.with_logical_partitioning(init, ("vocab", "embed")),
            (self.vocab_size, self.d_model),
            self.param_dtype,
        )

    def __call__(self, ids: jax.Array) -> jax.Array:
        """[B, T] int32 token ids -> [B, T, D] (compute dtype)."""
        x = jnp.take(self.table.astype(self.dtype), ids, axis=0)
        return nn.with_logical_constraint(x, ("batch", "seq", "embed"))

    def attend(self, x: jax.Array) -> jax.Array:
        """Tied output projection: [B, T, D] -> [B, T, V] float32 logits."""
        return jnp.einsum(
            "BTD,VD->BTV", x, self.table.astype(x.dtype), preferred_element_type=jnp.float32
        )
