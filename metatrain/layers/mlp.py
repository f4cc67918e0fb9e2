"""SwiGLU feed-forward block (Shazeer 2020, "GLU Variants Improve Transformer")."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def _fan_in_init() -> nn.initializers.Initializer:
    return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


class SwiGLU(nn.Module):
    """`down(silu(x @ gate) * (x @ up))`, three bias-free matrices.

    Attributes:
        d_model: D.
        d_ff: F, the hidden width (Llama uses about 8/3 D).
        dtype: compute dtype.
        param_dtype: parameter dtype.
    """

    d_model: int
    d_ff: int
    dtype: jnp.dtype = jnp.bfloat16
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, T, D] -> [B, T, D] (compute dtype)."""
        D, F = self.d_model, self.d_ff

        def kernel(name, shape, names):
            init = nn.with_logical_partitioning(_fan_in_init(), names)
            return self.param(name, init, shape, self.param_dtype).astype(self.dtype)

        w_gate = kernel("gate", (D, F), ("embed", "mlp"))
        w_up = kernel("up", (D, F), ("embed", "mlp"))
        w_down = kernel("down", (F, D), ("mlp", "embed"))
        x = x.astype(self.dtype)
        gate = jnp.einsum("BTD,DF->BTF", x, w_gate)
        up = jnp.einsum("BTD,DF->BTF", x, w_up)
        hidden = nn.with_logical_constraint(jax.nn.silu(gate) * up, ("batch", "seq", "mlp"))
        y = jnp.einsum("BTF,FD->BTD", hidden, w_down)
        return nn.with_logical_constraint(y, ("batch", "seq", "embed"))
