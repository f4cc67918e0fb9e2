"""Bits per byte, layout, ablations and intervals: each against a computation done another way."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metatrain.config import LossConfig
from metatrain.documents import Document, Segment, parse_record
from metatrain.evaluation.ablation import (
    VARIANTS,
    make_variants,
    mantra_only,
    remove_thinking,
    shuffle_thinking,
    text_tokens,
    thinking_blocks,
)
from metatrain.evaluation.layout import RowCounter, layout_documents
from metatrain.evaluation.scoring import score_rows
from metatrain.evaluation.stats import paired_ratio_difference
from metatrain.evaluation.text_bytes import token_byte_lengths
from metatrain.io.paths import DEFAULT_TAGS, REPO_ROOT
from metatrain.models import ModelConfig, Transformer, logits
from metatrain.roles import Role
from metatrain.tokenizer import Encoder

SAMPLE = REPO_ROOT / "data" / "sample" / "factbook.jsonl"


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return Encoder.from_files(REPO_ROOT / "tokenizer" / "sample.model", DEFAULT_TAGS)


def sample_documents(encoder, n, start=0):
    lines = SAMPLE.read_bytes().splitlines()[start:start + n]
    return [encoder.encode(parse_record(raw, path=str(SAMPLE), line=start + i + 1)) for i, raw in enumerate(lines)]


def hand_documents():
    return [
        Document("a", (Segment("text", "The study found a 23% reduction."),
                       Segment("thinking", "Meaningful, not dramatic."),
                       Segment("text", " However, the placebo group improved 15%."))),
        Document("b", (Segment("text", "Snow fell on Tuesday."), Segment("thinking", "Odd for May.", control="good"),
                       Segment("text", " Schools stayed open."), Segment("thinking", "Brave."))),
        Document("c", (Segment("text", "Plain text only, with ▁ and émoji 🎉."),)),
        Document("d", (Segment("text", "You asked: "), Segment("text", "why?", mode="ai_quoting_human"),
                       Segment("text", " Because.", mode="ai"), Segment("thinking", "Short answer."),
                       Segment("text", " Done.")), mode="ai"),
    ]


# -- bytes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["hello world", "  doubled  spaces\n\nand lines", "▁ literal meta space",
                                  "émoji 🎉 and 中文", "<thinking> is text here", "\t\x01 control"])
def test_token_bytes_add_up_to_the_texts_utf8_length(encoder, text):
    table = token_byte_lengths(encoder.tokenizer)
    ids = encoder.tokenizer.encode_texts([text])[0]
    assert int(table[ids].sum()) == len(text.encode("utf-8"))


def test_tags_and_specials_have_no_bytes(encoder):
    table = token_byte_lengths(encoder.tokenizer)
    assert all(table[i] == 0 for i in encoder.tag_ids.values())
    assert table[encoder.bos_id] == table[encoder.eos_id] == 0


# -- layout -----------------------------------------------------------------------------------


@pytest.mark.parametrize("seq_len,stride", [(16, 16), (16, 8), (16, 5), (64, 32), (7, 1)])
def test_layout_scores_every_target_once(encoder, seq_len, stride):
    docs = [encoder.encode(d) for d in hand_documents()] + sample_documents(encoder, 2)
    rows = layout_documents(docs, seq_len, stride)
    for d, doc in enumerate(docs):
        on = rows.doc_index == d
        # every target exactly once, in order, with its role
        np.testing.assert_array_equal(rows.targets[on], doc.ids[1:])
        np.testing.assert_array_equal(rows.target_roles[on], doc.roles[1:])
    assert (rows.target_roles[rows.doc_index < 0] == Role.PAD).all()
    # inputs are the document's previous tokens: context never crosses documents
    for r in range(len(rows)):
        for s in np.unique(rows.segment_ids[r][rows.segment_ids[r] > 0]):
            seg = rows.segment_ids[r] == s
            np.testing.assert_array_equal(rows.positions[r][seg], np.arange(seg.sum()))


@pytest.mark.parametrize("seq_len,stride", [(16, 16), (16, 8), (64, 32), (7, 1)])
def test_row_counter_counts_the_rows_layout_makes(encoder, seq_len, stride):
    docs = [encoder.encode(d) for d in hand_documents()] + sample_documents(encoder, 3) + \
        [encoder.encode(d) for d in hand_documents()]
    counter = RowCounter(seq_len, stride)
    for k, doc in enumerate(docs, start=1):
        assert counter.add(len(doc)) == len(layout_documents(docs[:k], seq_len, stride))


def test_layout_windows_give_context_after_the_first(encoder):
    doc = sample_documents(encoder, 1)[0]
    rows = layout_documents([doc], 32, 16)
    for r in range(1, len(rows)):
        scored = np.flatnonzero(rows.doc_index[r] >= 0)
        assert scored[0] == 16  # the first half of each later window is context only


# -- ablations --------------------------------------------------------------------------------


def test_variants_keep_the_text_tokens_and_change_the_thinking(encoder):
    docs = [encoder.encode(d) for d in hand_documents()] + sample_documents(encoder, 5)
    variants = make_variants(encoder, docs, seed=3)
    assert tuple(variants) == VARIANTS
    for name, v in variants.items():
        for a, b in zip(docs, v):
            np.testing.assert_array_equal(text_tokens(a), text_tokens(b))
            assert (a.roles == Role.TEXT).sum() == (b.roles == Role.TEXT).sum()
    think = lambda d: d.ids[d.roles == Role.THINKING].tolist()  # noqa: E731
    for a, r, s, m in zip(docs, variants["removed"], variants["shuffled"], variants["mantra_only"]):
        if not thinking_blocks(encoder, a):
            assert np.array_equal(a.ids, r.ids) and np.array_equal(a.ids, s.ids)
            continue
        assert not (r.roles == Role.THINKING).any() and not (r.roles == Role.MANTRA).any()
        assert encoder.tag_ids["<thinking>"] not in r.ids.tolist()
        assert not (m.roles == Role.THINKING).any()
        assert (m.roles == Role.MANTRA).sum() == (a.roles == Role.MANTRA).sum()
        assert think(s) != think(a)


def test_removed_drops_the_control_tag_of_a_block(encoder):
    doc = encoder.encode(hand_documents()[1])
    good = encoder.tag_ids["<|good|>"]
    assert good in doc.ids.tolist()
    removed = remove_thinking(encoder, doc)
    assert good not in removed.ids.tolist()
    assert good in mantra_only(encoder, doc).ids.tolist()
    # the removed document is what the encoder gives for the document without thinking
    plain = Document("b", tuple(s for s in hand_documents()[1].segments if s.kind == "text"))
    np.testing.assert_array_equal(removed.ids, encoder.encode(plain).ids)
    np.testing.assert_array_equal(removed.roles, encoder.encode(plain).roles)


def test_shuffle_is_a_derangement_and_needs_two_documents(encoder):
    docs = sample_documents(encoder, 6)
    shuffled = shuffle_thinking(encoder, docs, seed=0)
    for a, s in zip(docs, shuffled):
        blocks = thinking_blocks(encoder, a)
        if blocks:
            first = s.ids[thinking_blocks(encoder, s)[0].start:thinking_blocks(encoder, s)[0].end]
            assert not np.array_equal(first, a.ids[blocks[0].start:blocks[0].end])
    assert shuffle_thinking(encoder, docs[:1]) is None
    assert "shuffled" not in make_variants(encoder, docs[:1])


# -- bits per byte against NumPy float64 --------------------------------------------------------


def test_bpb_equals_an_independent_float64_computation(encoder):
    cfg = ModelConfig(vocab_size=encoder.vocab_size, d_model=58, n_layers=2, n_heads=1, n_kv_heads=1, d_ff=37,
                      max_seq_len=128, dtype="float32", param_dtype="float32")
    ids = jnp.zeros((1, 4), jnp.int32)
    params = Transformer(cfg).init(jax.random.key(7), ids, ids, ids + 1)["params"]
    params = jax.tree.map(lambda x: x.unbox() if hasattr(x, "unbox") else x, params,
                          is_leaf=lambda x: hasattr(x, "unbox"))
    docs_in = hand_documents()
    docs = [encoder.encode(d) for d in docs_in]
    rows = layout_documents(docs, 128)
    sums = score_rows(params, cfg, LossConfig(impl="chunked"), rows, len(docs), token_byte_lengths(encoder.tokenizer),
                      batch_rows=3)
    metrics = sums.metrics()

    # Independent: every document alone, full logits, float64 log-softmax, bytes from the JSON text.
    nll_text, text_bytes = 0.0, 0
    for doc, raw in zip(docs, docs_in):
        n = len(doc.ids)
        x = jnp.asarray(doc.ids[None, :-1])
        pos = jnp.arange(n - 1)[None]
        hidden = Transformer(cfg).apply({"params": params}, x, pos, jnp.ones_like(x))
        lg = np.asarray(logits(hidden, params, cfg), np.float64)[0]
        lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
        nll = lse - lg[np.arange(n - 1), doc.ids[1:]]
        nll_text += nll[doc.roles[1:] == Role.TEXT].sum()
        text_bytes += sum(len(s.text.encode("utf-8")) for s in raw.segments if s.kind == "text")
    assert metrics["bytes/text"] == text_bytes
    assert metrics["bpb/text"] == pytest.approx(nll_text / math.log(2) / text_bytes, rel=1e-5)
    assert metrics["tokens/text"] == sum(int((d.roles[1:] == Role.TEXT).sum()) for d in docs)


# -- intervals --------------------------------------------------------------------------------


def test_interval_covers_a_known_difference_and_is_paired():
    rng = np.random.default_rng(0)
    n = 200
    den = rng.integers(100, 1000, n).astype(float)
    base = den * rng.uniform(1.0, 3.0, n)  # documents differ a lot ...
    shifted = base + 0.1 * den + rng.normal(0, 1, n)  # ... the variant adds 0.1 per byte to each
    iv = paired_ratio_difference(shifted, base, den, resamples=500, seed=1)
    assert iv.documents == n and iv.ci is not None
    assert iv.ci[0] < 0.1 < iv.ci[1]
    assert iv.ci[1] - iv.ci[0] < 0.01  # paired: the documents' own spread cancels


def test_no_interval_with_too_few_documents():
    iv = paired_ratio_difference(np.ones(5) * 2, np.ones(5), np.ones(5), min_documents=20)
    assert iv.estimate == pytest.approx(1.0)
    assert iv.ci is None and "too few documents" in iv.reason and "5 < 20" in iv.reason


def test_interval_is_not_confident_about_noise():
    rng = np.random.default_rng(2)
    den = np.full(100, 500.0)
    a, b = rng.normal(1000, 50, 100), rng.normal(1000, 50, 100)
    iv = paired_ratio_difference(a, b, den, resamples=1000, seed=0)
    true = (a.sum() - b.sum()) / den.sum()
    assert iv.ci[0] <= true <= iv.ci[1]
