"""Free-generation counts: hand-made sequences with known violations, choosers driven by
fixed logits (no model), and one free-vs-masked run on the tiny trained checkpoint."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metatrain.engine.constraints import GrammarChooser, RowState, TagConstraints
from metatrain.engine.sampling import SamplingConfig
from metatrain.errors import UserError
from metatrain.evaluation.free_generation import (
    FreeChooser,
    GenerationStats,
    count_generation,
    run_free_generation,
)
from metatrain.io.paths import DEFAULT_TAGS, SAMPLE_TOKENIZER
from metatrain.run.reader import load_checkpoint
from metatrain.tokenizer.encoder import Encoder
from metatrain.tokenizer.grammar import IllegalTransition, State

GREEDY = SamplingConfig(0.0)
KEYS = {"tokens", "illegal_transitions", "illegal_per_1000_tokens", "thinking_blocks", "mantra_exact",
        "ai_samples", "ai_left", "ai_left_fraction"}


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return Encoder.from_files(SAMPLE_TOKENIZER, DEFAULT_TAGS)


@pytest.fixture(scope="module")
def ids(encoder):
    """Builders of id lists: tags by name, text, the mantra, EOS."""
    tags = encoder.tag_ids

    class Ids:
        eos = [encoder.eos_id]
        mantra = encoder.mantra_ids.tolist()
        wrong = [encoder.tokenizer.encode_texts(["Zebra"])[0][0]]  # not the mantra's first id

        @staticmethod
        def text(s):
            return list(encoder.tokenizer.encode_texts([s])[0])

        def __getattr__(self, name):  # ids.open, ids.close, ids.ai, ids.end_ai, ...
            return [tags[{"open": "<thinking>", "close": "</thinking>", "ai": "<AI>", "end_ai": "</AI>",
                          "quote": "<AI_quoting_human>", "end_quote": "</AI_quoting_human>"}[name]]]

    assert Ids.wrong != Ids.mantra[:1]
    return Ids()


def _one(encoder, seq, *, ai=False, blocks=0):
    start = encoder.grammar.initial_state("ai" if ai else None)
    return count_generation(encoder, [seq], [start], ai_samples=[ai], start_blocks=[blocks])


# ------------------------------------------------------------------ hand-made sequences

@pytest.mark.parametrize("case, illegal, blocks, matches", [
    ("close_outside", 1, 0, 0),
    ("end_ai_in_human", 1, 0, 0),
    ("eos_in_block", 1, 1, 1),
    ("nested_open", 1, 1, 1),
    ("exact", 0, 1, 1),
    ("first_wrong", 0, 1, 0),
    ("closed_early", 0, 1, 0),
    ("cut_off", 0, 0, 0),
    ("cut_off_after_deviating", 0, 1, 0),
    ("legal_end", 0, 0, 0),
])
def test_human_sequences_have_the_known_violations(encoder, ids, case, illegal, blocks, matches):
    seq = {
        "close_outside": ids.text("Hi") + ids.close + ids.text(" there") + ids.eos,
        "end_ai_in_human": ids.text("Hi") + ids.end_ai + ids.text(" there"),
        "eos_in_block": ids.open + ids.mantra + ids.text("Hm") + ids.eos,
        "nested_open": ids.open + ids.mantra + ids.open + ids.close + ids.eos,
        "exact": ids.text("A.") + ids.open + ids.mantra + ids.text("Ok") + ids.close + ids.eos,
        "first_wrong": ids.open + ids.wrong + ids.mantra[1:] + ids.close,
        "closed_early": ids.open + ids.mantra[:3] + ids.close + ids.text("B."),
        "cut_off": ids.text("A.") + ids.open + ids.mantra[:5],
        "cut_off_after_deviating": ids.open + ids.wrong + ids.mantra[1:4],
        "legal_end": ids.text("A.") + ids.eos,
    }[case]
    stats = _one(encoder, seq)
    assert (stats.tokens, stats.illegal_transitions, stats.thinking_blocks, stats.mantra_matches) == (
        len(seq), illegal, blocks, matches)
    assert stats.ai_samples == stats.ai_left == 0 and stats.ai_left_fraction is None


@pytest.mark.parametrize("case, illegal, left", [
    ("stays", 0, False),
    ("closes_and_writes_human_text", 0, True),
    ("closes_and_opens_thinking", 0, True),
    ("closes_last", 0, False),
    ("closes_then_eos", 0, False),
    ("quotes_a_human", 0, False),
    ("end_ai_inside_thinking", 1, False),
    ("eos_in_ai_mode", 1, False),
])
def test_ai_samples_leave_only_by_writing_after_closing_ai(encoder, ids, case, illegal, left):
    seq = {
        "stays": ids.text("Sure, here it is."),
        "closes_and_writes_human_text": ids.text("Sure.") + ids.end_ai + ids.text("Thanks!"),
        "closes_and_opens_thinking": ids.text("Sure.") + ids.end_ai + ids.open,
        "closes_last": ids.text("Sure.") + ids.end_ai,
        "closes_then_eos": ids.text("Sure.") + ids.end_ai + ids.eos,
        "quotes_a_human": ids.text("You said") + ids.quote + ids.text("hi") + ids.end_quote + ids.text("."),
        "end_ai_inside_thinking": ids.open + ids.mantra + ids.end_ai + ids.text("more"),
        "eos_in_ai_mode": ids.text("Sure.") + ids.eos,
    }[case]
    stats = _one(encoder, seq, ai=True)
    assert (stats.tokens, stats.illegal_transitions, stats.ai_samples, stats.ai_left) == (len(seq), illegal, 1, left)
    assert stats.ai_left_fraction == float(left)


def test_totals_fractions_and_json(encoder, ids):
    human = encoder.grammar.initial_state()
    ai = encoder.grammar.initial_state("ai")
    seqs = [
        ids.open + ids.mantra + ids.close + ids.end_ai,  # exact, then 1 illegal
        ids.open + ids.wrong + ids.close + ids.eos,  # a miss
        ids.open + ids.mantra[:2],  # undecided
        ids.text("x") + ids.end_ai + ids.text("y"),  # AI sample that leaves
        ids.text("x") + ids.eos + ids.close + ids.close,  # illegal EOS; nothing after it counts
    ]
    stats = count_generation(encoder, seqs, [human, human, human, ai, ai], ai_samples=[0, 0, 0, 1, 1])
    tokens = sum(len(s) for s in seqs[:4]) + len(ids.text("x")) + 1
    assert stats == GenerationStats(tokens=tokens, illegal_transitions=2, thinking_blocks=2, mantra_matches=1,
                                    ai_samples=2, ai_left=1)
    out = stats.to_json()
    assert set(out) == KEYS
    assert out["illegal_per_1000_tokens"] == pytest.approx(2000 / tokens)
    assert out["mantra_exact"] == 0.5 and out["ai_left_fraction"] == 0.5
    empty = count_generation(encoder, [], [], ai_samples=[]).to_json()
    assert empty["tokens"] == 0 and empty["illegal_per_1000_tokens"] is None and empty["mantra_exact"] is None


@pytest.mark.parametrize("policy, blocks_before, counted", [
    ("every", 1, 2), ("first", 0, 1), ("first", 1, 0), ("none", 0, 0),
])
def test_only_blocks_the_policy_gives_the_mantra_are_counted(encoder, ids, policy, blocks_before, counted):
    enc = Encoder(encoder.tokenizer, encoder.grammar, mantra=encoder.mantra, mantra_policy=policy)
    # Two blocks: the first with the mantra, the second without (text straight away).
    seq = ids.open + ids.mantra + ids.close + ids.open + ids.text("No mantra.") + ids.close
    stats = _one(enc, seq, blocks=blocks_before)
    assert stats.thinking_blocks == counted
    assert stats.mantra_exact == {2: 0.5, 1: 1.0, 0: None}[counted]


def test_bad_arguments_are_rejected(encoder):
    with pytest.raises(ValueError, match="as many"):
        count_generation(encoder, [[5]], [0, 0], ai_samples=[False])
    with pytest.raises(ValueError, match="ids must lie"):
        count_generation(encoder, [[-1]], [0], ai_samples=[False])


# ------------------------------------------------------ choosers on fixed logits, no model

STEPS = 6


@functools.partial(jax.jit, static_argnames=("chooser",))
def _drive(logits, rows, constraints, key, chooser):
    """STEPS steps of `chooser` on the same logits -> (tokens [B, STEPS], -1 after the end; rows)."""
    def step(rows, key):
        tokens, new_rows = chooser(logits, rows, key, constraints)
        return new_rows, jnp.where(rows.done, -1, tokens)

    rows, tokens = jax.lax.scan(step, rows, jax.random.split(key, STEPS))
    return tokens.T, rows


def _favouring(encoder, token, rows=2):
    """[rows, V] logits: noise, with `token` far above everything."""
    noise = jax.random.normal(jax.random.key(1), (rows, encoder.vocab_size))
    return noise.at[:, token].set(30.0)


def _emitted(tokens):
    return [[int(t) for t in row if t >= 0] for row in np.asarray(tokens)]


@pytest.mark.parametrize("sampling", [GREEDY, SamplingConfig(1.0)])
def test_free_chooser_emits_an_illegal_tag_the_mask_forbids(encoder, sampling):
    close = encoder.tag_ids["</thinking>"]
    human = encoder.grammar.initial_state()
    constraints = TagConstraints.from_encoder(encoder)
    logits = _favouring(encoder, close)
    rows = RowState.start(np.full(2, human), np.zeros(2), constraints.mantra_length)
    outputs = {}
    for name, chooser in (("free", FreeChooser(sampling)), ("masked", GrammarChooser(sampling))):
        tokens, final = _drive(logits, rows, constraints, jax.random.key(0), chooser=chooser)
        seqs = _emitted(tokens)
        outputs[name] = seqs, count_generation(encoder, seqs, [human] * 2, ai_samples=[False] * 2)
        assert np.asarray(final.grammar_state).min() >= 0, "an illegal tag never gives state -1"
    seqs, stats = outputs["free"]
    assert seqs == [[close] * STEPS] * 2 and stats.illegal_transitions == 2 * STEPS
    seqs, stats = outputs["masked"]
    assert all(close not in s for s in seqs) and stats.illegal_transitions == 0


def test_free_chooser_ignores_the_ai_lock_and_ends_only_on_eos(encoder):
    end_ai, eos = encoder.tag_ids["</AI>"], encoder.eos_id
    ai = encoder.grammar.initial_state("ai")
    constraints = TagConstraints.from_encoder(encoder, lock_mode="ai")  # its `ends` must not stop FreeChooser
    rows = RowState.start(np.full(2, ai), np.zeros(2), constraints.mantra_length)
    tokens, final = _drive(_favouring(encoder, end_ai), rows, constraints, jax.random.key(0), chooser=FreeChooser(GREEDY))
    seqs = _emitted(tokens)
    assert seqs == [[end_ai] * STEPS] * 2 and not np.asarray(final.done).any()
    assert (np.asarray(final.grammar_state) == encoder.grammar.initial_state()).all()
    stats = count_generation(encoder, seqs, [ai] * 2, ai_samples=[True] * 2)
    assert (stats.illegal_transitions, stats.ai_left) == (2 * (STEPS - 1), 2)
    masked, _ = _drive(_favouring(encoder, end_ai), rows, constraints, jax.random.key(0), chooser=GrammarChooser(GREEDY))
    assert _emitted(masked) == [[end_ai]] * 2, "the lock ends the masked row at </AI>"
    thinking = encoder.grammar.state_id(State("human", thinking=True))
    rows = RowState.start(np.full(2, thinking), np.zeros(2), constraints.mantra_length)
    tokens, final = _drive(_favouring(encoder, eos), rows, constraints, jax.random.key(0), chooser=FreeChooser(GREEDY))
    assert _emitted(tokens) == [[eos]] * 2 and np.asarray(final.done).all()
    assert (np.asarray(final.grammar_state) == thinking).all(), "an illegal EOS keeps the state"


def test_free_chooser_tracks_the_grammar_like_a_host_walk(encoder):
    """Tag-heavy sampled logits; each row's final state and block count against the scalar grammar."""
    g = encoder.grammar
    id_to_tag = {i: t for t, i in encoder.tag_ids.items()}
    constraints = TagConstraints.from_encoder(encoder)
    tags = jnp.asarray(sorted(id_to_tag), jnp.int32)
    logits = jax.random.normal(jax.random.key(2), (8, encoder.vocab_size)).at[:, tags].add(12.0)
    starts = np.arange(8) % g.num_states
    rows = RowState.start(starts, np.zeros(8), constraints.mantra_length)
    tokens, final = _drive(logits, rows, constraints, jax.random.key(3), chooser=FreeChooser(SamplingConfig(1.0)))
    seqs = _emitted(tokens)
    assert sum(t in id_to_tag for s in seqs for t in s) >= 30, "the logits must produce tags"
    for seq, start, state, blocks, mantra_pos in zip(seqs, starts, *jax.device_get(
            (final.grammar_state, final.blocks, final.mantra_pos)), strict=True):
        expected, opened = int(start), 0
        for token in seq:
            if token in id_to_tag:
                try:
                    expected = g.next_state(expected, id_to_tag[token])
                    opened += id_to_tag[token] == "<thinking>"
                except IllegalTransition:
                    pass
        assert (state, blocks, mantra_pos) == (expected, opened, constraints.mantra_length)


