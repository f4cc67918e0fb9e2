"""The decoder-only transformer: embed, L pre-norm blocks, final norm.

`Transformer.__call__` stops at the final normalised hidden state; the output
projection is applied by the fused loss (`metatrain.loss`), which never materialises
the full [tokens, vocab] logits. `output_projection` hands it the [D, V] matrix and
`logits` applies it for generation: every consumer of logits (training and evaluation
losses, the engine, scoring) goes through `output_projection`, which is where μP's
output multiplier lives. `Transformer.decode` is the generation path: new
tokens against a `KVCache` (`init_cache`) of the keys and values of earlier ones.

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

μP (`parametrization: mup`, Yang et al. 2022, arXiv 2203.03466, Table 3 for Adam), with
m = d_model / mup_base_width: hidden matrices (attention and MLP, `hidden_matrix_mask`)
keep their fan-in initialisation and get Adam learning rate lr / m (in
`metatrain.run.optimizer`); the embedding table and an untied output projection are
initialised with the base width's standard deviation at every width and keep lr; norm
scales are unchanged; the logits are multiplied by 1 / m (`output_projection`).
Attention keeps its 1/sqrt(head_dim) scale: a size family fixes head_dim, so the
scale does not change with width (μP's 1/head_dim is for head_dim that grows).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from metatrain.layers import (
    Attention,
    Embedding,
    LayerCache,
    RMSNorm,
    SwiGLU,
    cache_attention_mask,
    write_slots,
)
from metatrain.models.config import ModelConfig

Params = Any  # nested dict of arrays (or of flax `LogicallyPartitioned` boxes)

_REMAT_POLICIES = {
    "full": None,  # save nothing inside a block: recompute it all in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # The same weight-matmul outputs, kept in host memory instead of HBM (TPU v4 and later,
    # where XLA supports the `pinned_host` memory space); moved back for the backward pass.
    "offload": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
}


class DecoderBlock(nn.Module):
    """`x + attention(norm(x))`, then `x + mlp(norm(x))`.

    Both methods return `(x, per-layer output)` so that they are bodies of `nn.scan`.
    """

    config: ModelConfig

    def setup(self) -> None:
        cfg = self.config
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        self.attention_norm = RMSNorm(cfg.norm_eps, dtype, param_dtype)
        self.attention = Attention(
            d_model=cfg.d_model,
            n_heads=cfg.n_heads,
            n_kv_heads=cfg.n_kv_heads,
            head_dim=cfg.head_dim,
            rope_theta=cfg.rope_theta,
            implementation=cfg.attention,
            dtype=dtype,
            param_dtype=param_dtype,
        )
        self.mlp_norm = RMSNorm(cfg.norm_eps, dtype, param_dtype)
        self.mlp = SwiGLU(cfg.d_model, cfg.d_ff, dtype, param_dtype)

    def __call__(
        self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array
    ) -> tuple[jax.Array, None]:
        """x [B, T, D] -> ([B, T, D], None); positions and segment_ids [B, T] int32."""
        x = x + self.attention(self.attention_norm(x), positions, segment_ids)
        x = x + self.mlp(self.mlp_norm(x))
        return nn.with_logical_constraint(x, ("batch", "seq", "embed")), None

    def decode(
        self, x: jax.Array, positions: jax.Array, mask: jax.Array, index: jax.Array, cache: LayerCache
    ) -> tuple[jax.Array, LayerCache]:
        """New tokens through the block over its KV cache (see `Attention.decode`).

        x [B, T, D], positions [B, T], mask [B, 1, T, S], index [B], cache [B, S, K, H]
        each -> ([B, T, D], the cache with the T new slots written).
        """
        attended, cache = self.attention.decode(self.attention_norm(x), positions, mask, index, cache)
        x = x + attended
        x = x + self.mlp(self.mlp_norm(x))
        return x, cache


def _block_class(config: ModelConfig) -> type[nn.Module]:
    if config.remat == "none":
        return DecoderBlock
    return nn.remat(
        DecoderBlock,
        policy=_REMAT_POLICIES[config.remat],
        # Inside a scan, CSE across iterations cannot undo the remat; outside, it can.
        prevent_cse=not config.scan_layers,
    )


def _scanned(block: type[nn.Module], n_layers: int) -> type[nn.Module]:
    """The block stacked `n_layers` times by `nn.scan`, for training and for decoding.

    Parameters get a leading `layers` axis; in `decode` each layer's cache is sliced
    from (and written back into) the leading axis of the stacked `LayerCache`.
    """

    def scan(in_axes: tuple) -> dict:
        return dict(
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=in_axes,
            length=n_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )

    return nn.scan(block, methods={
        "__call__": scan((nn.broadcast, nn.broadcast)),
        "decode": scan((nn.broadcast, nn.broadcast, nn.broadcast, 0)),
    })


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer for the positions decoded so far.

    Slots are filled left to right; slot s holds the token fed at step s, and the
    segment id of that token (0: empty or padding, never attended by a document).

    Attributes:
        layers: `LayerCache` of [L, B, S, K, H] keys and values (compute dtype).
        segment_ids: [B, S] int32 document of each slot.
        index: int32 [B], each row's next free slot: rows fill at their own pace (a
            row admitted mid-batch starts at 0 while its neighbours are far along).
    """

    layers: LayerCache
    segment_ids: jax.Array
    index: jax.Array

    @property
    def length(self) -> int:
        """S, the number of slots."""
        return self.segment_ids.shape[1]


