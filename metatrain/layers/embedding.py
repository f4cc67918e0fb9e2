"""Token embedding table (a tied model also reads it, transposed, as the output projection)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class Embedding(nn.Module):
    """A [V, D] table; rows initialised with standard deviation `init_std`.

    The default 1/sqrt(D) gives a row unit norm in expectation, so a tied output
    projection applied to the (unit-RMS) final normalised hidden state gives logits of
    order 1. μP keeps the base width's value at every width (`ModelConfig.embedding_init_std`).
    The output projection itself is `metatrain.models.output_projection`, the one path
    from hidden states to logits.

    Attributes:
        vocab_size: V.
        d_model: D.
        dtype: compute dtype of the looked-up vectors.
        param_dtype: dtype of the table.
        init_std: standard deviation of the initial table (None: 1/sqrt(D)).
    """

    vocab_size: int
    d_model: int
    dtype: jnp.dtype = jnp.bfloat16
    param_dtype: jnp.dtype = jnp.float32
    init_std: float | None = None

    def setup(self) -> None:
        std = self.d_model**-0.5 if self.init_std is None else self.init_std
        self.table = self.param(
            "table",
            nn.with_logical_partitioning(nn.initializers.normal(stddev=std), ("vocab", "embed")),
            (self.vocab_size, self.d_model),
            self.param_dtype,
        )

    def __call__(self, ids: jax.Array) -> jax.Array:
        """[B, T] int32 token ids -> [B, T, D] (compute dtype)."""
        x = jnp.take(self.table.astype(self.dtype), ids, axis=0)
        return nn.with_logical_constraint(x, ("batch", "seq", "embed"))
