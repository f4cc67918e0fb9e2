"""Compiled programs kept on disk, so that a second run of a command does not compile again.

JAX's persistent compilation cache (`jax_compilation_cache_dir`) stores every compiled
program under a key of its HLO, the devices and the compiler version; a later process
that builds the same program (same model shape, slot count, buckets, mesh) loads it
instead of compiling. Every generating command turns it on at start-up:

  * the directory: `METATRAIN_COMPILATION_CACHE` if set (`off` turns caching off), else a
    directory JAX was already given (`JAX_COMPILATION_CACHE_DIR`), else
    `$XDG_CACHE_HOME/metatrain/jax` (default `~/.cache/metatrain/jax`);
  * every program is kept, however quick its compile (JAX's default keeps only those
    over a second, which leaves out a small model's many bucket programs).

The cache never changes what a program computes; a directory that cannot be written
only costs the compile time back.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

#: The environment variable naming the cache directory (`off`: no cache).
ENV_VAR: str = "METATRAIN_COMPILATION_CACHE"


def cache_directory() -> Path | None:
    """Where compiled programs go (None: caching is off); see the module docstring."""
    chosen = os.environ.get(ENV_VAR)
    if chosen is not None:
        return None if chosen.strip().lower() in ("", "off", "none", "0") else Path(chosen).expanduser()
    if jax.config.jax_compilation_cache_dir:
        return Path(jax.config.jax_compilation_cache_dir)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "metatrain" / "jax"


def enable_compilation_cache() -> Path | None:
    """Turn JAX's persistent compilation cache on in `cache_directory()` (created if
    missing); returns it, or None when caching is off or the directory cannot be made."""
    directory = cache_directory()
    if directory is None:
        return None
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None  # a read-only home: compile every time, as without the cache
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory
