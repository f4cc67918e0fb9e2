"""`RowSampling`: the engine's token policy when every row brings its own sampling settings.

The tag grammar first (illegal tags and control tokens masked, the mantra forced, the
lock's exit ending the row), exactly as `GrammarChooser` applies it, then each row
sampled with its own temperature and top-p from its own PRNG key. The settings are
arrays in the engine's slots, so rows with different settings share one compiled step.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from metatrain.engine.constraints import (
    RowState,
    TagConstraints,
    advance,
    forced_tokens,
    mask_illegal_tags,
)
from metatrain.engine.sampling import draw_categorical, filter_top_p, finite_scores


@flax.struct.dataclass
class RowSampling:
    """Per-row settings (a `Chooser` whose fields are arrays).

    Attributes:
        temperature: float32 [B] (0: greedy).
        top_p: float32 [B] nucleus mass in (0, 1].
    """

    temperature: jax.Array
    top_p: jax.Array

    def __call__(
        self, logits: jax.Array, rows: RowState, keys: jax.Array, constraints: TagConstraints
    ) -> tuple[jax.Array, RowState]:
        """logits [B, V], keys [B] -> (tokens [B] int32, rows after them)."""
        scores = mask_illegal_tags(finite_scores(logits), constraints, rows)
        greedy = jnp.argmax(scores, axis=-1).astype(jnp.int32)
        sampled = jax.lax.cond(jnp.any(self.temperature > 0), lambda: self._draw(scores, keys), lambda: greedy)
        forcing, mantra_token = forced_tokens(constraints, rows)
        tokens = jnp.where(forcing, mantra_token, jnp.where(self.temperature > 0, sampled, greedy))
        return tokens, advance(constraints, rows, tokens)

    def _draw(self, scores: jax.Array, keys: jax.Array) -> jax.Array:
        """One token per row with each row's own temperature and top-p ([B, V] -> [B])."""
        shifted = finite_scores(scores - jnp.max(scores, axis=-1, keepdims=True))
        scaled = jnp.where(jnp.isfinite(scores), shifted / jnp.maximum(self.temperature, 1e-30)[:, None], -jnp.inf)
        return draw_categorical(keys, filter_top_p(scaled, self.top_p))
