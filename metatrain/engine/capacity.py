"""How many rows one decode batch can hold: its memory per row against what the device has free.

A decode batch (`metatrain generate`, the free generation of `metatrain eval`, each engine
of `metatrain serve`) keeps, for every row:

  * its KV cache: `n_layers` x (keys, values) x slots x `n_kv_heads` x `head_dim` in the
    compute dtype, and one int32 segment id a slot;
  * the logits of its next token and the token policy's working room, a few
    vocabulary-sized float32 arrays (the masked scores, the sorted copy top-k and top-p
    need, its cumulative sum);
  * while the prompt goes in (prefill): the attention scores of the prompt against the
    cache and the MLP's activations.

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


def row_bytes(model_config: ModelConfig, prompt_length: int, cache_length: int) -> int:
    """Estimated bytes one row of a decode batch takes (see the module docstring)."""
    c = model_config
    item = np.dtype(c.dtype).itemsize
    cache = c.n_layers * 2 * cache_length * c.n_kv_heads * c.head_dim * item + cache_length * 4
    step = VOCAB_ARRAYS_PER_ROW * c.vocab_size * 4 + cache_length * 4  # + the row's emitted tokens
    prefill = prompt_length * (c.n_heads * cache_length * 4 + 4 * max(c.d_ff, c.d_model) * item)
    return cache + step + prefill


@dataclasses.dataclass(frozen=True)
class DecodeMemory:
    """A decode batch's memory on one device.

    Attributes:
        row_bytes: bytes a row takes (`row_bytes`).
        free_bytes: bytes the device has free (None: unknown, nothing is refused).
        device: the device, in words.
        cache_length: slots of each row's KV cache.
    """

    row_bytes: int
    free_bytes: int | None
    device: str
    cache_length: int

    @classmethod
    def measure(cls, model_config: ModelConfig, prompt_length: int, cache_length: int,
                device: jax.Device) -> DecodeMemory:
        """The memory of rows with prompts of `prompt_length` tokens (padded) and
        `cache_length` cache slots, against what `device` has free now."""
        return cls(row_bytes(model_config, prompt_length, cache_length), free_bytes(device),
                   f"{device.platform.upper()} device {device.id}", cache_length)

    @property
    def rows_that_fit(self) -> int | None:
        """Rows one batch may hold (None: the device does not say how much is free)."""
        if self.free_bytes is None:
            return None
        return int(self.free_bytes * USABLE_SHARE) // self.row_bytes

    def shortfall(self, rows: int) -> str | None:
        """None when `rows` fit; else why not, in words: `R rows need about X ... and Y
        are free on DEVICE` (the caller adds which option to change)."""
        fits = self.rows_that_fit
        if fits is None or rows <= fits:
            return None
        return (f"{rows} rows decoded at once need about {gib(rows * self.row_bytes)} "
                f"(a KV cache of {self.cache_length} tokens and the logits of each row), and "
                f"{gib(self.free_bytes or 0)} are free on the {self.device}")


def device_of(params: object) -> jax.Device:
    """The device holding the first leaf of `params` (the reader puts them all on one)."""
    leaf = jax.tree.leaves(params)[0]
    return next(iter(leaf.devices())) if hasattr(leaf, "devices") else jax.local_devices()[0]
