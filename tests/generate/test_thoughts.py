"""`ThoughtWriter`: a tiny trained checkpoint writes the thought at the end of a prefix."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from metatrain.documents import Segment
from metatrain.engine.sampling import SamplingConfig
from metatrain.errors import UserError
from metatrain.generate.generator import Generator
from metatrain.generate.thoughts import (
    ThoughtPrefix,
    ThoughtWriter,
    last_chars,
    with_modes,
)

PREFIXES = [
    ThoughtPrefix("a", (Segment("text", "The capital of France is Paris. Its population"),), seed=1),
    ThoughtPrefix("b", (Segment("text", "Rivers of Europe: "), Segment("thinking", "the Danube is long"),
                        Segment("text", " The Rhine flows north.")), seed=2),
    ThoughtPrefix("c", (Segment("text", "Hello there."),), mode="ai", seed=3),
]


@pytest.fixture(scope="module")
def generator(workdir) -> Generator:
    return Generator.load(workdir)


def test_greedy_is_deterministic_and_both_ways_write_the_same(generator):
    batch = ThoughtWriter(generator, max_new_tokens=10, max_batch=3)
    first = batch.write(PREFIXES)
    assert batch.write(PREFIXES) == first
    assert all(t.tokens_out >= 1 and t.tokens_in > 0 for t in first)
    assert all(t.finish_reason in ("end_of_mode", "length") for t in first)
    mantra = generator.encoder.mantra
    assert not any(t.text.startswith(mantra[:10]) for t in first)

    writer = ThoughtWriter(generator, max_new_tokens=10, max_batch=2)

    async def each():
        try:
            return await asyncio.gather(*(writer.think(p) for p in PREFIXES))
        finally:
            await writer.aclose()

    assert list(asyncio.run(each())) == first  # two rows at a time, submitted: the same thoughts


def test_sampling_is_seeded(generator):
    writer = ThoughtWriter(generator, sampling=SamplingConfig(1.0), max_new_tokens=12, max_batch=3)
    one = writer.write(PREFIXES)
    assert writer.write(PREFIXES) == one
    reseeded = [ThoughtPrefix(p.doc_id, p.context, p.mode, seed=p.seed + 100) for p in PREFIXES]
    assert writer.write(reseeded) != one


def test_a_prefix_longer_than_the_context_is_cut_from_the_front(generator):
    writer = ThoughtWriter(generator, max_new_tokens=40, max_batch=1)
    words = " ".join(f"word{i}" for i in range(2000))
    prefix = ThoughtPrefix("long", (Segment("text", "START " + words),))
    encoded = writer.encode(prefix)
    limit = generator.model_config.max_seq_len
    assert len(encoded.ids) <= limit - 40
    text = generator.encoder.decode(encoded.ids)
    assert "START" not in text and "word1999" in text
    (thought,) = writer.write([prefix])
    assert thought.tokens_in == len(encoded.ids)


def test_a_cut_keeps_each_segment_in_its_mode(generator):
    context = (Segment("text", "Question: ", mode="ai"), Segment("text", "what is it?", mode="ai_quoting_human"),
               Segment("text", " It is a river."))
    resolved = with_modes(context, "ai")
    assert [s.mode for s in resolved] == ["ai", "ai_quoting_human", "ai_quoting_human"]
    assert last_chars(resolved, 5) == (Segment("text", "iver.", mode="ai_quoting_human"),)
    assert last_chars((Segment("thinking", "abc"),), 10) == (Segment("text", " "),)
    writer = ThoughtWriter(generator, max_new_tokens=8, max_batch=1, context_chars=20)
    # A human document moves into AI mode; the cut drops that segment and the rest stays AI.
    moved = (Segment("text", "Hi. ", mode="ai"), Segment("text", "The answer is that it flows north."))
    encoded = writer.encode(ThoughtPrefix("m", moved))
    ai = generator.encoder.tag_ids["<AI>"]
    assert "Hi." not in generator.encoder.decode(encoded.ids) and ai in encoded.ids.tolist()
    # A prefix that ends where no thinking may open is refused in one line ...
    with pytest.raises(UserError, match="no thinking may open"):
        writer.encode(ThoughtPrefix("q", context, mode="ai"))
    # ... unless the block opens in another mode: its mode tags are forced before it.
    tags = generator.encoder.tag_ids
    for doc_mode, block_mode, cut in (("ai", "ai", 12), ("human", "human", 100)):
        back = ThoughtPrefix("q", context, mode=doc_mode, block_mode=block_mode)
        if doc_mode == "human":  # human text, then AI text, then the block back in human mode
            back = ThoughtPrefix("h", (Segment("text", "Hello. "), Segment("text", "Hi there.", mode="ai")),
                                 block_mode="human")
        encoded = ThoughtWriter(generator, max_new_tokens=8, max_batch=1, context_chars=cut).encode(back)
        exit_tag = tags["</AI_quoting_human>"] if doc_mode == "ai" else tags["</AI>"]
        mantra = generator.encoder.mantra_ids.tolist()
        assert encoded.prefix == (exit_tag, tags["<thinking>"], *mantra)
        assert encoded.ids[-len(encoded.prefix):].tolist() == list(encoded.prefix)
        (thought,) = ThoughtWriter(generator, max_new_tokens=8, max_batch=1, context_chars=cut).write([back])
        assert thought.tokens_out >= 1 and thought.tokens_in == len(encoded.ids)


def test_bad_settings_are_one_line(generator):
    with pytest.raises(UserError, match="--self-think-tokens must be >= 1"):
        ThoughtWriter(generator, max_new_tokens=0, flag="--self-think-tokens")
    with pytest.raises(UserError, match="--max-batch must be >= 1"):
        ThoughtWriter(generator, max_batch=0)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_it_writes_what_the_annotate_generator_writes(workdir, generator, temperature):
    """The same prefix, seed and settings: the thought of `annotate --generator metatrain`
    (its engine thread, one request at a time) equals the batch job's."""
    from metatrain.annotate.generators import ThinkRequest
    from metatrain.annotate.local_model import MetatrainGenerator

    local = MetatrainGenerator(workdir, temperature=temperature, top_p=0.95, max_new_tokens=12, max_batch=2)

    async def annotate():
        try:
            return [await local.think(ThinkRequest(p.doc_id, 0, (), p.context, seed=p.seed, mode=p.mode))
                    for p in PREFIXES]
        finally:
            await local.aclose()

    replies = asyncio.run(annotate())
    writer = ThoughtWriter(generator, sampling=SamplingConfig(temperature, 0, 0.95), max_new_tokens=12, max_batch=2)
    thoughts = writer.write(PREFIXES)
    assert [(r.text, r.tokens_in, r.tokens_out) for r in replies] == \
        [(t.text, t.tokens_in, t.tokens_out) for t in thoughts]



def test_the_mantra_policy_counts_the_blocks_of_the_whole_document(generator):
    """Under `first`, a point after a block gets no mantra even when the context is cut so
    short that the earlier block is gone from the prompt (training counts the document's blocks)."""
    from metatrain.tokenizer.encoder import Encoder

    e = generator.encoder
    first = Encoder(e.tokenizer, e.grammar.registry, mantra=e.mantra, mantra_policy="first")
    writer = ThoughtWriter(Generator(generator.params, generator.model_config, first), max_new_tokens=4,
                           context_chars=12)
    mantra = tuple(first.mantra_ids.tolist())
    opening = first.tag_ids[first.grammar.registry.thinking_open]
    lone = writer.encode(ThoughtPrefix("a", (Segment("text", "x" * 40 + " Paris is large."),)))
    assert lone.prefix == (opening, *mantra)  # the document's first block: the mantra
    later = writer.encode(ThoughtPrefix("b", (Segment("text", "Rivers: "), Segment("thinking", "the Danube"),
                                              Segment("text", "x" * 40 + " The Rhine flows north.")),))
    assert not np.isin(first.tag_ids[first.grammar.registry.thinking_close], later.ids)  # the block was cut off
    assert later.prefix == (opening,)  # ... and still counts: no mantra
