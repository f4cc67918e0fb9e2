"""How many UTF-8 bytes of text each token stands for: the denominator of bits per byte.

Loss in nats per token depends on the tokenizer (a larger vocabulary has fewer, harder
tokens) and, in a joint run, on how much of the sequence is thinking; bits per byte of
text does not. It is

    bpb/text = Σ_t∈text nll_t / ln 2 / Σ_t∈text bytes(target_t)

where `bytes(id)` is the length in UTF-8 of the text the piece spells: a normal piece
with SentencePiece's `▁` read as the space it stands for, one byte for a byte-fallback
piece, none for control pieces (tags, BOS, EOS) and `<unk>`. metatrain's tokenizers are
exact (`SpmTokenizer.exact`: identity normaliser, no dummy prefix, byte fallback), so the
bytes of a text run's tokens add up to the UTF-8 length of the text itself; a test
checks it. For a non-exact tokenizer (imported from elsewhere) they add up to the bytes
of the *normalised* text, which is what its model predicts.
"""

from __future__ import annotations

import math

import numpy as np
from sentencepiece import sentencepiece_model_pb2 as model_pb2

from metatrain.tokenizer.spm import SpmTokenizer

_META_SPACE = "\u2581"
LN2 = math.log(2.0)
_TYPES = model_pb2.ModelProto.SentencePiece.Type
_TEXT_TYPES = frozenset({_TYPES.NORMAL, _TYPES.USER_DEFINED, _TYPES.UNUSED})


def token_byte_lengths(tokenizer: SpmTokenizer) -> np.ndarray:
    """int32 [V]: UTF-8 bytes of text each token id spells (0 for tags and specials)."""
    out = np.zeros((tokenizer.vocab_size,), np.int32)
    for i, piece in enumerate(tokenizer.proto.pieces):
        if piece.type == _TYPES.BYTE:
            out[i] = 1
        elif piece.type in _TEXT_TYPES:
            out[i] = len(piece.piece.replace(_META_SPACE, " ").encode("utf-8"))
    return out


def bits_per_byte(nll_nats: float, text_bytes: float) -> float | None:
    """Σ nll (nats) / ln 2 / bytes, or None without bytes."""
    return float(nll_nats / LN2 / text_bytes) if text_bytes > 0 else None
