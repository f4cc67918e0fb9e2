"""`Engine`: rows in, tokens out, continuously batched over a fixed set of slots.

The host side of the engine (the device side: `metatrain.engine.step`). A row waits in
a queue until a slot is free; every tick of the loop then

  1. ends the rows whose callers cancelled them (their slots free at once);
  2. admits waiting rows into free slots, all in one prefill call, each starting from
     the longest prefix of its prompt that some slot's cache already holds (a
     document's successive insertion points in `annotate`, a chat's growing history);
  3. runs `steps_per_call` decode steps of the first k slots, k the smallest row-count
     bucket covering every live row (free slots are taken lowest first, so the live
     rows stay packed at the front), and hands each row its new tokens.

So a row that ends frees its slot for the next tick, a newcomer waits at most one call
for it, and a step costs what the live rows need. The same loop runs two ways:
`run(rows)` on the caller's thread until every row has ended (`metatrain generate`,
`eval`; deterministic, so every process of a multi-host job steps the same batches),
and `start()` on a background thread fed by `submit` (`serve`, `annotate`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import hashlib
import queue
import threading
from collections.abc import Sequence
from typing import Any, Protocol

import jax
import numpy as np

from metatrain.engine.capacity import PREFILL_ROWS, DecodeMemory, device_of
from metatrain.engine.constraints import RowState, TagConstraints
from metatrain.engine.policy import RowSampling
from metatrain.engine.step import (
    DISPATCH_LOCK,
    PROMPT_BUCKET,
    Admission,
    Chooser,
    SlotLayout,
    Slots,
    admit_call,
    cache_length,
    new_slots,
    padded_length,
    prefill_width,
    prompt_rows,
    steps_call,
)
from metatrain.errors import UserError
from metatrain.models import ModelConfig

#: Decode steps per call while rows wait for a slot or a client streams: tokens reach
#: callers, and newcomers their slot, in groups of this many.
STEPS_PER_CALL: int = 4
#: Steps per call when nothing waits (a batch job's last rows): fewer host round trips.
STEPS_WHEN_ALONE: int = 128


class PromptLike(Protocol):
    """What the engine reads of an encoded prompt (`metatrain.generate.prompts.EncodedPrompt`)."""

    ids: np.ndarray  # int32 [n], what the model reads
    state: int  # grammar state after `ids`
    blocks: int  # thinking blocks opened in `ids`


@dataclasses.dataclass(frozen=True)
class RowRequest:
    """One sequence to generate (a request with `n` choices is `n` of these).

    Attributes:
        prompt: the encoded prompt (with the lock's mode tags and control, if any).
        max_new_tokens: budget of generated tokens, forced ones included (>= 1).
        temperature: 0 is greedy (per-row settings: used when the engine has no static
            token policy).
        top_p: nucleus mass in (0, 1].
        seed: PRNG seed of this row.
        stream: which of the seed's streams it draws from (a request's n-th choice, a
            batch's n-th row): `fold_in(key(seed), stream)`.
    """

    prompt: PromptLike
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    stream: int = 0


class Handle:
    """What a caller holds for one submitted row: its tokens as they come, and `cancel()`.

    `await handle.next()` gives the next list of new token ids, or None once the row has
    ended; `finish_reason` is then `eos`, `end_of_mode`, `length` or `cancelled`.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop | None):
        self._loop = loop
        self._queue: asyncio.Queue | None = asyncio.Queue() if loop is not None else None
        self.cancelled = threading.Event()
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.tokens: list[int] = []  # every token so far (read after the end)
        self.admitted_step: int | None = None  # the engine's step count when the row took its slot
        self.ended_step: int | None = None  # ... and when it ended

    def cancel(self) -> None:
        """Stop this row at its next step (thread-safe; idempotent)."""
        self.cancelled.set()

    async def next(self) -> list[int] | None:
        """The next new ids, or None at the end (raises what the engine raised, if it failed)."""
        item = await self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    # -- called from the engine's loop ---------------------------------------------------------
    def _put(self, item: Any) -> None:
        if self._loop is None:
            return
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the caller's event loop is gone: nobody is listening
            self.cancelled.set()

    def _tokens(self, ids: list[int]) -> None:
        self.tokens.extend(ids)
        self._put(ids)

    def _end(self, reason: str) -> None:
        self.finish_reason = reason
        self._put(None)

    def _fail(self, error: BaseException) -> None:
        self.error = error
        self.finish_reason = "error"
        self._put(error)


