"""Free generation: has a trained model learnt the tag grammar and the mantra on its own?

`metatrain generate` samples under the grammar: illegal tags are masked out of the
logits, the mantra is forced after `<thinking>`, and the AI lock ends a row at `</AI>`.
That guarantees well-formed output and hides what the model itself learnt. Here the
model also samples *free* (`FreeChooser`: no mask, no forcing, no lock), and both kinds
of samples are counted by the same code (`count_generation`); the masked run is the
reference, which must come out at 0 illegal transitions, mantra 1.0 and 0 leaving AI.

Definitions (`count_generation`), over generated id sequences, each continuing from
the grammar state its prompt left. An AI-mode sample starts after the lock's `<AI>`,
which the caller leaves out of the sequence: it was put there, not generated.

  * tokens: every id of a sequence up to and including its first EOS (text, tags,
    EOS, and the forced mantra ids of masked runs); ids after an EOS are not counted.
  * illegal transition: a token that `encoder.bound_grammar.allowed_tokens` forbids
    in the current state: a tag the grammar does not allow there, or EOS where a
    document may not end. The state then stays as it was; a legal tag moves along
    the transition table; other tokens keep it. EOS ends the sequence, legal or not.
  * thinking blocks: each legal `<thinking>`, numbered per document after the blocks
    the prompt already opened. Only blocks that `block_gets_mantra(policy, index)`
    gives the mantra are counted. A counted block reproduces the mantra when the M =
    len(`encoder.mantra_ids`) ids after its `<thinking>` are exactly the mantra; any
    other id in those places (`</thinking>`, EOS, any tag or text) is a miss. A block
    whose sequence ends within those M places while every id it has so far agrees
    with the mantra is undecided (a budget cut, not the model's error) and left out.
    A block cut off after it already deviated is a miss.
  * leaving AI mode: an AI sample leaves when it generates any token other than EOS
    while its grammar state is in the base mode (human, thinking or not): it closed
    AI mode and went on writing. `</AI>` as the last token, or `</AI>` then EOS, is how
    an AI-mode document ends in training (the encoder closes modes before EOS) and is
    not leaving. Under the lock `</AI>` ends the row, so masked samples never leave.

Perplexity-style evaluation (per-role loss, bits per byte) lives elsewhere; this module
only samples and counts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from metatrain.engine.constraints import RowState, TagConstraints
from metatrain.engine.sampling import SamplingConfig, pick_tokens, scaled_scores
from metatrain.errors import UserError
from metatrain.generate.generator import Generator
from metatrain.generate.prompts import EncodedPrompt, encode_prompt
from metatrain.models import ModelConfig
from metatrain.tokenizer.encoder import Encoder
from metatrain.tokenizer.mantra import block_gets_mantra

#: The mode the AI-mode samples are locked into (as `metatrain generate --mode ai`).
AI_MODE = "ai"


def free_advance(constraints: TagConstraints, rows: RowState, tokens: jax.Array) -> RowState:
    """Row states after `tokens` ([B] int32) when nothing was masked; done rows stay.

    A legal tag moves along the transition table, an illegal one leaves the state as it
    was (never -1, which would poison every later gather); other tokens keep it. Only
    EOS ends a row: a free sample may leave AI mode and keep writing, which is what is
    being measured. No mantra is forced, so `mantra_pos` stays where `RowState.start`
    put it (not forcing).
    """
    tag = constraints.token_to_tag[tokens]
    moved = constraints.transitions[rows.grammar_state, jnp.maximum(tag, 0)]
    legal_tag = (tag >= 0) & (moved >= 0)
    opens = legal_tag & (tokens == constraints.thinking_open)
    new = RowState(
        grammar_state=jnp.where(legal_tag, moved, rows.grammar_state),
        mantra_pos=rows.mantra_pos,
        blocks=rows.blocks + opens.astype(jnp.int32),
        done=tokens == constraints.eos_id,
    )
    return jax.tree.map(lambda old, nxt: jnp.where(rows.done, old, nxt), rows, new)


@dataclasses.dataclass(frozen=True)
class FreeChooser:
    """Samples each row's next token from the model alone: no tag mask, no mantra, no lock.

    Implements `metatrain.engine.step.Chooser`; frozen and hashable, so it is a
    static token policy of the engine (`metatrain.engine.Engine`). The constraints are only read for the grammar
    arrays (state tracking); their `ends` (the lock) are ignored.
    """

    sampling: SamplingConfig = SamplingConfig()

    def __call__(
        self, logits: jax.Array, rows: RowState, key: jax.Array, constraints: TagConstraints
    ) -> tuple[jax.Array, RowState]:
        """logits [B, V] -> (tokens [B] int32, rows after them)."""
        tokens = pick_tokens(scaled_scores(logits, self.sampling), key, self.sampling)
        return tokens, free_advance(constraints, rows, tokens)


@dataclasses.dataclass(frozen=True)
class GenerationStats:
    """Grammar and mantra counts over a set of samples (definitions: module docstring).

    Attributes:
        tokens: generated tokens counted.
        illegal_transitions: tokens the grammar forbids where they stand.
        thinking_blocks: blocks that get the mantra and were decided (not cut off).
        mantra_matches: of those, blocks opening with exactly the mantra.
        ai_samples: AI-mode samples.
        ai_left: AI-mode samples that left AI mode.
    """

    tokens: int
    illegal_transitions: int
    thinking_blocks: int
    mantra_matches: int
    ai_samples: int
    ai_left: int

    @property
    def illegal_per_1000_tokens(self) -> float | None:
        return 1000.0 * self.illegal_transitions / self.tokens if self.tokens else None

    @property
    def mantra_exact(self) -> float | None:
        """Fraction of counted blocks that reproduce the mantra; None without any."""
        return self.mantra_matches / self.thinking_blocks if self.thinking_blocks else None

    @property
    def ai_left_fraction(self) -> float | None:
        return self.ai_left / self.ai_samples if self.ai_samples else None

    def to_json(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "illegal_transitions": self.illegal_transitions,
            "illegal_per_1000_tokens": self.illegal_per_1000_tokens,
            "thinking_blocks": self.thinking_blocks,
            "mantra_exact": self.mantra_exact,
            "ai_samples": self.ai_samples,
            "ai_left": self.ai_left,
            "ai_left_fraction": self.ai_left_fraction,
        }


def _mantra_verdict(following: Sequence[int], mantra: Sequence[int]) -> bool | None:
    """Whether the ids after a `<thinking>` open with `mantra`; None: cut off, undecided."""
    head = list(following[: len(mantra)])
    if head == list(mantra):
        return True
    if len(head) < len(mantra) and head == list(mantra[: len(head)]):
        return None
    return False


def count_generation(
    encoder: Encoder,
    sequences: Sequence[Sequence[int]],
    start_states: Sequence[int],
    *,
    ai_samples: Sequence[bool],
    start_blocks: Sequence[int] | None = None,
) -> GenerationStats:
    """Counts illegal transitions, mantra reproductions and AI-mode exits (host side).

    Args:
        encoder: tokenizer, grammar, mantra and mantra policy of the model.
        sequences: generated ids per sample, without the lock's `<AI>` prefix.
        start_states: grammar state each sequence continues from (after the prefix).
        ai_samples: which samples were started in AI mode.
        start_blocks: thinking blocks each prompt already opened (default 0), for the
            `first` mantra policy.

    Returns:
        The counts summed over all samples.

    Raises:
        ValueError: the arguments differ in length, or an id is outside the vocabulary.
    """
    blocks_before = [0] * len(sequences) if start_blocks is None else list(start_blocks)
    if not len(sequences) == len(start_states) == len(ai_samples) == len(blocks_before):
        raise ValueError(f"{len(sequences)} sequences need as many start states, ai flags and "
                         f"start blocks, got {len(start_states)}, {len(ai_samples)}, {len(blocks_before)}")
    bound, grammar = encoder.bound_grammar, encoder.grammar
    base = [s.mode == grammar.base_mode for s in grammar.states]
    opening = encoder.tag_ids[grammar.registry.thinking_open]
    mantra = encoder.mantra_ids.tolist() if encoder.mantra else []
    tokens = illegal = blocks = matches = left = 0
    for sample, (seq, state, block, ai) in enumerate(zip(sequences, start_states, blocks_before, ai_samples)):
        ids = [int(t) for t in seq]
        if any(not 0 <= t < encoder.vocab_size for t in ids):
            raise ValueError(f"sample {sample}: ids must lie in [0, {encoder.vocab_size}), got {ids}")
        state, opened, sample_left = int(state), [], False
        for i, token in enumerate(ids):
            sample_left |= bool(ai) and base[state] and token != encoder.eos_id
            if not bound.allowed_tokens[state, token]:
                illegal += 1
            else:
                if token == opening:
                    opened.append((i, block))
                    block += 1
                state = int(bound.next_states(np.int32(state), np.int32(token)))
            if token == encoder.eos_id:
                ids = ids[: i + 1]
                break
        tokens += len(ids)
        left += sample_left
        for i, index in opened:
            if not (mantra and block_gets_mantra(encoder.mantra_policy, index)):
                continue
            verdict = _mantra_verdict(ids[i + 1:], mantra)
            blocks += verdict is not None
            matches += verdict is True
    return GenerationStats(tokens, illegal, blocks, matches, sum(bool(a) for a in ai_samples), left)


def _capped_budget(model_config: ModelConfig, prompts: Sequence[EncodedPrompt], max_new_tokens: int) -> int:
    """`max_new_tokens`, cut to what the model's max_seq_len leaves after the longest prompt."""
    if max_new_tokens < 1:
        raise UserError(f"max-new-tokens must be >= 1, got {max_new_tokens}")
    longest = max(len(p.ids) for p in prompts)
    room = model_config.max_seq_len - longest
    if room < 1:
        raise UserError(f"a prompt has {longest} tokens (the AI-mode `<AI>` included) and the model's "
                        f"max_seq_len is {model_config.max_seq_len}: shorten it to at most "
                        f"{model_config.max_seq_len - 1} tokens")
    return min(max_new_tokens, room)


