"""The grammar in the decode step, driven by adversarial logits instead of a model.

Whatever the logits say (illegal tags pushed to +inf, NaN, huge values), the emitted
sequence must be accepted by the grammar, thinking never nests, the mantra follows every
`<thinking>` exactly (under the policy), and a locked row never produces base-mode text.
The oracle walks the grammar's scalar API (`Grammar.next_state`, `can_end`), not the
arrays the step uses.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from metatrain.documents import Document, Segment
from metatrain.engine.constraints import (
    GrammarChooser,
    RowState,
    TagConstraints,
    mask_illegal_tags,
)
from metatrain.engine.sampling import SamplingConfig
from metatrain.errors import UserError
from metatrain.generate.prompts import encode_prompt
from metatrain.tokenizer.encoder import Encoder

STEPS, ROWS = 80, 6
# Sampled, so that every legal tag gets its turn; one policy, so one compile (greedy and
# the other filters are exercised on adversarial logits in test_sampling).
CHOOSER = GrammarChooser(SamplingConfig(1.0, 5, 0.9))


def _adversarial_logits(key, knobs, tag_ids, eos_id, vocab):
    """[ROWS, V] logits that push tags (one of them to +inf), EOS, NaN and extremes."""
    k1, k2, k3, k4 = jax.random.split(key, 4)
    logits = jax.random.normal(k1, (ROWS, vocab)) * knobs["scale"]
    logits = logits.at[:, tag_ids].add(knobs["tag_boost"])
    favourite = jax.random.choice(k2, tag_ids, (ROWS,))
    logits = logits.at[jnp.arange(ROWS), favourite].set(jnp.inf)
    logits = logits.at[:, eos_id].add(knobs["eos_boost"])
    return jnp.where(jax.random.uniform(k3, logits.shape) < knobs["nan_rate"], jnp.nan, logits)


@functools.partial(jax.jit, static_argnames=("chooser",))
def _drive(rows, constraints, tag_ids, knobs, key, chooser):
    """STEPS steps of `chooser` on adversarial logits -> tokens [ROWS, STEPS] (-1 after the end)."""
    vocab = constraints.token_to_tag.shape[0]

    def step(carry, key):
        rows = carry
        k1, k2 = jax.random.split(key)
        logits = _adversarial_logits(k1, knobs, tag_ids, constraints.eos_id, vocab)
        tokens, new_rows = chooser(logits, rows, k2, constraints)
        return new_rows, jnp.where(rows.done, -1, tokens)

    rows, tokens = jax.lax.scan(step, rows, jax.random.split(key, STEPS))
    return tokens.T, rows


def _check_row(encoder: Encoder, tokens, start_state, start_blocks, locked):
    """Asserts every property on one row's emitted tokens."""
    g = encoder.grammar
    reg = g.registry
    id_to_tag = {i: t for t, i in encoder.tag_ids.items()}
    mantra = encoder.mantra_ids.tolist()
    tokens = [int(t) for t in tokens]
    state, blocks, depth = start_state, start_blocks, 0
    for i, token in enumerate(tokens):
        assert token != -1 or all(t == -1 for t in tokens[i:]), "a row, once ended, stays ended"
        if token == -1:
            break
        if locked:
            assert g.states[state].mode != g.base_mode, "locked: nothing is emitted in the base mode"
        if token == encoder.eos_id:
            assert g.can_end(state), f"EOS in state {g.states[state]}"
            assert all(t == -1 for t in tokens[i + 1:]), "EOS ends the row"
            continue
        if token in id_to_tag:
            tag = id_to_tag[token]
            state = g.next_state(state, tag)  # raises IllegalTransition on an illegal tag
            if tag == reg.thinking_open:
                depth += 1
                assert depth == 1, "thinking nested"
                expected = mantra if encoder.mantra_policy == "every" or (
                    encoder.mantra_policy == "first" and blocks == 0) else []
                forced = tokens[i + 1 : i + 1 + len(expected)]
                forced = forced[: forced.index(-1)] if -1 in forced else forced
                assert forced == expected[: len(forced)], "the mantra follows <thinking> exactly"
                blocks += 1
            elif tag == reg.thinking_close:
                depth -= 1
            if locked and g.states[state].mode == g.base_mode:
                assert all(t == -1 for t in tokens[i + 1:]), "the lock's exit tag ends the row"


@pytest.fixture(scope="module")
def setups(encoder):
    """(encoder, constraints) per (mantra policy, locked)."""
    out = {}
    for policy in ("every", "first", "none"):
        enc = Encoder(encoder.tokenizer, encoder.grammar, mantra=encoder.mantra, mantra_policy=policy)
        for locked in (False, True):
            out[policy, locked] = enc, TagConstraints.from_encoder(enc, lock_mode="ai" if locked else None)
    return out


