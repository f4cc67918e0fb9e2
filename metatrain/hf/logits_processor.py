"""metatrain's tag grammar, mantra forcing and AI-mode lock for `transformers` `generate`.

`TagGrammarLogitsProcessor` is a `transformers.LogitsProcessor` that does to
`model.generate` what `metatrain.engine.constraints` does inside metatrain's own
decode loop, so a model exported by `metatrain export` keeps its grammar (and, with
`mode="ai"`, the lock) outside metatrain:

    from transformers import AutoModelForCausalLM, LogitsProcessorList
    from metatrain.hf import TagGrammarLogitsProcessor

    model = AutoModelForCausalLM.from_pretrained(DIR)
    grammar = TagGrammarLogitsProcessor.from_pretrained(DIR, mode="ai")
    prompt = torch.tensor([grammar.prompt_ids("Q: why?")])
    out = model.generate(prompt, logits_processor=LogitsProcessorList([grammar]), do_sample=False,
                         max_new_tokens=128 + grammar.extra_tokens(prompt[0]))
    ids = grammar.sample_ids(out[0, prompt.shape[1]:])   # == metatrain's Sample.ids

It imports numpy, torch, transformers, yaml and sentencepiece, and none of jax: the
grammar is `metatrain.tokenizer.grammar` (plain numpy), the same object metatrain's
encoder and decoder use.

Files read from the exported directory DIR (`from_pretrained`):

  * `DIR/metatrain.json`, a JSON object with the keys
      - `mantra_policy` (required): "every", "first" or "none";
      - `mantra_file` (required unless the policy is "none"; may be null then): the
        mantra's text file, relative to DIR (e.g. "mantra.txt"), read as UTF-8
        verbatim: nothing is stripped, so it must be byte-for-byte the run's
        `data.mantra` (the default mantra ends with a newline);
      - `tags` (default "tags.yaml"): metatrain's tag registry, relative to DIR;
      - `tokenizer` (default "tokenizer.model"): the SentencePiece model, relative to DIR;
      - `bos_id`, `eos_id` (optional): checked against the SentencePiece model's ids;
      - `pad_id` (optional): the id `generate` left-pads batched prompts with.
  * `DIR/tags.yaml` and `DIR/tokenizer.model` (or what the keys above name).
  * For the pad id only, when neither the `pad_token_id` argument nor `pad_id` gives
    one: `pad_token_id` of `DIR/generation_config.json`, else of `DIR/config.json`.
    Nothing else of the HF files is read.

Behaviour, per batch row (rows are independent):

  * State. At the first call the processor runs the grammar over each row's prompt
    (`input_ids`, leading pad tokens skipped: HF left-pads batched prompts), then over
    each newly appended token. A prompt tag the grammar forbids is a ValueError. A call
    whose `input_ids` do not extend the previous call's by one token per row starts a
    new generation (`reset()` forces that, e.g. to reuse the processor for a prompt
    that happens to extend the last one). For greedy search and sampling
    (`num_return_sequences` included); not for beam search (HF's beam search also keeps
    -inf candidates when fewer than 2 * num_beams tokens are allowed, e.g. while a
    mantra is forced) nor assisted generation (several tokens per call).
  * The mask. Every tag (and EOS) that `BoundGrammar.allowed_tokens` forbids in the
    row's state gets -inf, and so does every control token (`<|good|>`, `<|bad|>`: they
    condition a reply from the prompt and are never generated); ordinary tokens keep
    their score. Scores are first made
    finite (NaN and -inf to float32's lowest, +inf to its highest), as metatrain does,
    so -inf means only "forbidden". Score columns past the tokenizer's vocabulary (a
    padded lm_head) are -inf.
  * Forcing. A forced token gets score 0 and every other token -inf: the mantra's
    tokens after a `<thinking>` that the policy gives a mantra (`every` block, the
    `first` block of the document, the prompt's blocks counted, or `none`), and the
    lock's tokens below. A prompt that stops partway into a mantra has the rest forced.
  * The lock (`mode="ai"`, or any non-base mode of the registry; `mode="thinking"`
    writes one thinking block as `metatrain annotate` does). metatrain appends the mode
    tags leading into the locked mode (`<AI>`) to the prompt and reports them as the
    first generated ids; here they are forced as the first generated tokens, so the
    ids are the same and the model sees the same sequence. The row ends when the
    grammar returns to the base mode (`</AI>`, kept, as metatrain's last id); the
    processor then forces EOS so that `generate` stops the row. EOS is illegal in AI
    mode, so a locked row ends on `</AI>` or at the budget.
  * After a row's end (EOS, or the lock's exit) EOS is forced at every later step
    (`generate` writes its pad token there anyway).

So, greedy (`do_sample=False`), the tokens `generate` appends after the prompt
`metatrain.generate.prompts.encode_prompt(...)` would build without the lock (BOS +
the text's ids, `prompt_ids`) are metatrain's `Sample.ids` (`metatrain generate
--temperature 0 --json`), followed, when the row ended before the budget, by: nothing
more than padding (finish reason `eos`: the EOS is in `Sample.ids`), or one forced EOS
and padding (`end_of_mode`: `Sample.ids` ends on `</AI>`). `sample_ids` cuts that off.
metatrain's `--max-new-tokens N` does not count the lock's mode tags; `generate`'s
`max_new_tokens` counts them: give it `N + extra_tokens(prompt)` for the same budget
(the EOS forced after `</AI>` then fits whenever the row ends before its budget). One
`generate` call has one `max_new_tokens`: for prompts whose lock prefixes differ in
length, pass the largest and cut each row at `N + extra_tokens(its prompt)`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import LogitsProcessor

from metatrain.errors import UserError
from metatrain.tokenizer.encoder import Encoder
from metatrain.tokenizer.grammar import ILLEGAL
from metatrain.tokenizer.mantra import (
    DEFAULT_MANTRA,
    block_gets_mantra,
    check_mantra_policy,
)
from metatrain.tokenizer.registry import load_registry
from metatrain.tokenizer.spm import SpmTokenizer

#: `mode` of the lock that writes one thinking block (`metatrain.engine.constraints.
#: THINKING_LOCK`, not imported from there because that module imports jax).
THINKING_LOCK = "thinking"

#: The exported directory's metatrain file, and its keys.
METADATA_FILE = "metatrain.json"
_METADATA_KEYS = {"mantra_policy", "mantra_file", "tags", "tokenizer", "bos_id", "eos_id", "pad_id"}


class _Row:
    """Where one row stands: grammar state, thinking blocks opened, tokens still to force."""

    __slots__ = ("state", "blocks", "forced", "done")

    def __init__(self, state: int):
        self.state = state
        self.blocks = 0
        self.forced: list[int] = []
        self.done = False


class TagGrammarLogitsProcessor(LogitsProcessor):
    """Applies metatrain's tag grammar, mantra forcing and lock to `generate`'s scores.

    Args:
        encoder: the SentencePiece model, tag grammar, mantra and mantra policy the
            model was trained with (no jax needed: `metatrain.tokenizer.encoder.Encoder`).
        mode: None or the registry's base mode ("human"): no lock; another mode of the
            registry ("ai"): the lock into it; "thinking": one thinking block.
        pad_token_id: the id `generate` left-pads prompts with (leading ones are
            skipped when reading a prompt); None: nothing is skipped.

    Raises:
        ValueError: `mode` is not a mode of the registry (nor "thinking").
    """

    def __init__(self, encoder: Encoder, mode: str | None = None, *, pad_token_id: int | None = None):
        grammar = encoder.grammar
        if mode == grammar.base_mode:
            mode = None
        if mode is not None and mode != THINKING_LOCK and mode not in grammar.modes:
            raise ValueError(f"cannot lock generation into mode {mode!r}: the tag registry "
                             f"{grammar.registry.source} has the modes {', '.join(grammar.modes)} "
                             f"(or use {THINKING_LOCK!r}; {grammar.base_mode!r} or None: no lock)")
        self.encoder = encoder
        self.mode = mode
        self.pad_token_id = pad_token_id
        bound = encoder.bound_grammar
        self.vocab_size = encoder.vocab_size
        self.eos_id = int(encoder.eos_id)
        self.bos_id = int(encoder.bos_id)
        self._thinking_open = int(encoder.tag_ids[grammar.registry.thinking_open])
        self._mantra = encoder.mantra_ids.tolist() if encoder.mantra else []
        self._policy = encoder.mantra_policy
        self._token_to_tag = bound.token_to_tag.tolist()
        self._table = grammar.transition_table().tolist()
        if mode is None:
            ends = [False] * grammar.num_states
        elif mode == THINKING_LOCK:
            ends = [not s.thinking for s in grammar.states]
        else:
            ends = [s.mode == grammar.base_mode for s in grammar.states]
        self._ends = ends
        allowed = bound.generation_allowed()  # control tokens are never generated, as in metatrain
        masked = np.flatnonzero(~allowed.all(axis=0))
        self._masked_ids = torch.as_tensor(masked, dtype=torch.long)
        self._masked_allowed = torch.as_tensor(allowed[:, masked])
        self._rows: list[_Row] | None = None
        self._ids: np.ndarray | None = None

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, directory: str | Path, mode: str | None = "human", *,
                        pad_token_id: int | None = None) -> "TagGrammarLogitsProcessor":
        """The processor of a directory written by `metatrain export` (files: module docstring).

        Raises:
            ValueError: a file is missing or malformed, its ids disagree with the
                SentencePiece model, or `mode` is unknown.
        """
        directory = Path(directory)
        meta_path = directory / METADATA_FILE
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except OSError as e:
            raise ValueError(f"cannot read {meta_path} ({e.strerror or e}): is {directory} a directory "
                             "written by `metatrain export`?") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{meta_path} is not JSON: {e}") from None
        if not isinstance(meta, dict):
            raise ValueError(f"{meta_path} must hold a JSON object, got {type(meta).__name__}")
        unknown = set(meta) - _METADATA_KEYS
        if unknown:
            raise ValueError(f"{meta_path}: unknown key(s) {sorted(unknown)}; known: {sorted(_METADATA_KEYS)}")
        if "mantra_policy" not in meta:
            raise ValueError(f"{meta_path}: missing key `mantra_policy`")
        policy = check_mantra_policy(meta["mantra_policy"])

        def file(key: str, default: str | None) -> Path | None:
            name = meta.get(key, default)
            if name is None:
                return None
            if not isinstance(name, str) or not name:
                raise ValueError(f"{meta_path}: `{key}` must be a file name, got {name!r}")
            path = directory / name
            if not path.is_file():
                raise ValueError(f"{meta_path}: `{key}` names {path}, which is not a file")
            return path

        mantra_path = file("mantra_file", None)
        if mantra_path is None:
            if policy != "none":
                raise ValueError(f"{meta_path}: `mantra_file` is required with mantra policy {policy!r}")
            mantra = DEFAULT_MANTRA  # never used: the policy gives no block a mantra
        else:
            mantra = mantra_path.read_text(encoding="utf-8")
        try:
            registry = load_registry(file("tags", "tags.yaml"))
            tokenizer = SpmTokenizer.load(file("tokenizer", "tokenizer.model"), registry)
        except UserError as e:  # a library caller gets the usual exception type
            raise ValueError(str(e)) from None
        encoder = Encoder(tokenizer, registry, mantra=mantra, mantra_policy=policy)
        for key, actual in (("bos_id", encoder.bos_id), ("eos_id", encoder.eos_id)):
            if key in meta and meta[key] != actual:
                raise ValueError(f"{meta_path}: `{key}` is {meta[key]} but the SentencePiece model "
                                 f"{tokenizer.source} has {actual}")
        if pad_token_id is None:
            pad_token_id = meta.get("pad_id")
        if pad_token_id is None:
            for name in ("generation_config.json", "config.json"):
                try:
                    pad_token_id = json.loads((directory / name).read_text(encoding="utf-8")).get("pad_token_id")
                except (OSError, ValueError, AttributeError):
                    continue
                if pad_token_id is not None:
                    break
        if isinstance(pad_token_id, list):  # HF allows a list; the first is the one it pads with
            pad_token_id = pad_token_id[0] if pad_token_id else None
        return cls(encoder, mode, pad_token_id=pad_token_id)

    # ------------------------------------------------------------------ helpers

    def prompt_ids(self, text: str) -> list[int]:
        """BOS + `text` as ordinary text: the ids `metatrain generate --prompt TEXT` starts
        from (before the lock's mode tags, which this processor forces)."""
        return [self.bos_id, *self.encoder.tokenizer.encode_texts([text])[0]]

    def lock_prefix(self, prompt: Sequence[int] | torch.Tensor) -> list[int]:
        """The tokens forced before the model's first own choice after `prompt` (one row,
        leading pad tokens or not): the lock's mode tags (`<AI>`; with `mode="thinking"`,
        `<thinking>` and the mantra when the block gets one), or the rest of a mantra the
        prompt stopped in. With a lock, metatrain's `EncodedPrompt.prefix`."""
        row = self._start(np.asarray(prompt, dtype=np.int64).reshape(-1))
        out: list[int] = []
        while row.forced:
            token = row.forced.pop(0)
            out.append(token)
            self._step(row, token, "forced token")
        return out

    def extra_tokens(self, prompt: Sequence[int] | torch.Tensor) -> int:
        """What to add to metatrain's `--max-new-tokens` for `generate`'s `max_new_tokens`
        after `prompt`, for the same budget: the lock's forced prefix (`lock_prefix`), which
        metatrain does not count; 0 without a lock."""
        return len(self.lock_prefix(prompt)) if self.mode is not None else 0

    def sample_ids(self, generated: Sequence[int] | torch.Tensor) -> list[int]:
        """`generate`'s ids after the prompt (one row) as metatrain's `Sample.ids`: up to
        the first EOS, kept without a lock (the document's end) and dropped with one (it
        was forced after the lock's exit tag); the padding after it dropped."""
        ids = [int(t) for t in (generated.tolist() if isinstance(generated, torch.Tensor) else generated)]
        if self.eos_id in ids:
            end = ids.index(self.eos_id)
            ids = ids[: end + 1] if self.mode is None else ids[:end]
        return ids

    def reset(self) -> None:
        """Forget the rows: the next call reads its `input_ids` as new prompts."""
        self._rows = None
        self._ids = None

    # ------------------------------------------------------------------ state

    def _step(self, row: _Row, token: int, where: str) -> None:
        """Moves `row` past `token` (the decoder's `advance`)."""
        tag = self._token_to_tag[token] if 0 <= token < self.vocab_size else ILLEGAL
        if tag != ILLEGAL:
            nxt = self._table[row.state][tag]
            if nxt == ILLEGAL:
                grammar = self.encoder.grammar
                raise ValueError(f"{where}: tag {grammar.tags[tag]} (id {token}) is illegal in state "
                                 f"{grammar.states[row.state]} (legal there: "
                                 f"{', '.join(grammar.allowed_tags(row.state)) or 'no tag'})")
            row.state = nxt
        if token == self._thinking_open:
            if self._mantra and block_gets_mantra(self._policy, row.blocks):
                row.forced = list(self._mantra)
            row.blocks += 1

    def _start(self, ids: np.ndarray) -> _Row:
        """The row after a prompt, with the lock's tokens to force."""
        tokens = ids.tolist()
        skip = 0
        if self.pad_token_id is not None:
            while skip < len(tokens) and tokens[skip] == self.pad_token_id:
                skip += 1
        grammar = self.encoder.grammar
        row = _Row(grammar.initial_state())
        for i in range(skip, len(tokens)):
            token = tokens[i]
            if row.forced:  # a mantra in the prompt: follow it while the prompt does
                if token == row.forced[0]:
                    row.forced.pop(0)
                else:
                    row.forced = []
            self._step(row, token, f"prompt token {i}")
        if self.mode is None:
            return row
        state = grammar.states[row.state]
        if state.thinking:
            raise ValueError(f"the prompt ends inside a thinking block: the lock into {self.mode!r} "
                             "cannot start there (close the block, or leave out the lock)")
        if self.mode == THINKING_LOCK:
            if state.mode not in grammar.registry.thinking_modes:
                raise ValueError(f"the prompt ends in mode {state.mode}, where thinking may not open")
            prefix = [self._thinking_open]
        else:
            prefix = [int(self.encoder.tag_ids[t]) for t in grammar.mode_path(state.mode, self.mode)]
        row.forced = prefix
        return row

    def _advance(self, row: _Row, token: int, index: int) -> None:
        if row.done:
            return
        if row.forced:
            expected = row.forced.pop(0)
            if token != expected:
                raise ValueError(
                    f"row {index}: token {token} was generated where {expected} was forced; a logits "
                    "processor after TagGrammarLogitsProcessor (or the sampler) overrode it")
        self._step(row, token, f"row {index}: generated token")
        if token == self.eos_id or self._ends[row.state]:
            row.done = True
            row.forced = []

    def _sync(self, ids: np.ndarray) -> None:
        """Brings the rows up to `ids` [B, T]: one new token per row, or new prompts."""
        prev = self._ids
        if (self._rows is None or prev is None or ids.shape != (prev.shape[0], prev.shape[1] + 1)
                or not np.array_equal(ids[:, :-1], prev)):  # not a continuation: a new generation
            self._rows = [self._start(row) for row in ids]
        else:
            for b, row in enumerate(self._rows):
                self._advance(row, int(ids[b, -1]), b)
        self._ids = ids

    # ------------------------------------------------------------------ the call

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """Scores [B, V] (float32) with the grammar's -inf and the forced tokens, for the next token."""
        if scores.shape[-1] < self.vocab_size:
            raise ValueError(f"the model scores {scores.shape[-1]} tokens but the tokenizer has "
                             f"{self.vocab_size}: this is not the model the tag grammar was exported with")
        self._sync(input_ids.detach().cpu().numpy().astype(np.int64))  # a copy: kept for the next call
        rows = self._rows
        assert rows is not None
        info = torch.finfo(torch.float32)
        out = torch.nan_to_num(scores.to(torch.float32), nan=info.min, posinf=info.max, neginf=info.min)
        if out.shape[-1] > self.vocab_size:
            out[:, self.vocab_size:] = -torch.inf
        device = out.device
        states = torch.as_tensor([r.state for r in rows], dtype=torch.long)
        columns = self._masked_ids.to(device)
        legal = self._masked_allowed[states].to(device)
        out[:, columns] = torch.where(legal, out[:, columns], torch.full_like(out[:, columns], -torch.inf))
        forced = [(b, self.eos_id if r.done else r.forced[0]) for b, r in enumerate(rows) if r.done or r.forced]
        if forced:
            which = torch.as_tensor([b for b, _ in forced], dtype=torch.long, device=device)
            tokens = torch.as_tensor([t for _, t in forced], dtype=torch.long, device=device)
            out[which] = -torch.inf
            out[which, tokens] = 0.0
        return out