def check_generation_fits(generator: Generator, *, prompts: int, samples: int, prompt_tokens: int,
                          max_new_tokens: int) -> None:
    """Refuses free generation whose `prompts` x `samples` rows one decode batch cannot
    hold on the parameters' device (`metatrain.engine.capacity`), before any work.

    Args:
        generator: the model.
        prompts, samples: `--prompts` and `--samples`.
        prompt_tokens: text tokens of a prompt, at most (the AI lock's tags come on top).
        max_new_tokens: `--max-new-tokens` (cut, as `run_free_generation` cuts it).

    Raises:
        UserError: naming both flags, the memory, and the most samples that fit.
    """
    longest = prompt_tokens + len(encode_prompt(generator.encoder, "", AI_MODE).ids)
    budget = max(1, min(max_new_tokens, generator.model_config.max_seq_len - longest))
    memory = generator.decode_memory(longest, budget)
    too_many = memory.shortfall(prompts * samples)
    if too_many:
        fits = memory.rows_that_fit or 0
        fix = (f"lower --samples to at most {fits // prompts}" if fits >= prompts else
               f"lower --prompts and --samples to a product of at most {fits}")
        raise UserError(f"--prompts {prompts} x --samples {samples} (free generation): {too_many}; {fix}, "
                        "or leave generation out with --no-generation")


