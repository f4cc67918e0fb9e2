"""Grouped-query self-attention, causal and restricted to each packed document.

Packed rows hold several documents end to end (docs/design.md section 4); a query may only
see keys of its own document (equal `segment_ids`) at or before its own position.
Grouped-query attention (Ainslie et al. 2023) shares each key/value head among
`n_heads / n_kv_heads` query heads: query head `n` reads key/value head
`n // (n_heads / n_kv_heads)`, so `n_kv_heads == n_heads` is ordinary multi-head
attention and `n_kv_heads == 1` is multi-query attention.

Decoding with a KV cache (`Attention.decode`) sits between the two halves of the
layer: `project_qkv` rotates the keys and values of the new tokens, `decode` writes them
into the layer's `LayerCache` at the next free slots, and `dot_product_attention` reads
every slot the `cache_attention_mask` lets each query see. A cache slot carries the
segment id of the token written there (0 = empty or padding), so the cached mask is the
training mask (same document, not in the future) evaluated on slots.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from metatrain.errors import UserError
from metatrain.layers.rotary import apply_rotary

AttentionImpl = Literal["auto", "xla", "cudnn", "splash"]


def attention_mask(segment_ids: jax.Array) -> jax.Array:
    """Which keys each query may see: same document and not in the future.

    Padding (segment 0) attends only to earlier padding, so no row is fully masked.

    Args:
        segment_ids: [B, T] int32 document index of every position.

    Returns:
        [B, 1, T, S] bool (S = T), True where attention is allowed.
    """
    seq_len = segment_ids.shape[1]
    same_document = segment_ids[:, :, None] == segment_ids[:, None, :]  # [B, T, S]
    causal = jnp.tril(jnp.ones((seq_len, seq_len), dtype=bool))  # [T, S]
    return (same_document & causal)[:, None]


def cache_attention_mask(
    query_segment_ids: jax.Array, key_segment_ids: jax.Array, query_start: jax.Array
) -> jax.Array:
    """Which cache slots each new query may see: same document and not in the future.

    The T new queries sit at slots `query_start .. query_start + T - 1` of an S-slot
    cache; `key_segment_ids` already holds their own segment ids at those slots.

    Args:
        query_segment_ids: [B, T] int32 document of each new token.
        key_segment_ids: [B, S] int32 document of each cache slot (0 = empty or padding).
        query_start: int32 [B], each row's slot of its first new token.

    Returns:
        [B, 1, T, S] bool, True where attention is allowed.
    """
    num_queries, num_slots = query_segment_ids.shape[1], key_segment_ids.shape[1]
    query_slots = query_start[:, None] + jnp.arange(num_queries)[None, :]  # [B, T]
    causal = jnp.arange(num_slots)[None, None, :] <= query_slots[:, :, None]  # [B, T, S]
    same_document = query_segment_ids[:, :, None] == key_segment_ids[:, None, :]  # [B, T, S]
    return (same_document & causal)[:, None]


def write_slots(cache: jax.Array, new: jax.Array, index: jax.Array) -> jax.Array:
    """`new` [B, T, ...] written into `cache` [B, S, ...] at each row's own slot `index[b]`.

    The cache needs T free slots after every index (a start past S - T would be clamped
    and overwrite earlier slots)."""
    return jax.vmap(lambda c, n, i: jax.lax.dynamic_update_slice_in_dim(c, n, i, axis=0))(cache, new, index)


class LayerCache(NamedTuple):
    """Rotated keys and values of one attention layer, one slot per decoded position.

    Attributes:
        key: [B, S, K, H] in the compute dtype.
        value: [B, S, K, H] in the compute dtype.
    """

    key: jax.Array
    value: jax.Array


def dot_product_attention(
    query: jax.Array, key: jax.Array, value: jax.Array, mask: jax.Array
) -> jax.Array:
    """Masked softmax attention with grouped key/value heads; scores in float32.

    Args:
        query: [B, T, N, H].
        key: [B, S, K, H] with N divisible by K.
        value: [B, S, K, H].
        mask: [B, 1, T, S] bool, True where a query may see a key.

    Returns:
        [B, T, N, H] in the dtype of `value`.
    """
    batch, seq_len, n_heads, head_dim = query.shape
    n_kv_heads = key.shape[2]
    group = n_heads // n_kv_heads
    query = query * jnp.asarray(head_dim**-0.5, query.dtype)
    query = query.reshape(batch, seq_len, n_kv_heads, group, head_dim)  # [B, T, K, G, H]
    scores = jnp.einsum(
        "BTKGH,BSKH->BKGTS", query, key, preferred_element_type=jnp.float32
    )
    scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)  # mask [B,1,1,T,S]
    probs = jax.nn.softmax(scores, axis=-1).astype(value.dtype)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, value)
    return out.reshape(batch, seq_len, n_heads, head_dim)


def _cudnn_attention(
    query: jax.Array, key: jax.Array, value: jax.Array, segment_ids: jax.Array
) -> jax.Array:
    """cuDNN flash attention (NVIDIA GPUs only), same mask as `dot_product_attention`.

    Causality is cuDNN's own mask; the same-document mask is passed as `mask`, which
    JAX turns into an additive bias [B, 1, T, S]. Checked on an H100 (jax 0.11.2)
    against the XLA path: outputs and gradients agree to bf16 precision (relative RMS
    difference 0.4% and 0.5%); the bias costs about 50% over causal-only in the kernel
    (~4% of a 1B-model step at seq 2048).
    """
    if jax.default_backend() != "gpu":
        raise UserError(
            f"model.attention=cudnn needs an NVIDIA GPU, but JAX is running on "
            f"{jax.default_backend()}; use model.attention=xla"
        )
    same_document = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]  # [B,1,T,S]
    return jax.nn.dot_product_attention(
        query, key, value, mask=same_document, is_causal=True, implementation="cudnn"
    )


#: Splash attention's query and key/value tile (its kernels need T divisible by it).
SPLASH_BLOCK = 512


def _splash_blocks(seq_len: int):
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as splash,
    )

    block = next(b for b in (SPLASH_BLOCK, 256, 128) if seq_len % b == 0)
    return splash.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block,
        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
        block_q_dq=block, block_kv_dq=block,
    )


def _splash_attention(
    query: jax.Array, key: jax.Array, value: jax.Array, segment_ids: jax.Array, *, interpret: bool
) -> jax.Array:
    """JAX's TPU splash attention (Pallas, `jax.experimental.pallas.ops.tpu.splash_attention`),
    causal and restricted to each document by `segment_ids`: the mask of `attention_mask`
    without ever forming `[T, S]` scores in HBM.

    Mosaic kernels are not partitioned by XLA, so on a mesh the kernel runs under
    `shard_map`: batch over the mesh axes of `batch`, heads over those of `heads`
    (the model's logical rules), one kernel per local example (vmapped).

    Args:
        query: [B, T, N, H]; key, value: [B, T, K, H]; segment_ids: [B, T] int32.
        interpret: run the kernels in Pallas interpret mode (CPU).

    Returns:
        [B, T, N, H] in the dtype of `value`.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as splash,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_mask as masks,
    )

    seq_len, head_dim = query.shape[1], query.shape[3]
    if seq_len % 128:
        raise UserError(f"model.attention=splash needs the sequence length to be a multiple of 128, got {seq_len}")
    q = (query * jnp.asarray(head_dim**-0.5, query.dtype)).transpose(0, 2, 1, 3)  # [B, N, T, H]
    k, v = key.transpose(0, 2, 1, 3), value.transpose(0, 2, 1, 3)  # [B, K, T, H]

    def local(q, k, v, seg):  # this device's examples and heads
        mask = masks.MultiHeadMask([masks.CausalMask((seq_len, seq_len))] * q.shape[1])
        kernel = splash.make_splash_mha(
            mask, block_sizes=_splash_blocks(seq_len), head_shards=1, q_seq_shards=1, interpret=interpret
        )
        return jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=splash.SegmentIds(q=s, kv=s)))(q, k, v, seg)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        out = local(q, k, v, segment_ids)
    else:
        heads = nn.logical_to_mesh_axes(("batch", "heads", None, None))
        kv_heads = nn.logical_to_mesh_axes(("batch", "kv_heads", None, None))
        rows = nn.logical_to_mesh_axes(("batch", None))
        out = jax.shard_map(
            local, mesh=mesh, in_specs=(heads, kv_heads, kv_heads, rows), out_specs=heads, check_vma=False
        )(q, k, v, segment_ids)
    return out.transpose(0, 2, 1, 3).astype(value.dtype)


