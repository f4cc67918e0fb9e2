"""Continuous batching on the tiny trained run: a freed slot is taken mid-batch, a row's
tokens do not depend on its neighbours, prefixes are reused, steps run on the live rows only."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import pytest

from metatrain.engine import (
    Engine,
    GrammarChooser,
    RowRequest,
    SamplingConfig,
    TagConstraints,
)
from metatrain.generate.generator import Generator
from metatrain.generate.prompts import encode_prompt

GREEDY = SamplingConfig(0.0)


@dataclasses.dataclass(frozen=True)
class NeverEnds:
    """Greedy under the grammar, EOS never chosen: every row runs to its budget."""

    eos: int
    inner: GrammarChooser = GrammarChooser(GREEDY)

    def __call__(self, logits, rows, keys, constraints):
        return self.inner(logits.at[:, self.eos].set(-jnp.inf), rows, keys, constraints)


@pytest.fixture(scope="module")
def generator(workdir) -> Generator:
    return Generator.load(workdir)


def _engine(generator, max_batch: int, **kwargs) -> Engine:
    enc = generator.encoder
    return Engine(generator.params, generator.model_config, TagConstraints.from_encoder(enc), max_batch=max_batch,
                  eos_id=enc.eos_id, chooser=NeverEnds(enc.eos_id), **kwargs)


def _row(generator, text: str, budget: int) -> RowRequest:
    return RowRequest(encode_prompt(generator.encoder, text), budget)


def test_a_slot_freed_mid_batch_is_taken_by_a_waiting_row_whose_output_is_its_own(generator):
    engine = _engine(generator, 2)
    short, long, waiting = (_row(generator, "Rain falls on the hills.", 4),
                            _row(generator, "The economy of the island rests on fishing", 40),
                            _row(generator, "Deserts cover a fifth of the land.", 12))
    a, b, c = engine.run([short, long, waiting])
    assert [len(h.tokens) for h in (a, b, c)] == [4, 40, 12]
    assert a.ended_step <= c.admitted_step < b.ended_step, "the waiting row joined while the long one decoded"
    assert engine.active_rows == 0
    alone = [_engine(generator, 1).run([r])[0].tokens for r in (short, long, waiting)]
    assert [a.tokens, b.tokens, c.tokens] == alone, "a row's tokens do not depend on its neighbours"


def test_the_rows_a_step_runs_follow_the_live_rows_not_max_batch(generator):
    engine = _engine(generator, 8)
    engine.run([_row(generator, "Rain:", 8)])
    assert set(engine.step_rows) == {1}, engine.step_rows
    engine.run([_row(generator, f"Rain {i}:", 8) for i in range(3)])
    assert 4 in engine.step_rows and 8 not in engine.step_rows, engine.step_rows


def test_a_shared_prefix_is_reused_and_gives_the_same_ids(generator):
    text = "The island's economy rests on fishing, farming and a little tourism in the summer months. " * 2
    rows = [_row(generator, text + tail, 16) for tail in ("Fish", "Farms bring", "Tourists come")]
    fresh = _engine(generator, 4, prefix_reuse=False)
    reusing = _engine(generator, 4)
    first = reusing.run(rows[:1])  # its slot now holds the shared prefix
    rest = reusing.run(rows[1:])
    assert reusing.reused_tokens >= 2 * 16, "the later rows started from the first row's cache"
    expected = fresh.run(rows)
    assert fresh.reused_tokens == 0
    assert [h.tokens for h in first + rest] == [h.tokens for h in expected]


def test_a_cancelled_waiting_row_never_takes_a_slot(generator):
    engine = _engine(generator, 1)
    rows = [_row(generator, "Rain:", 6), _row(generator, "Snow:", 6)]
    handles = []
    original = engine._admit

    def admit_then_cancel(rows):  # cancel the second row while it waits for the first's slot
        original(rows)
        if len(handles) == 0:
            handles.append(True)
            engine._waiting[0][1].cancel()

    engine._admit = admit_then_cancel
    first, second = engine.run(rows)
    assert first.finish_reason == "length" and second.finish_reason == "cancelled" and second.tokens == []
    assert second.admitted_step is None


def test_a_short_row_sent_during_a_long_reply_finishes_first(generator):
    """No head-of-line blocking on the server path: the short row joins the running batch."""
    import asyncio

    LONG = generator.model_config.max_seq_len - 24  # noqa: N806 - long enough to outlast a loaded machine

    engine = _engine(generator, 4)
    engine.start()
    finished: list[str] = []

    async def collect(handle, name):
        while await handle.next() is not None:
            pass
        finished.append(name)

    async def main():
        long = engine.submit(_row(generator, "The economy of the island rests on fishing", LONG))
        first = await long.next()  # the long row is decoding
        assert first
        short = engine.submit(_row(generator, "Rain:", 4))
        await asyncio.gather(collect(long, "long"), collect(short, "short"))
        return long, short

    try:
        long, short = asyncio.run(main())
    finally:
        engine.stop()
    assert finished == ["short", "long"]
    assert long.admitted_step < short.admitted_step < short.ended_step < long.ended_step
    assert len(short.tokens) == 4 and len(long.tokens) == LONG


def test_a_long_reused_prefix_beside_a_long_prompt_in_one_call_gives_the_ids_without_reuse(generator):
    """One prefill call pads every prompt's rest to the longest; a row reusing a prefix that
    long would write past its cache's end: it must prefill from the start instead."""
    limit = generator.model_config.max_seq_len
    text = "The island's economy rests on fishing, farming and a little tourism in the summer months. " * 40
    other = "Deserts cover a fifth of the land and rain rarely falls there at all. " * 40
    base = encode_prompt(generator.encoder, text)
    base = dataclasses.replace(base, ids=base.ids[: limit - 8])
    near = dataclasses.replace(base, ids=base.ids[: limit - 10])  # a prefix of what slot 0 will hold
    far = encode_prompt(generator.encoder, other)
    far = dataclasses.replace(far, ids=far.ids[: limit - 28])  # a long rest: the call's width
    reusing = _engine(generator, 4)
    reusing.run([RowRequest(base, 4)])
    a, b = reusing.run([RowRequest(near, 8), RowRequest(far, 8)])
    fresh = _engine(generator, 4, prefix_reuse=False)
    fa, fb = fresh.run([RowRequest(near, 8), RowRequest(far, 8)])
    assert (a.tokens, b.tokens) == (fa.tokens, fb.tokens)