@dataclasses.dataclass
class _Slot:
    """The host's record of one slot: who it decodes for, and what its cache holds."""

    handle: Handle | None = None  # None: free
    cached: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0,), np.int32))
    emitted: list[int] = dataclasses.field(default_factory=list)
    last: int | None = None
    budget: int = 0

    def holds(self) -> np.ndarray:
        """The ids whose keys and values the slot's cache holds (prompt, then emitted)."""
        if self.emitted:
            return np.concatenate([self.cached, np.asarray(self.emitted, np.int32)])
        return self.cached


def _row_hash(request: RowRequest) -> np.ndarray:
    """int32 [2]: a digest of what a row computes (prompt, budget, sampling, seed): how the
    processes of a multi-host server agree on which row is which."""
    digest = hashlib.blake2b(np.asarray(request.prompt.ids, np.int32).tobytes(), digest_size=8)
    digest.update(repr((request.max_new_tokens, request.temperature, request.top_p, request.seed,
                        request.stream, int(request.prompt.state), int(request.prompt.blocks))).encode())
    return np.frombuffer(digest.digest(), np.int32).copy()


def _buckets(limit: int, unit: int) -> list[int]:
    """Row counts a call may run with: `unit`, 2 x unit, 4 x unit, ..., and `limit`."""
    out, n = [], unit
    while n < limit:
        out.append(n)
        n *= 2
    return [*out, limit]


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    differs = np.flatnonzero(a[:n] != b[:n])
    return int(differs[0]) if len(differs) else n


