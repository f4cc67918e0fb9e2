"""The decoder-only transformer: embed, L pre-norm blocks, final norm.

`Transformer.__call__` stops at the final normalised hidden state; the output
projection is applied by the fused loss (`metatrain.loss`), which never materialises
the full [tokens, vocab] logits. `output_projection` hands it the [D, V] matrix and
`logits` applies it for generation.

Parameter tree (scan_layers=True; unrolled blocks are `layers_0`, `layers_1`, ...):

    embedding/table                 [V, D]       (vocab, embed)
    layers/attention_norm/scale     [L, D]       (layers, norm)
    layers/attention/query          [L, D, N, H] (layers, embed, heads, head_dim)
    layers/attention/key, value     [L, D, K, H] (layers, embed, kv_heads, head_dim)
    layers/attention/out            [L, N, H, D] (layers, heads, head_dim, embed)
    layers/mlp_norm/scale           [L, D]       (layers, norm)
    layers/mlp/gate, up             [L, D, F]    (layers, embed, mlp)
    layers/mlp/down                 [L, F, D]    (layers, mlp, embed)
    final_norm/scale                [D]          (norm)
    output_projection               [D, V]       (embed, vocab)   untied only
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from metatrain.layers import Attention, Embedding, RMSNorm, SwiGLU
from metatrain.models.config import ModelConfig

Params = Any  # nested dict of arrays (or of flax `LogicallyPartitioned` boxes)

_REMAT_POLICIES = {
    "full": None,  # save nothing inside a block: recompute it all in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class DecoderBlock(nn.Module):
    """`x + attention(norm(x))`, then `x + mlp(norm(x))`.

    Returns `(x, None)` so the same module is the body of `nn.scan`.
    """

    config: ModelConfig

    @nn.compact
    def __call__(
        self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array
    ) -> tuple[jax.Array, None]:
        """x [B, T, D] -> ([B, T, D], None); positions and segment_ids [B, T] int32."""
        cfg = self.config
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        norm = lambda name: RMSNorm(cfg.norm_eps, dtype, param_dtype, name=name)  # noqa: E731
        attention = Attention(
            d_model=cfg.d_model,
            n_heads=cfg.n_heads,
            n_kv_heads=cfg.n_kv_heads,
            head_dim=cfg.head_dim,
            rope_theta=cfg.rope_theta,
            implementation=cfg.attention,
            dtype=dtype,
            param_dtype=param_dtype,
            name="attention",
        )
        mlp = SwiGLU(cfg.d_model, cfg.d_ff, dtype, param_dtype, name="mlp")
        x = x + attention(norm("attention_norm")(x), positions, segment_ids)
        x = x + mlp(norm("mlp_norm")(x))
        return nn.with_logical_constraint(x, ("batch", "seq", "embed")), None


def _block_class(config: ModelConfig) -> type[nn.Module]:
    if config.remat == "none":
        return DecoderBlock
    return nn.remat(
        DecoderBlock,
        policy=_REMAT_POLICIES[config.remat],
        # Inside a scan, CSE across iterations cannot undo the remat; outside, it can.
        prevent_cse=not config.scan_layers,
    )


class Transformer(nn.Module):
    """Decoder-only language model up to the final norm (no output projection)."""

    config: ModelConfig

    @nn.compact
    def __call__(
        self, inputs: jax.Array, positions: jax.Array, segment_ids: jax.Array
    ) -> jax.Array:
        """Hidden states of every position.

        Args:
            inputs: [B, T] int32 token ids.
            positions: [B, T] int32 position inside each packed document.
            segment_ids: [B, T] int32 document index (0 = padding); attention never
                crosses documents.

        Returns:
            [B, T, D] final normalised hidden states in the compute dtype.
        """
        cfg = self.config
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        x = Embedding(cfg.vocab_size, cfg.d_model, dtype, param_dtype, name="embedding")(inputs)
        block = _block_class(cfg)
        if cfg.scan_layers:
            stack = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast),
                length=cfg.n_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, _ = stack(cfg, name="layers")(x, positions, segment_ids)
        else:
            for i in range(cfg.n_layers):
                x, _ = block(cfg, name=f"layers_{i}")(x, positions, segment_ids)
        x = RMSNorm(cfg.norm_eps, dtype, param_dtype, name="final_norm")(x)
        if not cfg.tie_embeddings:
            # Declared here so that it exists in the parameter tree; applied by the loss.
            self.param(
                "output_projection",
                nn.with_logical_partitioning(
                    nn.initializers.normal(stddev=cfg.d_model**-0.5), ("embed", "vocab")
                ),
                (cfg.d_model, cfg.vocab_size),
                param_dtype,
            )
        return nn.with_logical_constraint(x, ("batch", "seq", "embed"))


def output_projection(params: Params, config: ModelConfig) -> jax.Array:
    """The [D, V] matrix that turns hidden states into logits, in the parameter dtype.

    Tied: the embedding table transposed. Works on boxed or unboxed parameters.
    """
    if config.tie_embeddings:
        return nn.unbox(params["embedding"]["table"]).T
    return nn.unbox(params["output_projection"])


def logits(hidden: jax.Array, params: Params, config: ModelConfig) -> jax.Array:
    """[B, T, D] hidden states -> [B, T, V] float32 logits (for generation and tests)."""
    w = output_projection(params, config).astype(hidden.dtype)
    return jnp.einsum("BTD,DV->BTV", hidden, w, preferred_element_type=jnp.float32)


def init_params_shape(config: ModelConfig) -> Params:
    """Abstract (ShapeDtypeStruct) parameters, still boxed with their logical axis names."""
    model = Transformer(config)
    ids = jnp.zeros((1, 1), jnp.int32)

    def init(key):
        return model.init(key, ids, ids, ids + 1)["params"]

    return jax.eval_shape(init, jax.random.key(0))


def weight_decay_mask(params: Params) -> Params:
    """True for every weight matrix, False for RMSNorm scales (the model has no biases).

    Decided by name, not by rank, because scanned layers give norm scales a leading
    `layers` axis ([L, D]) that makes them look like matrices.
    """
    def decays(path, _leaf) -> bool:
        return not any(getattr(k, "key", None) == "scale" for k in path)

    return jax.tree_util.tree_map_with_path(
        decays, params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
    )
