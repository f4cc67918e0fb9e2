"""How many rows one decode batch can hold: its memory per row against what the device has free.

A decode batch (`metatrain generate`, the free generation of `metatrain eval`, each engine
of `metatrain serve`) keeps, for every row:

  * its KV cache: `n_layers` x (keys, values) x slots x `n_kv_heads` x `head_dim` in the
    compute dtype, and one int32 segment id a slot;
  * the logits of its next token and the token policy's working room, a few
    vocabulary-sized float32 arrays (the masked scores, the sorted copy top-k and top-p
    need, its cumulative sum);
and, once for the engine, the prefill of `PREFILL_ROWS` prompts at a time: a copy of
their cache rows, the attention scores of each prompt against its cache and the MLP's
activations. On a mesh a device holds its share: rows split over `data`, KV heads over
`tensor`.

`DecodeMemory` measures that before anything is allocated, so that a batch too large is
refused in one line that says how many rows fit, instead of failing in the allocator
with a traceback, or being killed by the system halfway through. It is an estimate
(within a small factor); the allocator stays the final word.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np

from metatrain.models import ModelConfig

#: Vocabulary-sized float32 arrays a row holds during a step (logits, masked scores,
#: sorted scores and their cumulative sum for top-k/top-p, and the compiler's copies).
VOCAB_ARRAYS_PER_ROW: int = 8
#: Share of the free memory a batch may take (the rest: compiled programs, fragmentation).
USABLE_SHARE: float = 0.9


def gib(n: float) -> str:
    """`n` bytes, readable (`12.3 GiB`, `4.1 TiB`, `1.2e+05 TiB`)."""
    value = n / 2**30
    if value < 1024:
        return f"{value:.3g} GiB"
    value /= 1024
    return f"{value:.3g} TiB" if value < 1e5 else f"{value:.2g} TiB"


def host_available_bytes() -> int | None:
    """Memory the host can still give this process: the kernel's `MemAvailable`, less if
    a cgroup (a container) allows less; None where neither can be read."""
    found: list[int] = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    for limit_file, usage_file in (("memory.max", "memory.current"), ("memory/memory.limit_in_bytes",
                                                                       "memory/memory.usage_in_bytes")):
        try:
            limit = (Path("/sys/fs/cgroup") / limit_file).read_text().strip()
            usage = int((Path("/sys/fs/cgroup") / usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:
            found.append(max(0, int(limit) - usage))
    return min(found) if found else None


def free_bytes(device: jax.Device) -> int | None:
    """Memory `device` has free: its allocator's limit less what is in use (GPU, TPU), or
    what the host has available (CPU); None when it does not say."""
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - a backend without statistics raises instead of returning None
        stats = None
    if stats and "bytes_limit" in stats:
        return max(0, int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)))
    if device.platform == "cpu":
        return host_available_bytes()
    return None


#: Prompts one prefill call of the engine takes at most (more are prefilled by several
#: calls of one tick). Each call works on a copy of its rows' KV cache; past 4 rows XLA's
#: TPU prefill program grows to several copies of the whole cache (the 7b preset, 32 slots
#: of 4,096 tokens on v5e:2x4: 3.7 GiB of temporaries a chip at 4 rows, 17 at 8, 30 at 32).
PREFILL_ROWS: int = 4


def row_bytes(model_config: ModelConfig, cache_length: int) -> int:
    """Estimated bytes one row of a batch keeps while it decodes: its KV cache and its
    step arrays (see the module docstring)."""
    c = model_config
    item = np.dtype(c.dtype).itemsize
    cache = c.n_layers * 2 * cache_length * c.n_kv_heads * c.head_dim * item + cache_length * 4
    step = VOCAB_ARRAYS_PER_ROW * c.vocab_size * 4 + cache_length * 4  # + the row's emitted tokens
    return cache + step


def prefill_bytes(model_config: ModelConfig, prompt_length: int, cache_length: int) -> int:
    """Estimated working bytes of one prompt while it is prefilled: a copy of its cache
    row, the attention scores of the prompt against the cache, the MLP's activations."""
    c = model_config
    item = np.dtype(c.dtype).itemsize
    copy = c.n_layers * 2 * cache_length * c.n_kv_heads * c.head_dim * item
    return copy + prompt_length * (c.n_heads * cache_length * 4 + 4 * max(c.d_ff, c.d_model) * item)


@dataclasses.dataclass(frozen=True)
class DecodeMemory:
    """A decode batch's memory on one device.

    A mesh splits the rows over `data` and each row's KV heads over `tensor`; one device
    holds its share of every row, and of the prefill of `PREFILL_ROWS` prompts at once.

    Attributes:
        row_bytes: bytes a decoding row takes, whole (`row_bytes`).
        free_bytes: bytes the device has free (None: unknown, nothing is refused).
        device: the device, in words.
        cache_length: slots of each row's KV cache.
        prefill_bytes: working bytes of the prefill calls, whole (`PREFILL_ROWS` prompts).
        split: the devices one row's bytes are spread over (`data` x the `tensor` share of
            its KV heads; 1 on one device).
    """

    row_bytes: int
    free_bytes: int | None
    device: str
    cache_length: int
    prefill_bytes: int = 0
    split: int = 1

    @classmethod
    def measure(cls, model_config: ModelConfig, prompt_length: int, cache_length: int,
                device: jax.Device, mesh_shape: dict[str, int] | None = None) -> DecodeMemory:
        """The memory of rows with prompts of `prompt_length` tokens (padded) and
        `cache_length` cache slots, against what `device` has free now; `mesh_shape`: the
        axis sizes of the mesh the rows are spread over (None: one device)."""
        sizes = mesh_shape or {}
        tensor = sizes.get("tensor", 1)
        heads = tensor if tensor and model_config.n_kv_heads % tensor == 0 else 1
        return cls(row_bytes(model_config, cache_length), free_bytes(device),
                   f"{device.platform.upper()} device {device.id}", cache_length,
                   prefill_bytes=PREFILL_ROWS * prefill_bytes(model_config, prompt_length, cache_length) // heads,
                   split=sizes.get("data", 1) * heads)

    @property
    def rows_that_fit(self) -> int | None:
        """Rows one batch may hold (None: the device does not say how much is free)."""
        if self.free_bytes is None:
            return None
        room = int(self.free_bytes * USABLE_SHARE) - self.prefill_bytes
        return max(0, room * self.split // self.row_bytes)

    def shortfall(self, rows: int) -> str | None:
        """None when `rows` fit; else why not, in words: `R rows need about X ... and Y
        are free on DEVICE` (the caller adds which option to change)."""
        fits = self.rows_that_fit
        if fits is None or rows <= fits:
            return None
        need = rows * self.row_bytes // self.split + self.prefill_bytes
        return (f"{rows} rows decoded at once need about {gib(need)} a device "
                f"(a KV cache of {self.cache_length} tokens and the logits of each row, and the prefill), and "
                f"{gib(self.free_bytes or 0)} are free on the {self.device}")


def device_of(params: object) -> jax.Device:
    """The device holding the first leaf of `params` (the reader puts them all on one)."""
    leaf = jax.tree.leaves(params)[0]
    return next(iter(leaf.devices())) if hasattr(leaf, "devices") else jax.local_devices()[0]
