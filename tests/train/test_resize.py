"""`metatrain tokenizer resize-checkpoint`: a run carried over to an extended tokenizer.

One module-scoped tiny run (4 steps) is extended with two control tags and resized;
the tests read the resized checkpoint back, continue it, and compare its losses with
the same run continued without resizing. Refusals (a tokenizer that changes an old id,
an --out that is not empty) must leave both work directories as they were. A resize into
a store (local disk, or a bucket) writes what a resize into a local directory writes.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from sentencepiece import sentencepiece_model_pb2 as model_pb2

from metatrain.cli import main
from metatrain.config import config_to_dict, load_config
from metatrain.errors import UserError
from metatrain.io.paths import DEFAULT_TAGS, REPO_ROOT
from metatrain.io.storage import as_path
from metatrain.run.checkpoint import Checkpointer
from metatrain.run.program import build_train_program
from metatrain.tokenizer import extend_tokenizer, load_registry
from metatrain.tokenizer.resize import DEFAULT_NOISE_SCALE
from metatrain.train.loop import train
from metatrain.train.resize import resize_checkpoint

from ..conftest import TINY, error_lines, leaves_by_name, train_losses
from ..conftest import run_cli as run_metatrain

STEPS, MORE_STEPS = 4, 6
OLD_VOCAB = 4096
NEW_TAGS = ("<|toxic|>", "<|helpful|>")
TABLE = "params/embedding/table"
MOMENTS = ("opt_state/1/0/mu/embedding/table", "opt_state/1/0/nu/embedding/table")


def tiny_overrides(steps: int) -> list[str]:
    return [f"trainer.steps={steps}", f"checkpoint.every={STEPS}", "trainer.eval_every=0",
            "trainer.progress=false", "trainer.log_every=1"]


def restore(workdir: Path):
    """The newest checkpoint of `workdir`, restored as training would (over all 8 devices)."""
    config = load_config(workdir / "config.yaml")
    checkpointer = Checkpointer(workdir, read_only=True)
    try:
        restored = checkpointer.restore_latest(build_train_program(config, jax.devices()).abstract_state())
    finally:
        checkpointer.close()
    assert restored is not None
    return config, restored


def tree_digest(root: Path) -> dict[str, str]:
    """SHA-256 of every file under `root`, by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("METATRAIN_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "metatrain.cli", "tokenizer", "resize-checkpoint", *args],
                          capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=300)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 4-step tiny run, an extension of its tokenizer by `NEW_TAGS`, and the resize."""
    root = tmp_path_factory.mktemp("resize")
    base = root / "base"
    train(load_config(TINY, tiny_overrides(STEPS)), base)

    tags = root / "my_tags.yaml"
    shipped = DEFAULT_TAGS.read_text()
    anchor = '  bad: "<|bad|>"\n'
    assert anchor in shipped
    tags.write_text(shipped.replace(anchor, anchor + '  toxic: "<|toxic|>"\n  helpful: "<|helpful|>"\n'))
    extended = extend_tokenizer(base / "tokenizer.model", load_registry(tags), root / "new.model")
    assert extended.added == {tag: OLD_VOCAB + i for i, tag in enumerate(NEW_TAGS)}

    before = tree_digest(base)
    report = resize_checkpoint(base, root / "new.model", root / "resized", tags=tags, seed=0)
    assert tree_digest(base) == before, "resizing wrote into the run it read"
    return root, base, root / "new.model", tags, report


def test_resized_checkpoint_grows_vocab_rows_and_keeps_everything_else(run):
    root, base, new_model, tags, report = run
    out = root / "resized"
    new_vocab = OLD_VOCAB + len(NEW_TAGS)
    assert (report.step, report.old_vocab_size, report.new_vocab_size) == (STEPS, OLD_VOCAB, new_vocab)
    assert report.new_pieces == tuple((OLD_VOCAB + i, tag) for i, tag in enumerate(NEW_TAGS))
    assert report.grown == (TABLE, *MOMENTS)  # tiny ties its embeddings: no output projection

    # The config names the new vocabulary and the new directory's own tokenizer and tags.
    config = load_config(out / "config.yaml")
    assert config.model.vocab_size == new_vocab
    assert config.data.tokenizer == out / "tokenizer.model" and config.data.tags == out / "tags.yaml"
    assert (out / "tokenizer.model").read_bytes() == new_model.read_bytes()
    assert (out / "tags.yaml").read_bytes() == tags.read_bytes()
    assert not (out / "train.lock").exists()
    old_config, old = restore(base)
    changed = {k for k, a, b in _flat_diff(config_to_dict(old_config), config_to_dict(config))}
    assert changed == {"model.vocab_size", "data.tokenizer", "data.tags"}

    _, new = restore(out)
    assert new.step == old.step == STEPS and int(new.state.step) == STEPS
    assert new.data_state == old.data_state
    assert new.config == config_to_dict(config)
    before, after = leaves_by_name(old.state), leaves_by_name(new.state)
    assert before.keys() == after.keys()

    table, grown = before[TABLE], after[TABLE]  # [V, D]
    assert grown.shape == (new_vocab, table.shape[1]) and grown.dtype == table.dtype
    assert np.array_equal(grown[:OLD_VOCAB], table)  # bit for bit
    added = grown[OLD_VOCAB:].astype(np.float64)
    mean, spread = table.astype(np.float64).mean(0), table.astype(np.float64).std(0)
    assert np.all(np.abs(added - mean) <= 6 * DEFAULT_NOISE_SCALE * spread)  # mean + 1% noise
    assert not np.array_equal(added[0], added[1]) and not np.array_equal(added[0], mean)

    for name in MOMENTS:
        assert np.array_equal(after[name][:OLD_VOCAB], before[name])
        assert np.all(after[name][OLD_VOCAB:] == 0)
        assert np.any(before[name] != 0)  # trained moments, so "identical" means something
    for name in before.keys() - {TABLE, *MOMENTS}:
        assert after[name].dtype == before[name].dtype and np.array_equal(after[name], before[name]), name


def _flat_diff(a: dict, b: dict, prefix: str = ""):
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            yield from _flat_diff(x, y, f"{prefix}{key}.")
        elif x != y:
            yield f"{prefix}{key}", x, y


def test_resized_run_continues_with_the_loss_it_stopped_at(run):
    root, base, new_model, tags, _ = run
    out = root / "resized"
    summary = train(load_config(out / "config.yaml", [f"trainer.steps={MORE_STEPS}"]), out)
    assert (summary.start_step, summary.final_step) == (STEPS, MORE_STEPS)
    resized = train_losses(out)
    assert sorted(resized) == list(range(STEPS + 1, MORE_STEPS + 1))

    before = train_losses(base)[STEPS]
    assert abs(resized[STEPS + 1] - before) <= 0.05 * before, (resized[STEPS + 1], before)

    # The same run continued without resizing: step 5's loss is computed from the
    # parameters of step 4, so the two differ only by the new logits in the softmax's
    # normaliser. A new row at the mean of the old ones has exp(h . mean) <= the mean
    # of exp(h . row) (Jensen), so each new id adds at most Z/V: the loss grows, by at
    # most log(1 + 2/V) (the 1% noise and the z-loss move that bound by far less than half).
    plain = root / "plain"
    shutil.copytree(base, plain)
    train(load_config(plain / "config.yaml", [f"trainer.steps={MORE_STEPS}"]), plain)
    reference = train_losses(plain)[STEPS + 1]
    bound = np.log1p(len(NEW_TAGS) / OLD_VOCAB)
    assert 0 < resized[STEPS + 1] - reference <= 1.5 * bound, (resized[STEPS + 1], reference, bound)

    # The command line does the same (default seed and noise scale).
    result = run_cli("--workdir", str(base), "--tokenizer", str(new_model), "--out", str(root / "by_cli"),
                     "--tags", str(tags))
    assert result.returncode == 0, result.stderr
    assert f"wrote {root / 'by_cli'}" in result.stderr and f"{OLD_VOCAB} -> {OLD_VOCAB + len(NEW_TAGS)}" in result.stderr
    assert load_config(root / "by_cli" / "config.yaml").model.vocab_size == OLD_VOCAB + len(NEW_TAGS)


def test_tokenizer_that_changes_an_old_id_is_refused(run, tmp_path):
    root, base, new_model, tags, _ = run
    proto = model_pb2.ModelProto()
    proto.ParseFromString(new_model.read_bytes())
    old_piece = proto.pieces[300].piece
    proto.pieces[300].piece = old_piece + "_renamed"
    bad = tmp_path / "renamed.model"
    bad.write_bytes(proto.SerializeToString())
    before = tree_digest(base)

    with pytest.raises(UserError, match=r"id 300 was") as error:
        resize_checkpoint(base, bad, tmp_path / "out", tags=tags)
    assert "\n" not in str(error.value) and repr(old_piece) in str(error.value)
    assert not (tmp_path / "out").exists()

    result = run_cli("--workdir", str(base), "--tokenizer", str(bad), "--out", str(tmp_path / "out"),
                     "--tags", str(tags))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "id 300" in result.stderr
    lines = [l for l in result.stderr.splitlines() if l.strip() and not l.startswith("WARNING: All log messages before absl")]
    assert len(lines) == 1 and lines[0].startswith("metatrain tokenizer: error: "), result.stderr
    assert not (tmp_path / "out").exists()
    assert tree_digest(base) == before


def test_out_that_is_not_empty_is_refused(run, tmp_path):
    root, base, new_model, tags, _ = run
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before, mine = tree_digest(base), tree_digest(out)
    for target in (out, base):  # the run itself is a non-empty --out too
        with pytest.raises(UserError, match="choose another --out"):
            resize_checkpoint(base, new_model, target, tags=tags)
    assert tree_digest(base) == before and tree_digest(out) == mine


@pytest.mark.hostile
def test_out_that_is_a_symlink_is_refused_not_followed(run, tmp_path):
    root, base, new_model, tags, _ = run
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(UserError, match="is a symbolic link"):
        resize_checkpoint(base, new_model, tmp_path / "link", tags=tags)
    assert (tmp_path / "link").is_symlink() and not any((tmp_path / "real").iterdir())


# -- a resize into a store: local disk or a bucket (the GCS emulator) ---------------------

ANCHOR = '  bad: "<|bad|>"\n'
NEW_TAG_LINES = '  toxic: "<|toxic|>"\n  helpful: "<|helpful|>"\n'


@pytest.fixture(scope="module")
def extended(workdir, tmp_path_factory):
    """The session run's tokenizer extended by two tags: `(new.model, tags.yaml)`."""
    root = tmp_path_factory.mktemp("extended")
    tags = root / "tags.yaml"
    tags.write_text(DEFAULT_TAGS.read_text().replace(ANCHOR, ANCHOR + NEW_TAG_LINES))
    extend_tokenizer(workdir / "tokenizer.model", load_registry(tags), root / "new.model")
    return root / "new.model", tags


