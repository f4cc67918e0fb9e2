"""The serving engine: concurrent requests decoded together, one jitted step for all rows.

Requests wait in a queue; a decode thread takes up to `max_batch` of them (the ones there
when a batch starts; a batch starts as soon as one request waits), prefills their
prompts into one KV cache and steps every row together until each has ended. Shapes are
fixed by `max_batch`, the prompt bucket (a multiple of `decoder.PROMPT_BUCKET` tokens) and the
model's `max_seq_len`, so no request compiles anything once its bucket has been seen,
and every row carries its own sampling settings (temperature, top-p, seed) as arrays.

A row ends at EOS, at the lock's exit (`</AI>`), at its own token budget, or when its
request is cancelled (a client that disconnects, a stop string the caller matched):
from the next step on it is masked like padding, and the batch ends as soon as no row
is live, so a cancelled request never holds its slot to the end of its budget.

The decode step is the one `metatrain generate` runs (`metatrain.generate.decoder`:
`prefill`, then `decode_step`), and so is the grammar (`metatrain.generate.constraints`):
illegal tags and every control token are masked, the mantra is forced after
`<thinking>`, and a row prompted under the AI-mode lock ends when it leaves AI mode.
Only the token policy is the engine's own: each row samples with its own settings.

Tokens reach each request's `Handle` as the steps produce them (`STEPS_PER_CALL` per
jitted call), through the event loop the handle was made on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import queue
import threading
from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from metatrain.errors import UserError
from metatrain.generate.capacity import DecodeMemory
from metatrain.generate.constraints import RowState, TagConstraints, advance, forced_tokens, mask_illegal_tags
from metatrain.generate.decoder import DecodeState, PromptBatch, batch_prompts, decode_step, padded_length, prefill
from metatrain.generate.prompts import EncodedPrompt
from metatrain.generate.sampling import draw_categorical, filter_top_p, finite_scores
from metatrain.models import ModelConfig

#: Decode steps per jitted call: tokens reach clients in groups of this many.
STEPS_PER_CALL: int = 4


@dataclasses.dataclass(frozen=True)
class RowRequest:
    """One sequence to generate (a request with `n` choices is `n` of these).

    Attributes:
        prompt: the encoded prompt (with the lock's mode tags and control, if any).
        max_new_tokens: budget of generated tokens, forced ones included (>= 1).
        temperature: 0 is greedy.
        top_p: nucleus mass in (0, 1].
        seed: PRNG seed of this row.
    """

    prompt: EncodedPrompt
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0


class Handle:
    """What a caller holds for one submitted row: its tokens as they come, and `cancel()`.

    `await handle.next()` gives the next list of new token ids, or None once the row has
    ended; `finish_reason` is then `eos`, `end_of_mode`, `length` or `cancelled`.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.finish_reason: str | None = None
        self.error: BaseException | None = None

    def cancel(self) -> None:
        """Stop this row at its next step (thread-safe; idempotent)."""
        self.cancelled.set()

    async def next(self) -> list[int] | None:
        """The next new ids, or None at the end (raises what the engine raised, if it failed)."""
        item = await self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    # -- called from the decode thread -----------------------------------------------------
    def _put(self, item: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the caller's event loop is gone: nobody is listening
            self.cancelled.set()

    def _tokens(self, ids: list[int]) -> None:
        self._put(ids)

    def _end(self, reason: str) -> None:
        self.finish_reason = reason
        self._put(None)

    def _fail(self, error: BaseException) -> None:
        self.error = error
        self.finish_reason = "error"
        self._put(error)


@flax.struct.dataclass
class RowSampling:
    """The engine's token policy (a `metatrain.generate.decoder.Chooser`): the tag grammar,
    then each row sampled with its own temperature and top-p, from its own PRNG key.

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
        sampled = self._pick(scores, keys)
        forcing, mantra_token = forced_tokens(constraints, rows)
        tokens = jnp.where(forcing, mantra_token, sampled)
        return tokens, advance(constraints, rows, tokens)

    def _pick(self, scores: jax.Array, keys: jax.Array) -> jax.Array:
        """One token per row with each row's own temperature and top-p ([B, V] -> [B])."""
        greedy = jnp.argmax(scores, axis=-1).astype(jnp.int32)
        shifted = finite_scores(scores - jnp.max(scores, axis=-1, keepdims=True))
        scaled = jnp.where(jnp.isfinite(scores), shifted / jnp.maximum(self.temperature, 1e-30)[:, None], -jnp.inf)
        kept = filter_top_p(scaled, self.top_p)  # each row's own top-p
        sampled = jax.vmap(lambda k, s: draw_categorical(k, s[None])[0])(keys, kept)
        return jnp.where(self.temperature > 0, sampled, greedy)


@flax.struct.dataclass
class _Batch:
    """Device state of a running batch ([B] per row): the shared decode state (with [B]
    PRNG keys), each row's sampling settings, budget and tokens emitted so far."""

    decode: DecodeState
    sampling: RowSampling
    budget: jax.Array  # [B] int32
    emitted: jax.Array  # [B] int32


@functools.partial(jax.jit, static_argnames=("model_config",))
def _prefill(params: Any, prompts: PromptBatch, rows: RowState, keys: jax.Array, sampling: RowSampling,
             budget: jax.Array, *, model_config: ModelConfig) -> _Batch:
    """The prompts [B, P] into a cache of P + max_seq_len slots: room for any row's budget
    (each row's own prompt and budget fit `max_seq_len`, its positions)."""
    decode = prefill(params, prompts, rows, keys, model_config=model_config,
                     cache_length=prompts.ids.shape[1] + model_config.max_seq_len)
    return _Batch(decode, sampling, budget, jnp.zeros_like(budget))


@functools.partial(jax.jit, static_argnames=("model_config", "steps"), donate_argnames=("batch",))
def _steps(params: Any, batch: _Batch, cancel: jax.Array, constraints: TagConstraints, *,
           model_config: ModelConfig, steps: int) -> tuple[_Batch, jax.Array]:
    """`steps` decode steps of every live row -> (state, tokens [B, steps], -1 where none).

    Rows in `cancel` ([B] bool) end before the first; a row ends at its budget."""
    rows = batch.decode.rows
    batch = batch.replace(decode=batch.decode.replace(rows=rows.replace(done=rows.done | cancel)))

    def step(b: _Batch, _):
        decode, tokens, live = decode_step(params, b.decode, constraints, b.sampling, model_config=model_config)
        emitted = b.emitted + live.astype(jnp.int32)
        rows = decode.rows.replace(done=decode.rows.done | (emitted >= b.budget))
        return b.replace(decode=decode.replace(rows=rows), emitted=emitted), tokens

    batch, tokens = jax.lax.scan(step, batch, None, length=steps)
    return batch, tokens.T


def check_batch_fits(model_config: ModelConfig, max_batch: int, *, engines: int, device: jax.Device) -> None:
    """Refuses, before any engine allocates, a `max_batch` whose batches `engines` engines
    (each may hold one at once) cannot keep in `device`'s free memory, and a context too
    long for even one row. A batch's cache holds the longest prompt's bucket plus
    `max_seq_len` slots (`_prefill`).

    Raises:
        UserError: the context or `--max-batch`, with how much fits.
    """
    context = model_config.max_seq_len
    prompt = padded_length(context - 1)
    memory = DecodeMemory.measure(model_config, prompt, prompt + context, device)
    fits = memory.rows_that_fit
    if fits is None:
        return
    per_engine = fits // engines
    if per_engine < 1:
        raise UserError(
            f"the model's context, max_seq_len={context}, is too large to serve: {memory.shortfall(engines)}; "
            "serve it on a device with more memory, or fix the run's model.max_seq_len (for an imported "
            "model, max_position_embeddings in its config.json)"
        )
    if max_batch > per_engine:
        raise UserError(
            f"--max-batch {max_batch} does not fit: {engines} engines (locked, unlocked) x {max_batch} rows = "
            f"{memory.shortfall(engines * max_batch)}; give --max-batch {per_engine} or less"
        )


class Engine:
    """Decodes submitted rows in batches of up to `max_batch` on a background thread.

    Args:
        params: the model's unboxed parameters.
        model_config: its shape.
        constraints: the grammar, mantra and lock (`TagConstraints.from_encoder`; with
            `lock_mode="ai"` a row ends when it leaves AI mode).
        max_batch: rows decoded together (fixed: a smaller batch is padded).
        eos_id: the end-of-document token (finish reason `eos`).
        end_ids: tokens that end a row under the lock (`</AI>`: finish reason `end_of_mode`).
    """

    def __init__(self, params: Any, model_config: ModelConfig, constraints: TagConstraints, *,
                 max_batch: int, eos_id: int, end_ids: frozenset[int] = frozenset()):
        if max_batch < 1:
            raise UserError(f"--max-batch must be >= 1, got {max_batch}")
        self.params, self.model_config, self.constraints = params, model_config, constraints
        self.max_batch, self.eos_id, self.end_ids = max_batch, eos_id, end_ids
        self._waiting: queue.Queue[tuple[RowRequest, Handle] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self.active_rows = 0  # rows of the running batch not yet ended (for tests and metrics)
        self.batches = 0
        self._warm_buckets: set[int] = set()  # prompt lengths (padded) already compiled

    # -- the caller's side ---------------------------------------------------------------------
    def check(self, request: RowRequest) -> None:
        """Raises UserError when `request` cannot run: a prompt longer than the context, or a
        budget beyond what the context leaves after it."""
        limit = self.model_config.max_seq_len
        length = len(request.prompt.ids)
        if length >= limit:
            raise UserError(f"the prompt has {length} tokens and the model's context is {limit}: "
                            f"shorten it to at most {limit - 1} tokens")
        room = limit - length
        if request.max_new_tokens > room:
            raise UserError(f"max_tokens {request.max_new_tokens} does not fit: the prompt has {length} tokens "
                            f"and the model's context is {limit}; ask for at most {room}")

    def submit(self, request: RowRequest, loop: asyncio.AbstractEventLoop | None = None) -> Handle:
        """Queue one row; its tokens arrive on the returned handle (on `loop`, default: the running one)."""
        if self._stopped:
            raise UserError("the server is shutting down; send the request again when it is back")
        self.check(request)
        handle = Handle(loop or asyncio.get_running_loop())
        self._waiting.put((request, handle))
        return handle

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="metatrain-serve-decode", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Finish the running batch, then end every row still waiting (`error`), so that no
        request waits for a decode thread that is gone."""
        self._stopped = True
        if self._thread is not None:
            self._waiting.put(None)
            self._thread.join(timeout=60)
            self._thread = None
        while True:
            try:
                item = self._waiting.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                item[1]._fail(UserError("the server shut down before this request was decoded"))

    def warm_up(self, prompt: EncodedPrompt) -> None:
        """Compile the prefill and step programs for `prompt`'s bucket (blocking); a bucket
        already warmed is not decoded again (the server warms before it listens, and the
        app's start-up asks again)."""
        bucket = padded_length(len(prompt.ids))
        if bucket not in self._warm_buckets:
            self._decode([(RowRequest(prompt, 1, temperature=0.0), None)])
            self._warm_buckets.add(bucket)

    # -- the decode thread -----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            item = self._waiting.get()
            if item is None:
                return
            batch = [item]
            while len(batch) < self.max_batch:
                try:
                    more = self._waiting.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._waiting.put(None)
                    break
                batch.append(more)
            live = [(r, h) for r, h in batch if not h.cancelled.is_set()]
            for _, h in batch:
                if h.cancelled.is_set():
                    h._end("cancelled")
            if not live:
                continue
            try:
                self._decode(live)
            except BaseException as e:  # noqa: BLE001 - every waiting caller must hear of it
                for _, h in live:
                    if h.finish_reason is None:
                        h._fail(e)

    def _decode(self, items: Sequence[tuple[RowRequest, Handle | None]]) -> None:
        b = self.max_batch
        requests = [r for r, _ in items]
        pad = [requests[0]] * (b - len(requests))  # padding rows: done from the start
        everyone = [*requests, *pad]
        prompts, rows = batch_prompts([r.prompt for r in everyone], self.constraints.mantra_length)
        rows = rows.replace(done=jnp.asarray(np.arange(b) >= len(requests)))
        keys = jax.vmap(jax.random.key)(jnp.asarray([r.seed for r in everyone], jnp.uint32))
        sampling = RowSampling(jnp.asarray([r.temperature for r in everyone], jnp.float32),
                               jnp.asarray([r.top_p for r in everyone], jnp.float32))
        state = _prefill(self.params, prompts, rows, keys, sampling,
                         jnp.asarray([r.max_new_tokens for r in everyone], jnp.int32),
                         model_config=self.model_config)
        handles = [h for _, h in items]
        ended = [False] * len(items)
        last: list[int | None] = [None] * len(items)
        self.batches += 1
        self.active_rows = len(items)
        while not all(ended):
            cancel = np.zeros((b,), bool)
            for i, h in enumerate(handles):
                cancel[i] = h is not None and h.cancelled.is_set()
            state, tokens = _steps(self.params, state, jnp.asarray(cancel), self.constraints,
                                   model_config=self.model_config, steps=STEPS_PER_CALL)
            tokens, done = jax.device_get((tokens, state.decode.rows.done))
            for i, h in enumerate(handles):
                if ended[i]:
                    continue
                new = [int(t) for t in tokens[i] if t >= 0]
                if new:
                    last[i] = new[-1]
                    if h is not None:
                        h._tokens(new)
                if done[i]:
                    ended[i] = True
                    self.active_rows -= 1
                    if h is not None:
                        h._end(self._reason(cancel[i], last[i]))
        self.active_rows = 0

    def _reason(self, cancelled: bool, last: int | None) -> str:
        if cancelled:
            return "cancelled"
        if last == self.eos_id:
            return "eos"
        if last in self.end_ids:
            return "end_of_mode"
        return "length"
