"""`metatrain tokenizer resize-checkpoint`: a run carried over to an extended tokenizer.

One module-scoped tiny run (4 steps) is extended with two control tags and resized;
the tests read the resized checkpoint back, continue it, and compare its losses with
the same run continued without resizing. Refusals (a tokenizer that changes an old id,
an --out that is not empty) must leave both work directories as they were.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from sentencepiece import sentencepiece_model_pb2 as model_pb2

from metatrain.config import config_to_dict, load_config
from metatrain.errors import UserError
from metatrain.io.paths import DEFAULT_TAGS, REPO_ROOT
from metatrain.run.checkpoint import Checkpointer
from metatrain.run.create import grow_train_state
from metatrain.run.program import build_train_program
from metatrain.run.state import init_state
from metatrain.tokenizer import extend_tokenizer, load_registry
from metatrain.tokenizer.resize import DEFAULT_NOISE_SCALE
from metatrain.train.loop import train
from metatrain.train.resize import resize_checkpoint

TINY = REPO_ROOT / "configs" / "tiny.yaml"
STEPS, MORE_STEPS = 4, 6
OLD_VOCAB = 4096
NEW_TAGS = ("<|toxic|>", "<|helpful|>")
TABLE = "params/embedding/table"
MOMENTS = ("opt_state/1/0/mu/embedding/table", "opt_state/1/0/nu/embedding/table")


def tiny_overrides(steps: int) -> list[str]:
    return [f"trainer.steps={steps}", f"checkpoint.every={STEPS}", "trainer.eval_every=0",
            "trainer.progress=false", "trainer.log_every=1"]


def train_losses(workdir: Path) -> dict[int, float]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def leaves_by_name(tree) -> dict[str, np.ndarray]:
    """`{"params/embedding/table": array, ...}` on the host."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        name = "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
        out[name] = np.asarray(jax.device_get(leaf))
    return out


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


def test_grow_train_state_grows_an_untied_output_projection_along_its_vocab_axis():
    """No training: a fresh untied model, grown from 13 to 17 ids (prime sizes)."""
    def program(vocab):
        config = load_config(TINY, ["model.tie_embeddings=false", f"model.vocab_size={vocab}", "mesh.data=1"])
        return build_train_program(config, jax.devices()[:1])

    small, large = program(13), program(17)
    state = init_state(small.model, small.optimizer, small.shardings, seed=0)
    grown, names = grow_train_state(state, large.abstract_state(), old_vocab_size=13, new_vocab_size=17, seed=3)
    assert set(names) == {TABLE, "params/output_projection",
                          *(f"opt_state/1/0/{m}/{p}" for m in ("mu", "nu")
                            for p in ("embedding/table", "output_projection"))}
    before, after = leaves_by_name(state), leaves_by_name(grown)
    out_before, out_after = before["params/output_projection"], after["params/output_projection"]  # [D, V]
    assert out_after.shape == (out_before.shape[0], 17)
    assert np.array_equal(out_after[:, :13], out_before)
    assert np.allclose(out_after[:, 13:], out_before.mean(1, keepdims=True),
                       atol=6 * DEFAULT_NOISE_SCALE * out_before.std(1).max())
    # Each table draws its own noise (same seed, different tables).
    noise_in = after[TABLE][13:] - before[TABLE].mean(0)  # [4, D]
    noise_out = out_after[:, 13:].T - out_before.mean(1)  # [4, D]
    assert not np.allclose(noise_in / before[TABLE].std(0), noise_out / out_before.std(1))

    wrong = program(13).abstract_state()  # same vocabulary but another width: not a resize
    wrong = jax.tree.map(lambda s: jax.ShapeDtypeStruct(tuple(d + 1 for d in s.shape), s.dtype), wrong)
    with pytest.raises(ValueError, match="is not a vocabulary resize"):
        grow_train_state(state, wrong, old_vocab_size=13, new_vocab_size=17)
