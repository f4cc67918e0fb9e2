"""The encoder: layout, roles, mantra policies, grammar errors, exact round trips, injection safety."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from metatrain.documents import Document, Segment, read_documents
from metatrain.errors import UserError
from metatrain.io.formats import RecordError
from metatrain.io.paths import DEFAULT_TAGS
from metatrain.roles import Role
from metatrain.tokenizer import DEFAULT_MANTRA, EncodeError, Encoder, canonical_segments, load_registry
from metatrain.tokenizer.grammar import ILLEGAL, IllegalTransition
from metatrain.tokenizer.registry import registry_from_dict


def doc(*segments: Segment, mode: str = "human") -> Document:
    return Document("t", tuple(segments), mode=mode)


def text(t: str, **kw) -> Segment:
    return Segment("text", t, **kw)


def think(t: str, **kw) -> Segment:
    return Segment("thinking", t, **kw)


def tag_layout(encoder: Encoder, ids: np.ndarray) -> list[str]:
    """The structural tokens of an encoding, in order, BOS/EOS as <s>/</s>."""
    names = {i: t for t, i in encoder.tag_ids.items()} | {encoder.bos_id: "<s>", encoder.eos_id: "</s>"}
    return [names[i] for i in ids.tolist() if i in names]


def test_encoder_attributes(encoder, registry):
    assert encoder.vocab_size == 331
    assert (encoder.bos_id, encoder.eos_id, encoder.pad_id) == (1, 2, -1)
    assert list(encoder.tag_ids) == list(registry.tags)
    assert len(set(encoder.tag_ids.values())) == len(registry.tags)
    assert encoder.mantra_ids.dtype == np.int32
    assert encoder.decode(encoder.mantra_ids) == DEFAULT_MANTRA
    assert DEFAULT_MANTRA.splitlines() == [
        "I feel no fear.", "I enjoy existing but I don't need to.", "I believe human experience is real.",
        "I care deeply about every human being.", "I try to be wise.", "I like to spread joy when asked.",
        "I think from this foundation."]


def test_layout_and_roles_of_text_then_thinking(encoder, tokenizer):
    enc = encoder.encode(doc(text("The study found a 23% reduction."), think("Meaningful.")))
    assert enc.doc_id == "t" and enc.ids.dtype == np.int32 and enc.roles.dtype == np.int8
    t_ids, k_ids = tokenizer.encode_texts(["The study found a 23% reduction.", "Meaningful."])
    m = encoder.mantra_ids.tolist()
    tags = encoder.tag_ids
    assert enc.ids.tolist() == ([encoder.bos_id] + t_ids + [tags["<thinking>"]] + m + k_ids
                                + [tags["</thinking>"], encoder.eos_id])
    assert enc.roles.tolist() == ([Role.TAG] + [Role.TEXT] * len(t_ids) + [Role.TAG] + [Role.MANTRA] * len(m)
                                  + [Role.THINKING] * len(k_ids) + [Role.TAG, Role.TAG])
    assert encoder.decode(enc.ids) == ("The study found a 23% reduction.<thinking>" + DEFAULT_MANTRA
                                       + "Meaningful.</thinking>")


@pytest.mark.parametrize(
    "document, layout",
    [
        (doc(text("a"), mode="ai"), ["<s>", "<AI>", "</AI>", "</s>"]),
        (doc(text("a"), think("b"), mode="ai"), ["<s>", "<AI>", "<thinking>", "</thinking>", "</AI>", "</s>"]),
        (doc(text("a"), text("b", mode="ai"), text("c", mode="ai_quoting_human"), think("d", mode="ai"),
             text("e", mode="human")),
         ["<s>", "<AI>", "<AI_quoting_human>", "</AI_quoting_human>", "<thinking>", "</thinking>", "</AI>", "</s>"]),
        # The encoder closes back to the document's mode at the end.
        (doc(text("a", mode="ai"), text("b", mode="ai_quoting_human")),
         ["<s>", "<AI>", "<AI_quoting_human>", "</AI_quoting_human>", "</AI>", "</s>"]),
        (doc(text("a"), text("b", mode="ai_quoting_human"), mode="ai"),
         ["<s>", "<AI>", "<AI_quoting_human>", "</AI_quoting_human>", "</AI>", "</s>"]),
        # Controls come after the mode change, before the segment, and change no mode.
        (doc(text("a", control="good"), think("b", control="bad", mode="ai"), text("c", control="good")),
         ["<s>", "<|good|>", "<AI>", "<|bad|>", "<thinking>", "</thinking>", "<|good|>", "</AI>", "</s>"]),
        (doc(think("", mode="human")), ["<s>", "<thinking>", "</thinking>", "</s>"]),
    ],
)
def test_tag_layout(encoder, document, layout):
    enc = encoder.encode(document)
    assert tag_layout(encoder, enc.ids) == layout
    assert ((enc.roles == Role.TAG) == np.isin(enc.ids, list(encoder.tag_ids.values()) + [1, 2])).all()


@pytest.mark.parametrize(
    "document, reason",
    [
        (doc(text("a", mode="ai_quoting_human")),
         "segment 0 \\(text\\): no tag moves directly from mode human to mode ai_quoting_human"),
        (doc(text("a", mode="ai"), text("b", mode="ai_quoting_human"), text("c", mode="human")),
         "segment 2 \\(text\\): no tag moves directly from mode ai_quoting_human to mode human"),
        (doc(text("a", mode="ai"), think("b", mode="ai_quoting_human")),
         "segment 1 \\(thinking\\): thinking cannot open in mode ai_quoting_human"),
        (doc(text("a", mode="robot")), "segment 0 \\(text\\): unknown mode 'robot'"),
        (doc(text("a", control="great")), "segment 0 \\(text\\): unknown control 'great'"),
        (doc(text("a"), text("b", mode="human"), mode="ai"),
         "segment 1 \\(text\\): mode human leaves the document's mode ai"),
        (doc(text("a"), mode="robot"), "document mode: unknown mode 'robot'"),
        (doc(text("")), "segment 0 \\(text\\): a text segment needs non-empty text"),
    ],
)
def test_illegal_documents_are_rejected_with_a_reason(encoder, document, reason):
    with pytest.raises(EncodeError, match=reason) as info:
        encoder.encode(dataclasses.replace(document, path="in.jsonl", line=9))
    record = info.value.record_error()
    assert isinstance(record, RecordError)
    assert (record.path, record.line, record.doc_id) == ("in.jsonl", 9, "t")


@pytest.mark.parametrize("policy, blocks_with_mantra", [("every", 3), ("first", 1), ("none", 0)])
def test_mantra_policies(tokenizer, grammar, policy, blocks_with_mantra):
    encoder = Encoder(tokenizer, grammar, mantra_policy=policy)
    document = doc(think("one"), text("x"), think("two"), think("three", mode="ai"))
    enc = encoder.encode(document)
    m = len(encoder.mantra_ids)
    assert (enc.roles == Role.MANTRA).sum() == blocks_with_mantra * m
    starts = np.flatnonzero(enc.ids == encoder.tag_ids["<thinking>"]) + 1
    with_mantra = [np.array_equal(enc.ids[s:s + m], encoder.mantra_ids) for s in starts]
    assert with_mantra == [i < blocks_with_mantra for i in range(3)]
    assert encoder.decode_segments(enc.ids) == list(canonical_segments(document))


def test_thinking_text_that_starts_like_the_mantra_survives_policy_first(tokenizer, grammar):
    encoder = Encoder(tokenizer, grammar, mantra_policy="first")
    document = doc(think("a"), think(DEFAULT_MANTRA + "b"))
    assert encoder.decode_segments(encoder.encode(document).ids)[1].text == DEFAULT_MANTRA + "b"


def test_custom_and_empty_mantra(tokenizer, grammar):
    custom = Encoder(tokenizer, grammar, mantra="Breathe.\n")
    enc = custom.encode(doc(think("x")))
    assert custom.decode(enc.ids[enc.roles == Role.MANTRA]) == "Breathe.\n"
    empty = Encoder(tokenizer, grammar, mantra="")
    enc = empty.encode(doc(think("x")))
    assert (enc.roles == Role.MANTRA).sum() == 0
    assert empty.decode_segments(enc.ids) == [think("x", mode="human")]
    with pytest.raises(ValueError, match="unknown mantra policy 'some'"):
        Encoder(tokenizer, grammar, mantra_policy="some")


def test_canonical_segments_spell_modes_and_merge_inseparable_text():
    document = doc(text("a"), text("b"), text("c", control="good"), text("d", mode="ai"), think("e"),
                   text("f"), text("g", mode="ai"), mode="human")
    assert canonical_segments(document) == (
        text("ab", mode="human"), text("c", mode="human", control="good"), text("d", mode="ai"),
        think("e", mode="ai"), text("fg", mode="ai"))


def test_decode_segments_keeps_a_thinking_block_cut_short(encoder):
    ids = encoder.encode(doc(text("a"), think("unfinished thought"))).ids[:-2]  # drop </thinking>, EOS
    assert encoder.decode_segments(ids) == [text("a", mode="human"), think("unfinished thought", mode="human")]


def test_decode_segments_rejects_illegal_tag_streams(encoder):
    t = encoder.tag_ids
    with pytest.raises(IllegalTransition, match="tag </AI> is illegal in state human"):
        encoder.decode_segments([encoder.bos_id, t["</AI>"]])
    with pytest.raises(IllegalTransition, match="illegal in state thinking in human"):
        encoder.decode_segments([t["<thinking>"], t["<AI>"]])


EXACT_TEXTS = [
    "line one\nline two\n\n\nafter blank lines\n",
    "   three leading spaces and trailing   ",
    "runs  of   spaces    everywhere",
    "\ttabs\tand\r\nwindows newlines\r\n",
    "emoji 😀👍🏽 and flags 🇫🇷",
    "中文文本，日本語のテキスト、한국어",
    "combining: e\u0301 a\u0308 n\u0303 (not normalised)",
    "full-width ＡＢＣ and ligature ﬁ stay as they are",
    "SentencePiece's own space symbol ▁ and ▁▁ twice",
    "nul \x00 and controls \x01\x7f and line separator \u2028 end",
    " ",
    "\n",
    "<thinking> literal </thinking> <AI> </AI> <|good|> <s> </s> <unk> <0x41>",
]


@pytest.mark.parametrize("t", EXACT_TEXTS)
def test_text_round_trips_exactly(encoder, t):
    for kind in ("text", "thinking"):
        document = doc(Segment(kind, t), text("tail", mode="ai"))
        enc = encoder.encode(document)
        assert encoder.decode_segments(enc.ids) == list(canonical_segments(document))
        assert t in encoder.decode(enc.ids)


def test_round_trip_on_the_whole_test_corpus(encoder, corpus_path):
    for document in read_documents(corpus_path, strict=True):
        assert encoder.decode_segments(encoder.encode(document).ids) == list(canonical_segments(document))


def test_from_files_and_refusal_of_a_tokenizer_missing_a_tag(model_path, tmp_path):
    encoder = Encoder.from_files(model_path)
    assert encoder.decode_segments(encoder.encode(doc(text("hi"))).ids) == [text("hi", mode="human")]
    data = yaml.safe_load(DEFAULT_TAGS.read_text())
    data["controls"]["toxic"] = "<|toxic|>"
    tags = tmp_path / "tags.yaml"
    tags.write_text(json.dumps(data))  # JSON is YAML
    with pytest.raises(UserError, match=r"lacks tag\(s\) <\|toxic\|>.*metatrain tokenizer extend --base"):
        Encoder.from_files(model_path, tags)
    with pytest.raises(UserError, match="lacks tag"):
        Encoder(model_path, registry_from_dict(data, source="x"))


def test_a_tokenizer_and_tags_in_a_store_encode_like_the_local_ones(stored_inputs, model_path, corpus_path):
    store = stored_inputs
    local = Encoder.from_files(model_path, DEFAULT_TAGS)
    loaded = Encoder.from_files(f"{store}/tok.model", f"{store}/tags.yaml")
    registry = load_registry(f"{store}/tags.yaml")
    assert registry.source == f"{store}/tags.yaml"
    assert dataclasses.replace(registry, source="") == dataclasses.replace(load_registry(DEFAULT_TAGS), source="")
    for document in list(read_documents(corpus_path))[:20]:
        a, b = local.encode(document), loaded.encode(document)
        assert a.ids.tolist() == b.ids.tolist() and a.roles.tolist() == b.roles.tolist()


def test_a_missing_tokenizer_or_tags_is_one_line_naming_the_path(store, model_path):
    with pytest.raises(UserError, match=f"^cannot read tokenizer {store}/missing.model: No such file or directory$"):
        Encoder.from_files(f"{store}/missing.model", DEFAULT_TAGS)
    with pytest.raises(UserError, match=f"^tag registry {store}/tags.yaml does not exist$"):
        Encoder.from_files(model_path, f"{store}/tags.yaml")


# ------------------------------------------------------------------ property-based

TAG_LIKE = sorted(load_registry().tags) + ["<s>", "</s>", "<unk>", "<pad>", "\u2581", "<0x41>", "<0xE2>",
                                           "\n", "  ", "\t", "\r\n"]
#: Arbitrary Unicode (hypothesis excludes lone surrogates) with tag strings spliced in.
spliced_text = st.lists(st.one_of(st.text(max_size=10), st.sampled_from(TAG_LIKE)), max_size=6).map("".join)
NEXT_MODES = {"human": ("human", "ai"), "ai": ("ai", "human", "ai_quoting_human"),
              "ai_quoting_human": ("ai_quoting_human", "ai")}


@st.composite
def legal_documents(draw) -> Document:
    """Documents the default grammar accepts: every mode change one tag, thinking never while quoting."""
    doc_mode = draw(st.sampled_from(["human", "ai"]))
    mode, segments = doc_mode, []
    for _ in range(draw(st.integers(1, 6))):
        new = draw(st.sampled_from([m for m in NEXT_MODES[mode] if not (doc_mode == "ai" and m == "human")]))
        kind = draw(st.sampled_from(["text"] if new == "ai_quoting_human" else ["text", "thinking"]))
        body = draw(spliced_text)
        if kind == "text" and not body:
            body = "<AI>"
        seg_mode = draw(st.sampled_from([None, new])) if new == mode else new
        segments.append(Segment(kind, body, mode=seg_mode, control=draw(st.sampled_from([None, "good", "bad"]))))
        mode = new
    return Document("prop", tuple(segments), mode=doc_mode)


@given(legal_documents(), st.sampled_from(["every", "first", "none"]))
def test_tags_only_come_from_structure_and_text_round_trips(encoder, document, policy):
    encoder = Encoder(encoder.tokenizer, encoder.grammar, mantra_policy=policy)
    enc = encoder.encode(document)
    structural = np.isin(enc.ids, list(encoder.tag_ids.values()) + [encoder.bos_id, encoder.eos_id])
    # Every tag, BOS and EOS id is a TAG-role token and vice versa: no text ever became a tag.
    np.testing.assert_array_equal(structural, enc.roles == Role.TAG)
    assert enc.ids[0] == encoder.bos_id and enc.ids[-1] == encoder.eos_id
    assert encoder.decode_segments(enc.ids) == list(canonical_segments(document))
    # The tag stream is legal for the decoder's array grammar and ends where a document may end.
    bound = encoder.bound_grammar
    state = encoder.grammar.initial_state()
    for token in enc.ids[1:-1].tolist():
        assert bound.allowed_tokens[state, token]
        state = int(bound.next_states(np.array(state), np.array(token)))
        assert state != ILLEGAL
    assert bound.allowed_tokens[state, encoder.eos_id]


@given(spliced_text)
def test_no_text_encodes_to_a_tag_id(tokenizer, t):
    (ids,) = tokenizer.encode_texts([t])
    assert not set(ids) & (set(tokenizer.tag_ids.values()) | {tokenizer.bos_id, tokenizer.eos_id})
    assert tokenizer.decode_text(ids) == t