def init_cache(config: ModelConfig, batch: int, length: int) -> KVCache:
    """An empty cache of `length` slots for `batch` rows: [L, B, S, K, H] zeros."""
    shape = (config.n_layers, batch, length, config.n_kv_heads, config.head_dim)
    dtype = jnp.dtype(config.dtype)
    return KVCache(
        LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)), jnp.zeros((batch, length), jnp.int32), jnp.zeros((batch,), jnp.int32)
    )


class Transformer(nn.Module):
    """Decoder-only language model up to the final norm (no output projection).

    `__call__` runs whole packed rows (training, evaluation); `decode` runs new tokens
    against a `KVCache` (generation). Both read the same parameters.
    """

    config: ModelConfig

    def setup(self) -> None:
        cfg = self.config
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        self.embedding = Embedding(
            cfg.vocab_size, cfg.d_model, dtype, param_dtype, init_std=cfg.embedding_init_std
        )
        block = _block_class(cfg)
        if cfg.scan_layers:
            self.layers = _scanned(block, cfg.n_layers)(cfg)
        else:  # named layers_0, layers_1, ...
            self.layers = [block(cfg) for _ in range(cfg.n_layers)]
        self.final_norm = RMSNorm(cfg.norm_eps, dtype, param_dtype)
        if not cfg.tie_embeddings:
            # Declared here so that it exists in the parameter tree; applied by the loss.
            self.param(
                "output_projection",
                nn.with_logical_partitioning(
                    nn.initializers.normal(stddev=cfg.embedding_init_std), ("embed", "vocab")
                ),
                (cfg.d_model, cfg.vocab_size),
                param_dtype,
            )

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
        x = self.embedding(inputs)
        if self.config.scan_layers:
            x, _ = self.layers(x, positions, segment_ids)
        else:
            for layer in self.layers:
                x, _ = layer(x, positions, segment_ids)
        x = self.final_norm(x)
        return nn.with_logical_constraint(x, ("batch", "seq", "embed"))

    def decode(
        self, inputs: jax.Array, positions: jax.Array, segment_ids: jax.Array, cache: KVCache
    ) -> tuple[jax.Array, KVCache]:
        """Hidden states of T new tokens that follow the cached ones, and the grown cache.

        A prompt is one call with T = its length (prefill), each later token one call
        with T = 1; the hidden states equal those `__call__` gives for the same tokens
        at the end of the whole sequence.

        Args:
            inputs: [B, T] int32 token ids, row b's written to slots `cache.index[b] ..`
                (the cache must have T free slots after every row's index).
            positions: [B, T] int32 position of each token inside its document.
            segment_ids: [B, T] int32 document of each token (0 = padding).
            cache: the cache of the tokens before these (`init_cache` when none).

        Returns:
            ([B, T, D] final normalised hidden states, the cache with every row's index
            T slots on).
        """
        index = cache.index
        slot_segments = write_slots(cache.segment_ids, segment_ids, index)
        mask = cache_attention_mask(segment_ids, slot_segments, index)  # [B, 1, T, S]
        x = self.embedding(inputs)
        if self.config.scan_layers:
            x, layers = self.layers.decode(x, positions, mask, index, cache.layers)
        else:
            per_layer = []
            for i, layer in enumerate(self.layers):
                x, layer_cache = layer.decode(
                    x, positions, mask, index, jax.tree.map(lambda a, i=i: a[i], cache.layers)
                )
                per_layer.append(layer_cache)
            layers = jax.tree.map(lambda *a: jnp.stack(a), *per_layer)
        hidden = self.final_norm(x)
        return hidden, KVCache(layers, slot_segments, index + inputs.shape[1])


def output_projection(params: Params, config: ModelConfig) -> jax.Array:
    """The [D, V] matrix that turns hidden states into logits, in the parameter dtype.

    Tied: the embedding table transposed. Under μP it is multiplied by
    mup_base_width / d_model (the 1 / m output multiplier; gradients flow through the
    product, so the table's gradient from the logits is scaled too); at m = 1 it is the
    standard matrix exactly. Works on boxed or unboxed parameters.
    """
    if config.tie_embeddings:
        w = nn.unbox(params["embedding"]["table"]).T
    else:
        w = nn.unbox(params["output_projection"])
    if config.parametrization == "mup":
        w = w * (config.mup_base_width / config.d_model)
    return w


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


def hidden_matrix_mask(params: Params) -> Params:
    """True for the hidden matrices (attention query/key/value/out, MLP gate/up/down).

    These are μP's matrix-like weights, both dimensions growing with width: their Adam
    learning rate is divided by the width multiplier. The embedding table, an untied
    output projection and norm scales (one width dimension each) are False. Decided by
    the module a parameter lives in; works on boxed or unboxed parameters.
    """
    def is_hidden(path, _leaf) -> bool:
        return any(getattr(k, "key", None) in ("attention", "mlp") for k in path)

    return jax.tree_util.tree_map_with_path(
        is_hidden, params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
    )
