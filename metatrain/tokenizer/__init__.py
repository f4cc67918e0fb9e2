"""Tags, grammar, encoding and SentencePiece tools (docs/design.md sections 2-3).

    registry.py  the tag registry YAML -> `TagRegistry`
    grammar.py   `Grammar`: the tag state machine, scalar and array forms
    mantra.py    `DEFAULT_MANTRA`, mantra policies, mantra files
    spm.py       `SpmTokenizer`: a SentencePiece model checked against the registry
    build.py     train a model with the tags, or extend an existing one
    encoder.py   `Encoder`: documents <-> (ids, roles)
    encode_file.py  document files -> JSON Lines of ids and roles (`metatrain encode`)
    resize.py    grow embedding/output tables when the vocabulary grows
"""

from metatrain.tokenizer.build import extend_tokenizer, train_tokenizer
from metatrain.tokenizer.encoder import EncodedDocument, EncodeError, Encoder, canonical_segments
from metatrain.tokenizer.grammar import BoundGrammar, Grammar, IllegalTransition, State
from metatrain.tokenizer.mantra import DEFAULT_MANTRA, MANTRA_POLICIES
from metatrain.tokenizer.registry import TagRegistry, load_registry
from metatrain.tokenizer.resize import grow_vocab_axis
from metatrain.tokenizer.spm import SpmTokenizer, inspect_tokenizer

__all__ = [
    "DEFAULT_MANTRA",
    "MANTRA_POLICIES",
    "BoundGrammar",
    "EncodeError",
    "EncodedDocument",
    "Encoder",
    "Grammar",
    "IllegalTransition",
    "SpmTokenizer",
    "State",
    "TagRegistry",
    "canonical_segments",
    "extend_tokenizer",
    "grow_vocab_axis",
    "inspect_tokenizer",
    "load_registry",
    "train_tokenizer",
]
