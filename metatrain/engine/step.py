"""The engine's device side: a fixed set of slots, rows admitted into free ones, steps of the live ones.

The engine keeps one KV cache of `max_batch` rows (slots) x `S` positions for its whole
life (`Slots`). Each row has its own cache position (`KVCache.index`), so a row admitted
while its neighbours are half-way through their replies starts at position 0 next to
them, and a row that ends frees its slot for the next step:

  * `admit` prefills n new prompts into n slots in one call: each prompt's ids go into
    its row from a start position (0, or the length of a prefix copied from another
    slot whose cache already holds those ids), and its first logits are kept;
  * `run_steps` runs a few decode steps of the first k slots (k a row-count bucket that
    covers every live row, so a step costs what the live rows need, not `max_batch`).

Each step turns every live row's logits into its next token (the token policy,
`Chooser`: the tag-grammar mask, mantra forcing and lock, then sampling), feeds the
tokens through the model and keeps the next logits; a row ends at EOS, the lock's exit,
its budget, its context, or when the host cancels it. Shapes are fixed by the slot
count, the prompt bucket (`PROMPT_BUCKET`), the admission and row-count buckets, so
nothing compiles per request or per token, and the grammar lives in the step
(`metatrain.engine.constraints`): no token makes a round trip to the host mid-call.

Prompts are left-aligned in their rows (slot s holds the token at position s); a
prompt bucket's padding lands on slots after the prompt with segment id 0 (never
attended) and is overwritten by the row's own tokens as it decodes.
"""

from __future__ import annotations

import threading
import dataclasses
import functools
from typing import Any, Protocol

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from metatrain.engine.constraints import RowState, TagConstraints
from metatrain.engine.policy import RowSampling
from metatrain.models import KVCache, ModelConfig, Transformer, init_cache, logits
from metatrain.parallel.mesh import kv_cache_spec

Params = Any
#: Prompts are padded to a multiple of this, so prompts of similar length share a compile.
PROMPT_BUCKET: int = 16

#: Held while a program that runs on the engine's devices is dispatched (the engine's
#: admissions and steps, `Scorer` calls). Two threads that dispatch sharded programs at
#: once could enqueue them in different orders on different devices, and their
#: collectives would then wait on each other for ever; one lock gives every device the
#: same order.
DISPATCH_LOCK = threading.RLock()


class Chooser(Protocol):
    """Picks each row's next token from the step's logits.

    Either static for the whole engine (hashable, e.g. `GrammarChooser(sampling)`), or
    the engine's `RowSampling`, whose per-row settings live in the slots."""

    def __call__(
        self, logits: jax.Array, rows: RowState, key: jax.Array, constraints: TagConstraints
    ) -> tuple[jax.Array, RowState]:
        """logits [B, V], keys [B] -> (tokens [B] int32, row states after them)."""
        ...


