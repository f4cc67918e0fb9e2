"""The shipped sample tokenizer against the shipped sample corpus."""

from __future__ import annotations

from metatrain.documents import read_documents
from metatrain.io.paths import SAMPLE_CORPUS, SAMPLE_TOKENIZER
from metatrain.tokenizer import Encoder, canonical_segments, inspect_tokenizer, load_registry


def test_sample_tokenizer_has_every_default_tag_and_exact_settings():
    info = inspect_tokenizer(SAMPLE_TOKENIZER)
    assert info.vocab_size == 4096
    assert info.missing_tags == ()
    assert list(info.tags) == list(load_registry().tags)
    assert info.exact_round_trip and info.byte_fallback


def test_sample_corpus_round_trips_and_compresses():
    encoder = Encoder.from_files(SAMPLE_TOKENIZER)
    chars = text_tokens = documents = 0
    for doc in read_documents(SAMPLE_CORPUS, strict=True):
        encoded = encoder.encode(doc)
        assert encoder.decode_segments(encoded.ids) == list(canonical_segments(doc)), doc.id
        chars += sum(len(s.text) for s in doc.segments)
        text_tokens += int(((encoded.roles == 1) | (encoded.roles == 2)).sum())
        documents += 1
    assert documents >= 10
    # A model trained on this corpus must do much better than bytes (about 1 char/token).
    assert chars / text_tokens > 3.0