def _fan_in_init(in_axis, out_axis):
    return nn.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=in_axis, out_axis=out_axis
    )


class Attention(nn.Module):
    """Self-attention with rotary positions and grouped key/value heads.

    Attributes:
        d_model: D, width of the residual stream.
        n_heads: query heads N.
        n_kv_heads: key/value heads K (divides N).
        head_dim: H.
        rope_theta: rotary base.
        implementation: "xla" (einsum, runs anywhere), "cudnn" (fused, NVIDIA GPUs),
            "splash" (JAX's TPU flash kernel; interpret mode elsewhere) or "auto"
            (splash when compiled for TPU and T is a multiple of 128, else xla).
        dtype: compute dtype.
        param_dtype: parameter dtype.
    """

    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    implementation: AttentionImpl = "xla"
    dtype: jnp.dtype = jnp.bfloat16
    param_dtype: jnp.dtype = jnp.float32

    def setup(self) -> None:
        D, N, K, H = self.d_model, self.n_heads, self.n_kv_heads, self.head_dim

        def kernel(name, shape, names, in_axis, out_axis):
            init = nn.with_logical_partitioning(_fan_in_init(in_axis, out_axis), names)
            return self.param(name, init, shape, self.param_dtype)

        self.w_query = kernel("query", (D, N, H), ("embed", "heads", "head_dim"), 0, (1, 2))
        self.w_key = kernel("key", (D, K, H), ("embed", "kv_heads", "head_dim"), 0, (1, 2))
        self.w_value = kernel("value", (D, K, H), ("embed", "kv_heads", "head_dim"), 0, (1, 2))
        self.w_out = kernel("out", (N, H, D), ("heads", "head_dim", "embed"), (0, 1), 2)

    def project_qkv(
        self, x: jax.Array, positions: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Queries, keys and values of new tokens, rotated to their positions.

        Args:
            x: [B, T, D] normalised residual stream.
            positions: [B, T] int32 position of each token inside its document.

        Returns:
            query [B, T, N, H], key [B, T, K, H], value [B, T, K, H] (compute dtype).
        """
        x = x.astype(self.dtype)
        query = jnp.einsum("BTD,DNH->BTNH", x, self.w_query.astype(self.dtype))
        key = jnp.einsum("BTD,DKH->BTKH", x, self.w_key.astype(self.dtype))
        value = jnp.einsum("BTD,DKH->BTKH", x, self.w_value.astype(self.dtype))
        query = apply_rotary(query, positions, self.rope_theta)
        key = apply_rotary(key, positions, self.rope_theta)
        query = nn.with_logical_constraint(query, ("batch", "seq", "heads", "head_dim"))
        key = nn.with_logical_constraint(key, ("batch", "seq", "kv_heads", "head_dim"))
        value = nn.with_logical_constraint(value, ("batch", "seq", "kv_heads", "head_dim"))
        return query, key, value

    def __call__(
        self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array
    ) -> jax.Array:
        """[B, T, D] -> [B, T, D] (compute dtype).

        Args:
            x: [B, T, D] normalised residual stream.
            positions: [B, T] int32 position inside each document (drives RoPE).
            segment_ids: [B, T] int32 document of each position (drives the mask).
        """
        query, key, value = self.project_qkv(x, positions)
        if self.implementation == "cudnn":
            out = _cudnn_attention(query, key, value, segment_ids)
        elif self.implementation == "splash":  # TPU kernel; interpret mode off TPU (tests)
            out = jax.lax.platform_dependent(
                query, key, value, segment_ids,
                tpu=lambda *a: _splash_attention(*a, interpret=False),
                default=lambda *a: _splash_attention(*a, interpret=True),
            )
        elif self.implementation == "auto" and query.shape[1] % 128 == 0:  # splash on TPU, XLA elsewhere
            out = jax.lax.platform_dependent(
                query, key, value, segment_ids,
                tpu=lambda *a: _splash_attention(*a, interpret=False),
                default=lambda q, k, v, seg: dot_product_attention(q, k, v, attention_mask(seg)),
            )
        else:
            out = dot_product_attention(query, key, value, attention_mask(segment_ids))
        return self.project_out(out)

    def project_out(self, out: jax.Array) -> jax.Array:
        """Per-head attention outputs [B, T, N, H] -> [B, T, D] (compute dtype)."""
        out = nn.with_logical_constraint(out, ("batch", "seq", "heads", "head_dim"))
        y = jnp.einsum("BTNH,NHD->BTD", out, self.w_out.astype(self.dtype))
        return nn.with_logical_constraint(y, ("batch", "seq", "embed"))

    def decode(
        self, x: jax.Array, positions: jax.Array, mask: jax.Array, index: jax.Array, cache: LayerCache
    ) -> tuple[jax.Array, LayerCache]:
        """Attention of T new tokens over a KV cache, which they are first written into.

        Always the XLA path: the cuDNN kernel wants as many keys as queries.

        Args:
            x: [B, T, D] normalised residual stream of the new tokens.
            positions: [B, T] int32 position of each new token inside its document.
            mask: [B, 1, T, S] bool from `cache_attention_mask`.
            index: int32 [B], each row's cache slot of its first new token.
            cache: this layer's keys and values, [B, S, K, H] each.

        Returns:
            ([B, T, D] output in the compute dtype, the cache with the new slots written).
        """
        query, key, value = self.project_qkv(x, positions)
        cache = LayerCache(
            write_slots(cache.key, key.astype(cache.key.dtype), index),
            write_slots(cache.value, value.astype(cache.value.dtype), index),
        )
        out = dot_product_attention(query, cache.key, cache.value, mask)
        return self.project_out(out), cache
