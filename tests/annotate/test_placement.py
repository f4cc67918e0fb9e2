"""Placement: splitting keeps text exact, points land where each layout says, assembly encodes."""

from __future__ import annotations

import functools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from metatrain.annotate.inputs import RawDocument
from metatrain.annotate.placement import (
    InsertionPoint,
    PlacementConfig,
    assemble,
    context_at,
    placement_segments,
    plan_insertions,
    split_text,
    text_of,
)
from metatrain.documents import Document, Segment
from metatrain.io.paths import DEFAULT_TAGS, SAMPLE_TOKENIZER
from metatrain.tokenizer import Encoder, SpmTokenizer, canonical_segments

T, K = "text", "thinking"


def raw(*segments: Segment | str, mode: str = "human", doc_id: str = "d") -> RawDocument:
    segs = tuple(Segment(T, s) if isinstance(s, str) else s for s in segments)
    return RawDocument(doc_id, segs, mode)


def where(points: list[InsertionPoint]) -> list[tuple[str, str]]:
    return [(p.position, p.passage) for p in points]


@functools.lru_cache(maxsize=1)
def encoder() -> Encoder:
    return Encoder.from_files(SAMPLE_TOKENIZER, DEFAULT_TAGS)


# ---------------------------------------------------------------------------- config


@pytest.mark.parametrize("kwargs, message", [
    ({"where": "paragraph"}, "where: 'paragraph' is not one of passage, document, chunk"),
    ({"split": "line"}, "split: 'line' is not one of"),
    ({"split": "tokens:0"}, "split: 'tokens:0'"),
    ({"split": "tokens:x"}, "split: 'tokens:x'"),
    ({"split": "tokens:-3"}, "split: 'tokens:-3'"),
    ({"max_blocks": 0}, "max_blocks: 0 must be a whole number >= 1"),
    ({"max_blocks": 2.0}, "max_blocks: 2.0"),
    ({"max_blocks": True}, "max_blocks: True"),
    ({"order": "sideways", "where": "chunk"}, "order: 'sideways' is not one of before, after, random"),
    ({"order": "random"}, "order: random applies to where=chunk; where=passage"),
    ({"order": "before", "where": "document"}, "order: before applies to where=chunk; where=document"),
    ({"seed": "1"}, "seed: '1' must be a whole number"),
    ({"replace_thinking": 1}, "replace_thinking: 1 must be true or false"),
])
def test_config_refuses_bad_options_naming_them(kwargs, message):
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        PlacementConfig(**kwargs)


def test_default_orders():
    assert PlacementConfig().effective_order == "after"
    assert PlacementConfig(where="document").effective_order == "after"
    assert PlacementConfig(where="chunk").effective_order == "random"
    assert PlacementConfig(where="chunk", order="before").effective_order == "before"
    assert PlacementConfig(split="tokens:12").split_tokens == 12 and PlacementConfig().split_tokens is None


# ---------------------------------------------------------------------------- splitting


@pytest.mark.parametrize("text, units", [
    ("One.\n\nTwo.\n\n\nThree", ["One.\n\n", "Two.\n\n\n", "Three"]),
    ("A\r\n\r\nB\r\nstill B\r\n \t\r\nC\n", ["A\r\n\r\n", "B\r\nstill B\r\n \t\r\n", "C\n"]),
    ("\n\n\nLeading blank lines.\n\nEnd.\n\n", ["\n\n\nLeading blank lines.\n\n", "End.\n\n"]),
    ("no break at all", ["no break at all"]),
    ("\n \n\n", ["\n \n\n"]),
])
def test_paragraph_units(text, units):
    assert split_text(text, "paragraph") == units