def local_files(root: Path) -> dict[str, bytes]:
    """`{relative name: bytes}` of every file under `root`."""
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def stored_files(store, under: str) -> dict[str, bytes]:
    """`{relative name: bytes}` of every file under `under` in `store`."""
    return {name: store.read_bytes(f"{under}/{name}") for name in store.files(under)}


def shape_of(files: dict[str, bytes]) -> set[str]:
    """The file names, with orbax's data files (`.../d/HASH`: random names, and as many
    as its writes happened to be batched into) as one `.../d/*`."""
    return {re.sub(r"/d/[0-9a-f]{32}$", "/d/*", name) for name in files}


def test_a_resize_into_a_store_equals_the_local_one_and_trains_further(workdir, extended, store, tmp_path):
    new_model, tags = extended
    local, remote = tmp_path / "resized", f"{store}/resized"
    resize_checkpoint(workdir, new_model, local, tags=tags)
    assert main(["tokenizer", "resize-checkpoint", "--workdir", str(workdir), "--tokenizer", str(new_model),
                 "--out", remote, "--tags", str(tags)]) == 0

    want, got = local_files(local), stored_files(store, "resized")
    assert shape_of(got) == shape_of(want) and "train.lock" not in got  # the lock was released
    for name in ("tokenizer.model", "tags.yaml"):
        assert got[name] == want[name]
    assert got["config.yaml"].decode() == want["config.yaml"].decode().replace(str(local), remote)

    (_, a), (remote_config, b) = restore(local), restore(as_path(remote))
    assert str(remote_config.data.tokenizer) == f"{remote}/tokenizer.model"
    assert str(remote_config.data.tags) == f"{remote}/tags.yaml"
    assert b.config == config_to_dict(remote_config)  # the checkpoint names the store's own copies
    assert a.step == b.step and a.data_state == b.data_state
    for x, y in zip(jax.tree_util.tree_leaves(a.state), jax.tree_util.tree_leaves(b.state), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and np.array_equal(x, y)

    done = run_metatrain("train", "--workdir", remote, "--set", f"trainer.steps={a.step + 1}", env=store.env())
    assert done.returncode == 0, done.stderr
    assert sorted(train_losses(as_path(remote))) == [a.step + 1]

    # A run in the store resizes, too (to the tokenizer it already has, so nothing grows;
    # in a new process, since this one's file system has cached listings the trainer changed).
    back = run_metatrain("tokenizer", "resize-checkpoint", "--workdir", remote, "--tokenizer", str(new_model),
                         "--out", str(tmp_path / "from_store"), env=store.env())
    assert back.returncode == 0, back.stderr
    assert f"from {remote} at step {a.step + 1}: vocabulary 4098 -> 4098 (new: none); grew 0 leaves" in back.stderr
    assert (tmp_path / "from_store" / "tags.yaml").read_bytes() == tags.read_bytes()  # the run's own tags


def test_an_out_in_a_store_that_is_not_empty_is_refused_in_one_line_and_nothing_changes(workdir, extended, store,
                                                                                        capsys):
    new_model, tags = extended
    out = f"{store}/taken"
    store.write_text("taken/notes.txt", "mine")
    before, run_before = stored_files(store, "taken"), local_files(workdir)
    assert main(["tokenizer", "resize-checkpoint", "--workdir", str(workdir), "--tokenizer", str(new_model),
                 "--out", out, "--tags", str(tags)]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert lines == [f"metatrain tokenizer: error: --out {out} already exists and is not empty; metatrain never "
                     "writes into a directory with contents: remove it or choose another --out"], lines
    assert store.files() == ["taken/notes.txt"]
    assert stored_files(store, "taken") == before and local_files(workdir) == run_before
