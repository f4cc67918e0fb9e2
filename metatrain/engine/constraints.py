"""The tag grammar inside the decode loop: masking, state tracking, mantra forcing, the lock.

Every row of a batch carries a `RowState`: its grammar state (an int of
`metatrain.tokenizer.grammar.Grammar`), how far into a forced mantra it is, how many
thinking blocks it has opened and whether it is finished. `TagConstraints` holds the
grammar's arrays (from `BoundGrammar`, the same object the encoder validates with) on
the device, so choosing a token is a gather and a few selects inside the jitted step:

  * `mask_illegal_tags`: -inf on every token `BoundGrammar.allowed_tokens` forbids in
    each row's state. Ordinary tokens are allowed in every state, so only the columns
    that some state forbids (tags, EOS) are stored and gathered: [B, C], C ~ 10;
  * `advance`: the grammar's transition table applied to the emitted token; after
    `<thinking>` the mantra (under the run's mantra policy) is forced token by token;
  * the AI-mode lock: `ends` marks the states that finish a row (the base mode, reached
    by `</AI>`), so a locked row never produces base-mode text;
  * control tokens (`<|good|>`, `<|bad|>`) are never generated: they condition a reply
    (placed in the prompt, `--control`), and a sample that could emit them would choose
    its own conditioning (`BoundGrammar.generation_allowed`).

Sampling itself (temperature, top-k, top-p) lives in `metatrain.engine.sampling`.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from metatrain.engine.sampling import SamplingConfig, pick_tokens, scaled_scores
from metatrain.errors import UserError
from metatrain.tokenizer.encoder import Encoder
from metatrain.tokenizer.mantra import block_gets_mantra

#: Block indices told apart by the mantra policies (`every`, `first`, `none`): the first
#: block, and every later one alike. `mantra_table` is indexed with the blocks opened so
#: far, clipped to its last entry.
_POLICY_BLOCKS = 2


@flax.struct.dataclass
class TagConstraints:
    """The grammar, the mantra and the lock as device arrays.

    Attributes:
        masked_ids: int32 [C], the tokens some state forbids (tags, EOS).
        masked_allowed: bool [num_states, C], `BoundGrammar.allowed_tokens` at those
            columns, with every control token forbidden (every other column is True in
            every state).
        token_to_tag: int32 [V], tag index of each token, -1 for ordinary tokens.
        transitions: int32 [num_states, num_tags], `Grammar.transition_table()`.
        ends: bool [num_states], states that finish a row (the lock's exit; all False
            without a lock).
        mantra: int32 [max(M, 1)], the mantra's token ids (M = `mantra_length`).
        mantra_table: bool [2], whether block 0, and each later block, gets the mantra.
        thinking_open: int32 scalar, the `<thinking>` token.
        eos_id: int32 scalar.
        mantra_length: M, static.
    """

    masked_ids: jax.Array
    masked_allowed: jax.Array
    token_to_tag: jax.Array
    transitions: jax.Array
    ends: jax.Array
    mantra: jax.Array
    mantra_table: jax.Array
    thinking_open: jax.Array
    eos_id: jax.Array
    mantra_length: int = flax.struct.field(pytree_node=False, default=0)

    @classmethod
    def from_encoder(cls, encoder: Encoder, *, lock_mode: str | None = None) -> "TagConstraints":
        """The constraints of `encoder`'s grammar, mantra and mantra policy.

        Args:
            encoder: tokenizer, grammar and mantra the model was trained with.
            lock_mode: lock generation into this mode (e.g. "ai"): a row ends when the
                grammar returns to the base mode. `THINKING_LOCK`: a row is one thinking
                block and ends at `</thinking>`. None: no lock.

        Raises:
            UserError: `lock_mode` is not a mode of the grammar, or is its base mode.
        """
        bound = encoder.bound_grammar
        grammar = bound.grammar
        ends = np.zeros((grammar.num_states,), bool)
        if lock_mode == THINKING_LOCK:  # one thinking block: the row ends at its </thinking>
            ends = np.array([not s.thinking for s in grammar.states])
        elif lock_mode is not None:
            check_lock_mode(encoder, lock_mode)
            ends = np.array([s.mode == grammar.base_mode for s in grammar.states])
        mantra = np.asarray(encoder.mantra_ids if encoder.mantra else [], np.int32)
        table = [block_gets_mantra(encoder.mantra_policy, i) for i in range(_POLICY_BLOCKS)]
        allowed = bound.generation_allowed()  # less the control tokens
        masked = np.flatnonzero(~allowed.all(axis=0)).astype(np.int32)
        return cls(
            masked_ids=jnp.asarray(masked),
            masked_allowed=jnp.asarray(allowed[:, masked]),
            token_to_tag=jnp.asarray(bound.token_to_tag),
            transitions=jnp.asarray(grammar.transition_table()),
            ends=jnp.asarray(ends),
            mantra=jnp.asarray(mantra if len(mantra) else np.zeros((1,), np.int32)),
            mantra_table=jnp.asarray(table),
            thinking_open=jnp.asarray(encoder.tag_ids[grammar.registry.thinking_open], jnp.int32),
            eos_id=jnp.asarray(encoder.eos_id, jnp.int32),
            mantra_length=len(mantra),
        )


#: The lock that writes one thinking block: generation starts after `<thinking>` (and the
#: mantra, when the policy gives this block one) and ends at `</thinking>`. This is how a
#: trained model annotates a corpus (`metatrain annotate --generator metatrain`).
THINKING_LOCK = "thinking"


def check_lock_mode(encoder: Encoder, mode: str) -> None:
    """Raises `UserError` unless generation can be locked into `mode` (a mode of the
    grammar other than its base mode, or `THINKING_LOCK`)."""
    if mode == THINKING_LOCK:
        return
    grammar = encoder.grammar
    if mode not in grammar.modes:
        raise UserError(f"cannot lock generation into mode {mode!r}: the tag registry "
                        f"{grammar.registry.source} has the modes {', '.join(grammar.modes)}")
    if mode == grammar.base_mode:
        raise UserError(f"mode {mode!r} is the base mode: there is nothing to lock (leave out the lock)")


@flax.struct.dataclass
class RowState:
    """Where each row of a batch stands in the grammar.

    Attributes:
        grammar_state: int32 [B], state of `Grammar.states` after the last token.
        mantra_pos: int32 [B], index of the next mantra token to force; `mantra_length`
            when no mantra is being forced.
        blocks: int32 [B], thinking blocks opened so far in the document.
        done: bool [B], the row has ended (EOS, or the lock's exit tag).
    """

    grammar_state: jax.Array
    mantra_pos: jax.Array
    blocks: jax.Array
    done: jax.Array

    @classmethod
    def start(cls, grammar_states: np.ndarray, blocks: np.ndarray, mantra_length: int) -> "RowState":
        """Rows that continue after prompts ending in `grammar_states` ([B] each)."""
        grammar_states = jnp.asarray(grammar_states, jnp.int32)
        return cls(
            grammar_state=grammar_states,
            mantra_pos=jnp.full_like(grammar_states, mantra_length),
            blocks=jnp.asarray(blocks, jnp.int32),
            done=jnp.zeros(grammar_states.shape, bool),
        )


def mask_illegal_tags(scores: jax.Array, constraints: TagConstraints, rows: RowState) -> jax.Array:
    """Scores [B, V] with -inf on every token the grammar forbids in each row's state.

    Ordinary tokens are never touched; tags (and EOS) keep their score where legal.
    """
    columns = scores[:, constraints.masked_ids]  # [B, C]
    legal = constraints.masked_allowed[rows.grammar_state]  # [B, C]
    return scores.at[:, constraints.masked_ids].set(jnp.where(legal, columns, -jnp.inf))


def forced_tokens(constraints: TagConstraints, rows: RowState) -> tuple[jax.Array, jax.Array]:
    """Which rows are inside a mantra, and the mantra token each must emit.

    Returns:
        (bool [B], int32 [B]); the tokens of rows not being forced are meaningless.
    """
    forcing = rows.mantra_pos < constraints.mantra_length
    position = jnp.clip(rows.mantra_pos, 0, constraints.mantra.shape[0] - 1)
    return forcing, constraints.mantra[position]


def advance(constraints: TagConstraints, rows: RowState, tokens: jax.Array) -> RowState:
    """The row states after emitting `tokens` ([B] int32); finished rows stay as they are.

    Ordinary tokens keep the grammar state; a tag moves along the transition table
    (tokens must be allowed: an illegal tag would give state -1). `<thinking>` starts
    the mantra when the policy gives this block one; a row ends on EOS or on reaching
    a state in `constraints.ends`.
    """
    tag = constraints.token_to_tag[tokens]
    moved = constraints.transitions[rows.grammar_state, jnp.maximum(tag, 0)]
    state = jnp.where(tag >= 0, moved, rows.grammar_state)
    forcing, _ = forced_tokens(constraints, rows)
    opens = tokens == constraints.thinking_open
    policy_index = jnp.minimum(rows.blocks, constraints.mantra_table.shape[0] - 1)
    starts_mantra = opens & constraints.mantra_table[policy_index] & (constraints.mantra_length > 0)
    mantra_pos = jnp.where(
        starts_mantra, 0, jnp.where(forcing, rows.mantra_pos + 1, constraints.mantra_length)
    )
    new = RowState(
        grammar_state=state,
        mantra_pos=mantra_pos,
        blocks=rows.blocks + opens.astype(jnp.int32),
        done=(tokens == constraints.eos_id) | constraints.ends[state],
    )
    return jax.tree.map(lambda old, nxt: jnp.where(rows.done, old, nxt), rows, new)


@dataclasses.dataclass(frozen=True)
class GrammarChooser:
    """Chooses each row's next token under the grammar: the default token policy.

    A forced mantra token when the row is inside a mantra, otherwise a token sampled
    from the logits with every illegal tag masked out. Hashable, so it is a static
    argument of the jitted decode loop.
    """

    sampling: SamplingConfig = SamplingConfig()

    def __call__(
        self, logits: jax.Array, rows: RowState, key: jax.Array, constraints: TagConstraints
    ) -> tuple[jax.Array, RowState]:
        """logits [B, V] -> (tokens [B] int32, rows after them)."""
        scores = mask_illegal_tags(scaled_scores(logits, self.sampling), constraints, rows)
        sampled = pick_tokens(scores, key, self.sampling)
        forcing, mantra_token = forced_tokens(constraints, rows)
        tokens = jnp.where(forcing, mantra_token, sampled)
        return tokens, advance(constraints, rows, tokens)
