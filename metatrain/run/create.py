"""A new work directory from a train state held in host memory.

`metatrain tokenizer resize-checkpoint` (`metatrain.train.resize`) and `metatrain
import` (`metatrain.hf.importer`) both build a train state on one host device, grow its
vocabulary-sized leaves where the tokenizer grew (`grow_train_state`), and write it as
a fresh run (`write_workdir`) that `metatrain train` continues.

`write_workdir` builds the directory beside its final name (`staging_dir`) in this
order: the tokenizer, the tag registry, the checkpoint (`write_run`: complete once orbax
has committed it) and `config.yaml` last, the marker of a finished directory; then it
renames it into place (`publish_dir`). An interrupt or a failure leaves nothing under
the final name; in a bucket the directory is written in place and every object under it
is removed again. The importer builds its directory the same way and ends with `write_run`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from metatrain.config import RunConfig, config_to_dict, save_config
from metatrain.io.outputs import built_dir, write_atomically
from metatrain.io.storage import StoragePath, as_path, join
from metatrain.run.checkpoint import Checkpointer
from metatrain.run.layout import CONFIG_FILE, TAGS_FILE, TOKENIZER_FILE
from metatrain.tokenizer.resize import DEFAULT_NOISE_SCALE, grow_vocab_axis


def _leaf_name(path: Sequence[Any]) -> str:
    """`params/embedding/table`, `opt_state/1/0/mu/embedding/table` for a tree path."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def _vocab_axis(name: str, old: tuple[int, ...], new: tuple[int, ...], old_vocab: int, new_vocab: int) -> int | None:
    """The one axis where `old` and `new` differ (V_old -> V_new), None when they agree.

    Raises:
        ValueError: the shapes differ in some other way (a bug: only the vocabulary changed).
    """
    if old == new:
        return None
    axes = [a for a in range(len(old)) if old[a] != new[a]] if len(old) == len(new) else []
    if len(axes) != 1 or (old[axes[0]], new[axes[0]]) != (old_vocab, new_vocab):
        raise ValueError(
            f"{name}: shape {old} -> {new} is not a vocabulary resize {old_vocab} -> {new_vocab} along one axis"
        )
    return axes[0]


def _seed_for(seed: int, index: int) -> int:
    """An independent noise seed for the `index`-th grown parameter (the embedding and the
    output projection must not share their noise)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def grow_train_state(
    state: Any,
    target: Any,
    *,
    old_vocab_size: int,
    new_vocab_size: int,
    seed: int = 0,
    noise_scale: float = DEFAULT_NOISE_SCALE,
) -> tuple[Any, tuple[str, ...]]:
    """`state` with entries for ids `old_vocab_size..new_vocab_size-1`, laid out as `target`.

    Walks `state` and `target` together: a leaf whose shape differs from its target
    along one axis (V_old -> V_new) is vocab-sized. Under `params` it grows with
    `grow_vocab_axis` (mean of the old entries plus noise); anywhere else (optimizer
    moments) with zeros. Every other leaf, and every old entry, is copied bit for bit.

    Args:
        state: a `TrainState` of arrays for V_old, e.g. `params/embedding/table` [V_old, D].
        target: the same tree for V_new, of `jax.ShapeDtypeStruct`s (with shardings),
            e.g. a `TrainProgram.abstract_state()`.
        old_vocab_size: V_old.
        new_vocab_size: V_new >= V_old.
        seed: seed of the noise.
        noise_scale: noise standard deviation as a fraction of each feature's spread.

    Returns:
        `(new state, names of the grown leaves)`; the new state's arrays carry the
        target's shardings.

    Raises:
        ValueError: the trees differ in structure, or a leaf's shape differs other than
            by the vocabulary along one axis.
    """
    grown: list[str] = []

    def grow(path, leaf, spec):
        name = _leaf_name(path)
        value = np.asarray(jax.device_get(leaf))
        if value.dtype != spec.dtype:
            raise ValueError(f"{name}: dtype {value.dtype} in the checkpoint but {spec.dtype} in the new state")
        axis = _vocab_axis(name, value.shape, tuple(spec.shape), old_vocab_size, new_vocab_size)
        if axis is not None:
            if name.startswith("params/"):
                value = grow_vocab_axis(value, new_vocab_size, axis=axis, noise_scale=noise_scale,
                                        seed=_seed_for(seed, sum(g.startswith("params/") for g in grown)))
            else:
                pad = [(0, 0)] * value.ndim
                pad[axis] = (0, new_vocab_size - old_vocab_size)
                value = np.pad(value, pad)  # zeros after the old entries, which stay as they were
            grown.append(name)
        sharding = getattr(spec, "sharding", None)
        return jax.device_put(value, sharding) if sharding is not None else jnp.asarray(value)

    new_state = jax.tree_util.tree_map_with_path(grow, state, target)
    return new_state, tuple(grown)


def host_devices() -> list[jax.Device]:
    """One CPU device when JAX has the CPU backend (host memory holds the whole state),
    else the first device."""
    try:
        return jax.local_devices(backend="cpu")[:1]
    except RuntimeError:
        return jax.local_devices()[:1]


def on_one_device(config: RunConfig) -> RunConfig:
    """`config` laid over a single device (the layout does not change a checkpoint's shapes)."""
    mesh = dataclasses.replace(config.mesh, data=1, fsdp=1, tensor=1, dcn_data=1)
    return dataclasses.replace(config, mesh=mesh)


def write_run(directory: StoragePath, config: RunConfig, step: int, state: Any, data_state: dict) -> None:
    """The checkpoint at `step`, then `config.yaml`, the mark of a finished work directory,
    into `directory` (being built; its tokenizer and tag registry already there)."""
    checkpointer = Checkpointer(directory, config.checkpoint)
    try:
        checkpointer.save(step, state, data_state, config_to_dict(config))
    finally:
        checkpointer.close()  # waits for the (async) save; raises FaultError if it failed
    save_config(config, join(directory, CONFIG_FILE))


def write_workdir(
    out: StoragePath, config: RunConfig, tokenizer: StoragePath, tags: StoragePath, step: int, state: Any,
    data_state: dict,
) -> None:
    """Creates the work directory `out`: built aside and moved into place whole, so an
    interrupted or failed write leaves nothing under its name (in a bucket: written in
    place, `config.yaml` last, and every object removed again on failure)."""
    with built_dir(out, what="the work directory") as staging:
        for source, name in ((tokenizer, TOKENIZER_FILE), (tags, TAGS_FILE)):
            write_atomically(join(staging, name), as_path(source).read_bytes(), option="--out")
        write_run(staging, config, step, state, data_state)
