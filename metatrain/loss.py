"""The joint loss: role-weighted next-token cross entropy (docs/design.md section 3).

    L = Σ_t w[role_t] · nll_t / Σ_t w[role_t]  +  z_loss · Σ_t w[role_t] · lse_t² / Σ_t w[role_t]

computed with the fused output-projection kernel (`metatrain.kernels`), which returns
per-token `nll` and `lse` without materialising the logits. Alongside the scalar loss
come per-role *sums* (negative log-likelihood, token count, correct predictions) that
the trainer adds across micro-batches, steps and devices before dividing; PAD tokens
are masked out (no loss, no statistics and, on the Pallas paths, no compute).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from metatrain.kernels import LossSharding, fused_cross_entropy
from metatrain.roles import LOSS_ROLES, NUM_ROLES, Role


def joint_loss(
    hidden: jax.Array,
    projection: jax.Array,
    targets: jax.Array,
    target_roles: jax.Array,
    role_weights: jax.Array,
    *,
    z_loss: float = 0.0,
    impl: str = "auto",
    sharding: LossSharding | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted mean cross entropy over the batch, and per-role statistics.

    Args:
        hidden: `[B, T, D]` final hidden states (after the last norm).
        projection: `[D, V]` output projection (the tied embedding, transposed).
        targets: `[B, T]` int32 next-token ids.
        target_roles: `[B, T]` int8 `Role` of each target; `Role.PAD` takes no loss.
        role_weights: `[NUM_ROLES]` f32 loss weight per role, indexed by `Role` value.
            The PAD entry is ignored (forced to 0). A weight of 0 gives exactly zero
            gradient from that role's tokens while still reporting their statistics.
        z_loss: coefficient of the weighted mean of `lse²` (keeps logits from drifting).
        impl: cross-entropy implementation (`metatrain.kernels.IMPLS`).
        sharding: how rows and vocabulary are laid out (see `fused_cross_entropy`).

    Returns:
        `(loss, stats)`: the scalar f32 loss (0 when every weight is 0), and f32 scalar
        sums `nll_sum/<role>`, `count/<role>`, `correct/<role>` for each role in
        `LOSS_ROLE_LABELS`, plus `weight_sum` (Σ w, the loss's denominator).
    """
    hidden, projection, targets, target_roles, role_weights = map(
        jnp.asarray, (hidden, projection, targets, target_roles, role_weights)
    )
    if hidden.ndim != 3 or targets.shape != hidden.shape[:2] or target_roles.shape != targets.shape:
        raise ValueError(
            f"joint_loss expects hidden [B, T, D], targets [B, T] and target_roles [B, T]; "
            f"got hidden{list(hidden.shape)}, targets{list(targets.shape)}, "
            f"target_roles{list(target_roles.shape)}"
        )
    if role_weights.shape != (NUM_ROLES,):
        raise ValueError(
            f"role_weights must have one entry per Role ({NUM_ROLES}, indexed by Role value); "
            f"got shape {list(role_weights.shape)}"
        )
    batch, seq, depth = hidden.shape
    roles = target_roles.reshape(-1).astype(jnp.int32)  # [N]
    mask = roles != Role.PAD
    weights = role_weights.astype(jnp.float32).at[Role.PAD].set(0.0)[roles]  # [N]

    nll, lse, correct = fused_cross_entropy(
        hidden.reshape(batch * seq, depth),
        projection,
        targets.reshape(-1),
        mask,
        impl=impl,
        return_correct=True,
        sharding=sharding,
    )
    weight_sum = jnp.sum(weights)
    denom = jnp.where(weight_sum > 0, weight_sum, 1.0)  # no 0/0 (nor NaN gradients) when all w = 0
    loss = jnp.sum(weights * nll) / denom
    if z_loss:
        loss = loss + z_loss * jnp.sum(weights * lse * lse) / denom

    stats = {"weight_sum": weight_sum}
    nll, correct = jax.lax.stop_gradient(nll), jax.lax.stop_gradient(correct)
    for role in LOSS_ROLES:
        is_role = roles == role
        stats[f"nll_sum/{role.label}"] = jnp.sum(jnp.where(is_role, nll, 0.0))
        stats[f"count/{role.label}"] = jnp.sum(is_role.astype(jnp.float32))
        stats[f"correct/{role.label}"] = jnp.sum(jnp.where(is_role, correct, 0.0))
    return loss, jax.tree.map(jax.lax.stop_gradient, stats)