@pytest.mark.parametrize("text, units", [
    ("It rose. It fell!  Why? ", ["It rose. ", "It fell!  ", "Why? "]),
    ('He said "stop." Then left… Wait?! Yes', ['He said "stop." ', "Then left… ", "Wait?! ", "Yes"]),
    ("Pi is 3.14 (roughly). Next", ["Pi is 3.14 (roughly). ", "Next"]),
    ("中文。好的！真的？「对。」嗯", ["中文。", "好的！", "真的？", "「对。」", "嗯"]),
    ("Title\n\nBody text. More", ["Title\n\n", "Body text. ", "More"]),
    ("End.", ["End."]),
])
def test_sentence_units(text, units):
    assert split_text(text, "sentence") == units


def test_token_units_end_at_piece_boundaries():
    tokenizer = SpmTokenizer.load(SAMPLE_TOKENIZER)
    text = "héllo world 😀😀 中文 and more words here\r\n"
    units = split_text(text, "tokens:3", tokenizer)
    assert "".join(units) == text and len(units) > 3
    assert units == split_text(text, "tokens:3", tokenizer.processor) == split_text(text, "tokens:3")
    pieces = tokenizer.processor.encode(text, out_type="proto").pieces
    ends = {p.end for p in pieces}
    offset = 0
    for unit in units[:-1]:
        offset += len(unit.encode("utf-8"))
        assert offset in ends  # a cut is always the end of a piece, never inside a character
    assert split_text(text, "tokens:100000") == [text]
    assert split_text("😀", "tokens:1") == ["😀"]  # four byte pieces, one character


TEXT_PIECES = st.sampled_from(["\n", "\r\n", "\n\n", "\r\n\r\n", " ", "\t", ". ", "! ", "?", "…", "。", "！",
                               '"', "」", "😀", "中文", "A", "word", "▁", "<thinking>", "</AI>", "\x00", "\r"])
TEXTS = st.lists(st.one_of(TEXT_PIECES, st.text(st.characters(exclude_categories=("Cs",)), max_size=8)),
                 max_size=30).map("".join)
SPLITS = st.sampled_from(["paragraph", "sentence", "tokens:1", "tokens:3", "tokens:40"])


@given(TEXTS, SPLITS)
def test_units_join_to_the_text_and_none_is_only_whitespace(text, split):
    units = split_text(text, split)
    assert "".join(units) == text and all(units)
    if len(units) > 1:
        assert all(u.strip() for u in units)


# ---------------------------------------------------------------------------- layouts


PARAS = "First para.\n\nSecond para. Two sentences.\n\nThird.\n"


def test_passage_puts_a_point_after_each_unit_never_at_the_start():
    doc = raw(PARAS)
    points = plan_insertions(doc, PlacementConfig())
    assert where(points) == [("after", "First para.\n\n"), ("after", "Second para. Two sentences.\n\n"),
                             ("after", "Third.\n")]
    assert [p.index for p in points] == [0, 1, 2] and points[0].offset == len("First para.\n\n")
    assert points[1].before == (Segment(T, "First para.\n\nSecond para. Two sentences.\n\n"),)
    out = assemble(doc, points, ["t0", None, "t2"], PlacementConfig())
    assert out == (Segment(T, "First para.\n\n"), Segment(K, "t0"),
                   Segment(T, "Second para. Two sentences.\n\nThird.\n"), Segment(K, "t2"))


def test_document_puts_one_point_after_the_whole_text():
    doc = raw(PARAS)
    (point,) = plan_insertions(doc, PlacementConfig(where="document", split="sentence"))
    assert (point.position, point.passage, point.before) == ("after", PARAS, (Segment(T, PARAS),))
    assert assemble(doc, [point], ["why"], PlacementConfig(where="document")) == (
        Segment(T, PARAS), Segment(K, "why"))


