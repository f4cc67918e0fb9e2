"""The decode step, shared by everything that generates, and the jitted loop around it.

`prefill` puts prompts (left-padded to a common length) through `Transformer.decode`
in one call; `decode_step` then turns each row's logits into its next token (the token
policy, `Chooser`: the tag-grammar mask, mantra forcing and lock, then sampling), feeds
the live rows' tokens through the model with the cache and keeps the logits for the
next one. `metatrain generate` (`generate_tokens` here: one `jax.jit` program, a
`lax.while_loop` of steps until every row has ended or the token budget is spent) and
the serving engine (`metatrain.serve.engine`: a `lax.scan` of a few steps per call,
each row with its own sampling settings) run the same step. Shapes are fixed by the
batch, the padded prompt length and the cache length, so nothing recompiles per token,
and the grammar lives in the step (`metatrain.generate.constraints`), so no token makes
a round trip to the host.

The step is generic in its token policy (`chooser`): `GrammarChooser` in normal use; a
test or benchmark may pass another (fixed logits, no grammar) to drive the same loop.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Protocol

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from metatrain.generate.constraints import RowState, TagConstraints
from metatrain.generate.prompts import EncodedPrompt
from metatrain.models import KVCache, ModelConfig, Transformer, init_cache, logits

Params = Any
#: Prompts are padded to a multiple of this, so prompts of similar length share a compile.
PROMPT_BUCKET: int = 16


class Chooser(Protocol):
    """Picks each row's next token from the step's logits.

    A static argument of `generate_tokens` (hashable, e.g. `GrammarChooser`), or a pytree
    carried in the jitted state (the serving engine's per-row settings).
    """

    def __call__(
        self, logits: jax.Array, rows: RowState, key: jax.Array, constraints: TagConstraints
    ) -> tuple[jax.Array, RowState]:
        """logits [B, V], key (one, or [B]) -> (tokens [B] int32, row states after them)."""
        ...


@flax.struct.dataclass
class PromptBatch:
    """Prompts as one array, each right-aligned so that all end at the same slot.

    Attributes:
        ids: int32 [B, P], each prompt's ids at the end of its row, padding before.
        lengths: int32 [B], real tokens in each row (>= 1).
    """

    ids: jax.Array
    lengths: jax.Array

    @classmethod
    def left_padded(cls, prompts: list[np.ndarray], length: int) -> "PromptBatch":
        """Right-aligns `prompts` (1-D id arrays, none longer than `length`)."""
        ids = np.zeros((len(prompts), length), np.int32)
        for row, prompt in enumerate(prompts):
            ids[row, length - len(prompt):] = prompt
        return cls(jnp.asarray(ids), jnp.asarray([len(p) for p in prompts], jnp.int32))

    def segment_ids(self) -> jax.Array:
        """[B, P] int32: 1 on prompt tokens, 0 on padding."""
        pad = self.ids.shape[1] - self.lengths
        return (jnp.arange(self.ids.shape[1])[None, :] >= pad[:, None]).astype(jnp.int32)

    def positions(self) -> jax.Array:
        """[B, P] int32 position of each token in its document (padding: 0)."""
        pad = self.ids.shape[1] - self.lengths
        return jnp.maximum(jnp.arange(self.ids.shape[1])[None, :] - pad[:, None], 0)


def padded_length(longest: int) -> int:
    """P, the prompt length a batch whose longest prompt has `longest` tokens is padded to."""
    return -(-longest // PROMPT_BUCKET) * PROMPT_BUCKET


def batch_prompts(prompts: Sequence[EncodedPrompt], mantra_length: int) -> tuple[PromptBatch, RowState]:
    """Encoded prompts as one batch, padded to a multiple of `PROMPT_BUCKET` (so similar
    lengths share a compile), and each row's grammar state after its prompt.

    Args:
        prompts: B encoded prompts (`metatrain.generate.prompts.encode_prompt`).
        mantra_length: M of the constraints the rows will be decoded under.

    Returns:
        `(ids [B, P] right-aligned, P a multiple of PROMPT_BUCKET; row states [B])`.
    """
    length = padded_length(max(len(p.ids) for p in prompts))
    return (
        PromptBatch.left_padded([p.ids for p in prompts], length),
        RowState.start(np.array([p.state for p in prompts]), np.array([p.blocks for p in prompts]), mantra_length),
    )


@flax.struct.dataclass
class DecodeState:
    """Where a batch stands between two decode steps.

    Attributes:
        cache: the KV cache of every token fed so far.
        logits: float32 [B, V], each row's logits for its next token.
        positions: int32 [B], document position of each row's next token.
        rows: each row's grammar state (`done`: it has ended).
        key: the PRNG key of the next step: one for the batch (a scalar key array), or
            one per row ([B], for a token policy that draws each row with its own).
    """

    cache: KVCache
    logits: jax.Array
    positions: jax.Array
    rows: RowState
    key: jax.Array


def _last_logits(hidden: jax.Array, params: Params, config: ModelConfig) -> jax.Array:
    """[B, T, D] -> [B, V] float32 logits of the last position."""
    return logits(hidden[:, -1:], params, config)[:, 0]


def _split(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(key for later steps, key for this one) of one key, or of each of [B] keys."""
    if key.ndim == 0:
        later, now = jax.random.split(key)
        return later, now
    pairs = jax.vmap(jax.random.split)(key)  # [B, 2]
    return pairs[:, 0], pairs[:, 1]


def prefill(
    params: Params, prompts: PromptBatch, rows: RowState, key: jax.Array, *, model_config: ModelConfig,
    cache_length: int,
) -> DecodeState:
    """The prompts [B, P] through the model into a fresh cache of `cache_length` slots
    (>= P + the tokens that will be decoded), ready for the first `decode_step`.

    Args:
        params: the model's (unboxed) parameters.
        prompts: [B, P] right-aligned prompt ids.
        rows: each row's state after its prompt (`RowState.start`).
        key: one PRNG key, or [B] keys (one per row).
        model_config: the model's shape.
        cache_length: S, slots of the cache.

    Returns:
        The batch before its first step: the cache [B, S] holding the prompts, each
        row's logits [B, V] for its first token, positions [B] = the prompt lengths.
    """
    cache = init_cache(model_config, prompts.ids.shape[0], cache_length)
    hidden, cache = Transformer(model_config).apply(
        {"params": params}, prompts.ids, prompts.positions(), prompts.segment_ids(), cache,
        method=Transformer.decode,
    )
    return DecodeState(cache, _last_logits(hidden, params, model_config), prompts.lengths, rows, key)


def decode_step(
    params: Params, state: DecodeState, constraints: TagConstraints, chooser: Chooser, *,
    model_config: ModelConfig,
) -> tuple[DecodeState, jax.Array, jax.Array]:
    """One token for every live row: the policy picks it, the model reads it.

    A row is live until it has ended (`rows.done`: EOS, the lock's exit, or whatever
    the caller ended it for) and while its next position is inside the model's context;
    a row that reaches the end of the context ends there. `chooser` turns the logits into
    tokens (for `GrammarChooser`: illegal tags masked, the mantra forced, the lock's
    exit ending the row, then sampling) and the row states after them; the live rows'
    tokens go through the model with the cache (the others as padding), and the logits
    of the next token are kept.

    Args:
        params: the model's (unboxed) parameters.
        state: the batch after the previous step (or `prefill`).
        constraints: the grammar, mantra and lock on the device.
        chooser: the token policy (a static object, or a pytree of per-row settings).
        model_config: the model's shape.

    Returns:
        `(state after the step, tokens [B] int32 (-1 for rows that were not live),
        live [B] bool: the rows that emitted a token)`.
    """
    key, sub = _split(state.key)
    live = ~state.rows.done & (state.positions < model_config.max_seq_len)
    tokens, rows = chooser(state.logits, state.rows, sub, constraints)
    rows = rows.replace(done=rows.done | ~live)
    fed = jnp.where(live, tokens, 0)
    hidden, cache = Transformer(model_config).apply(
        {"params": params}, fed[:, None], state.positions[:, None], live[:, None].astype(jnp.int32),
        state.cache, method=Transformer.decode,
    )
    after = DecodeState(cache, _last_logits(hidden, params, model_config), state.positions + 1, rows, key)
    return after, jnp.where(live, tokens, -1), live


@flax.struct.dataclass
class DecodeOutput:
    """What the loop produced.

    Attributes:
        tokens: int32 [B, N], each row's emitted ids, -1 after its end.
        lengths: int32 [B], tokens each row emitted.
        rows: the final row states (`done` False: the budget ran out).
        steps: int32 scalar, steps the loop ran (<= N).
    """

    tokens: jax.Array
    lengths: jax.Array
    rows: RowState
    steps: jax.Array


@flax.struct.dataclass
class _LoopState:
    decode: DecodeState
    tokens: jax.Array  # [B, N]
    lengths: jax.Array  # [B]
    step: jax.Array  # scalar


@functools.partial(jax.jit, static_argnames=("model_config", "max_new_tokens", "chooser"))
def generate_tokens(
    params: Params,
    prompts: PromptBatch,
    rows: RowState,
    constraints: TagConstraints,
    key: jax.Array,
    *,
    model_config: ModelConfig,
    max_new_tokens: int,
    chooser: Chooser,
) -> DecodeOutput:
    """Continues every prompt by up to `max_new_tokens` tokens (`prefill`, then
    `decode_step` until every row has ended or the budget is spent).

    Args:
        params: the model's (unboxed) parameters.
        prompts: [B, P] right-aligned prompt ids.
        rows: each row's state after its prompt (`RowState.start`).
        constraints: the grammar, mantra and lock on the device.
        key: PRNG key of the whole generation.
        model_config: the model's shape.
        max_new_tokens: N, the budget per row (prompt + N must fit `max_seq_len`).
        chooser: the token policy, e.g. `GrammarChooser(sampling)`.

    Returns:
        The emitted tokens [B, N] and per-row lengths and states.
    """
    batch, prompt_len = prompts.ids.shape
    state = _LoopState(
        decode=prefill(params, prompts, rows, key, model_config=model_config,
                       cache_length=prompt_len + max_new_tokens),
        tokens=jnp.full((batch, max_new_tokens), -1, jnp.int32),
        lengths=jnp.zeros((batch,), jnp.int32),
        step=jnp.zeros((), jnp.int32),
    )

    def running(s: _LoopState) -> jax.Array:
        return (s.step < max_new_tokens) & ~jnp.all(s.decode.rows.done)

    def step(s: _LoopState) -> _LoopState:
        decode, tokens, live = decode_step(params, s.decode, constraints, chooser, model_config=model_config)
        return _LoopState(
            decode=decode,
            tokens=s.tokens.at[:, s.step].set(tokens),
            lengths=s.lengths + live.astype(jnp.int32),
            step=s.step + 1,
        )

    final = jax.lax.while_loop(running, step, state)
    return DecodeOutput(final.tokens, final.lengths, final.decode.rows, final.step)
