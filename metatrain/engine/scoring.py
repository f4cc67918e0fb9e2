"""`Scorer`: log-likelihoods of chosen tokens of whole rows, batched on the engine's device.

What `annotate --samples K` needs to judge a candidate thought: the log-probability of
some tokens of a row (the text after a thought) given everything before them. The
forward pass is the training one (`Transformer.apply` over the whole row, causal
attention, positions from 0), then the output projection and a log-softmax in float32,
taken only at the scored positions (so a call costs [rows, scored, vocab] logits, not
[rows, width, vocab]).

Shapes are bucketed so a run compiles a few programs only: the width (tokens a row
reads) is a power of two (at least `MIN_WIDTH`, at most the model's `max_seq_len`), the
number of rows a power of two up to `max_rows` (more rows go in several calls), and the
number of scored positions a power of two. On a mesh the rows go in whole on every
device and the sums come back whole on every device (the parameters stay where they
are: the engine's own, shared). Calls are dispatched under the engine's
`DISPATCH_LOCK`, so a scorer may run in another thread beside a decoding engine on the
same devices (and several threads may share one scorer).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from metatrain.engine.step import DISPATCH_LOCK
from metatrain.models import ModelConfig, Transformer, output_projection

#: The narrowest row a call reads (shorter rows are padded to it).
MIN_WIDTH: int = 16
#: The fewest scored positions a call gathers.
MIN_TARGETS: int = 8


def _power_of_two(n: int, least: int) -> int:
    return max(least, 1 << max(n - 1, 0).bit_length())


@functools.partial(jax.jit, static_argnames=("model_config", "out_sharding"))
def target_log_probs(
    params: Any,
    inputs: jax.Array,
    segment_ids: jax.Array,
    at: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    *,
    model_config: ModelConfig,
    out_sharding: NamedSharding | None = None,
) -> jax.Array:
    """f32 [B]: Σ_m weights[b, m] · log p(targets[b, m] | inputs[b, :at[b, m] + 1]).

    Args:
        inputs: int32 [B, T] token ids (what the model reads; padding after each row).
        segment_ids: int32 [B, T]: 1 on a row's tokens, 0 on padding.
        at: int32 [B, M] the input position whose output predicts each target.
        targets: int32 [B, M] the scored token ids.
        weights: f32 [B, M] 1 for a scored target, 0 for padding.
    """
    b, t = inputs.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    hidden = Transformer(model_config).apply({"params": params}, inputs, positions, segment_ids)  # [B, T, D]
    hidden = jnp.take_along_axis(hidden, at[:, :, None], axis=1).astype(jnp.float32)  # [B, M, D]
    projection = output_projection(params, model_config).astype(jnp.float32)  # [D, V]
    logits = jnp.einsum("BMD,DV->BMV", hidden, projection, preferred_element_type=jnp.float32)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(log_probs, targets[:, :, None], axis=-1)[:, :, 0]  # [B, M]
    out = jnp.sum(picked * weights, axis=1)
    if out_sharding is not None:
        out = jax.lax.with_sharding_constraint(out, out_sharding)
    return out


class Scorer:
    """Sums of log-likelihoods of chosen tokens of rows, under one model.

    Args:
        params: the model's unboxed parameters (on one device, or sharded over `mesh`),
            e.g. the inference engine's own.
        model_config: its shape.
        mesh: the mesh the parameters are on (None: one device).
        max_rows: rows per call at most (calls use a power of two up to it).
    """

    def __init__(self, params: Any, model_config: ModelConfig, mesh: jax.sharding.Mesh | None = None, *,
                 max_rows: int = 16):
        self.params, self.model_config, self.mesh = params, model_config, mesh
        self.max_rows = _power_of_two(max_rows, 1)
        self._everywhere = NamedSharding(mesh, PartitionSpec()) if mesh is not None and mesh.size > 1 else None
        self.calls = 0  # forward calls so far (for tests and metrics)

    @property
    def max_len(self) -> int:
        """The longest row (tokens) a call scores: the model's `max_seq_len`."""
        return self.model_config.max_seq_len

    def log_likelihoods(self, rows: Sequence[np.ndarray],
                        targets: Sequence[np.ndarray | tuple[int, int]]) -> list[float]:
        """Σ log p (nats) of each row's scored tokens given the tokens before them.

        Args:
            rows: int token ids, each [n] with 2 <= n <= `max_len` (BOS first).
            targets: per row, which tokens are scored: a bool mask [n] (True at position
                i scores `row[i]` given `row[:i]`; position 0 is never scored), or a
                `(start, end)` range of positions (`1 <= start`, `end <= n`).

        Returns:
            One float per row (0.0 for a row with no scored token).

        Raises:
            ValueError: a row too short or too long, a mask of another length, a range
                outside its row.
        """
        if len(rows) != len(targets):
            raise ValueError(f"{len(rows)} rows but {len(targets)} targets")
        prepared = [self._prepare(np.asarray(r), t) for r, t in zip(rows, targets)]
        out: list[float] = []
        for first in range(0, len(prepared), self.max_rows):
            out += self._call(prepared[first:first + self.max_rows])
        return out

    def _prepare(self, row: np.ndarray, target: np.ndarray | tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        n = len(row)
        if not 2 <= n <= self.max_len:
            raise ValueError(f"a scored row needs 2 to {self.max_len} tokens, got {n}")
        if isinstance(target, tuple):
            start, end = target
            if not 1 <= start <= end <= n:
                raise ValueError(f"target range {target} outside a row of {n} tokens")
            positions = np.arange(start, end)
        else:
            mask = np.asarray(target, bool)
            if mask.shape != (n,):
                raise ValueError(f"a target mask of shape {mask.shape} for a row of {n} tokens")
            if mask[0]:
                raise ValueError("position 0 has nothing before it to score it from")
            positions = np.flatnonzero(mask)
        return row.astype(np.int32), positions

    def _call(self, part: list[tuple[np.ndarray, np.ndarray]]) -> list[float]:
        rows = _power_of_two(len(part), 1)
        width = min(_power_of_two(max(len(r) - 1 for r, _ in part), MIN_WIDTH), self.max_len)
        scored = _power_of_two(max(len(p) for _, p in part), MIN_TARGETS)
        inputs = np.zeros((rows, width), np.int32)
        segment_ids = np.zeros((rows, width), np.int32)
        at = np.zeros((rows, scored), np.int32)
        targets = np.zeros((rows, scored), np.int32)
        weights = np.zeros((rows, scored), np.float32)
        for i, (row, positions) in enumerate(part):
            inputs[i, : len(row) - 1] = row[:-1]
            segment_ids[i, : len(row) - 1] = 1
            m = len(positions)
            at[i, :m] = positions - 1
            targets[i, :m] = row[positions]
            weights[i, :m] = 1.0
        batch = (inputs, segment_ids, at, targets, weights)
        if self._everywhere is not None:
            batch = tuple(self._to_mesh(a) for a in batch)
        with DISPATCH_LOCK:  # dispatched in order with the engine's programs; waited for outside
            sums = target_log_probs(self.params, *batch, model_config=self.model_config,
                                    out_sharding=self._everywhere)
            self.calls += 1
        sums = np.asarray(jax.device_get(sums), np.float64)
        return [float(s) for s in sums[: len(part)]]

    def _to_mesh(self, value: np.ndarray) -> jax.Array:
        assert self._everywhere is not None
        return jax.make_array_from_callback(value.shape, self._everywhere, lambda index: value[index])