def test_chunk_orders():
    doc = raw(PARAS)
    before = plan_insertions(doc, PlacementConfig(where="chunk", order="before"))
    assert where(before) == [("before", "First para.\n\n"), ("before", "Second para. Two sentences.\n\n"),
                             ("before", "Third.\n")]
    assert before[0].offset == 0 and before[0].before == ()  # "before" may open the document
    out = assemble(doc, before, ["a", "b", "c"], PlacementConfig(where="chunk", order="before"))
    assert [s.text for s in out] == ["a", "First para.\n\n", "b", "Second para. Two sentences.\n\n", "c", "Third.\n"]


LONG = " ".join(f"Sentence number {i}." for i in range(60))


def test_random_order_is_seeded_by_seed_and_id_only():
    def sides(seed, doc_id="long"):
        config = PlacementConfig(where="chunk", split="sentence", seed=seed)
        return "".join(p.position[0] for p in plan_insertions(raw(LONG, doc_id=doc_id), config))

    assert len(sides(0)) == 60 and set(sides(0)) == {"a", "b"}
    assert sides(0) == sides(0)
    assert len({sides(s) for s in range(4)}) == 4 and sides(0, "other") != sides(0)
    # Fixed by sha256, not Python's hash(): the same in every process and Python version.
    assert sides(0)[:20] == GOLDEN_SIDES


GOLDEN_SIDES = "aabbbababbaababbabbb"


def test_random_chunks_may_share_a_boundary_each_keeping_its_thought():
    config = PlacementConfig(where="chunk", split="sentence", seed=0)
    doc = raw(LONG, doc_id="long")
    points = plan_insertions(doc, config)
    out = assemble(doc, points, [f"t{i}" for i in range(len(points))], config)
    assert [s.text for s in out if s.kind == K] == [f"t{i}" for i in range(60)]
    assert text_of(out) == LONG


@pytest.mark.parametrize("k, kept", [(1, [9]), (2, [4, 9]), (3, [2, 5, 9]), (4, [1, 4, 6, 9]), (10, list(range(10))),
                                     (50, list(range(10)))])
def test_max_blocks_keeps_evenly_spread_points_with_the_last(k, kept):
    text = "".join(f"P{i}.\n\n" for i in range(10))
    points = plan_insertions(raw(text), PlacementConfig(max_blocks=k))
    assert [p.passage for p in points] == [f"P{i}.\n\n" for i in kept]
    assert [p.index for p in points] == list(range(len(kept)))


# ---------------------------------------------------------------------------- existing thinking, modes


def test_existing_thinking_stays_and_no_block_touches_it():
    doc = raw("A.\n\nB.\n\n", Segment(K, "old"), Segment(T, "\n"), Segment(T, "C.\n\nD.", mode="ai"))
    config = PlacementConfig()
    points = plan_insertions(doc, config)
    # not after B. (thinking follows), nor after the bare "\n"
    assert where(points) == [("after", "A.\n\n"), ("after", "C.\n\n"), ("after", "D.")]
    out = assemble(doc, points, ["x", None, "y"], config)
    assert out == (Segment(T, "A.\n\n"), Segment(K, "x"), Segment(T, "B.\n\n"), Segment(K, "old"),
                   Segment(T, "\n"), Segment(T, "C.\n\nD.", mode="ai"), Segment(K, "y"))
    before = plan_insertions(doc, PlacementConfig(where="chunk", order="before"))
    assert where(before) == [("before", "A.\n\n"), ("before", "B.\n\n"), ("before", "D.")]  # not before C.
    assert plan_insertions(raw("Text.", Segment(K, "t")), PlacementConfig(where="document")) == []


def test_replace_thinking_drops_it_and_keeps_its_mode_change():
    doc = raw("Human text. ", Segment(K, "old", mode="ai"), Segment(T, "AI text."), Segment(T, " More."))
    config = PlacementConfig(split="sentence", replace_thinking=True)
    assert placement_segments(doc, config) == (Segment(T, "Human text. "), Segment(T, "AI text. More.", mode="ai"))
    points = plan_insertions(doc, config)
    assert where(points) == [("after", "Human text. "), ("after", "AI text. "), ("after", "More.")]
    out = assemble(doc, points, ["a", "b", "c"], config)
    assert out == (Segment(T, "Human text. "), Segment(K, "a"), Segment(T, "AI text. ", mode="ai"), Segment(K, "b"),
                   Segment(T, "More."), Segment(K, "c"))
    assert text_of(out) == doc.text


