"""Transformer building blocks: normalisation, rotary positions, attention, MLP, embedding.

Each layer is a small flax linen module (or pure function) that takes explicit
arguments, never a run config, and names the logical axes of its parameters and
activations so that `metatrain.parallel` can map them onto a device mesh.

Axis letters used in shapes and einsums throughout:
    B batch, T query positions, S key positions, D embed (d_model), N query heads,
    K key/value heads, G query heads per key/value head (N / K), H head_dim,
    F mlp hidden, V vocab, L layers.
"""

from metatrain.layers.attention import (
    Attention,
    LayerCache,
    attention_mask,
    cache_attention_mask,
    dot_product_attention,
    write_slots,
)
from metatrain.layers.embedding import Embedding
from metatrain.layers.mlp import SwiGLU
from metatrain.layers.normalization import RMSNorm
from metatrain.layers.rotary import apply_rotary

__all__ = [
    "Attention",
    "Embedding",
    "LayerCache",
    "RMSNorm",
    "SwiGLU",
    "apply_rotary",
    "attention_mask",
    "cache_attention_mask",
    "write_slots",
    "dot_product_attention",
]
