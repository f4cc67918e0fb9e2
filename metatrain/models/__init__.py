"""Model families. One today: the decoder-only `Transformer` and its `ModelConfig`.

Model code knows nothing of training: it takes a `ModelConfig` and arrays.
"""

from metatrain.models.config import ModelConfig
from metatrain.models.transformer import (
    DecoderBlock,
    KVCache,
    Transformer,
    init_cache,
    init_params_shape,
    logits,
    output_projection,
    weight_decay_mask,
)

__all__ = [
    "DecoderBlock",
    "KVCache",
    "ModelConfig",
    "Transformer",
    "init_cache",
    "init_params_shape",
    "logits",
    "output_projection",
    "weight_decay_mask",
]