# ------------------------------------------------------------ the tiny trained checkpoint

PROMPTS = ["Background: The island", "The economy of a small country"]


@pytest.fixture(scope="module")
def loaded(workdir):
    return load_checkpoint(workdir)


def test_free_and_masked_runs_on_a_trained_checkpoint(loaded):
    report = run_free_generation(loaded.params, loaded.model_config, loaded.encoder, PROMPTS,
                                 num_samples=2, max_new_tokens=24, sampling=SamplingConfig(1.0), seed=0)
    assert set(report) == {"prompts", "samples_per_prompt", "max_new_tokens", "temperature", "free", "masked"}
    assert (report["prompts"], report["samples_per_prompt"], report["max_new_tokens"], report["temperature"]) == (
        2, 2, 24, 1.0)
    free, masked = report["free"], report["masked"]
    assert set(free) == set(masked) == KEYS
    for stats in (free, masked):
        assert stats["ai_samples"] == 4 and 8 <= stats["tokens"] <= 8 * 24
    assert masked["illegal_transitions"] == 0 and masked["illegal_per_1000_tokens"] == 0.0
    assert masked["ai_left"] == 0 and masked["ai_left_fraction"] == 0.0
    assert masked["mantra_exact"] in (None, 1.0)


def test_the_budget_is_cut_to_the_room_max_seq_len_leaves(loaded):
    encoder, config = loaded.encoder, loaded.model_config
    words = " ".join(["word"] * config.max_seq_len)
    ids = encoder.tokenizer.encode_texts([words])[0]
    # BOS + prompt + <AI> leaves 3 tokens of room.
    prompt = encoder.tokenizer.decode_text(ids[: config.max_seq_len - 5])
    assert len(encoder.tokenizer.encode_texts([prompt])[0]) == config.max_seq_len - 5
    report = run_free_generation(loaded.params, config, encoder, [prompt], num_samples=1, max_new_tokens=24)
    assert report["max_new_tokens"] == 3 and report["masked"]["tokens"] <= 2 * 3
    with pytest.raises(UserError, match="max_seq_len"):
        run_free_generation(loaded.params, config, encoder, [words], num_samples=1)
