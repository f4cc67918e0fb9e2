"""The tag grammar: which tag may follow in which state, for the encoder and the decoder.

A state is a mode (human, ai, ...) plus whether a thinking block is open. The encoder
walks this machine to validate documents and insert mode tags; the decoder uses the
array form (`transition_table`, `Grammar.bind`) to mask illegal tags out of the logits
with one gather. States and tags are small integers so both uses share one table.

Rules (from the registry):
  * a mode tag is legal in its `from` mode outside thinking and moves to its `to` mode;
  * the thinking open tag is legal in `thinking.allowed_in` modes; inside thinking the
    close tag is the only legal tag, and it returns to the mode the block opened in;
  * control tags are legal in every state outside thinking and change nothing;
  * reserved tags are legal nowhere.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping

import numpy as np

from metatrain.tokenizer.registry import TagRegistry

#: Value of `transition_table` entries for illegal (state, tag) pairs.
ILLEGAL: int = -1


class IllegalTransition(ValueError):
    """A tag that the grammar forbids in the current state, or an unreachable mode."""


@dataclasses.dataclass(frozen=True)
class State:
    """A grammar state: the current mode, and whether a thinking block is open in it."""

    mode: str
    thinking: bool = False

    def __str__(self) -> str:
        return f"thinking in {self.mode}" if self.thinking else self.mode


class Grammar:
    """The tag state machine of one `TagRegistry`.

    States are ints indexing `states`; tags are strings, or ints indexing `tags` in the
    array form. Outside-thinking states come first, in registry mode order.
    """

    def __init__(self, registry: TagRegistry):
        self.registry = registry
        self.tags: tuple[str, ...] = registry.tags
        self.tag_index: dict[str, int] = {tag: i for i, tag in enumerate(self.tags)}
        self.states: tuple[State, ...] = tuple(State(m) for m in registry.modes) + tuple(
            State(m, thinking=True) for m in registry.modes if m in registry.thinking_modes
        )
        self._state_index = {s: i for i, s in enumerate(self.states)}
        self._table = self._build_table()
        self._table.setflags(write=False)
        # One-tag moves between modes: (source, target) -> tag.
        self._mode_moves: dict[tuple[str, str], str] = {}
        for t in registry.transitions:
            self._mode_moves.setdefault((t.source, t.target), t.tag)

    @property
    def num_states(self) -> int:
        return len(self.states)

    @property
    def num_tags(self) -> int:
        return len(self.tags)

    @property
    def base_mode(self) -> str:
        return self.registry.base_mode

    @property
    def modes(self) -> tuple[str, ...]:
        return self.registry.modes

    def _build_table(self) -> np.ndarray:
        reg = self.registry
        table = np.full((len(self.states), len(self.tags)), ILLEGAL, dtype=np.int32)
        index = {s: i for i, s in enumerate(self.states)}
        for s, state in enumerate(self.states):
            if state.thinking:
                table[s, self.tags.index(reg.thinking_close)] = index[State(state.mode)]
                continue
            if state.mode in reg.thinking_modes:
                table[s, self.tags.index(reg.thinking_open)] = index[State(state.mode, True)]
            for t in reg.transitions:
                if t.source == state.mode:
                    table[s, self.tags.index(t.tag)] = index[State(t.target)]
            for _, tag in reg.controls:
                table[s, self.tags.index(tag)] = s
        return table

    # ----------------------------------------------------------------- scalar form

    def state_id(self, state: State) -> int:
        """The int id of `state`; raises `IllegalTransition` if it cannot occur."""
        try:
            return self._state_index[state]
        except KeyError:
            raise IllegalTransition(f"no grammar state {state}; modes are {list(self.modes)}") from None

    def initial_state(self, mode: str | None = None) -> int:
        """The state outside thinking in `mode` (default: the base mode)."""
        mode = self.base_mode if mode is None else mode
        if mode not in self.modes:
            raise IllegalTransition(f"unknown mode {mode!r}; the grammar's modes are {list(self.modes)}")
        return self._state_index[State(mode)]

    def next_state(self, state: int, tag: str) -> int:
        """The state after emitting `tag` in `state`.

        Raises:
            IllegalTransition: `tag` is not a tag, or not legal in `state`; the message
                lists what is legal there.
        """
        if tag not in self.tag_index:
            raise IllegalTransition(f"{tag!r} is not a tag of the registry {self.registry.source}")
        nxt = int(self._table[state, self.tag_index[tag]])
        if nxt == ILLEGAL:
            allowed = ", ".join(self.allowed_tags(state)) or "no tag"
            raise IllegalTransition(f"tag {tag} is illegal in state {self.states[state]} (legal there: {allowed})")
        return nxt

    def allowed_tags(self, state: int) -> tuple[str, ...]:
        """The tags legal in `state`, in tag-index order."""
        return tuple(tag for tag, nxt in zip(self.tags, self._table[state]) if nxt != ILLEGAL)

    def can_end(self, state: int) -> bool:
        """Whether a document may end in `state` (base mode, no thinking block open)."""
        return state == self.initial_state()

    def mode_tag(self, source: str, target: str) -> str:
        """The one tag that moves from mode `source` straight to mode `target`.

        Raises:
            IllegalTransition: no single tag of the grammar makes that move.
        """
        for mode in (source, target):
            if mode not in self.modes:
                raise IllegalTransition(f"unknown mode {mode!r}; the grammar's modes are {list(self.modes)}")
        try:
            return self._mode_moves[(source, target)]
        except KeyError:
            reachable = sorted({t for (s, t) in self._mode_moves if s == source})
            raise IllegalTransition(
                f"no tag moves directly from mode {source} to mode {target} "
                f"(from {source} the grammar allows: {', '.join(reachable) or 'nothing'})"
            ) from None

    def mode_path(self, source: str, target: str) -> tuple[str, ...]:
        """The shortest sequence of mode tags leading from mode `source` to mode `target`.

        Raises:
            IllegalTransition: `target` cannot be reached from `source`.
        """
        for mode in (source, target):
            if mode not in self.modes:
                raise IllegalTransition(f"unknown mode {mode!r}; the grammar's modes are {list(self.modes)}")
        previous: dict[str, tuple[str, str] | None] = {source: None}
        queue = collections.deque([source])
        while queue:
            mode = queue.popleft()
            if mode == target:
                break
            for t in self.registry.transitions:
                if t.source == mode and t.target not in previous:
                    previous[t.target] = (mode, t.tag)
                    queue.append(t.target)
        if target not in previous:
            raise IllegalTransition(f"mode {target} cannot be reached from mode {source} in this grammar")
        path: list[str] = []
        mode = target
        while (step := previous[mode]) is not None:
            mode, tag = step
            path.append(tag)
        return tuple(reversed(path))

    # ------------------------------------------------------------------ array form

    def transition_table(self) -> np.ndarray:
        """Next state for every (state, tag index), `ILLEGAL` (-1) where forbidden.

        Returns:
            int32 [num_states, num_tags], read-only.
        """
        return self._table

    def bind(self, tag_ids: Mapping[str, int], vocab_size: int, *, eos_id: int | None = None) -> "BoundGrammar":
        """Ties the grammar to a vocabulary, for masking logits.

        Args:
            tag_ids: token id of every tag (e.g. `Encoder.tag_ids`).
            vocab_size: number of token ids.
            eos_id: if given, EOS is allowed only in states where a document may end.

        Raises:
            ValueError: a tag has no id, or ids collide or fall outside the vocabulary.
        """
        missing = [t for t in self.tags if t not in tag_ids]
        if missing:
            raise ValueError(f"no token id for tag(s) {missing}")
        ids = np.array([tag_ids[t] for t in self.tags], dtype=np.int32)
        if len(set(ids.tolist())) != len(ids) or (ids < 0).any() or (ids >= vocab_size).any():
            raise ValueError(f"tag ids {dict(zip(self.tags, ids.tolist()))} must be distinct and < {vocab_size}")
        token_to_tag = np.full((vocab_size,), ILLEGAL, dtype=np.int32)
        token_to_tag[ids] = np.arange(len(ids), dtype=np.int32)
        mask = np.ones((self.num_states, vocab_size), dtype=bool)
        mask[:, ids] = self._table != ILLEGAL
        if eos_id is not None:
            mask[:, eos_id] = [self.can_end(s) for s in range(self.num_states)]
        for array in (ids, token_to_tag, mask):
            array.setflags(write=False)
        return BoundGrammar(self, ids, token_to_tag, mask)


@dataclasses.dataclass(frozen=True)
class BoundGrammar:
    """A grammar tied to token ids, in the arrays a decoder gathers from.

    Attributes:
        grammar: the grammar.
        tag_token_ids: int32 [num_tags], token id of each tag index.
        token_to_tag: int32 [vocab], tag index of each token id, -1 for ordinary tokens.
        allowed_tokens: bool [num_states, vocab]; `logits[~allowed_tokens[state]] = -inf`
            masks every illegal tag (and EOS where a document may not end) in one gather.
    """

    grammar: Grammar
    tag_token_ids: np.ndarray
    token_to_tag: np.ndarray
    allowed_tokens: np.ndarray

    def next_states(self, states: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """Next state after each token; ordinary tokens keep the state, illegal tags give -1.

        Args:
            states: int [...], current states.
            tokens: int [...], emitted token ids (same shape).

        Returns:
            int32 [...].
        """
        tag = self.token_to_tag[tokens]
        table = self.grammar.transition_table()
        return np.where(tag == ILLEGAL, states, table[states, np.maximum(tag, 0)]).astype(np.int32)

    def generation_allowed(self) -> np.ndarray:
        """bool [num_states, vocab]: what a sample may emit in each state, `allowed_tokens`
        less every control token. Controls condition a reply from its prompt and are
        never generated (`metatrain generate`, the `transformers` logits processor)."""
        controls = [self.grammar.tag_index[tag] for _, tag in self.grammar.registry.controls]
        return self.allowed_tokens & ~np.isin(self.token_to_tag, controls)[None, :]