def padded_length(longest: int) -> int:
    """P, the length a batch of prompts whose longest has `longest` tokens is padded to."""
    return -(-longest // PROMPT_BUCKET) * PROMPT_BUCKET


def prefill_width(longest: int, context: int) -> int:
    """T, the width a prefill call pads its prompts to when the longest has `longest`
    (< `context`) tokens: a power of two from `PROMPT_BUCKET` on, so that few widths (few
    programs) cover every prompt length, and never more than the context's bucket (so a
    prompt prefilled from position 0 always fits its cache row)."""
    return min(max(PROMPT_BUCKET, 1 << (max(longest, 1) - 1).bit_length()), padded_length(context))


def cache_length(context: int) -> int:
    """S, slots of each row for rows of up to `context` tokens (prompt and reply): the
    context plus one prompt bucket. A prefill call pads its prompts to `prefill_width`
    (at most the context's bucket, so a row prefilled from position 0 always fits); the
    engine checks that a row reusing a prefix has room for its padding after it, else
    that row prefills from 0."""
    return context + PROMPT_BUCKET


@flax.struct.dataclass
class Slots:
    """Every slot of the engine between two calls ([B] = max_batch rows).

    Attributes:
        cache: the KV cache [L, B, S, K, H], each row's own `index` (its next position).
        logits: float32 [B, V], each row's logits for its next token.
        rows: each row's grammar state (`done`: ended, or a free slot).
        keys: [B] PRNG keys, one per row.
        sampling: per-row settings of the `RowSampling` policy (unused under a static one).
        budget: int32 [B], tokens each row may still emit in all.
        emitted: int32 [B], tokens each row has emitted.
        grammar_end: bool [B], the row ended by the grammar (EOS, the lock's exit), whatever
            else ended it at the same step (its budget): its finish reason.
    """

    cache: KVCache
    logits: jax.Array
    rows: RowState
    keys: jax.Array
    sampling: RowSampling
    budget: jax.Array
    emitted: jax.Array
    grammar_end: jax.Array

    @property
    def size(self) -> int:
        return self.logits.shape[0]


def empty_slots(model_config: ModelConfig, batch: int, context: int) -> Slots:
    """`batch` free slots (every row done, at position 0) for rows of up to `context` tokens."""
    rows = RowState(*(jnp.zeros((batch,), jnp.int32) for _ in range(3)), done=jnp.ones((batch,), bool))
    return Slots(
        cache=init_cache(model_config, batch, cache_length(context)),
        logits=jnp.zeros((batch, model_config.vocab_size), jnp.float32),
        rows=rows,
        keys=jax.vmap(jax.random.key)(jnp.zeros((batch,), jnp.uint32)),
        # Free slots greedy: a lone greedy row never pays for a sampling draw.
        sampling=RowSampling(jnp.zeros((batch,), jnp.float32), jnp.ones((batch,), jnp.float32)),
        budget=jnp.zeros((batch,), jnp.int32),
        emitted=jnp.zeros((batch,), jnp.int32),
        grammar_end=jnp.zeros((batch,), bool),
    )


@flax.struct.dataclass
class Admission:
    """n prompts to prefill into n slots (rows of padding have `slot` = B: dropped).

    Attributes:
        slot: int32 [n], the slot each prompt goes to.
        source: int32 [n], a slot whose cache holds this prompt's first `start` ids (any
            slot when `start` is 0).
        start: int32 [n], ids of the prompt already cached in `source`: prefill begins
            there.
        ids: int32 [n, T], the rest of each prompt, left-aligned, padding after.
        lengths: int32 [n], real ids in each row of `ids` (>= 1).
        rows: each prompt's grammar state after it.
        seeds: uint32 [n], each row's PRNG seed ...
        streams: uint32 [n], ... and stream: its key is `fold_in(key(seed), stream)`.
        sampling: the rows' `RowSampling` settings.
        budget: int32 [n], tokens each may emit.
    """

    slot: jax.Array
    source: jax.Array
    start: jax.Array
    ids: jax.Array
    lengths: jax.Array
    rows: RowState
    seeds: jax.Array
    streams: jax.Array
    sampling: RowSampling
    budget: jax.Array


def abstract_admission(admitted: int, width: int) -> Admission:
    """An `Admission` of `admitted` prompts of `width` ids as ShapeDtypeStructs (what
    `Engine._admit` builds), for compiling ahead of time."""
    def rows(dtype: Any, *shape: int) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct((admitted, *shape), dtype)

    return Admission(
        slot=rows(jnp.int32), source=rows(jnp.int32), start=rows(jnp.int32), ids=rows(jnp.int32, width),
        lengths=rows(jnp.int32), rows=RowState(rows(jnp.int32), rows(jnp.int32), rows(jnp.int32), rows(jnp.bool_)),
        seeds=rows(jnp.uint32), streams=rows(jnp.uint32),
        sampling=RowSampling(rows(jnp.float32), rows(jnp.float32)), budget=rows(jnp.int32),
    )


def _take(tree: Any, index: jax.Array) -> Any:
    """Rows `index` of every [B, ...] leaf (the cache's layers: axis 1)."""
    return jax.tree.map(lambda a: jnp.take(a, index, axis=0, mode="clip"), tree)


def _put(tree: Any, index: jax.Array, new: Any) -> Any:
    """`tree` with rows `index` replaced by `new` (out-of-range indices dropped)."""
    return jax.tree.map(lambda a, n: a.at[index].set(n, mode="drop"), tree, new)


def _take_cache(cache: KVCache, index: jax.Array) -> KVCache:
    """Rows `index` [n] of `cache` (clipped into range), each by a dynamic slice: a gather
    of n rows may first copy the whole cache into another layout (seen on TPU)."""
    rows = cache.segment_ids.shape[0]

    def take(a: jax.Array, axis: int) -> jax.Array:
        picked = [jax.lax.dynamic_slice_in_dim(a, jnp.clip(index[i], 0, rows - 1), 1, axis)
                  for i in range(index.shape[0])]
        return jnp.concatenate(picked, axis=axis)

    return KVCache(
        jax.tree.map(lambda a: take(a, 1), cache.layers), take(cache.segment_ids, 0), take(cache.index, 0)
    )


def _put_cache(cache: KVCache, index: jax.Array, new: KVCache) -> KVCache:
    """`cache` with rows `index` [n] replaced by `new`'s n rows (out of range: left as
    they are), one row at a time: each write is an in-place dynamic-update-slice, where a
    scatter of n rows may copy the whole cache (seen on TPU: the 7b preset's prefill
    then needs 2.6x the cache in temporaries)."""
    rows = cache.segment_ids.shape[0]

    def put_row(i: int, c: KVCache) -> KVCache:
        row = jnp.minimum(index[i], rows - 1)
        keep = index[i] >= rows  # padding of the admission: write the row back unchanged

        def write(a: jax.Array, n: jax.Array, axis: int) -> jax.Array:
            update = jax.lax.dynamic_index_in_dim(n, i, axis, keepdims=True)
            current = jax.lax.dynamic_slice_in_dim(a, row, 1, axis)
            return jax.lax.dynamic_update_slice_in_dim(a, jnp.where(keep, current, update), row, axis)

        return KVCache(
            jax.tree.map(lambda a, n: write(a, n, 1), c.layers, new.layers),
            write(c.segment_ids, new.segment_ids, 0),
            write(c.index, new.index, 0),
        )

    for i in range(index.shape[0]):  # unrolled: a loop's carry would copy the cache it starts from
        cache = put_row(i, cache)
    return cache


def _model_logits(params: Params, model_config: ModelConfig, cache: KVCache, ids: jax.Array,
                  positions: jax.Array, segments: jax.Array) -> tuple[jax.Array, KVCache]:
    """ids [n, T] through the model after `cache` -> (hidden [n, T, D], the cache after)."""
    return Transformer(model_config).apply(
        {"params": params}, ids, positions, segments, cache, method=Transformer.decode
    )


def admit(params: Params, slots: Slots, new: Admission, *, model_config: ModelConfig,
          layout: SlotLayout | None = None) -> Slots:
    """The prompts of `new` prefilled into their slots; the other slots are untouched.

    Each admitted row first gets `source`'s cache (the prefix it shares), with every
    slot from `start` on emptied, then the rest of its prompt goes in from `start`.

    Returns:
        The slots with the new rows live: cache, first logits, rows, keys, budgets.
    """
    cache = _take_cache(slots.cache, new.source)  # [n] rows holding each prompt's cached prefix
    if layout is not None:  # the copy's KV heads stay split over `tensor` (else each chip holds them all)
        cache = cache.replace(layers=layout.heads_split(cache.layers))
    kept = jnp.arange(cache.segment_ids.shape[1])[None, :] < new.start[:, None]
    cache = cache.replace(segment_ids=jnp.where(kept, cache.segment_ids, 0), index=new.start)
    width = new.ids.shape[1]
    real = jnp.arange(width)[None, :] < new.lengths[:, None]  # [n, T]
    positions = new.start[:, None] + jnp.arange(width)[None, :]
    hidden, cache = _model_logits(params, model_config, cache, new.ids, positions, real.astype(jnp.int32))
    last = jnp.take_along_axis(hidden, (new.lengths - 1)[:, None, None], axis=1)  # [n, 1, D]
    first_logits = logits(last, params, model_config)[:, 0]
    cache = cache.replace(index=new.start + new.lengths)
    return slots.replace(
        cache=_put_cache(slots.cache, new.slot, cache),
        logits=_put(slots.logits, new.slot, first_logits),
        rows=_put(slots.rows, new.slot, new.rows),
        keys=_put(slots.keys, new.slot, jax.vmap(lambda s, n: jax.random.fold_in(jax.random.key(s), n))(
            new.seeds, new.streams)),
        sampling=_put(slots.sampling, new.slot, new.sampling),
        budget=_put(slots.budget, new.slot, new.budget),
        emitted=_put(slots.emitted, new.slot, jnp.zeros_like(new.budget)),
        grammar_end=_put(slots.grammar_end, new.slot, jnp.zeros(new.budget.shape, bool)),
    )


def _split(keys: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(keys for later steps, keys for this one) of [B] keys."""
    pairs = jax.vmap(jax.random.split)(keys)  # [B, 2]
    return pairs[:, 0], pairs[:, 1]


def decode_step(params: Params, slots: Slots, constraints: TagConstraints, chooser: Chooser | None, *,
                model_config: ModelConfig) -> tuple[Slots, jax.Array]:
    """One token for every live row of `slots`: the policy picks it, the model reads it.

    A row is live until it has ended (`rows.done`: EOS, the lock's exit, its budget, a
    cancel) and while its next position is inside the model's context. `chooser` (or,
    when None, the rows' own `RowSampling`) turns the logits into tokens and row states;
    the live rows' tokens go through the model at each row's own position (the others
    as padding, their position unmoved), and the logits of the next token are kept.

    Returns:
        `(slots after the step, tokens [B] int32, -1 for rows that were not live)`.
    """
    keys, now = _split(slots.keys)
    position = slots.cache.index
    live = ~slots.rows.done & (position < model_config.max_seq_len)
    policy = slots.sampling if chooser is None else chooser
    tokens, rows = policy(slots.logits, slots.rows, now, constraints)
    grammar_end = slots.grammar_end | (live & rows.done)
    emitted = slots.emitted + live.astype(jnp.int32)
    rows = rows.replace(done=rows.done | ~live | (emitted >= slots.budget))
    fed = jnp.where(live, tokens, 0)
    hidden, cache = Transformer(model_config).apply(
        {"params": params}, fed[:, None], position[:, None], live[:, None].astype(jnp.int32), slots.cache,
        method=Transformer.decode,
    )
    cache = cache.replace(index=position + live.astype(jnp.int32))
    after = slots.replace(cache=cache, logits=logits(hidden, params, model_config)[:, 0], rows=rows, keys=keys,
                          emitted=emitted, grammar_end=grammar_end)
    return after, jnp.where(live, tokens, -1)


_ROW_FIELDS = ("logits", "rows", "keys", "sampling", "budget", "emitted", "grammar_end")


def _first_rows(slots: Slots, rows: int) -> Slots:
    """Slots `0 .. rows - 1` (static slices: no gather)."""
    if rows == slots.size:
        return slots
    cache = slots.cache
    cut = KVCache(jax.tree.map(lambda a: a[:, :rows], cache.layers), cache.segment_ids[:rows], cache.index[:rows])
    return slots.replace(cache=cut, **{f: jax.tree.map(lambda a: a[:rows], getattr(slots, f)) for f in _ROW_FIELDS})


def _put_first_rows(slots: Slots, part: Slots) -> Slots:
    """`slots` with its first `part.size` rows replaced by `part`."""
    rows = part.size
    if rows == slots.size:
        return part
    cache, new = slots.cache, part.cache
    cache = KVCache(
        jax.tree.map(lambda a, n: a.at[:, :rows].set(n), cache.layers, new.layers),
        cache.segment_ids.at[:rows].set(new.segment_ids),
        cache.index.at[:rows].set(new.index),
    )
    return slots.replace(cache=cache, **{
        f: jax.tree.map(lambda a, n: a.at[:rows].set(n), getattr(slots, f), getattr(part, f)) for f in _ROW_FIELDS
    })


def run_steps(params: Params, slots: Slots, cancel: jax.Array, constraints: TagConstraints, *,
              model_config: ModelConfig, chooser: Chooser | None, rows: int, steps: int,
              ) -> tuple[Slots, jax.Array]:
    """`steps` decode steps of slots `0 .. rows - 1` (the rest untouched).

    Args:
        cancel: bool [B]: rows that end before the first step.
        rows: k, a row-count bucket that covers every live slot.
        steps: decode steps in this call.

    Returns:
        `(slots after, tokens [k, steps] int32, -1 where a row emitted none)`.
    """
    slots = slots.replace(rows=slots.rows.replace(done=slots.rows.done | cancel))
    part = _first_rows(slots, rows)

    def step(s: Slots, _):
        return decode_step(params, s, constraints, chooser, model_config=model_config)

    part, tokens = jax.lax.scan(step, part, None, length=steps)
    return _put_first_rows(slots, part), tokens.T


def slot_spec(path: tuple, leaf: Any) -> PartitionSpec:
    """Where one array of the slots lives (its pytree `path` in `Slots`): the cache's
    [L, B, S, K, H] keys and values by `kv_cache_spec` (rows over `data`, KV heads over
    `tensor`), every other array by its rows over `data`."""
    names = [getattr(k, "name", getattr(k, "key", None)) for k in path]
    if "layers" in names:
        return kv_cache_spec()
    return PartitionSpec("data", *([None] * (len(leaf.shape) - 1)))


@dataclasses.dataclass(frozen=True)
class SlotLayout:
    """Where the slots live on a mesh: rows over `data`, the cache's KV heads over `tensor`.

    Hashable (a static argument of the jitted calls); `constrain` pins every array of
    the slots to its layout, so the cache never moves between calls."""

    mesh: Mesh

    def _spec(self, path: tuple, leaf: jax.Array) -> NamedSharding:
        return NamedSharding(self.mesh, slot_spec(path, leaf))

    def heads_split(self, layers: Any) -> Any:
        """[L, n, S, K, H] cache rows (a copy of some slots) with their KV heads over `tensor`."""
        spec = NamedSharding(self.mesh, PartitionSpec(None, None, None, "tensor", None))
        return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, spec), layers)

    def constrain(self, slots: Slots) -> Slots:
        return jax.tree_util.tree_map_with_path(
            lambda path, a: jax.lax.with_sharding_constraint(a, self._spec(path, a)), slots
        )

    @property
    def everywhere(self) -> NamedSharding:
        """Replicated on every device of the mesh (what the host reads back)."""
        return NamedSharding(self.mesh, PartitionSpec())

    def replicated(self, value: Any) -> Any:
        """Host numpy values (the same on every process) onto every device of the mesh,
        as global arrays: admission inputs, cancel flags."""
        def put(a):
            a = np.asarray(a)
            return jax.make_array_from_callback(a.shape, self.everywhere, lambda index: a[index])

        return jax.tree.map(put, value)


@functools.partial(jax.jit, static_argnames=("model_config", "layout"), donate_argnames=("slots",))
def admit_call(params: Params, slots: Slots, new: Admission, *, model_config: ModelConfig,
               layout: SlotLayout | None) -> Slots:
    """`admit`, jitted (slots donated: the cache is updated in place)."""
    out = admit(params, slots, new, model_config=model_config, layout=layout)
    return out if layout is None else layout.constrain(out)


@functools.partial(jax.jit, static_argnames=("model_config", "chooser", "rows", "steps", "layout"),
                   donate_argnames=("slots",))
def steps_call(params: Params, slots: Slots, cancel: jax.Array, constraints: TagConstraints, *,
               model_config: ModelConfig, chooser: Chooser | None, rows: int, steps: int,
               layout: SlotLayout | None) -> tuple[Slots, jax.Array, jax.Array]:
    """`run_steps`, jitted (slots donated) -> (slots, tokens [k, steps], ended [k, 2]: each
    row's (done, ended by the grammar))."""
    out, tokens = run_steps(params, slots, cancel, constraints, model_config=model_config, chooser=chooser,
                            rows=rows, steps=steps)
    done = jnp.stack([out.rows.done[:rows], out.grammar_end[:rows]], axis=1)  # [k, 2]
    if layout is None:
        return out, tokens, done
    # What the host reads is on every device: each process of a multi-host job reads it whole.
    tokens, done = (jax.lax.with_sharding_constraint(a, layout.everywhere) for a in (tokens, done))
    return layout.constrain(out), tokens, done


@functools.partial(jax.jit, static_argnames=("model_config", "batch", "context", "layout"))
def new_slots(*, model_config: ModelConfig, batch: int, context: int, layout: SlotLayout | None) -> Slots:
    """`empty_slots` made on the devices where they will live (on a mesh: each device
    allocates only its shard)."""
    slots = empty_slots(model_config, batch, context)
    return slots if layout is None else layout.constrain(slots)


def prompt_rows(prompts: list[np.ndarray], width: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-aligned ids [n, width] (zeros after each prompt) and lengths [n]."""
    ids = np.zeros((len(prompts), width), np.int32)
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt)] = prompt
    return ids, np.asarray([len(p) for p in prompts], np.int32)
