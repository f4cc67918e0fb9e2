"""MetatrainVocabulary: the encoder's ids for text, in Python and in TensorFlow; tags never from text.

seqio and TensorFlow come from the `seqio` extra; this module skips without them."""

from __future__ import annotations

import pytest

seqio = pytest.importorskip("seqio")
tf = pytest.importorskip("tensorflow")

from metatrain.data.seqio import MetatrainVocabulary  # noqa: E402
from metatrain.io.paths import DEFAULT_TAGS, SAMPLE_TOKENIZER  # noqa: E402
from metatrain.tokenizer import Encoder  # noqa: E402

from .conftest import TRICKY_TEXTS  # noqa: E402


@pytest.fixture(scope="module")
def vocabulary():
    return MetatrainVocabulary(SAMPLE_TOKENIZER, DEFAULT_TAGS)


@pytest.fixture(scope="module")
def encoder():
    return Encoder.from_files(SAMPLE_TOKENIZER, DEFAULT_TAGS)


@pytest.mark.parametrize("text", TRICKY_TEXTS)
def test_ids_equal_the_encoder_in_python_and_tensorflow(vocabulary, encoder, text):
    want = encoder.tokenizer.encode_texts([text])[0]
    assert list(vocabulary.encode(text)) == want
    assert vocabulary.encode_tf(tf.constant(text)).numpy().tolist() == want
    assert not set(want) & set(encoder.tag_ids.values()) and encoder.bos_id not in want and encoder.eos_id not in want


@pytest.mark.parametrize("text", TRICKY_TEXTS)
def test_decode_renders_like_the_encoder(vocabulary, encoder, text):
    ids = encoder.tokenizer.encode_texts([text])[0]
    assert vocabulary.decode(ids) == encoder.decode(ids) == text


def test_decode_renders_tags_and_stops_at_eos(vocabulary, encoder):
    thinking = encoder.tag_ids["<thinking>"]
    ids = [encoder.bos_id, *vocabulary.encode("ok "), thinking, *vocabulary.encode("hm"), encoder.eos_id,
           *vocabulary.encode("after")]
    assert vocabulary.decode(ids) == "ok <thinking>hm"
    rows = tf.constant([ids, ids[:3] + [vocabulary.pad_id] * (len(ids) - 3)], tf.int32)
    got = [t.decode() for t in vocabulary.decode_tf(rows).numpy().tolist()]
    assert got == ["ok <thinking>hm", encoder.decode(ids[:3])]


def test_sizes_and_special_ids_are_the_tokenizer_s(vocabulary, encoder):
    assert vocabulary.vocab_size == encoder.vocab_size
    assert (vocabulary.bos_id, vocabulary.eos_id) == (encoder.bos_id, encoder.eos_id)
    assert vocabulary == MetatrainVocabulary(SAMPLE_TOKENIZER, DEFAULT_TAGS)
    assert vocabulary != seqio.ByteVocabulary()