@given(
    seed=st.integers(0, 2**31 - 1),
    policy=st.sampled_from(["every", "first", "none"]),
    locked=st.booleans(),
    start_blocks=st.integers(0, 1),
    scale=st.sampled_from([1.0, 1e30]),
    tag_boost=st.sampled_from([0.0, 8.0, 1e30, np.inf]),
    eos_boost=st.sampled_from([-np.inf, 0.0, 5.0, np.inf]),
    nan_rate=st.sampled_from([0.0, 0.01, 0.5]),
)
def test_any_logits_give_grammatical_sequences(
    setups, seed, policy, locked, start_blocks, scale, tag_boost, eos_boost, nan_rate
):
    encoder, constraints = setups[policy, locked]
    prompt = encode_prompt(encoder, "Some text.", "ai" if locked else None)
    states = np.full((ROWS,), prompt.state)
    rows = RowState.start(states, np.full((ROWS,), start_blocks), constraints.mantra_length)
    knobs = {k: jnp.float32(v) for k, v in
             dict(scale=scale, tag_boost=tag_boost, eos_boost=eos_boost, nan_rate=nan_rate).items()}
    tag_ids = jnp.asarray(sorted(encoder.tag_ids.values()), jnp.int32)
    tokens, _ = _drive(rows, constraints, tag_ids, knobs, jax.random.key(seed), chooser=CHOOSER)
    for row in np.asarray(tokens):
        _check_row(encoder, row, prompt.state, start_blocks, locked)


def test_adversary_really_pushes_tags(encoder):
    """The property test is only worth something if tags and thinking blocks do come out."""
    constraints = TagConstraints.from_encoder(encoder)
    rows = RowState.start(np.zeros(ROWS, int), np.zeros(ROWS, int), constraints.mantra_length)
    knobs = {k: jnp.float32(v) for k, v in dict(scale=1, tag_boost=8, eos_boost=-np.inf, nan_rate=0).items()}
    tag_ids = jnp.asarray(sorted(encoder.tag_ids.values()), jnp.int32)
    tokens, rows = _drive(rows, constraints, tag_ids, knobs, jax.random.key(0), chooser=CHOOSER)
    tokens = np.asarray(tokens)
    opens = tokens == encoder.tag_ids["<thinking>"]
    assert opens.sum() >= ROWS and (tokens == encoder.tag_ids["</thinking>"]).any()
    assert (tokens == encoder.tag_ids["<AI>"]).any() and (tokens == encoder.tag_ids["</AI>"]).any()
    row, col = np.argwhere(opens)[0]
    mantra = encoder.mantra_ids.tolist()
    assert tokens[row, col + 1 : col + 1 + len(mantra)].tolist() == mantra[: STEPS - col - 1]


def test_the_mask_is_the_grammars_less_the_controls_and_never_touches_ordinary_tokens(encoder):
    bound = encoder.bound_grammar
    states = np.arange(encoder.grammar.num_states)
    constraints = TagConstraints.from_encoder(encoder)
    rows = RowState.start(states, np.zeros_like(states), constraints.mantra_length)
    scores = np.random.default_rng(0).normal(size=(len(states), encoder.vocab_size)).astype(np.float32)
    masked = np.asarray(mask_illegal_tags(jnp.asarray(scores), constraints, rows))
    expected = bound.allowed_tokens.copy()
    expected[:, [encoder.tag_ids[tag] for _, tag in encoder.grammar.registry.controls]] = False  # never generated
    np.testing.assert_array_equal(np.isfinite(masked), expected)
    ordinary = (bound.token_to_tag < 0) & (np.arange(encoder.vocab_size) != encoder.eos_id)
    np.testing.assert_array_equal(masked[:, ordinary], scores[:, ordinary])
    assert not bound.allowed_tokens.all(axis=1).any(), "every state forbids some tag"


def test_literal_tags_in_a_prompt_are_text(encoder):
    text = "Look: <AI> and <thinking> and </AI> and <|good|> are only characters."
    prompt = encode_prompt(encoder, text)
    assert prompt.state == encoder.grammar.initial_state() and prompt.blocks == 0
    assert not set(prompt.ids.tolist()) & set(encoder.tag_ids.values())
    locked = encode_prompt(encoder, text, "ai")
    assert locked.prefix == (encoder.tag_ids["<AI>"],)
    assert encoder.grammar.states[locked.state].mode == "ai"


def test_a_document_prompt_continues_in_its_last_mode(encoder):
    doc = Document("d", (Segment("text", "A person asks."), Segment("thinking", "Hmm."),
                         Segment("text", "The AI answers", mode="ai")))
    prompt = encode_prompt(encoder, doc)
    g = encoder.grammar
    assert g.states[prompt.state].mode == "ai" and prompt.blocks == 1
    assert prompt.ids[-1] != encoder.eos_id and prompt.ids[-1] != encoder.tag_ids["</AI>"]
    assert encode_prompt(encoder, doc, "ai").prefix == ()  # already in AI mode


def test_lock_modes_are_checked(encoder):
    for mode in ("human", "robot"):
        with pytest.raises(UserError, match=mode):
            TagConstraints.from_encoder(encoder, lock_mode=mode)
