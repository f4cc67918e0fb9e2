"""`Generator`: prompts in, samples out (ids, text and segments), from a trained model.

This is the host side of generation: it encodes prompts, decodes them as one batch job
on the inference engine (`metatrain.engine.Engine.run`), and turns the ids back into
text and segments with the run's `Encoder`. `metatrain generate`
and the sample printed after `metatrain train` both go through here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from metatrain.documents import Segment
from metatrain.engine.capacity import DecodeMemory, device_of
from metatrain.engine.constraints import GrammarChooser, TagConstraints
from metatrain.engine.engine import Engine, RowRequest
from metatrain.engine.sampling import SamplingConfig
from metatrain.engine.step import Chooser, cache_length, padded_length
from metatrain.errors import UserError
from metatrain.generate.prompts import (
    EncodedPrompt,
    Prompt,
    encode_prompt,
    grammar_states,
)
from metatrain.models import ModelConfig
from metatrain.run.reader import load_checkpoint
from metatrain.tokenizer.encoder import Encoder

#: New tokens when none are asked for (fewer if the model's max_seq_len leaves less room).
DEFAULT_MAX_NEW_TOKENS: int = 128


@dataclasses.dataclass(frozen=True)
class Sample:
    """One generated continuation.

    Attributes:
        prompt_index: which prompt it continues.
        sample_index: which of that prompt's samples it is.
        ids: the generated ids: the lock's mode tags, sampled and forced (mantra) ids,
            and the final EOS or `</AI>` if there is one.
        text: `ids` as text, every tag written out.
        segments: the segments recovered from `ids` (kind, mode, text, control).
        finish_reason: `eos`, `end_of_mode` (the lock's exit tag) or `length` (budget).
        start_state: the grammar state `ids` continue from (where the prompt left it).
    """

    prompt_index: int
    sample_index: int
    ids: tuple[int, ...]
    text: str
    segments: tuple[Segment, ...]
    finish_reason: str
    start_state: int

    def to_json(self) -> dict[str, Any]:
        """The JSON object `metatrain generate --json` prints."""
        return {
            "prompt_index": self.prompt_index,
            "sample_index": self.sample_index,
            "ids": list(self.ids),
            "text": self.text,
            "segments": [
                {"kind": s.kind, "mode": s.mode, "text": s.text, "control": s.control} for s in self.segments
            ],
            "finish_reason": self.finish_reason,
        }


def render_ids(encoder: Encoder, ids: Sequence[int], start_state: int, *, hide_thinking: bool = False) -> str:
    """`ids` as text with tags written out; with `hide_thinking`, thinking blocks dropped.

    A token belongs to a thinking block when the grammar is in a thinking state before
    or after it (the open tag, the block's text and mantra, the close tag).
    """
    ids = np.asarray(ids, np.int32)
    if hide_thinking and len(ids):
        thinking = np.array([s.thinking for s in encoder.grammar.states])
        after = grammar_states(encoder, ids, start_state)
        before = np.concatenate([[start_state], after[:-1]])
        ids = ids[~(thinking[before] | thinking[after])]
    return encoder.decode(ids)


def recover_segments(encoder: Encoder, ids: Sequence[int], start_state: int) -> tuple[Segment, ...]:
    """The segments of `ids` generated after a prompt that left the grammar in `start_state`.

    `Encoder.decode_segments` reads from the base mode, so the mode tags leading to the
    prompt's mode go first (tags alone make no segment).
    """
    grammar = encoder.grammar
    lead = grammar.mode_path(grammar.base_mode, grammar.states[start_state].mode)
    lead_ids = [encoder.tag_ids[t] for t in lead]
    return tuple(encoder.decode_segments(np.asarray([*lead_ids, *ids], np.int32)))


class Generator:
    """Samples from a model under its tag grammar.

    Args:
        params: the model's unboxed parameters (on one device, or sharded over `mesh`).
        model_config: its shape.
        encoder: tokenizer, grammar and mantra (policy) it was trained with.
        mesh: the mesh the parameters are on (None: one device).
    """

    def __init__(self, params: Any, model_config: ModelConfig, encoder: Encoder, mesh: Any = None):
        if encoder.vocab_size != model_config.vocab_size:
            raise UserError(f"the tokenizer has {encoder.vocab_size} tokens, the model {model_config.vocab_size}")
        self.params = params
        self.model_config = model_config
        self.encoder = encoder
        self.mesh = mesh

    @classmethod
    def load(cls, workdir: Path | None = None, checkpoint: Path | None = None,
             mesh_settings: Sequence[str] | None = None) -> "Generator":
        """From a work directory's latest checkpoint or one checkpoint step directory;
        with `mesh_settings` (`--set mesh.KEY=VALUE` values, [] for the default layout),
        restored straight onto a mesh of the visible devices."""
        if mesh_settings is None:
            loaded = load_checkpoint(workdir, checkpoint)
        else:
            loaded = load_checkpoint(workdir, checkpoint, mesh_settings=mesh_settings)
        return cls(loaded.params, loaded.model_config, loaded.encoder, getattr(loaded, "mesh", None))

    def _budget(self, prompts: Sequence[EncodedPrompt], max_new_tokens: int | None) -> int:
        limit = self.model_config.max_seq_len
        lengths = [len(p.ids) for p in prompts]
        longest = max(range(len(lengths)), key=lengths.__getitem__)
        room = limit - lengths[longest]
        which = f"prompt {longest + 1}" if len(prompts) > 1 else "the prompt"
        if room < 1:
            raise UserError(
                f"{which} has {lengths[longest]} tokens (forced mode tags included) and the model's "
                f"max_seq_len is {limit}: no room to generate; shorten it to at most {limit - 1} tokens"
            )
        if max_new_tokens is None:
            max_new_tokens = min(DEFAULT_MAX_NEW_TOKENS, room)
        elif max_new_tokens < 1:
            raise UserError(f"max-new-tokens must be >= 1, got {max_new_tokens}")
        elif max_new_tokens > room:
            raise UserError(
                f"max-new-tokens {max_new_tokens} does not fit: {which} has {lengths[longest]} tokens "
                f"and the model's max_seq_len is {limit}; ask for at most {room} or shorten the prompt"
            )
        return max_new_tokens

    def generate(
        self,
        prompts: Sequence[Prompt],
        *,
        lock_mode: str | None = None,
        control: str | None = None,
        num_samples: int = 1,
        max_new_tokens: int | None = None,
        sampling: SamplingConfig = SamplingConfig(),
        seed: int = 0,
        chooser: Chooser | None = None,
    ) -> list[Sample]:
        """Continues every prompt `num_samples` times, in one batch.

        Args:
            prompts: plain texts (human-mode text) or documents.
            lock_mode: lock generation into this mode (e.g. "ai"): it starts after the
                mode tags into it and ends when the grammar leaves for the base mode.
            control: condition every reply on this control token (a name of the tag
                registry's `controls`, e.g. "good"), placed as the encoder places a
                segment's control. Control tokens are never generated, with or without it.
            num_samples: samples per prompt.
            max_new_tokens: budget per sample (default: 128, or what max_seq_len leaves).
            sampling: temperature (0: greedy), top-k, top-p.
            seed: PRNG seed; the same seed, prompts and settings give the same samples.
            chooser: token policy (default: `GrammarChooser(sampling)`); for tests.

        Returns:
            Samples ordered by prompt, then sample index.

        Raises:
            UserError: no prompt, bad settings, a budget that does not fit, a bad lock mode
                or control, or more rows (prompts x samples) than the device's free memory
                holds in one batch (checked before anything is allocated).
        """
        if not prompts:
            raise UserError("give at least one prompt")
        if num_samples < 1:
            raise UserError(f"num-samples must be >= 1, got {num_samples}")
        encoded = [encode_prompt(self.encoder, p, lock_mode, control) for p in prompts]
        budget = self._budget(encoded, max_new_tokens)
        memory = self.decode_memory(max(len(p.ids) for p in encoded), budget)
        too_many = memory.shortfall(len(prompts) * num_samples)
        if too_many:
            per_prompt = (memory.rows_that_fit or 0) // len(prompts)
            fix = (f"ask for at most {per_prompt} samples per prompt" if per_prompt else
                   f"give at most {memory.rows_that_fit} prompts, or fewer --max-new-tokens")
            raise UserError(f"--num-samples {num_samples} x {len(prompts)} prompts: {too_many}; {fix}")
        rows = [p for p in encoded for _ in range(num_samples)]
        constraints = TagConstraints.from_encoder(self.encoder, lock_mode=lock_mode)
        tokens, lengths, done = self.decode_rows(rows, constraints, max_new_tokens=budget,
                                                 chooser=chooser or GrammarChooser(sampling), seed=seed)
        return [
            self._sample(row // num_samples, row % num_samples, rows[row], tokens[row, : lengths[row]], done[row])
            for row in range(len(rows))
        ]

    def decode_memory(self, longest_prompt: int, max_new_tokens: int) -> DecodeMemory:
        """The memory of one decode batch of prompts up to `longest_prompt` tokens, each
        continued by up to `max_new_tokens`, on the parameters' device (`capacity.py`)."""
        prompt_length = padded_length(longest_prompt)
        return DecodeMemory.measure(self.model_config, prompt_length, cache_length(prompt_length + max_new_tokens),
                                    device_of(self.params), dict(self.mesh.shape) if self.mesh is not None else None)

    def decode_rows(
        self, rows: Sequence[EncodedPrompt], constraints: TagConstraints, *, max_new_tokens: int,
        chooser: Chooser, seed: int = 0,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Decodes encoded prompts (one row each) as one batch job of the engine.

        Each row draws from its own stream of `seed` (row i: `fold_in(key(seed), i)`), so a
        row's sample does not depend on its neighbours. `max_new_tokens` must fit
        (`generate` checks it).

        Raises:
            UserError: the rows need more memory than the device has free (`decode_memory`).

        Returns:
            `(tokens [B, N] int32 (-1 after a row's end), lengths [B], done [B] bool)`.
        """
        longest = max(len(p.ids) for p in rows)
        too_many = self.decode_memory(longest, max_new_tokens).shortfall(len(rows))
        if too_many:
            raise UserError(f"{too_many}: decode fewer rows at once")
        context = min(self.model_config.max_seq_len, padded_length(longest) + max_new_tokens)
        engine = Engine(self.params, self.model_config, constraints, max_batch=len(rows), eos_id=self.encoder.eos_id,
                        context=context, chooser=chooser, mesh=self.mesh)
        handles = engine.run([RowRequest(p, max_new_tokens, seed=seed, stream=i) for i, p in enumerate(rows)])
        tokens = np.full((len(rows), max_new_tokens), -1, np.int32)
        for i, handle in enumerate(handles):
            tokens[i, : len(handle.tokens)] = handle.tokens
        lengths = np.asarray([len(h.tokens) for h in handles], np.int32)
        return tokens, lengths, np.asarray([h.finish_reason != "length" for h in handles])

    def _sample(self, prompt_index: int, sample_index: int, prompt: EncodedPrompt,
                generated: np.ndarray, done: bool) -> Sample:
        ids = [*prompt.prefix, *generated.tolist()]
        if not done:
            reason = "length"
        else:
            reason = "eos" if ids[-1] == self.encoder.eos_id else "end_of_mode"
        return Sample(
            prompt_index=prompt_index,
            sample_index=sample_index,
            ids=tuple(ids),
            text=render_ids(self.encoder, ids, prompt.prompt_state),
            segments=recover_segments(self.encoder, ids, prompt.prompt_state),
            finish_reason=reason,
            start_state=prompt.prompt_state,
        )

    def render(self, sample: Sample, prompt: Prompt | None = None, *, hide_thinking: bool = False) -> str:
        """The sample as text, tags written out, after its prompt if one is given.

        With `hide_thinking`, thinking blocks (tags, mantra and text) are left out.
        """
        text = render_ids(self.encoder, sample.ids, sample.start_state, hide_thinking=hide_thinking)
        if prompt is None:
            return text
        ids = encode_prompt(self.encoder, prompt).ids
        initial = self.encoder.grammar.initial_state()
        return render_ids(self.encoder, ids, initial, hide_thinking=hide_thinking) + text