def test_a_split_segment_keeps_mode_and_control_on_its_first_piece():
    doc = raw(Segment(T, "One. Two. ", mode="ai", control="good"), mode="human")
    config = PlacementConfig(split="sentence")
    out = assemble(doc, plan_insertions(doc, config), ["x", "y"], config)
    assert out == (Segment(T, "One. ", "ai", "good"), Segment(K, "x"), Segment(T, "Two. "), Segment(K, "y"))
    enc = encoder()
    decoded = enc.decode_segments(enc.encode(Document("d", out)).ids)
    assert decoded == [Segment(T, "One. ", "ai", "good"), Segment(K, "x", "ai"), Segment(T, "Two. ", "ai"),
                       Segment(K, "y", "ai")]


def test_points_where_thinking_cannot_open_are_left_out():
    doc = raw("Said: ", Segment(T, "quoted. words. ", mode="ai_quoting_human"), Segment(T, "Back.", mode="ai"),
              mode="ai")
    config = PlacementConfig(split="sentence")
    points = plan_insertions(doc, config, thinking_modes=encoder().grammar.registry.thinking_modes)
    assert where(points) == [("after", "Said: "), ("after", "Back.")]
    out = assemble(doc, points, ["a", "b"], config)
    encoder().encode(Document("d", out, mode="ai"))  # legal
    assert len(plan_insertions(doc, config)) == 4  # no check without thinking_modes


# ---------------------------------------------------------------------------- context and errors


def test_context_at_holds_the_thoughts_accepted_so_far():
    doc = raw(PARAS)
    config = PlacementConfig()
    points = plan_insertions(doc, config)
    assert context_at(doc, points, 0, [], config) == (Segment(T, "First para.\n\n"),)
    assert context_at(doc, points, 1, ["t0", "ignored"], config) == (
        Segment(T, "First para.\n\n"), Segment(K, "t0"), Segment(T, "Second para. Two sentences.\n\n"))
    assert context_at(doc, points, 2, ["t0", ""], config) == (  # no block at point 1: the text runs on
        Segment(T, "First para.\n\n"), Segment(K, "t0"), Segment(T, "Second para. Two sentences.\n\nThird.\n"))
    chunk = PlacementConfig(where="chunk", order="before")
    points = plan_insertions(doc, chunk)
    assert context_at(doc, points, 1, ["t0"], chunk) == (Segment(K, "t0"), Segment(T, "First para.\n\n"))


def test_bad_calls_are_refused():
    doc, config = raw(PARAS), PlacementConfig()
    points = plan_insertions(doc, config)
    with pytest.raises(ValueError, match="2 thoughts for 3 insertion points"):
        assemble(doc, points, ["a", "b"], config)
    with pytest.raises(ValueError, match="no insertion point 3"):
        context_at(doc, points, 3, ["a", "b", "c"], config)
    with pytest.raises(ValueError, match="needs the 2 thoughts before it, got 1"):
        context_at(doc, points, 2, ["a"], config)
    with pytest.raises(ValueError, match="was not planned for document 'd'"):
        assemble(raw("short"), points, ["a", "b", "c"], config)


# ---------------------------------------------------------------------------- properties


@st.composite
def configs(draw) -> PlacementConfig:
    where_ = draw(st.sampled_from(["passage", "document", "chunk"]))
    order = draw(st.sampled_from([None, "before", "after", "random"])) if where_ == "chunk" else None
    return PlacementConfig(where=where_, split=draw(SPLITS), order=order,
                           max_blocks=draw(st.one_of(st.none(), st.integers(1, 5))),
                           seed=draw(st.integers(0, 3)), replace_thinking=draw(st.booleans()))