def _free_samples(generator: Generator, prompts: Sequence[EncodedPrompt], num_samples: int,
                  budget: int, sampling: SamplingConfig, seed: int) -> list[list[int]]:
    """Generated ids per row (prompt-major, as `Generator.generate`), sampled by `FreeChooser`.

    `Generator.generate` cannot do this: it decodes segments, which rejects illegal tags.
    The constraints carry no lock, so nothing but EOS or the budget ends a row.
    """
    rows = [p for p in prompts for _ in range(num_samples)]
    tokens, lengths, _ = generator.decode_rows(rows, TagConstraints.from_encoder(generator.encoder),
                                               max_new_tokens=budget, chooser=FreeChooser(sampling), seed=seed)
    return [tokens[row, : lengths[row]].tolist() for row in range(len(rows))]


def run_free_generation(
    params: Any,
    model_config: ModelConfig,
    encoder: Encoder,
    prompts: Sequence[str],
    *,
    num_samples: int = 4,
    max_new_tokens: int = 64,
    sampling: SamplingConfig = SamplingConfig(),
    seed: int = 0,
    mesh: Any = None,
) -> dict[str, Any]:
    """Samples every prompt free and masked, in human and AI mode, and counts both.

    "masked" is `Generator.generate` itself (grammar mask, mantra forcing, the AI lock);
    "free" is the same batches and seed through the engine with `FreeChooser`.
    AI mode appends `<AI>` to the prompt (the lock's prefix) in both settings.

    Args:
        params: the model's unboxed parameters.
        model_config: its shape.
        encoder: tokenizer, grammar and mantra (policy) it was trained with.
        prompts: plain texts (human-mode text).
        num_samples: samples per prompt and mode.
        max_new_tokens: budget per sample, cut to the room max_seq_len leaves.
        sampling: temperature, top-k, top-p (the same in both settings).
        seed: PRNG seed of every generation call.
        mesh: the mesh `params` are on (None: one device).

    Returns:
        {"prompts", "samples_per_prompt", "max_new_tokens" (after the cut),
        "temperature", "free": `GenerationStats.to_json()`, "masked": the same}.

    Raises:
        UserError: no prompt, num_samples < 1, or no room left to generate.
    """
    if not prompts:
        raise UserError("give at least one prompt")
    if num_samples < 1:
        raise UserError(f"num-samples must be >= 1, got {num_samples}")
    generator = Generator(params, model_config, encoder, mesh)
    encoded = {lock: [encode_prompt(encoder, p, lock) for p in prompts] for lock in (None, AI_MODE)}
    budget = _capped_budget(model_config, [p for rows in encoded.values() for p in rows], max_new_tokens)
    report: dict[str, Any] = {"prompts": len(prompts), "samples_per_prompt": num_samples,
                              "max_new_tokens": budget, "temperature": sampling.temperature}
    for setting in ("free", "masked"):
        sequences, starts, blocks, ai = [], [], [], []
        for lock, rows in encoded.items():
            if setting == "free":
                generated = _free_samples(generator, rows, num_samples, budget, sampling, seed)
            else:
                samples = generator.generate(list(prompts), lock_mode=lock, num_samples=num_samples,
                                             max_new_tokens=budget, sampling=sampling, seed=seed)
                # Sample.ids start with the lock's `<AI>`: placed, not generated.
                generated = [list(s.ids[len(rows[s.prompt_index].prefix):]) for s in samples]
            for row, ids in enumerate(generated):
                prompt = rows[row // num_samples]
                sequences.append(ids)
                starts.append(prompt.state)
                blocks.append(prompt.blocks)
                ai.append(lock is not None)
        report[setting] = count_generation(encoder, sequences, starts, ai_samples=ai, start_blocks=blocks).to_json()
    return report