def check_batch_fits(model_config: ModelConfig, max_batch: int, *, engines: int, device: jax.Device,
                     mesh: jax.sharding.Mesh | None = None) -> None:
    """Refuses, before any engine allocates, a `max_batch` whose batches `engines` engines
    (each may hold one at once) cannot keep in `device`'s free memory, and a context too
    long for even one row. Each slot's cache holds the context plus one prompt bucket
    (`step.cache_length`).

    Raises:
        UserError: the context or `--max-batch`, with how much fits.
    """
    context = model_config.max_seq_len
    shape = dict(mesh.shape) if mesh is not None else None
    unit = shape["data"] if shape else 1
    memory = DecodeMemory.measure(model_config, padded_length(context - 1), cache_length(context), device, shape)
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
    max_batch = -(-max_batch // unit) * unit  # as the engine rounds it: a multiple of mesh.data
    if max_batch > per_engine:
        raise UserError(
            f"--max-batch {max_batch} does not fit: {engines} engines (locked, unlocked) x {max_batch} rows = "
            f"{memory.shortfall(engines * max_batch)}; give --max-batch {per_engine} or less"
        )


class Engine:
    """Decodes rows on `max_batch` slots (see the module docstring).

    Args:
        params: the model's unboxed parameters (on one device, or on `mesh`).
        model_config: its shape.
        constraints: the grammar, mantra and lock (`TagConstraints.from_encoder`; with
            `lock_mode="ai"` a row ends when it leaves AI mode).
        max_batch: slots (rows decoded at once); rounded up to a multiple of the mesh's
            `data` axis.
        eos_id: the end-of-document token (finish reason `eos`; a row the grammar ends
            otherwise, at the lock's exit, ends with `end_of_mode`).
        context: tokens a row may hold in all, prompt and reply (default: the model's
            `max_seq_len`); the cache has this many slots per row, plus one prompt bucket.
        chooser: a static token policy for every row (e.g. `GrammarChooser(sampling)`);
            None: each row's own `RowRequest` settings (`RowSampling`).
        mesh: the device mesh the parameters are on (None: one device).
        prefix_reuse: start a prompt from the longest prefix another slot holds.
        steps_per_call: decode steps per call while rows wait or stream.
    """

    def __init__(self, params: Any, model_config: ModelConfig, constraints: TagConstraints, *,
                 max_batch: int, eos_id: int, context: int | None = None,
                 chooser: Chooser | None = None, mesh: jax.sharding.Mesh | None = None, prefix_reuse: bool = True,
                 steps_per_call: int = STEPS_PER_CALL):
        if max_batch < 1:
            raise UserError(f"--max-batch must be >= 1, got {max_batch}")
        self.params, self.model_config, self.constraints = params, model_config, constraints
        self.eos_id, self.chooser = eos_id, chooser
        self.context = min(context or model_config.max_seq_len, model_config.max_seq_len)
        self.mesh = mesh
        self.layout = SlotLayout(mesh) if mesh is not None and mesh.size > 1 else None
        unit = mesh.shape["data"] if mesh is not None else 1
        self.max_batch = -(-max_batch // unit) * unit
        self.row_buckets = _buckets(self.max_batch, unit)
        self.prefix_reuse, self.steps_per_call = prefix_reuse, steps_per_call
        self._slots_state: Slots | None = None
        self._slots = [_Slot() for _ in range(self.max_batch)]
        self._waiting: collections.deque[tuple[RowRequest, Handle]] = collections.deque()
        self._inbox: queue.Queue[tuple[RowRequest, Handle] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._serving = False  # the server's loop (or its warm-up): calls of `steps_per_call`
        self.batches = 0  # admission calls (for tests and metrics)
        self.reused_tokens = 0  # prompt tokens taken from another slot's cache instead of prefilled
        self.prefilled_tokens = 0
        self.steps_run = 0  # decode steps so far
        self.step_rows: collections.Counter[int] = collections.Counter()  # calls by row-count bucket

    # -- limits ------------------------------------------------------------------------------------
    @property
    def active_rows(self) -> int:
        """Rows now decoding (for tests and metrics)."""
        return sum(s.handle is not None for s in self._slots)

    def memory(self) -> DecodeMemory:
        """The memory `max_batch` rows of `context` tokens take, against the device's free memory."""
        return DecodeMemory.measure(self.model_config, padded_length(self.context - 1), cache_length(self.context),
                                    device_of(self.params), dict(self.mesh.shape) if self.mesh is not None else None)

    def check(self, request: RowRequest) -> None:
        """Raises UserError when `request` cannot run: a prompt longer than the context, or a
        budget beyond what the context leaves after it."""
        limit = self.context
        length = len(request.prompt.ids)
        if length >= limit:
            raise UserError(f"the prompt has {length} tokens and the model's context is {limit}: "
                            f"shorten it to at most {limit - 1} tokens")
        room = limit - length
        if request.max_new_tokens > room:
            raise UserError(f"max_tokens {request.max_new_tokens} does not fit: the prompt has {length} tokens "
                            f"and the model's context is {limit}; ask for at most {room}")

    # -- a batch job: every row at once, on this thread ----------------------------------------
    def run(self, requests: Sequence[RowRequest]) -> list[Handle]:
        """Decodes every row (up to `max_batch` at a time, the rest taking slots as they
        free) and returns their handles, ended, with `tokens` and `finish_reason`."""
        for request in requests:  # all of them before any is queued
            self.check(request)
        handles = []
        for request in requests:
            handle = Handle(None)
            self._waiting.append((request, handle))
            handles.append(handle)
        while self._waiting or self.active_rows:
            self._tick()
        return handles

    # -- a server: rows submitted from any thread, decoded on the engine's own -------------------
    def submit(self, request: RowRequest, loop: asyncio.AbstractEventLoop | None = None) -> Handle:
        """Queue one row; its tokens arrive on the returned handle (on `loop`, default: the running one)."""
        if self._stopped:
            raise UserError("the server is shutting down; send the request again when it is back")
        self.check(request)
        handle = Handle(loop or asyncio.get_running_loop())
        self._inbox.put((request, handle))
        return handle

    def start(self) -> None:
        if self._thread is None:
            self._serving = True
            self._thread = threading.Thread(target=self._serve, name="metatrain-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Finish the rows decoding now, then end every row still waiting (`error`), so that
        no caller waits for a loop that is gone."""
        self._stopped = True
        if self._thread is not None:
            self._inbox.put(None)
            self._thread.join(timeout=60)
            self._thread = None
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                self._waiting.append(item)
        self._fail_waiting()

    def warm_up(self, prompt: PromptLike) -> None:
        """Compile the calls a server needs (blocking; before `start`: the caller's thread
        runs it): the prefill of `prompt`'s width, by decoding one token of it, and the
        decode call of every row-count bucket."""
        serving, self._serving = self._serving, True
        try:
            self.run([RowRequest(prompt, 1, temperature=0.0)])
            idle = self._put(np.zeros((self.max_batch,), bool))
            for rows in self.row_buckets[1:]:  # every row-count bucket, on free slots (a no-op)
                with DISPATCH_LOCK, self._sharding():
                    self._slots_state, _, _ = steps_call(
                        self.params, self._state(), idle, self.constraints, model_config=self.model_config,
                        chooser=self.chooser, rows=rows, steps=self.steps_per_call, layout=self.layout)
        finally:
            self._serving = serving

    def _serve(self) -> None:
        if jax.process_count() > 1:
            return self._serve_together()
        stopping = False
        while True:
            stopping = self._collect(stopping)
            if stopping:  # the rows decoding finish; none that waits starts
                self._fail_waiting()
                if not self.active_rows:
                    return
            try:
                self._tick(admit=[] if stopping else None)
            except BaseException as e:  # noqa: BLE001 - every caller in flight must hear of it
                self._fail_all(e)

    def _fail_waiting(self) -> None:
        failure = UserError("the server shut down before this request was decoded")
        while self._waiting:
            self._waiting.popleft()[1]._fail(failure)

    def _collect(self, stopping: bool) -> bool:
        """Newly submitted rows into the waiting queue (waiting for one when idle); True
        once `stop` has asked the loop to end."""
        idle = not self._waiting and not self.active_rows
        try:
            item = self._inbox.get(block=idle and not stopping)
            while True:
                if item is None:
                    stopping = True
                else:
                    self._waiting.append(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass
        return stopping

    # -- a server on several processes -------------------------------------------------------------
    def _serve_together(self) -> None:
        """The server loop of a multi-host job: every process must step the same batch, but
        rows reach each process at its own moments. Process 0 decides each tick (which
        waiting rows to admit, which rows to cancel, when to stop) and broadcasts it; the
        others admit the same rows, found by content (prompt, budget, sampling, seed), so
        they need the same rows submitted, in any order (every process of `annotate`
        submits the same insertion points)."""
        from jax.experimental import multihost_utils

        leader = jax.process_index() == 0
        stopping = False
        while True:
            plan = np.zeros((3 + 3 * self.max_batch,), np.int32)
            if leader:
                stopping = self._collect(stopping)
                if stopping:  # as on one process: the rows decoding finish, none that waits starts
                    self._fail_waiting()
                plan = self._plan(stopping and not self.active_rows)
            plan = np.asarray(multihost_utils.broadcast_one_to_all(plan))
            if plan[0]:
                return
            count, cancel = int(plan[1]), plan[3 + 2 * self.max_batch:].astype(bool)
            if not leader:
                self._follow(plan[3:3 + 2 * count].reshape(count, 2))
            try:
                self._tick(admit=[self._waiting.popleft() for _ in range(count)], cancel=cancel)
            except BaseException as e:  # noqa: BLE001 - every caller in flight must hear of it
                self._fail_all(e)

    def _plan(self, stop: bool) -> np.ndarray:
        """Process 0's tick as int32s: [stop, n admitted, 0, n x 2 row hashes, cancel [B]]."""
        plan = np.zeros((3 + 3 * self.max_batch,), np.int32)
        plan[0] = stop
        chosen = self._choose()
        for item in reversed(chosen):
            self._waiting.appendleft(item)
        plan[1] = len(chosen)
        for i, (request, _) in enumerate(chosen):
            plan[3 + 2 * i:5 + 2 * i] = _row_hash(request)
        plan[3 + 2 * self.max_batch:] = self._cancelled()
        return plan

    def _follow(self, hashes: np.ndarray) -> None:
        """Put the rows process 0 admits this tick (by hash, in its order) first in the
        waiting queue, waiting for any not yet submitted here."""
        front = []
        for wanted in hashes:
            while True:
                found = next((i for i, (r, _) in enumerate(self._waiting) if (_row_hash(r) == wanted).all()), None)
                if found is not None:
                    front.append(self._waiting[found])
                    del self._waiting[found]
                    break
                item = self._inbox.get()
                if item is not None:
                    self._waiting.append(item)
        self._waiting.extendleft(reversed(front))

    def _fail_all(self, error: BaseException) -> None:
        for slot in self._slots:
            if slot.handle is not None:
                slot.handle._fail(error)
            slot.handle, slot.cached, slot.emitted = None, np.zeros((0,), np.int32), []
        while self._waiting:
            self._waiting.popleft()[1]._fail(error)
        self._slots_state = None

    # -- one tick --------------------------------------------------------------------------------
    def _state(self) -> Slots:
        if self._slots_state is None:
            with DISPATCH_LOCK, self._sharding():
                self._slots_state = new_slots(model_config=self.model_config, batch=self.max_batch,
                                              context=self.context, layout=self.layout)
        return self._slots_state

    def _sharding(self) -> contextlib.AbstractContextManager:
        """The mesh and the inference rules, for the model's logical constraints while tracing."""
        if self.mesh is None:
            return contextlib.nullcontext()
        from metatrain.parallel.mesh import inference_rules, sharding_context

        return sharding_context(self.mesh, inference_rules())

    def _cancelled(self) -> np.ndarray:
        """bool [B]: the slots whose callers cancelled their rows."""
        return np.array([s.handle is not None and s.handle.cancelled.is_set() for s in self._slots])

    def _choose(self) -> list[tuple[RowRequest, Handle]]:
        """Waiting rows for the free slots, in order (a cancelled one ends here)."""
        free = sum(s.handle is None for s in self._slots)
        chosen: list[tuple[RowRequest, Handle]] = []
        while self._waiting and len(chosen) < free:
            request, handle = self._waiting.popleft()
            if handle.cancelled.is_set():
                handle._end("cancelled")
                continue
            chosen.append((request, handle))
        return chosen

    def _tick(self, admit: list[tuple[RowRequest, Handle]] | None = None, cancel: np.ndarray | None = None) -> None:
        """Admit (`admit`, default: what `_choose` picks), then one call of decode steps
        (rows in `cancel`, default: those cancelled here, end before it)."""
        cancel = self._cancelled() if cancel is None else cancel
        self._admit(self._choose() if admit is None else admit)
        live = [i for i, s in enumerate(self._slots) if s.handle is not None]
        if not live:
            return
        rows = next(b for b in self.row_buckets if b > max(live))
        # A server streams tokens and takes newcomers every few steps; a batch job with
        # nobody waiting runs longer calls (fewer round trips to the host).
        if self._serving or self._waiting:
            steps = self.steps_per_call
        else:  # a batch job's last rows: as many steps as the longest remaining budget (a power of two)
            left = max(self._slots[i].budget - len(self._slots[i].emitted) for i in live)
            steps = min(STEPS_WHEN_ALONE, 1 << (max(left, 1).bit_length() - 1))
        with DISPATCH_LOCK, self._sharding():
            state, tokens, done = steps_call(self.params, self._state(), self._put(cancel), self.constraints,
                                       model_config=self.model_config, chooser=self.chooser, rows=rows,
                                       steps=steps, layout=self.layout)
        self._slots_state = state
        self.steps_run += steps
        self.step_rows[rows] += 1
        tokens, done = jax.device_get((tokens, done))
        for i in live:
            slot = self._slots[i]
            new = [int(t) for t in tokens[i] if t >= 0]
            if new:
                slot.emitted.extend(new)
                slot.last = new[-1]
                slot.handle._tokens(new)
            if done[i, 0]:  # the slot is free before its caller hears of the end
                handle, slot.handle = slot.handle, None
                handle.ended_step = self.steps_run
                handle._end(self._reason(cancel[i], bool(done[i, 1]), slot))

    def _put(self, value: Any) -> Any:
        """Host values for a call: as they are on one device, global arrays on a mesh."""
        return value if self.layout is None else self.layout.replicated(value)

    def _admit(self, rows: list[tuple[RowRequest, Handle]]) -> None:
        """`rows` into free slots (lowest first), `PREFILL_ROWS` a prefill call."""
        for first in range(0, len(rows), PREFILL_ROWS):
            self._admit_some(rows[first:first + PREFILL_ROWS])

    def _admit_some(self, rows: list[tuple[RowRequest, Handle]]) -> None:
        holdings = [s.holds() for s in self._slots]
        free = [i for i, s in enumerate(self._slots) if s.handle is None]
        chosen, sources, starts = [], [], []
        for request, handle in rows:
            ids = np.asarray(request.prompt.ids, np.int32)
            source, start = None, 0
            if self.prefix_reuse:
                for i, held in enumerate(holdings):
                    common = min(_common_prefix(held, ids), len(ids) - 1)
                    if common >= PROMPT_BUCKET and (common > start or (common == start and i in free)):
                        source, start = i, common
            # The slot holding the prompt's own prefix when it is free (nothing to copy, and
            # other slots keep theirs for their documents), else the lowest free one.
            slot = source if source in free else free[0]
            free.remove(slot)
            chosen.append((slot, request, handle))
            sources.append(slot if source is None else source)
            starts.append(start)
        # One call pads every prompt's rest to the longest; a row reusing a long prefix
        # would then write past the end of its cache (and the write would be moved back
        # over its prefix): such rows prefill from the start instead.
        limit = cache_length(self.context)
        while True:
            width = prefill_width(max(len(r.prompt.ids) - s for (_, r, _), s in zip(chosen, starts, strict=True)),
                                  self.context)
            over = [j for j, s in enumerate(starts) if s and s + width > limit]
            if not over:
                break
            for j in over:
                sources[j], starts[j] = chosen[j][0], 0
        rests = [np.asarray(r.prompt.ids, np.int32)[s:] for (_, r, _), s in zip(chosen, starts, strict=True)]
        self.reused_tokens += sum(starts)
        self.prefilled_tokens += sum(len(r) for r in rests)
        count = min(PREFILL_ROWS, self.max_batch)  # one shape: fewer programs to compile
        pad = count - len(chosen)
        ids, lengths = prompt_rows([*rests, *[rests[0]] * pad], width)
        requests = [r for _, r, _ in chosen] + [chosen[0][1]] * pad
        mantra = self.constraints.mantra_length
        rows = RowState.start(np.array([r.prompt.state for r in requests]), np.array([r.prompt.blocks for r in requests]),
                              mantra)
        new = Admission(
            slot=np.asarray([s for s, _, _ in chosen] + [self.max_batch] * pad, np.int32),
            source=np.asarray(sources + [0] * pad, np.int32),
            start=np.asarray(starts + [0] * pad, np.int32),
            ids=ids, lengths=lengths, rows=rows,
            seeds=np.asarray([r.seed for r in requests], np.uint32),
            streams=np.asarray([r.stream for r in requests], np.uint32),
            sampling=RowSampling(np.asarray([r.temperature for r in requests], np.float32),
                                 np.asarray([r.top_p for r in requests], np.float32)),
            budget=np.asarray([r.max_new_tokens for r in requests], np.int32),
        )
        with DISPATCH_LOCK, self._sharding():
            self._slots_state = admit_call(self.params, self._state(), self._put(new), model_config=self.model_config,
                                           layout=self.layout)
        self.batches += 1
        for slot, request, handle in chosen:
            record = self._slots[slot]
            record.handle, record.cached = handle, np.asarray(request.prompt.ids, np.int32)
            handle.admitted_step = self.steps_run
            record.emitted, record.last, record.budget = [], None, request.max_new_tokens

    def _reason(self, cancelled: bool, by_grammar: bool, slot: _Slot) -> str:
        """Why a row ended: cancelled, EOS, the grammar's end (the lock's exit), else its
        budget or the context (`length`)."""
        if cancelled:
            return "cancelled"
        if slot.last == self.eos_id:
            return "eos"
        return "end_of_mode" if by_grammar else "length"
