"""Compiled programs persist across processes: a second `metatrain generate` compiles nothing."""

from __future__ import annotations

import jax

from metatrain.engine.compilation_cache import ENV_VAR, cache_directory

from ..conftest import run_cli


def _entries(directory) -> set[str]:
    return {p.name for p in directory.rglob("*") if p.is_file()}


def test_a_second_run_finds_every_program_in_the_cache(workdir, tmp_path):
    cache = tmp_path / "xla"
    args = ("generate", "--workdir", str(workdir), "--prompt", "Rain:", "--max-new-tokens", "8", "--temperature", "0")
    first = run_cli(*args, env={ENV_VAR: str(cache)})
    assert first.returncode == 0, first.stderr
    stored = _entries(cache)
    assert stored, "the first run stored its compiled programs"
    second = run_cli(*args, env={ENV_VAR: str(cache)})
    assert second.returncode == 0, second.stderr
    assert second.stdout == first.stdout
    assert _entries(cache) == stored, "the second run compiled nothing new"


def test_the_directory_comes_from_the_environment_or_is_off(monkeypatch, tmp_path):
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "mine"))
    assert cache_directory() == tmp_path / "mine"
    monkeypatch.setenv(ENV_VAR, "off")
    assert cache_directory() is None
    monkeypatch.delenv(ENV_VAR)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    before = jax.config.jax_compilation_cache_dir
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        assert cache_directory() == tmp_path / "xdg" / "metatrain" / "jax"
        jax.config.update("jax_compilation_cache_dir", str(tmp_path / "given"))
        assert cache_directory() == tmp_path / "given", "a directory JAX was given is kept"
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
