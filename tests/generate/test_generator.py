"""Generation from a real (tiny, one-step) checkpoint: the KV-cache loop end to end.

Every test here decodes with the same model shape, batch of 2 and budget of 12 tokens,
so the jitted loop compiles once per token policy.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metatrain.documents import Document, Segment
from metatrain.engine import GrammarChooser, SamplingConfig
from metatrain.engine.step import admit_call, steps_call
from metatrain.generate import Generator
from metatrain.generate.prompts import encode_prompt, grammar_states
from metatrain.models import Transformer, logits

N = 12
GREEDY = SamplingConfig(0.0)
PROMPTS = ["Background: The island", "A much longer prompt about the economy of a small country."]


@pytest.fixture(scope="module")
def generator(workdir) -> Generator:
    return Generator.load(workdir)


@dataclasses.dataclass(frozen=True)
class PushTokens:
    """A token policy whose 'model' wants `tokens` above everything (+`boost`), else noise."""

    tokens: tuple[int, ...]
    boost: float
    inner: GrammarChooser = GrammarChooser(SamplingConfig(1.0))

    def __call__(self, logits, rows, keys, constraints):
        pairs = jax.vmap(jax.random.split)(keys)  # one key per row
        noise = jax.vmap(lambda k: jax.random.normal(k, logits.shape[1:]))(pairs[:, 0])
        return self.inner(noise.at[:, jnp.asarray(self.tokens)].add(self.boost), rows, pairs[:, 1], constraints)


def _recomputed_logits(generator, ids):
    """[V] logits after `ids`, from the full forward pass (no cache) of a padded 64-token row."""
    row = np.zeros((1, 64), np.int32)
    row[0, : len(ids)] = ids
    seg = (np.arange(64) < len(ids)).astype(np.int32)[None]
    out = _FORWARD(generator.params, generator.model_config, jnp.asarray(row), jnp.asarray(seg))
    return np.asarray(out)[0, len(ids) - 1]


def _forward(params, config, row, seg):
    hidden = Transformer(config).apply({"params": params}, row, jnp.arange(row.shape[1])[None], seg)
    return logits(hidden, params, config)


_FORWARD = jax.jit(_forward, static_argnums=1)


def test_cached_greedy_decoding_agrees_with_recomputing_every_prefix(generator):
    encoder = generator.encoder
    samples = generator.generate(PROMPTS, max_new_tokens=N, sampling=GREEDY)
    allowed = encoder.bound_grammar.allowed_tokens
    for prompt, sample in zip(PROMPTS, samples, strict=True):
        assert len(sample.ids) == N and sample.finish_reason == "length"
        context = encode_prompt(encoder, prompt).ids.tolist()
        states = grammar_states(encoder, np.asarray(context + list(sample.ids)))[len(context) - 1:]
        for step, token in enumerate(sample.ids):
            full = _recomputed_logits(generator, context + list(sample.ids[:step]))
            legal = np.where(allowed[states[step]], full, -np.inf)
            # The cached step picked the best legal token of the recomputed logits.
            assert full[token] >= legal.max() - 1e-4, (prompt, step)


def test_greedy_is_deterministic_and_ignores_the_seed(generator):
    runs = [generator.generate(PROMPTS, max_new_tokens=N, sampling=GREEDY, seed=s) for s in (0, 0, 7)]
    assert [s.ids for s in runs[0]] == [s.ids for s in runs[1]] == [s.ids for s in runs[2]]


def test_a_seed_reproduces_samples_and_another_seed_changes_them(generator):
    sampled = SamplingConfig(1.0)
    a, b, c = (generator.generate(PROMPTS[:1], num_samples=2, max_new_tokens=N, sampling=sampled, seed=s)
               for s in (3, 3, 4))
    assert [s.ids for s in a] == [s.ids for s in b]
    assert [s.ids for s in a] != [s.ids for s in c]
    assert a[0].ids != a[1].ids, "samples of one prompt are independent draws"
    assert [(s.prompt_index, s.sample_index) for s in a] == [(0, 0), (0, 1)]


def test_no_recompilation_across_tokens_seeds_and_prompts_of_a_bucket(generator):
    generator.generate(PROMPTS, max_new_tokens=N, sampling=GREEDY, seed=1)
    compiled = admit_call._cache_size(), steps_call._cache_size()
    generator.generate(["Other words", "and more"], max_new_tokens=N, sampling=GREEDY, seed=2)
    assert (admit_call._cache_size(), steps_call._cache_size()) == compiled


def test_rows_end_on_eos_or_the_lock_exit_and_the_lock_never_generates_human_text(generator):
    """A 'model' that wants tags and EOS about as much as all text together."""
    encoder = generator.encoder
    eos, ai, end_ai = encoder.eos_id, encoder.tag_ids["<AI>"], encoder.tag_ids["</AI>"]
    controls = {encoder.tag_ids[tag] for _, tag in encoder.grammar.registry.controls}
    tags = tuple(sorted(set(encoder.tag_ids.values()) - controls)) + (eos,)  # controls are never generated
    chooser = PushTokens((*tags, *sorted(controls)), 6.0)
    reasons, seen_tags = set(), set()
    for seed in range(3):
        for lock in (None, "ai"):
            for sample in generator.generate(PROMPTS, lock_mode=lock, max_new_tokens=N, chooser=chooser, seed=seed):
                reasons.add((lock, sample.finish_reason))
                seen_tags |= set(sample.ids) & set(tags)
                assert not set(sample.ids) & controls, "a control token was generated"
                ids = list(sample.ids)
                if sample.finish_reason == "length":
                    assert len(ids) == N + (lock is not None) and eos not in ids
                elif sample.finish_reason == "eos":
                    assert lock is None and ids.index(eos) == len(ids) - 1
                else:
                    assert lock == "ai" and ids.index(end_ai) == len(ids) - 1
                if lock is None:
                    continue
                assert ids[0] == ai and all(seg.mode != "human" for seg in sample.segments), sample.segments
                states = grammar_states(encoder, np.asarray(ids), sample.start_state)
                modes = [encoder.grammar.states[s].mode for s in states]
                assert "human" not in modes[:-1]
    assert {(None, "eos"), ("ai", "end_of_mode")} <= reasons
    assert len(seen_tags) >= 4, "the adversary must actually produce tags"


def test_a_document_prompt_in_ai_mode_continues_in_ai_mode(generator):
    doc = Document("d", (Segment("text", "Question?"), Segment("text", "Answer", mode="ai")))
    encoder = generator.encoder
    (sample, plain) = generator.generate([doc, "plain"], max_new_tokens=N, sampling=GREEDY)
    assert sample.start_state == encoder.grammar.initial_state("ai")
    assert plain.start_state == encoder.grammar.initial_state("human")
    if sample.ids[0] not in encoder.tag_ids.values():
        assert sample.segments[0].mode == "ai"
