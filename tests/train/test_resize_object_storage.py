"""`metatrain tokenizer resize-checkpoint` with its new work directory in a bucket
(`gs://`, against the GCS emulator): the same checkpoint arrays and files as a resize
into a local directory, a run that trains further from the bucket (and resizes from
there), and a non-empty bucket `--out` refused without a change."""

from __future__ import annotations

import re
from pathlib import Path

import jax
import numpy as np
import pytest

from metatrain.cli import main
from metatrain.config import config_to_dict, load_config
from metatrain.io.paths import DEFAULT_TAGS
from metatrain.io.storage import as_path
from metatrain.run.checkpoint import Checkpointer
from metatrain.run.create import host_devices, on_one_device
from metatrain.run.program import build_train_program
from metatrain.tokenizer import extend_tokenizer, load_registry
from metatrain.train.resize import resize_checkpoint

from .conftest import error_lines, run_cli, train_losses

ANCHOR = '  bad: "<|bad|>"\n'
NEW_TAGS = '  toxic: "<|toxic|>"\n  helpful: "<|helpful|>"\n'


@pytest.fixture(scope="module")
def extended(workdir, tmp_path_factory):
    """The session run's tokenizer extended by two tags: `(new.model, tags.yaml)`."""
    root = tmp_path_factory.mktemp("extended")
    tags = root / "tags.yaml"
    tags.write_text(DEFAULT_TAGS.read_text().replace(ANCHOR, ANCHOR + NEW_TAGS))
    extend_tokenizer(workdir / "tokenizer.model", load_registry(tags), root / "new.model")
    return root / "new.model", tags


def local_files(root: Path) -> dict[str, bytes]:
    """`{relative name: bytes}` of every file under `root`."""
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def bucket_files(emulator, url: str) -> dict[str, bytes]:
    """`{relative name: bytes}` of every object under `url` (`gs://BUCKET/PREFIX`), listed by the emulator."""
    name, prefix = url.removeprefix("gs://").split("/", 1)
    return {key[len(prefix) + 1:]: as_path(f"gs://{name}/{key}").read_bytes()
            for key in emulator.objects(name, prefix + "/")}


def shape_of(files: dict[str, bytes]) -> set[str]:
    """The file names, with orbax's data files (`.../d/HASH`: random names, and as many
    as its writes happened to be batched into) as one `.../d/*`."""
    return {re.sub(r"/d/[0-9a-f]{32}$", "/d/*", name) for name in files}


def restore(workdir):
    """`(config, restored checkpoint)` of `workdir`, on one host device."""
    config = load_config(as_path(str(workdir)) / "config.yaml")
    checkpointer = Checkpointer(workdir, read_only=True)
    try:
        program = build_train_program(on_one_device(config), host_devices())
        restored = checkpointer.restore_latest(program.abstract_state())
    finally:
        checkpointer.close()
    return config, restored


def test_a_resize_into_a_bucket_equals_the_local_one_and_trains_further(workdir, extended, bucket, tmp_path,
                                                                         gcs_emulator):
    new_model, tags = extended
    local, remote = tmp_path / "resized", f"{bucket}/resized"
    resize_checkpoint(workdir, new_model, local, tags=tags)
    assert main(["tokenizer", "resize-checkpoint", "--workdir", str(workdir), "--tokenizer", str(new_model),
                 "--out", remote, "--tags", str(tags)]) == 0

    want, got = local_files(local), bucket_files(gcs_emulator, remote)
    assert shape_of(got) == shape_of(want) and "train.lock" not in got  # the lock was released
    for name in ("tokenizer.model", "tags.yaml"):
        assert got[name] == want[name]
    assert got["config.yaml"].decode() == want["config.yaml"].decode().replace(str(local), remote)

    (_, a), (remote_config, b) = restore(local), restore(remote)
    assert str(remote_config.data.tokenizer) == f"{remote}/tokenizer.model"
    assert str(remote_config.data.tags) == f"{remote}/tags.yaml"
    assert b.config == config_to_dict(remote_config)  # the checkpoint names the bucket's own copies
    assert a.step == b.step and a.data_state == b.data_state
    for x, y in zip(jax.tree_util.tree_leaves(a.state), jax.tree_util.tree_leaves(b.state), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and np.array_equal(x, y)

    done = run_cli("train", "--workdir", remote, "--set", f"trainer.steps={a.step + 1}", env=gcs_emulator.env())
    assert done.returncode == 0, done.stderr
    assert sorted(train_losses(as_path(remote))) == [a.step + 1]

    # A run in the bucket resizes, too (to the tokenizer it already has, so nothing grows;
    # in a new process, since this one's file system has cached listings the trainer changed).
    back = run_cli("tokenizer", "resize-checkpoint", "--workdir", remote, "--tokenizer", str(new_model),
                   "--out", str(tmp_path / "from_bucket"), env=gcs_emulator.env())
    assert back.returncode == 0, back.stderr
    assert f"from {remote} at step {a.step + 1}: vocabulary 4098 -> 4098 (new: none); grew 0 leaves" in back.stderr
    assert (tmp_path / "from_bucket" / "tags.yaml").read_bytes() == tags.read_bytes()  # the run's own tags


def test_a_bucket_out_that_is_not_empty_is_refused_in_one_line_and_nothing_changes(workdir, extended, bucket,
                                                                                    gcs_emulator, capsys):
    new_model, tags = extended
    out = f"{bucket}/taken"
    as_path(f"{out}/notes.txt").write_text("mine")
    before, run_before = bucket_files(gcs_emulator, out), local_files(workdir)
    assert main(["tokenizer", "resize-checkpoint", "--workdir", str(workdir), "--tokenizer", str(new_model),
                 "--out", out, "--tags", str(tags)]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert lines == [f"metatrain tokenizer: error: --out {out} already exists and is not empty; metatrain never "
                     "writes into a directory with contents: remove it or choose another --out"], lines
    assert gcs_emulator.objects(bucket.removeprefix("gs://")) == ["taken/notes.txt"]
    assert bucket_files(gcs_emulator, out) == before and local_files(workdir) == run_before
