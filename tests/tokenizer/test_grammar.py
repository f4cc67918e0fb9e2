"""The tag grammar: every (state, tag) pair of the default grammar, paths, and the array form."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from metatrain.io.paths import DEFAULT_TAGS
from metatrain.tokenizer.grammar import ILLEGAL, Grammar, IllegalTransition, State
from metatrain.tokenizer.registry import registry_from_dict

H, A, Q = State("human"), State("ai"), State("ai_quoting_human")
HT, AT = State("human", True), State("ai", True)
CONTROLS = ("<|good|>", "<|bad|>")

# Every legal move of the default grammar, written out by hand (docs/design.md sections 1-2).
# Anything not listed here must be illegal.
LEGAL = {
    (H, "<thinking>"): HT,
    (H, "<AI>"): A,
    (A, "<thinking>"): AT,
    (A, "</AI>"): H,
    (A, "<AI_quoting_human>"): Q,
    (Q, "</AI_quoting_human>"): A,
    (HT, "</thinking>"): H,
    (AT, "</thinking>"): A,
    **{(s, c): s for s in (H, A, Q) for c in CONTROLS},
}


def test_states_and_tags(grammar):
    assert set(grammar.states) == {H, A, Q, HT, AT}
    assert grammar.states[:3] == (H, A, Q)
    assert grammar.num_tags == 8


@pytest.mark.parametrize("state", [H, A, Q, HT, AT], ids=str)
@pytest.mark.parametrize("tag", ["<thinking>", "</thinking>", "<AI>", "</AI>", "<AI_quoting_human>",
                                 "</AI_quoting_human>", "<|good|>", "<|bad|>"])
def test_every_transition_of_the_default_grammar(grammar, state, tag):
    s = grammar.state_id(state)
    if (state, tag) in LEGAL:
        assert grammar.states[grammar.next_state(s, tag)] == LEGAL[(state, tag)]
        assert tag in grammar.allowed_tags(s)
    else:
        with pytest.raises(IllegalTransition, match=f"tag {tag} is illegal in state {state} \\(legal there: "):
            grammar.next_state(s, tag)
        assert tag not in grammar.allowed_tags(s)


def test_transition_table_matches_the_hand_written_moves(grammar):
    table = grammar.transition_table()
    assert table.dtype == np.int32 and table.shape == (5, 8)
    expected = np.full((5, 8), ILLEGAL, np.int32)
    for (state, tag), nxt in LEGAL.items():
        expected[grammar.state_id(state), grammar.tag_index[tag]] = grammar.state_id(nxt)
    np.testing.assert_array_equal(table, expected)
    with pytest.raises(ValueError):
        table[0, 0] = 1  # read-only: the decoder shares it


def test_initial_state_and_end(grammar):
    assert grammar.states[grammar.initial_state()] == H
    assert grammar.states[grammar.initial_state("ai")] == A
    assert [grammar.can_end(s) for s in range(grammar.num_states)] == [st_ == H for st_ in grammar.states]
    with pytest.raises(IllegalTransition, match="unknown mode 'robot'"):
        grammar.initial_state("robot")
    with pytest.raises(IllegalTransition, match="not a tag"):
        grammar.next_state(0, "<robot>")


def test_mode_tag_and_mode_path(grammar):
    assert grammar.mode_tag("human", "ai") == "<AI>"
    assert grammar.mode_tag("ai_quoting_human", "ai") == "</AI_quoting_human>"
    with pytest.raises(IllegalTransition, match="no tag moves directly from mode human to mode ai_quoting_human"):
        grammar.mode_tag("human", "ai_quoting_human")
    assert grammar.mode_path("human", "human") == ()
    assert grammar.mode_path("human", "ai_quoting_human") == ("<AI>", "<AI_quoting_human>")
    assert grammar.mode_path("ai_quoting_human", "human") == ("</AI_quoting_human>", "</AI>")


def _user_grammar() -> Grammar:
    data = yaml.safe_load(DEFAULT_TAGS.read_text())
    data["modes"].append("island")
    data["transitions"].append({"tag": "<island>", "from": "human", "to": "island"})  # no way back
    data["controls"]["toxic"] = "<|toxic|>"
    data["reserved"] = ["<|r0|>"]
    return Grammar(registry_from_dict(data, source="user.yaml"))


def test_user_tags_control_legal_outside_thinking_reserved_nowhere():
    g = _user_grammar()
    table = g.transition_table()
    toxic, reserved = g.tag_index["<|toxic|>"], g.tag_index["<|r0|>"]
    for s, state in enumerate(g.states):
        assert table[s, toxic] == (ILLEGAL if state.thinking else s)
        assert table[s, reserved] == ILLEGAL
    with pytest.raises(IllegalTransition, match="cannot be reached"):
        g.mode_path("island", "human")


def test_bind_gives_one_gather_masks(grammar):
    vocab = 53
    tag_ids = {tag: 40 + i for i, tag in enumerate(grammar.tags)}
    bound = grammar.bind(tag_ids, vocab, eos_id=2)
    assert bound.tag_token_ids.tolist() == list(range(40, 48))
    assert bound.token_to_tag.shape == (vocab,)
    assert bound.token_to_tag[40:48].tolist() == list(range(8))
    assert (np.delete(bound.token_to_tag, range(40, 48)) == ILLEGAL).all()
    mask = bound.allowed_tokens
    assert mask.shape == (grammar.num_states, vocab) and mask.dtype == bool
    for s in range(grammar.num_states):
        allowed_tags = {tag_ids[t] for t in grammar.allowed_tags(s)}
        for token in range(vocab):
            if token in tag_ids.values():
                assert mask[s, token] == (token in allowed_tags)
            elif token == 2:
                assert mask[s, token] == grammar.can_end(s)
            else:
                assert mask[s, token]
    with pytest.raises(ValueError, match="no token id"):
        grammar.bind({"<AI>": 3}, vocab)
    with pytest.raises(ValueError, match="distinct"):
        grammar.bind({t: 5 for t in grammar.tags}, vocab)


@given(st.lists(st.integers(0, 20), max_size=40))
def test_bound_next_states_agree_with_next_state(grammar, tokens):
    """Array-form stepping (what generation does) equals the scalar grammar on any token stream."""
    tag_ids = {tag: 13 + i for i, tag in enumerate(grammar.tags)}  # ids 13..20 are tags
    bound = grammar.bind(tag_ids, 23)
    id_to_tag = {i: t for t, i in tag_ids.items()}
    state = grammar.initial_state()
    for token in tokens:
        got = int(bound.next_states(np.array(state), np.array(token)))
        if token not in id_to_tag:
            assert got == state
            continue
        try:
            expected = grammar.next_state(state, id_to_tag[token])
        except IllegalTransition:
            assert got == ILLEGAL
            break
        assert got == expected
        state = expected
