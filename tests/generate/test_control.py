"""Conditional generation with control tokens (`--control good`): the token stands where
the encoder puts a segment's control, and no sample ever emits a control token."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metatrain.cli import main
from metatrain.documents import Document, Segment
from metatrain.engine.constraints import (
    THINKING_LOCK,
    GrammarChooser,
    RowState,
    TagConstraints,
)
from metatrain.engine.sampling import SamplingConfig
from metatrain.errors import UserError
from metatrain.generate.generator import Generator
from metatrain.generate.prompts import encode_prompt

PROMPT = "Tell me about rivers."


def _encoded_prefix(encoder, *segments: Segment) -> list[int]:
    """The encoder's ids of a document up to (not including) the body of its last segment."""
    doc = Document("d", (Segment("text", PROMPT), *segments))
    ids = encoder.encode(doc).ids.tolist()
    body = encoder.tokenizer.encode_texts([segments[-1].text])[0]
    start = next(i for i in range(len(ids)) if ids[i:i + len(body)] == list(body) and i > 1)
    return ids[:start]


@pytest.mark.parametrize("lock", [None, "ai", THINKING_LOCK])
def test_the_control_token_stands_where_the_encoder_puts_a_segments_control(encoder, lock):
    prompt = encode_prompt(encoder, PROMPT, lock, control="good")
    good = encoder.tag_ids["<|good|>"]
    if lock == "ai":
        expected = _encoded_prefix(encoder, Segment("text", "Wide.", mode="ai", control="good"))
        assert prompt.prefix == (encoder.tag_ids["<AI>"], good)
    elif lock == THINKING_LOCK:
        expected = _encoded_prefix(encoder, Segment("thinking", "Rivers.", control="good"))
        assert prompt.prefix[:2] == (good, encoder.tag_ids["<thinking>"])
        expected = expected[: len(prompt.ids)]  # the mantra is forced by the prefix as in training
    else:
        expected = _encoded_prefix(encoder, Segment("text", "Wide.", control="good"))
        assert prompt.prefix == (good,)
    assert prompt.ids.tolist() == expected


def test_an_unknown_control_is_refused_naming_the_registrys(encoder):
    with pytest.raises(UserError, match=r"control 'excellent' is not in the tag registry .*\(its controls: good, bad\)"):
        encode_prompt(encoder, PROMPT, "ai", control="excellent")
    # A document prompt ending in a thinking block has closed it: the control follows it.
    after_block = Document("d", (Segment("text", PROMPT), Segment("thinking", "Hmm.")))
    assert encode_prompt(encoder, after_block, control="bad").prefix == (encoder.tag_ids["<|bad|>"],)


def test_no_state_ever_lets_a_control_token_out_even_at_infinite_logits(encoder):
    constraints = TagConstraints.from_encoder(encoder)
    states = np.arange(encoder.grammar.num_states)
    rows = RowState.start(states, np.zeros_like(states), constraints.mantra_length)
    controls = [encoder.tag_ids[tag] for _, tag in encoder.grammar.registry.controls]
    logits = jnp.zeros((len(states), encoder.vocab_size)).at[:, controls].set(jnp.inf)
    for seed in range(5):
        tokens, _ = GrammarChooser(SamplingConfig(1.0, 0, 1.0))(logits, rows, jax.random.key(seed), constraints)
        assert not set(np.asarray(tokens).tolist()) & set(controls)
    # The grammar itself allows them outside thinking: it is generation that refuses them.
    allowed = encoder.bound_grammar.allowed_tokens
    assert allowed[:, controls].any()


def test_conditioned_samples_carry_the_control_and_never_emit_one(workdir, encoder):
    generator = Generator.load(workdir)
    samples = generator.generate([PROMPT, "Rain:"], lock_mode="ai", control="bad", num_samples=4,
                                 max_new_tokens=40, sampling=SamplingConfig(1.5, 0, 1.0), seed=7)
    controls = {encoder.tag_ids[tag] for _, tag in encoder.grammar.registry.controls}
    for sample in samples:
        assert sample.ids[:2] == (encoder.tag_ids["<AI>"], encoder.tag_ids["<|bad|>"])
        assert not set(sample.ids[2:]) & controls
        assert sample.segments[0].control == "bad" and sample.segments[0].mode == "ai"


def test_the_generate_command_takes_control(workdir, encoder, capsys):
    code = main(["generate", "--workdir", str(workdir), "--prompt", PROMPT, "--mode", "ai", "--control", "good",
                 "--max-new-tokens", "12", "--json"])
    assert code == 0, capsys.readouterr().err
    record = json.loads(capsys.readouterr().out.splitlines()[0])
    assert record["ids"][:2] == [encoder.tag_ids["<AI>"], encoder.tag_ids["<|good|>"]]
    assert record["segments"][0]["control"] == "good"
    assert main(["generate", "--workdir", str(workdir), "--prompt", PROMPT, "--control", "nice"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "control 'nice' is not in the tag registry" in err[0]
