"""The decode loop: prefill the prompts into a KV cache, then one jitted step per token.

`generate_tokens` is one `jax.jit` program: the prompts (left-padded to a common
length) go through `Transformer.decode` in one call, then a `lax.while_loop` runs the
step until every row has ended or the token budget is spent. Shapes are fixed by the
batch, the padded prompt length and the budget, so nothing recompiles per token, and
the grammar lives in the step (`metatrain.generate.constraints`), so no token makes a
round trip to the host.

The step is generic in its token policy (`chooser`): `GrammarChooser` in normal use; a
test or benchmark may pass another (fixed logits, no grammar) to drive the same loop.
"""

from __future__ import annotations

import functools
from typing import Any, Protocol

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from metatrain.generate.constraints import RowState, TagConstraints
from metatrain.models import KVCache, ModelConfig, Transformer, init_cache, logits

Params = Any


class Chooser(Protocol):
    """Picks each row's next token from the step's logits (hashable: a static argument)."""

    def __call__(
        self, logits: jax.Array, rows: RowState, key: jax.Array, constraints: TagConstraints
    ) -> tuple[jax.Array, RowState]:
        """logits [B, V] -> (tokens [B] int32, row states after them)."""
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
    cache: KVCache
    logits: jax.Array  # [B, V] float32, for the next token
    positions: jax.Array  # [B] int32, document position of the next token
    rows: RowState
    tokens: jax.Array  # [B, N]
    lengths: jax.Array  # [B]
    step: jax.Array  # scalar
    key: jax.Array


def _last_logits(hidden: jax.Array, params: Params, config: ModelConfig) -> jax.Array:
    """[B, T, D] -> [B, V] float32 logits of the last position."""
    return logits(hidden[:, -1:], params, config)[:, 0]


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
    """Continues every prompt by up to `max_new_tokens` tokens.

    Args:
        params: the model's (unboxed) parameters.
        prompts: [B, P] right-aligned prompt ids.
        rows: each row's state after its prompt (`RowState.start`).
        constraints: the grammar, mantra and lock on the device.
        key: PRNG key of the whole generation.
        model_config: the model's shape.
        max_new_tokens: N, the budget per row.
        chooser: the token policy, e.g. `GrammarChooser(sampling)`.

    Returns:
        The emitted tokens [B, N] and per-row lengths and states.
    """
    model = Transformer(model_config)
    batch, prompt_len = prompts.ids.shape
    cache = init_cache(model_config, batch, prompt_len + max_new_tokens)
    hidden, cache = model.apply(
        {"params": params}, prompts.ids, prompts.positions(), prompts.segment_ids(), cache,
        method=Transformer.decode,
    )
    state = _LoopState(
        cache=cache,
        logits=_last_logits(hidden, params, model_config),
        positions=prompts.lengths,
        rows=rows,
        tokens=jnp.full((batch, max_new_tokens), -1, jnp.int32),
        lengths=jnp.zeros((batch,), jnp.int32),
        step=jnp.zeros((), jnp.int32),
        key=key,
    )

    def running(s: _LoopState) -> jax.Array:
        return (s.step < max_new_tokens) & ~jnp.all(s.rows.done)

    def step(s: _LoopState) -> _LoopState:
        key, sub = jax.random.split(s.key)
        live = ~s.rows.done
        tokens, rows = chooser(s.logits, s.rows, sub, constraints)
        fed = jnp.where(live, tokens, 0)
        hidden, cache = model.apply(
            {"params": params}, fed[:, None], s.positions[:, None], live[:, None].astype(jnp.int32),
            s.cache, method=Transformer.decode,
        )
        return _LoopState(
            cache=cache,
            logits=_last_logits(hidden, params, model_config),
            positions=s.positions + 1,
            rows=rows,
            tokens=s.tokens.at[:, s.step].set(jnp.where(live, tokens, -1)),
            lengths=s.lengths + live.astype(jnp.int32),
            step=s.step + 1,
            key=key,
        )

    final = jax.lax.while_loop(running, step, state)
    return DecodeOutput(final.tokens, final.lengths, final.rows, final.step)
