"""The reference cross entropy: full `[N, V]` logits, gradients by plain JAX autodiff.

This is what the fused implementations are measured against (speed and memory) and
checked against (values and gradients). It materialises the logits, so it is only for
small vocabularies or as a baseline; XLA partitions it like any other JAX code.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from metatrain.kernels.cross_entropy_tiles import dot_nn, finish_stats


def naive_cross_entropy(
    hidden: jax.Array, projection: jax.Array, targets: jax.Array, mask: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`(nll, lse, correct)`, each `[N]` f32, from the full logits.

    Args:
        hidden: `[N, D]`.
        projection: `[D, V]`, same dtype as `hidden`.
        targets: `[N]` int32 in `[0, V)`.
        mask: `[N]` bool; False rows return zeros (and get zero gradient).
    """
    logits = dot_nn(hidden, projection)  # [N, V] f32
    m = jnp.max(logits, axis=1, keepdims=True)
    s = jnp.sum(jnp.exp(logits - jax.lax.stop_gradient(m)), axis=1, keepdims=True)
    t = jnp.take_along_axis(logits, targets[:, None], axis=1)
    nll, lse, correct = finish_stats((jax.lax.stop_gradient(m), s, t), mask[:, None])
    return nll[:, 0], lse[:, 0], correct[:, 0]