@st.composite
def documents(draw) -> RawDocument:
    segments = []
    for _ in range(draw(st.integers(1, 4))):
        if draw(st.integers(0, 3)) == 0:
            segments.append(Segment(K, draw(TEXTS), mode=draw(st.sampled_from([None, "human", "ai"]))))
        else:
            text = draw(TEXTS.filter(bool))
            segments.append(Segment(T, text, mode=draw(st.sampled_from([None, None, "human", "ai"])),
                                    control=draw(st.sampled_from([None, None, "good"]))))
    return RawDocument(draw(st.text(max_size=5)), tuple(segments), "human")


THOUGHTS = st.sampled_from([None, "", "  ", "A thought.", "<thinking> is text", "</AI> and </thinking>",
                            " spaced\n", "😀 中文"])


@given(documents(), configs(), st.data())
def test_assembled_text_is_exactly_the_input_and_encodes(doc, config, data):
    points = plan_insertions(doc, config)
    assert plan_insertions(doc, config) == points  # deterministic
    assert [p.index for p in points] == list(range(len(points)))
    if config.max_blocks is not None:
        assert len(points) <= config.max_blocks
    if config.where == "document":
        assert len(points) <= 1
    thoughts = data.draw(st.lists(THOUGHTS, min_size=len(points), max_size=len(points)))
    out = assemble(doc, points, thoughts, config)
    assert text_of(out) == doc.text
    new = [s for s in out if s.kind == K and s not in doc.segments]
    assert [s.text for s in new] == [t for t in thoughts if t and t.strip() and Segment(K, t) not in doc.segments]
    kept = [s for s in out if s.kind == K and s.text not in thoughts]
    if not config.replace_thinking:
        assert kept == [s for s in doc.segments if s.kind == K and s.text not in thoughts]
    for k in range(len(points)):  # each context is the start of the output, cut at the point
        context = context_at(doc, points, k, thoughts, config)
        if context:
            assert out[:len(context) - 1] == context[:-1]
            last, whole = context[-1], out[len(context) - 1]
            assert last == whole or (last.kind == whole.kind == T and whole.text.startswith(last.text)
                                     and (last.mode, last.control) == (whole.mode, whole.control))
    enc = encoder()
    document = Document(doc.id, out, doc.mode)
    decoded = enc.decode_segments(enc.encode(document).ids)
    assert decoded == list(canonical_segments(document))
    assert text_of(decoded) == doc.text


@pytest.mark.parametrize("thought", ["<thinking>", "</thinking>", "</AI>", "<AI_quoting_human>", "<|good|>"])
def test_thoughts_holding_tag_strings_stay_text(thought):
    doc = raw("Some text.\n\nMore <AI> text.\n")
    config = PlacementConfig()
    points = plan_insertions(doc, config)
    out = assemble(doc, points, [thought, f"x {thought} y"], config)
    enc = encoder()
    decoded = enc.decode_segments(enc.encode(Document("d", out)).ids)
    assert decoded == [Segment(T, "Some text.\n\n", "human"), Segment(K, thought, "human"),
                       Segment(T, "More <AI> text.\n", "human"), Segment(K, f"x {thought} y", "human")]


@given(documents(), configs())
def test_new_blocks_never_touch_existing_thinking(doc, config):
    points = plan_insertions(doc, config)
    out = assemble(doc, points, [f"new-{i}" for i in range(len(points))], config)
    solid = [s for s in out if s.kind == K or s.text.strip()]  # whitespace between blocks still touches
    for a, b in zip(solid, solid[1:]):
        if a.kind == b.kind == K:
            assert a.text.startswith("new-") == b.text.startswith("new-")  # two new, or two existing
    if config.effective_order == "after":
        assert all(p.offset > 0 for p in points)
