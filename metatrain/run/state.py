"""Train state and its sharded initialisation (eval_shape -> shardings -> jit)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from metatrain.models import ModelConfig, Transformer


@flax.struct.dataclass
class TrainState:
    """Everything the step updates. Parameters and optimizer state are fp32."""

    step: jax.Array  # int32 scalar: optimizer updates applied so far
    params: Any
    opt_state: Any


def _init_boxed(model: Transformer, optimizer: optax.GradientTransformation, key: jax.Array):
    ones = jnp.ones((1, 1), jnp.int32)
    params = model.init(key, ones, jnp.zeros_like(ones), ones)["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))


def state_shardings(
    model: Transformer, optimizer: optax.GradientTransformation, mesh: Mesh, rules
) -> TrainState:
    """NamedShardings for every leaf of the (unboxed) train state, from logical axis names.

    Optimizer moments mirror their parameters' logical axes because optax builds them
    with tree maps over the boxed parameters.
    """
    abstract = jax.eval_shape(lambda key: _init_boxed(model, optimizer, key), jax.random.key(0))
    specs = nn.get_partition_spec(abstract)
    shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
    # Leaves without logical names (step, optimizer counts) are replicated.
    return jax.tree.map(
        lambda s: s if isinstance(s, NamedSharding) else NamedSharding(mesh, PartitionSpec()),
        shardings,
        is_leaf=lambda x: isinstance(x, (NamedSharding, PartitionSpec)) or x is None,
    )


def init_state(
    model: Transformer,
    optimizer: optax.GradientTransformation,
    shardings: TrainState,
    seed: int,
) -> TrainState:
    """Initialise parameters and optimizer state directly into their shardings."""

    def init(key):
        return nn.unbox(_init_boxed(model, optimizer, key))

    return jax.jit(init, out_shardings=shardings)(jax.random.key(seed))


def abstract_state(
    model: Transformer, optimizer: optax.GradientTransformation, shardings: TrainState
) -> TrainState:
    """ShapeDtypeStructs with shardings: the restore target for checkpoints."""
    shapes = jax.eval_shape(lambda k: nn.unbox(_init_boxed(model, optimizer, k)), jax.random.key(0))
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )


def model_for(config: ModelConfig) -> Transformer:
    return Transformer(config)
