"""Carrying a run over to an extended tokenizer: `metatrain tokenizer resize-checkpoint`.

After `metatrain tokenizer extend`, every old id keeps its meaning and the new ids
follow them, so a run trained with the old vocabulary can continue with the new one
once its vocab-sized leaves have entries for the new ids:

    params     embedding/table [V, D], output_projection [D, V] (untied): new entries
               at the mean of the old ones plus small noise (`grow_vocab_axis`)
    opt_state  Adam mu/nu of those tables: zeros for the new entries (no history yet)

Every old entry, every other leaf, the step and the data iterator's state are copied
unchanged (the new ids are control pieces, so existing documents encode the same).
`resize_checkpoint` writes the result as a new work directory, never over an old one;
`metatrain train --workdir OUT --set trainer.steps=N` continues it.

The state is restored onto one host (CPU) device: this is an offline step, and host
memory is where a whole train state fits. The array surgery (`metatrain.run.create.grow_train_state`) is a
pure function of trees; files, the work directories and the checkpointer live in
`resize_checkpoint`.

The new work directory is built beside its final name and moved into place whole
(`metatrain.run.create.write_workdir`): `tokenizer.model`, `tags.yaml`, the checkpoint,
and `config.yaml` last, so a failure or an interrupt leaves nothing under the final
name. Either work directory may be in a bucket (`gs://`, see `metatrain.io.storage`):
there it is written in place, every file one whole object, orbax marks the checkpoint
with `commit_success.txt`, and a failed build's objects are deleted with `discard_dir`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from metatrain.config import RunConfig, config_to_dict, load_config
from metatrain.errors import UserError
from metatrain.io.outputs import check_output_dir
from metatrain.io.storage import StoragePath, absolute
from metatrain.run.checkpoint import Checkpointer
from metatrain.run.create import grow_train_state, host_devices, on_one_device, write_workdir
from metatrain.run.layout import CHECKPOINTS_DIR, CONFIG_FILE, TAGS_FILE, TOKENIZER_FILE
from metatrain.run.program import build_train_program
from metatrain.run.resume import config_differences
from metatrain.tokenizer.registry import load_registry
from metatrain.tokenizer.resize import DEFAULT_NOISE_SCALE
from metatrain.tokenizer.spm import SpmTokenizer, first_changed_id, read_model_proto


@dataclasses.dataclass(frozen=True)
class ResizeReport:
    """What `resize_checkpoint` wrote.

    Attributes:
        workdir: the run that was read (left unchanged); a local `Path` or, for a
            bucket, an `epath.Path` (as is `out`).
        out: the new work directory.
        step: the checkpoint's step, unchanged in `out`.
        old_vocab_size: V_old, pieces of the old tokenizer.
        new_vocab_size: V_new, pieces of the new one (`model.vocab_size` of `out`).
        new_pieces: `(id, piece)` of every id `>= V_old`.
        grown: the leaves that gained entries, e.g. `params/embedding/table`.
    """

    workdir: StoragePath
    out: StoragePath
    step: int
    old_vocab_size: int
    new_vocab_size: int
    new_pieces: tuple[tuple[int, str], ...]
    grown: tuple[str, ...]

    def summary(self) -> str:
        """One line for the command line."""
        added = ", ".join(f"{piece}={i}" for i, piece in self.new_pieces) or "none"
        return (
            f"wrote {self.out} from {self.workdir} at step {self.step}: vocabulary "
            f"{self.old_vocab_size} -> {self.new_vocab_size} (new: {added}); grew {len(self.grown)} "
            f"leaves; continue with `metatrain train --workdir {self.out} --set trainer.steps=N`"
        )


def check_extension(old_tokenizer: StoragePath, new_tokenizer: StoragePath) -> tuple[int, int, tuple[tuple[int, str], ...]]:
    """`(V_old, V_new, new pieces)` when `new_tokenizer` keeps every id of `old_tokenizer`.

    Raises:
        UserError: a file is unreadable, or an old id changed meaning (the first one is named).
    """
    old, new = read_model_proto(old_tokenizer), read_model_proto(new_tokenizer)
    changed = first_changed_id(old, new)
    if changed is not None:
        i, was, now = changed
        raise UserError(
            f"tokenizer {new_tokenizer} is not an extension of the run's tokenizer {old_tokenizer}: id {i} "
            f"was {was}, is {now}; the checkpoint's row {i} would mean something else. Make the new "
            f"tokenizer with `metatrain tokenizer extend --base {old_tokenizer} ...`"
        )
    added = tuple((i, new.pieces[i].piece) for i in range(len(old.pieces), len(new.pieces)))
    return len(old.pieces), len(new.pieces), added


def _read_run_config(workdir: StoragePath) -> RunConfig:
    if not (workdir / CHECKPOINTS_DIR).is_dir():
        raise UserError(f"{workdir} holds no checkpoints; give the --workdir of a run trained with `metatrain train`")
    if not (workdir / CONFIG_FILE).is_file():
        raise UserError(f"{workdir}/{CONFIG_FILE} is missing; give the --workdir of a run trained with `metatrain train`")
    return load_config(workdir / CONFIG_FILE)


def resize_checkpoint(
    workdir: str | StoragePath,
    tokenizer: str | StoragePath,
    out: str | StoragePath,
    *,
    tags: str | StoragePath | None = None,
    seed: int = 0,
    noise_scale: float = DEFAULT_NOISE_SCALE,
) -> ResizeReport:
    """Writes `out`: the run in `workdir` at its newest checkpoint, for the extended `tokenizer`.

    `out` gets `config.yaml` (the run's config with `model.vocab_size` = V_new and
    `data.tokenizer`/`data.tags` naming `out`'s own copies), `tokenizer.model`,
    `tags.yaml` and one checkpoint at the same step: vocab-sized parameters grown
    with `grow_vocab_axis`, their Adam moments zero for the new ids, everything else
    (old rows included) bit-identical. `workdir` is only read.

    Every path may be local or `gs://BUCKET/PATH`. A bucket `out` cannot be built aside
    and renamed into place: it is written in place, `config.yaml` last (the marker of a
    complete work directory), and its objects are deleted again when the build fails.

    Args:
        workdir: a run's work directory (its `tokenizer.model` is the old tokenizer).
        tokenizer: the new `.model`, `metatrain tokenizer extend` of the old one.
        out: the new work directory; must not exist, or be empty.
        tags: the tag registry of the new tokenizer (default: `workdir/tags.yaml`).
        seed: seed of the new rows' noise.
        noise_scale: the noise's standard deviation as a fraction of each feature's
            spread over the old rows.

    Raises:
        UserError: `out` is not empty; `workdir` is not a trained run; the tokenizer
            changes an old id, lacks a registry tag, or is unreadable.
        FaultError: no checkpoint of `workdir` restores, or `out` cannot be written.
    """
    check_output_dir(out, option="--out")  # before resolving: a symlink at --out is refused, not followed
    workdir, tokenizer, out = absolute(workdir), absolute(tokenizer), absolute(out)
    tags = absolute(tags) if tags is not None else workdir / TAGS_FILE
    if not (noise_scale >= 0 and math.isfinite(noise_scale)):
        raise UserError(f"--noise-scale {noise_scale}: must be a finite number >= 0")
    old_config = _read_run_config(workdir)
    old_vocab, new_vocab, new_pieces = check_extension(workdir / TOKENIZER_FILE, tokenizer)
    if old_config.model.vocab_size != old_vocab:
        raise UserError(
            f"{workdir}/{CONFIG_FILE} has model.vocab_size={old_config.model.vocab_size} but "
            f"{workdir}/{TOKENIZER_FILE} has {old_vocab} pieces; the work directory is inconsistent"
        )
    SpmTokenizer.load(tokenizer, load_registry(tags))  # every tag present, as a control piece

    old_program = build_train_program(on_one_device(old_config), host_devices())
    restored = _restore_newest(workdir, old_config, old_program.abstract_state())

    new_config = dataclasses.replace(
        old_config,
        model=dataclasses.replace(old_config.model, vocab_size=new_vocab),
        data=dataclasses.replace(old_config.data, tokenizer=out / TOKENIZER_FILE, tags=out / TAGS_FILE),
    )
    new_program = build_train_program(on_one_device(new_config), host_devices())
    state, grown = grow_train_state(
        restored.state, new_program.abstract_state(),
        old_vocab_size=old_vocab, new_vocab_size=new_vocab, seed=seed, noise_scale=noise_scale,
    )
    write_workdir(out, new_config, tokenizer, tags, restored.step, state, restored.data_state)
    return ResizeReport(workdir, out, restored.step, old_vocab, new_vocab, new_pieces, grown)


def _restore_newest(workdir: StoragePath, config: RunConfig, abstract_state: Any):
    """The newest checkpoint of `workdir` that restores, read-only.

    Raises:
        UserError: there is none, or its stored config disagrees with `config.yaml` in a
            key that decides what was trained.
    """

    def validate(step: int, stored: dict) -> None:
        diffs = config_differences(stored, config_to_dict(config), workdir)
        if diffs:
            keys = "; ".join(f"{key}: {old} -> {new}" for key, old, new in diffs)
            raise UserError(
                f"{workdir}/{CONFIG_FILE} does not describe its checkpoint at step {step} ({keys}); "
                "resize a work directory as `metatrain train` left it"
            )

    checkpointer = Checkpointer(workdir, read_only=True)
    try:
        restored = checkpointer.restore_latest(abstract_state, validate)
    finally:
        checkpointer.close()
    if restored is None:
        raise UserError(f"{workdir} holds no complete checkpoint; train first with `metatrain train --workdir {workdir}`")
    return restored