def test_stop_finishes_the_rows_decoding_and_ends_the_waiting_ones(generator):
    import asyncio

    from metatrain.errors import UserError

    engine = _engine(generator, 1)
    engine.start()
    budget = generator.model_config.max_seq_len - 24  # still decoding when stop() comes, however loaded

    async def main():
        first = engine.submit(_row(generator, "Rain:", budget))
        rest = [engine.submit(_row(generator, f"Snow {i}:", 12)) for i in range(4)]
        assert await first.next()
        await asyncio.to_thread(engine.stop)
        while await first.next() is not None:
            pass
        for handle in rest:
            with pytest.raises(UserError, match="shut down before this request was decoded"):
                while await handle.next() is not None:
                    pass
        return first

    first = asyncio.run(main())
    assert first.finish_reason == "length" and len(first.tokens) == budget


def test_the_lock_exit_on_the_last_budgeted_token_is_the_end_of_mode(generator):
    @dataclasses.dataclass(frozen=True)
    class Exits:
        token: int
        inner: GrammarChooser = GrammarChooser(GREEDY)

        def __call__(self, logits, rows, keys, constraints):
            return self.inner(logits.at[:, self.token].set(1e9), rows, keys, constraints)

    close = generator.encoder.tag_ids["</AI>"]
    for budget in (1, 2, 3):
        sample = generator.generate(["Rain falls."], lock_mode="ai", max_new_tokens=budget, chooser=Exits(close))[0]
        assert sample.ids[-1] == close and sample.finish_reason == "end_of_mode", (budget, sample)
