"""Rotary position embeddings (Su et al. 2021, RoFormer), "rotate half" layout.

The head dimension is split into two halves `(x1, x2)`; pair `i` (`x1[i]`, `x2[i]`) is
rotated by the angle `position * theta ** (-2 i / H)`. This is the layout of GPT-NeoX
and Llama checkpoints in Hugging Face format. Because the rotation of the query at
position `p` and of the key at position `q` compose into a rotation by `p - q`, the
attention score depends only on the relative position; documents packed into one row
get `positions` that restart at 0, so each sees the same positions it would alone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rotary_angles(positions: jax.Array, head_dim: int, theta: float) -> jax.Array:
    """Rotation angle of every (position, pair): [B, T] -> [B, T, H/2] float32."""
    if head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim  # [H/2]
    inv_freq = theta ** (-exponents)
    return positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]


def apply_rotary(x: jax.Array, positions: jax.Array, theta: float = 10000.0) -> jax.Array:
    """Rotate queries or keys by their positions.

    Args:
        x: [B, T, N, H] queries or keys (any float dtype; rotated in float32).
        positions: [B, T] int32 position of each token inside its document.
        theta: the RoPE base.

    Returns:
        [B, T, N, H] in the dtype of `x`.
    """
    angles = rotary_angles(positions, x.shape[-1], theta)[:, :, None, :]  # [B, T, 1, H/2]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)  # [B, T, N, H/2] each
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)
