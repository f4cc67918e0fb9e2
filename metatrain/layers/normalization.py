"""RMSNorm (Zhang & Sennrich 2019): scale by the inverse root-mean-square, no centring."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class RMSNorm(nn.Module):
    """`y = x / sqrt(mean(x^2) + eps) * scale`, statistics in float32.

    Attributes:
        eps: added to the mean square before the square root.
        dtype: dtype of the output (the compute dtype).
        param_dtype: dtype of the `scale` parameter.
    """

    eps: float = 1e-5
    dtype: jnp.dtype = jnp.bfloat16
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """[..., D] -> [..., D] in `dtype`."""
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
            (x.shape[-1],),
            self.param_dtype,
        )
        x32 = x.astype(jnp.float32)
        inv_rms = jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (x32 * inv_rms * scale.astype(jnp.float32)).astype(self.dtype)
