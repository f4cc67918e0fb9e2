"""Turning one step's logits into tokens: temperature, top-k, top-p, greedy.

Pure functions of arrays, jitted inside the decode loop. Whatever the logits hold (NaN,
infinities, huge values), a token that `allowed` forbids is never returned: scores are
made finite first, forbidden tokens then get -inf, and every filter keeps the best
allowed token. The grammar decides `allowed` (`metatrain.engine.constraints`); this
module knows nothing about tags.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from metatrain.errors import UserError

#: Below this a temperature's reciprocal overflows float32.
_FLOAT32_TINY: float = float(jnp.finfo(jnp.float32).tiny)

#: The largest seed: `jax.random.key` keeps only a seed's low 32 bits (2**32 + 5 would
#: draw what 5 draws), and a larger one does not even convert.
MAX_SEED: int = 2**32 - 1


def check_seed(seed: int, flag: str = "--seed") -> int:
    """`seed` if the PRNG takes it as it is (0 <= seed <= `MAX_SEED`).

    Raises:
        UserError: out of that range, naming `flag`.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        shown = seed if len(str(seed)) <= 40 else f"{str(seed)[:37]}..."
        raise UserError(f"{flag} must be an integer from 0 to {MAX_SEED} (the PRNG's 32 bits), got {shown}; "
                        "choose a seed in that range")
    return seed


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How a token is drawn from the allowed ones.

    Attributes:
        temperature: divides the logits; 0 means greedy (the most likely allowed token).
        top_k: keep only the k most likely tokens (0: no limit).
        top_p: keep the smallest set of most likely tokens whose probability reaches
            `top_p` (nucleus sampling; 1: no limit).
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not (self.temperature == 0 or _FLOAT32_TINY <= self.temperature < math.inf):
            raise UserError(
                f"temperature must be 0 (greedy) or a finite number from {_FLOAT32_TINY:.4g} (float32's "
                f"smallest normal: below it the scaled logits overflow), got {self.temperature}"
            )
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise UserError(f"top-k must be an integer >= 0 (0 = no limit), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top-p must be in (0, 1] (1 = no limit), got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def finite_scores(logits: jax.Array) -> jax.Array:
    """Float32 logits with NaN and -inf set to the lowest finite value, +inf to the highest.

    Afterwards -inf means exactly one thing: forbidden.
    """
    info = jnp.finfo(jnp.float32)
    return jnp.nan_to_num(logits.astype(jnp.float32), nan=info.min, posinf=info.max, neginf=info.min)


def filter_top_p(scores: jax.Array, p: float | jax.Array) -> jax.Array:
    """Keeps the most likely tokens until their probability reaches `p` ([B, V] -> [B, V]);
    `p` is one number, or one per row ([B], as the serving engine's rows each have theirs).

    The kept set is every token at least as likely as the threshold `t`, the largest
    probability with `P(prob >= t) >= p`: the smallest set of most likely tokens whose
    mass reaches `p`, ties with its least likely member included, and never empty.
    `t` is found by bisection on the bits of the probabilities (non-negative floats
    order like their int32 bits), 32 exact halvings of O(V) each: a full sort of the
    vocabulary costs several times a small model's decode step on a CPU.
    """
    if not isinstance(p, jax.Array | np.ndarray) and p >= 1.0:
        return scores
    per_row = isinstance(p, jax.Array | np.ndarray)
    if per_row:
        p = jnp.asarray(p, jnp.float32)[:, None]
    probs = jax.nn.softmax(scores, axis=-1)  # [B, V]
    bits = jax.lax.bitcast_convert_type(probs, jnp.int32)
    low = jnp.zeros(probs.shape[:-1] + (1,), jnp.int32)  # mass at or above: >= p (or keep all)
    high = jnp.max(bits, axis=-1, keepdims=True) + 1  # mass at or above: 0 < p

    def halve(_, bounds):
        low, high = bounds
        mid = low + (high - low) // 2
        enough = jnp.sum(jnp.where(bits >= mid, probs, 0.0), axis=-1, keepdims=True) >= p
        return jnp.where(enough, mid, low), jnp.where(enough, high, mid)

    low, _ = jax.lax.fori_loop(0, 32, halve, (low, high))
    kept = jnp.where(bits >= low, scores, -jnp.inf)
    return jnp.where(p >= 1.0, scores, kept) if per_row else kept


def draw_categorical(key: jax.Array, scores: jax.Array) -> jax.Array:
    """One index per row with probability softmax(scores) ([B, V] -> [B] int32), from one
    key for the batch or one key per row ([B]).

    Inverse-CDF sampling: one uniform number per row against the cumulative sum, which
    costs a few passes over V where Gumbel-max (`jax.random.categorical`) draws V
    random numbers. A token of probability 0 (score -inf) is never returned: its CDF
    step is empty.
    """
    cdf = jnp.cumsum(jax.nn.softmax(scores, axis=-1), axis=-1)
    tiny = jnp.finfo(jnp.float32).tiny
    if key.ndim == 1:  # one key per row: each row's draw is its own, whatever its neighbours
        u = jax.vmap(lambda k: jax.random.uniform(k, (1,), jnp.float32, tiny, 1.0))(key)
    else:
        u = jax.random.uniform(key, cdf.shape[:-1] + (1,), jnp.float32, tiny, 1.0)
    u = u * cdf[..., -1:]
    index = jnp.sum(cdf < u, axis=-1)
    return jnp.minimum(index, scores.shape[-1] - 1).astype(jnp.int32)


def scaled_scores(logits: jax.Array, config: SamplingConfig) -> jax.Array:
    """Finite float32 logits divided by the temperature (unscaled when greedy): [B, V].

    Forbidden tokens are set to -inf after this, by the caller.
    """
    scores = finite_scores(logits)
    if config.greedy:
        return scores
    # Shifted so the best is 0 first (softmax is unchanged): a small temperature then sends
    # the others towards -inf instead of overflowing the best ones to one tied maximum.
    shifted = finite_scores(scores - jnp.max(scores, axis=-1, keepdims=True))
    return finite_scores(shifted * jnp.float32(1.0 / config.temperature))


def pick_tokens(scores: jax.Array, key: jax.Array, config: SamplingConfig) -> jax.Array:
    """One token per row from scores where -inf means forbidden ([B, V] -> [B] int32).

    Greedy: the argmax. Otherwise top-k (exactly k candidates, ties broken towards the
    lower id), then top-p over the candidates, then an inverse-CDF draw. Every other
    score must be finite (`scaled_scores`), and at least one per row.
    """
    if config.greedy:
        return jnp.argmax(scores, axis=-1).astype(jnp.int32)
    if 0 < config.top_k < scores.shape[-1]:
        # The k best as candidates [B, k]: top-p then works on k values, not V.
        scores, candidate_ids = jax.lax.top_k(scores, config.top_k)
    else:
        candidate_ids = None
    choice = draw_categorical(key, filter_top_p(scores, config.top_p))
    if candidate_ids is not None:
        choice = jnp.take_along_axis(candidate_ids, choice[:, None], axis=-1)[:, 0]
    return choice.astype(jnp.int32)


def sample_tokens(
    logits: jax.Array, allowed: jax.Array, key: jax.Array, config: SamplingConfig
) -> jax.Array:
    """One token per row, drawn from the allowed tokens.

    Order: temperature, then the `allowed` mask, then top-k, top-p and the draw
    (`pick_tokens`). At least one token of every row must be allowed.

    Args:
        logits: [B, V] raw logits (any values, NaN and infinities included).
        allowed: [B, V] bool, False for tokens that must never be drawn.
        key: PRNG key (unused when greedy).
        config: temperature, top-k, top-p.

    Returns:
        [B] int32 token ids, each allowed in its row.
    """
    return pick_tokens(jnp.where(allowed, scaled_scores(logits, config), -jnp.inf), key, config)
