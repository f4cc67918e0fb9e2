"""The serving engine on the tiny trained run: batched rows decode as `metatrain generate`
does, budgets and cancellation end rows, and a batch never holds more than `max_batch`."""

from __future__ import annotations

import asyncio

import pytest

from metatrain.engine.constraints import TagConstraints
from metatrain.engine.engine import STEPS_PER_CALL, Engine, RowRequest
from metatrain.engine.sampling import SamplingConfig
from metatrain.errors import UserError
from metatrain.generate.generator import Generator
from metatrain.generate.prompts import encode_prompt


@pytest.fixture(scope="module")
def generator(workdir):
    return Generator.load(workdir)


@pytest.fixture(scope="module")
def engine(generator):
    enc = generator.encoder
    engine = Engine(generator.params, generator.model_config, TagConstraints.from_encoder(enc, lock_mode="ai"),
                    max_batch=4, eos_id=enc.eos_id)
    engine.start()
    yield engine
    engine.stop()


async def _collect(handle) -> list[int]:
    ids = []
    while (chunk := await handle.next()) is not None:
        ids += chunk
    return ids


def _run(engine, requests: list[RowRequest]) -> list[tuple[list[int], str]]:
    async def main():
        handles = [engine.submit(r) for r in requests]
        ids = await asyncio.gather(*(_collect(h) for h in handles))
        return [(i, h.finish_reason) for i, h in zip(ids, handles)]

    return asyncio.run(main())


def test_a_greedy_row_is_what_generate_gives_whatever_shares_its_batch(engine, generator):
    enc = generator.encoder
    prompts = ["Question: what is a river?", "Tell me about deserts.", "Rain:"]
    expected = generator.generate(prompts, lock_mode="ai", max_new_tokens=24, sampling=SamplingConfig(0.0))
    rows = [RowRequest(encode_prompt(enc, p, "ai"), 24, temperature=0.0) for p in prompts]
    rows.append(RowRequest(encode_prompt(enc, "Noise.", "ai"), 24, temperature=1.3, seed=5))  # a sampled companion
    results = _run(engine, rows)
    for sample, (ids, reason) in zip(expected, results):
        prefix = len(encode_prompt(enc, prompts[sample.prompt_index], "ai").prefix)
        assert list(sample.ids[prefix:]) == ids
        assert reason == {"length": "length", "eos": "eos", "end_of_mode": "end_of_mode"}[sample.finish_reason]


def test_a_seeded_row_repeats_and_budgets_are_exact(engine, generator):
    prompt = encode_prompt(generator.encoder, "Question: what is a river?", "ai")
    first = _run(engine, [RowRequest(prompt, 17, temperature=1.0, top_p=0.9, seed=11)])
    again = _run(engine, [RowRequest(prompt, 17, temperature=1.0, top_p=0.9, seed=11)])
    other = _run(engine, [RowRequest(prompt, 17, temperature=1.0, top_p=0.9, seed=12)])
    assert first == again and first != other
    ids, reason = first[0]
    assert reason in {"length", "end_of_mode"} and len(ids) <= 17
    if reason == "length":
        assert len(ids) == 17


def test_more_rows_than_the_batch_run_in_several_batches(engine, generator):
    prompt = encode_prompt(generator.encoder, "Rain:", "ai")
    before = engine.batches
    results = _run(engine, [RowRequest(prompt, 8, temperature=0.9, seed=s) for s in range(10)])
    assert len(results) == 10 and all(reason in {"length", "end_of_mode"} for _, reason in results)
    assert engine.batches - before >= 3  # at most 4 rows a batch
    assert engine.active_rows == 0


def test_a_cancelled_row_ends_at_once_and_frees_its_slot(engine, generator):
    prompt = encode_prompt(generator.encoder, "Question: what is a river?", "ai")
    budget = generator.model_config.max_seq_len - len(prompt.ids)

    async def main():
        handle = engine.submit(RowRequest(prompt, budget, temperature=0.0))
        got = await handle.next()
        handle.cancel()
        rest = await _collect(handle)
        return got, rest, handle.finish_reason

    got, rest, reason = asyncio.run(main())
    if reason == "cancelled":  # the tiny model may also leave AI mode before the cancel lands
        assert len(got) + len(rest) <= 3 * STEPS_PER_CALL < budget
    assert engine.active_rows == 0
    assert _run(engine, [RowRequest(prompt, 4, temperature=0.0)])[0][1] in {"length", "end_of_mode"}


def test_prompts_and_budgets_that_do_not_fit_the_context_are_refused(engine, generator):
    enc = generator.encoder
    limit = generator.model_config.max_seq_len
    long = encode_prompt(enc, "river " * limit, "ai")
    with pytest.raises(UserError, match=rf"the prompt has {len(long.ids)} tokens and the model's context is {limit}"):
        engine.check(RowRequest(long, 1))
    short = encode_prompt(enc, "Rain:", "ai")
    with pytest.raises(UserError, match=rf"max_tokens {limit} does not fit"):
        engine.check(RowRequest(short, limit))


def test_a_stopped_engine_refuses_new_rows_and_ends_the_waiting_ones(generator):
    enc = generator.encoder
    engine = Engine(generator.params, generator.model_config, TagConstraints.from_encoder(enc, lock_mode="ai"),
                    max_batch=2, eos_id=enc.eos_id)
    prompt = encode_prompt(enc, "Rain:", "ai")

    async def main():
        waiting = engine.submit(RowRequest(prompt, 4))  # never started: no thread decodes it
        engine.stop()
        with pytest.raises(UserError, match="the server shut down before this request was decoded"):
            await waiting.next()
        with pytest.raises(UserError, match="shutting down"):
            engine.submit(RowRequest(prompt, 4))

    asyncio.run(main())
