"""The training loop end to end on the tiny preset: metrics, checkpoints, exact resume,
sharded == unsharded, role weights, non-finite losses, the command line; a run preempted
and resumed in a work directory on local disk and in a bucket (`store`).

Runs use `configs/tiny.yaml` with a handful of steps; a module-scoped uninterrupted run
is the reference the resume and sharding tests compare against.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metatrain.config import load_config
from metatrain.data import global_batch
from metatrain.errors import EXIT_PREEMPTED, DivergedError, UserError
from metatrain.io.paths import REPO_ROOT
from metatrain.io.storage import as_path
from metatrain.roles import Role
from metatrain.train.hooks import FunctionHook
from metatrain.train.loop import Trainer, train

from ..conftest import (
    STEPS,
    TINY,
    error_lines,
    make_docs,
    read_records,
    run_cli,
    tiny_config,
    train_losses,
    write_jsonl,
)

# Keys every training record must carry (a contract read by scripts and sweeps).
TRAIN_KEYS = (
    "step", "loss", "loss/text", "loss/thinking", "loss/mantra", "loss/tag", "accuracy/text",
    "tokens/text", "tokens/thinking", "learning_rate", "grad_norm", "tokens_per_sec",
    "step_time", "mfu",
)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted 6-step run over all 8 devices (data-parallel)."""
    workdir = tmp_path_factory.mktemp("reference")
    summary = train(tiny_config(), workdir)
    return workdir, summary


def test_run_writes_metrics_checkpoints_and_a_self_contained_workdir(reference_run):
    workdir, summary = reference_run
    assert summary.start_step == 0 and summary.final_step == STEPS and not summary.preempted
    records = read_records(workdir)
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == list(range(1, STEPS + 1))
    for record in train_records:
        missing = [k for k in TRAIN_KEYS if k not in record]
        assert not missing, f"metrics record lacks {missing}"
        assert np.isfinite(record["loss"]) and record["tokens/text"] > 0
        assert record["mfu"] is None  # no peak FLOPs for a CPU
    eval_records = [r for r in records if "eval/loss" in r]
    assert [r["step"] for r in eval_records] == [3, 6]
    assert all(r["eval/loss/text"] is not None for r in eval_records)
    # Warmup: the learning rate the step reports grows over the first steps.
    lrs = [r["learning_rate"] for r in train_records]
    assert lrs[0] < lrs[1] < lrs[2]

    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [3, 6]
    for name in ("config.yaml", "tokenizer.model", "tags.yaml"):
        assert (workdir / name).is_file(), name
    saved = load_config(workdir / "config.yaml")
    assert saved == tiny_config()
    assert (workdir / "tensorboard").is_dir()


def test_resume_after_a_crash_equals_the_uninterrupted_run(reference_run, tmp_path):
    ref_dir, ref_summary = reference_run

    class Crash(Exception):
        pass

    def crash_after_step_4(info):
        if info.step == 4:  # the checkpoint of step 3 exists; step 4 is lost
            raise Crash()

    with pytest.raises(Crash):
        train(tiny_config(), tmp_path, hooks=(FunctionHook(every=1, fn=crash_after_step_4),))
    summary = train(tiny_config(), tmp_path)
    assert summary.start_step == 3 and summary.final_step == STEPS
    resumed, reference = train_losses(tmp_path), train_losses(ref_dir)
    # metrics.jsonl is appended to, so steps 4 (twice) .. 6 are there; CPU runs are exact.
    for step in range(1, STEPS + 1):
        assert resumed[step] == reference[step], f"step {step}: {resumed[step]} != {reference[step]}"
    assert summary.eval_metrics == ref_summary.eval_metrics


def test_sharded_run_equals_unsharded_run(tmp_path):
    assert jax.device_count() == 8
    sharded = train(
        tiny_config("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "trainer.eval_every=0"),
        tmp_path / "sharded",
    )
    single = train(
        tiny_config("mesh.data=1", "trainer.eval_every=0"),
        tmp_path / "single",
        devices=jax.devices()[:1],
    )
    a, b = train_losses(tmp_path / "sharded"), train_losses(tmp_path / "single")
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([a[s] for s in a], [b[s] for s in a], rtol=2e-5)
    # The losses move: equal losses are not an artefact of a run that does nothing.
    assert a[STEPS] < a[1] - 0.1
    assert sharded.final_step == single.final_step == STEPS


@pytest.fixture(scope="module")
def first_batch_and_params(tmp_path_factory):
    """The tiny model's initial parameters and first local training batch."""
    config = tiny_config()
    trainer = Trainer(config, tmp_path_factory.mktemp("unused"))
    try:
        state, _ = trainer.initial_state()
        local = next(trainer.train_iter)
        return trainer.model, config, state.params, local, trainer.batch_sharding
    finally:
        trainer.close()


def _loss_and_grads(setup, weights_override: str | None, targets: np.ndarray | None = None):
    from metatrain.run.step import _loss_and_stats

    model, config, params, local, sharding = setup
    if weights_override:
        config = load_config(TINY, [weights_override])
    batch = global_batch(dict(local, targets=local["targets"] if targets is None else targets), sharding)

    def loss_fn(params):
        return _loss_and_stats(params, batch, model, config.model, config.loss)

    (loss, stats), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    return float(loss), jax.device_get(stats), jax.device_get(grads)


@pytest.mark.parametrize("role", ["text", "thinking"])
def test_zero_role_weight_removes_that_role_from_loss_and_gradient(role, first_batch_and_params):
    """Changing the targets of a zero-weight role changes nothing the optimiser sees."""
    local = first_batch_and_params[3]
    role_id = Role.from_label(role)
    sel = local["target_roles"] == role_id
    assert sel.sum() > 0
    scrambled = np.array(local["targets"])
    scrambled[sel] = (scrambled[sel] + 17) % 4096

    zero = f"loss.weights.{role}=0.0"
    loss_a, stats_a, grads_a = _loss_and_grads(first_batch_and_params, zero)
    loss_b, stats_b, grads_b = _loss_and_grads(first_batch_and_params, zero, scrambled)
    assert loss_a == loss_b
    jax.tree.map(np.testing.assert_array_equal, grads_a, grads_b)
    # The role is still measured (reported), just not trained on.
    assert stats_a[f"nll_sum/{role}"] != stats_b[f"nll_sum/{role}"]

    # With weight 1 the same change does move loss and gradient (the test can fail).
    loss_c, _, grads_c = _loss_and_grads(first_batch_and_params, None)
    loss_d, _, grads_d = _loss_and_grads(first_batch_and_params, None, scrambled)
    assert loss_c != loss_d
    diff = jax.tree.map(lambda x, y: float(np.abs(x - y).max()), grads_c, grads_d)
    assert max(jax.tree.leaves(diff)) > 0


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    config = tiny_config("checkpoint.every=2", "trainer.eval_every=0", "checkpoint.async_save=false")
    trainer = Trainer(config, tmp_path)
    real_step = trainer.train_step
    calls = {"n": 0}

    def step_that_diverges_at_3(state, batch):
        calls["n"] += 1
        if calls["n"] == 3:  # poison the parameters: the real step then computes NaN
            state = state.replace(params=jax.tree.map(lambda p: p * jnp.nan, state.params))
        return real_step(state, batch)

    trainer.train_step = step_that_diverges_at_3
    try:
        with pytest.raises(DivergedError, match=r"at step 3.*step 2"):
            trainer.run()
    finally:
        trainer.close()
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [2]
    # The kept checkpoint is good: resuming from it trains on with finite losses.
    summary = train(config, tmp_path)
    assert summary.start_step == 2 and np.isfinite(summary.last_metrics["loss"])


def test_micro_batches_give_the_same_step_as_the_whole_batch(tmp_path):
    common = ("trainer.steps=2", "trainer.eval_every=0", "trainer.batch_size=16")
    whole = train(tiny_config(*common), tmp_path / "whole")
    accum = train(
        tiny_config(*common, "trainer.grad_accum=2"),
        tmp_path / "accum",
    )
    a, b = train_losses(tmp_path / "whole"), train_losses(tmp_path / "accum")
    np.testing.assert_allclose([a[1], a[2]], [b[1], b[2]], rtol=2e-5)
    assert whole.last_metrics["tokens/text"] == accum.last_metrics["tokens/text"]


def test_the_train_command_trains_resumes_and_prints_a_summary(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    cmd = [
        sys.executable, "-m", "metatrain.cli", "train", "--config", str(TINY),
        "--workdir", str(tmp_path), "--set", "trainer.steps=3", "--set", "trainer.eval_every=0",
        "--set", "trainer.progress=false",
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "trained steps 0 -> 3" in done.stdout and "per role: text" in done.stdout
    # The same command with more steps resumes from the workdir's checkpoint.
    cmd[cmd.index("trainer.steps=3")] = "trainer.steps=4"
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "trained steps 3 -> 4" in again.stdout
    # A typo in a key names the closest valid one and exits 2 without a traceback.
    bad = subprocess.run(
        cmd[:-2] + ["--set", "trainer.stepz=4"], env=env, capture_output=True, text=True, timeout=300
    )
    assert bad.returncode == 2 and "trainer.steps" in bad.stderr and "Traceback" not in bad.stderr


def test_a_model_that_does_not_fit_the_mesh_is_refused_before_compiling(tmp_path):
    from metatrain.errors import UserError

    with pytest.raises(UserError, match="model.n_kv_heads=2 is not divisible by 8"):
        Trainer(tiny_config("mesh.data=1", "mesh.tensor=8"), tmp_path)


@pytest.mark.slow
def test_the_readme_default_run_reaches_a_clearly_lower_loss():
    """`metatrain train` with no arguments (the README's first command), ~3 minutes."""
    workdir = REPO_ROOT / "runs" / "default"
    if workdir.exists():
        import shutil

        shutil.rmtree(workdir)
    done = subprocess.run(
        [sys.executable, "-m", "metatrain.cli", "train"], capture_output=True, text=True, timeout=900,
        cwd=REPO_ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    losses = train_losses(workdir)
    first, last = losses[min(losses)], losses[max(losses)]
    assert last < first - 2.0, (first, last)
    # docs/eval.md's first command: the report of the default run
    done = subprocess.run(
        [sys.executable, "-m", "metatrain.cli", "eval", "--workdir", str(workdir)], capture_output=True, text=True,
        timeout=600, cwd=REPO_ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "thinking ablation" in done.stdout and "too few documents" in done.stdout
    report = json.loads((workdir / "eval" / "200" / "report.json").read_text())
    assert report["documents"] == 9 and report["ablation"]["removed"]["minus_kept"]["bpb/text"] is not None


def test_data_seed_orders_the_data_and_trainer_seed_initialises_the_parameters(tmp_path):
    def first(*overrides):
        trainer = Trainer(tiny_config(*overrides), tmp_path / "unused")
        try:
            state, _ = trainer.initial_state()
            return next(trainer.train_iter), jax.device_get(state.params["embedding"]["table"])
        finally:
            trainer.close()

    batch, table = first()
    batch_data_seed, table_data_seed = first("data.seed=1")
    batch_trainer_seed, table_trainer_seed = first("trainer.seed=1")
    assert not np.array_equal(batch["inputs"], batch_data_seed["inputs"])
    np.testing.assert_array_equal(table, table_data_seed)
    for key in batch:
        np.testing.assert_array_equal(batch[key], batch_trainer_seed[key])
    assert not np.array_equal(table, table_trainer_seed)


def test_train_and_eval_share_one_loss_z_loss_included(tmp_path):
    """The eval loss of a batch is the loss the train step optimised on it."""
    trainer = Trainer(tiny_config("loss.z_loss=0.05", "mesh.data=1"), tmp_path, devices=jax.devices()[:1])
    try:
        state, _ = trainer.initial_state()
        batch = trainer.next_batch()
        stats = jax.device_get(trainer.eval_step(state.params, batch))
        _, metrics = trainer.train_step(state, batch)
        train_loss = float(metrics["loss"])
    finally:
        trainer.close()
    eval_loss = float(stats["loss_weighted_sum"]) / float(stats["weight_sum"])
    np.testing.assert_allclose(eval_loss, train_loss, rtol=1e-6)
    # Without the z-loss term the number would be clearly lower (so the test can fail).
    weights = tiny_config().loss.weights
    nll = sum(getattr(weights, r) * float(stats[f"nll_sum/{r}"]) for r in ("text", "thinking", "mantra", "tag"))
    count = sum(getattr(weights, r) * float(stats[f"count/{r}"]) for r in ("text", "thinking", "mantra", "tag"))
    assert eval_loss > nll / count + 0.1


def test_a_model_vocabulary_other_than_the_tokenizers_is_refused_at_start(tmp_path):
    from metatrain.errors import UserError

    for size in (4000, 4200):
        with pytest.raises(UserError, match=rf"model.vocab_size={size} but the tokenizer .*sample.model has 4096 pieces; set model.vocab_size: 4096"):
            Trainer(tiny_config(f"model.vocab_size={size}"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_trainer_profile_writes_a_trace_tensorboard_can_read(tmp_path):
    """Through the command line, in its own process (the profiler shares the process's
    runtimes: a test worker that has loaded libtpu for TPU compiles is no place for it)."""
    from jax.profiler import ProfileData

    done = run_cli("train", "--config", str(TINY), "--workdir", str(tmp_path), "--set", "trainer.steps=4",
                   "--set", "trainer.eval_every=0", "--set", "trainer.profile=[2, 2]")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "profile of steps 2-3 in" in done.stderr
    traces = sorted((tmp_path / "tensorboard" / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert len(traces) == 1, traces
    data = ProfileData.from_file(str(traces[0]))
    names = {plane.name for plane in data.planes}
    assert any(name.startswith("/host:") for name in names), names
    events = [e.name for plane in data.planes for line in plane.lines for e in line.events]
    assert any("train_step" in name for name in events)  # the jitted step ran while tracing


# -- preempted and resumed in a store: local disk or a bucket (the GCS emulator) ----------

PREEMPTED_STEPS = 60
PREEMPTED_ARGS = (
    "--config", str(TINY), "--set", f"trainer.steps={PREEMPTED_STEPS}", "--set", "trainer.log_every=1",
    "--set", "trainer.eval_every=20", "--set", "trainer.eval_batches=1", "--set", "trainer.progress=false",
    "--set", "checkpoint.every=5", "--set", "checkpoint.async_save=true",
)


def _losses(text: str) -> dict[int, float]:
    """Step -> loss from metrics.jsonl; a step logged twice (replayed after a resume) keeps its last value."""
    return {r["step"]: r["loss"] for r in map(json.loads, text.splitlines()) if "loss" in r}


def saved_steps(store, workdir: str) -> list[int]:
    """The steps of the complete checkpoints in `workdir` (a name in `store`): on local disk
    orbax renames a step's directory to the step when it is complete; in a bucket, which has
    no rename, it writes `commit_success.txt` into it."""
    steps = set()
    for name in store.files(workdir):
        parts = name.split("/")
        if len(parts) > 2 and parts[0] == "checkpoints" and parts[1].isdigit():
            if not store.is_bucket or parts[2] == "commit_success.txt":
                steps.add(int(parts[1]))
    return sorted(steps)


@pytest.fixture(scope="module")
def preempted_reference(tmp_path_factory):
    """The run the preemption test stops, uninterrupted, in a local work directory."""
    path = tmp_path_factory.mktemp("reference")
    done = run_cli("train", "--workdir", str(path), *PREEMPTED_ARGS)
    assert done.returncode == 0, done.stderr[-3000:]
    return _losses((path / "metrics.jsonl").read_text())


def test_a_run_in_a_store_is_preempted_and_resumes_exactly(preempted_reference, store):
    workdir = f"{store}/runs/tiny"
    env = dict(store.env(), JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    env.pop("METATRAIN_DEBUG", None)
    command = [sys.executable, "-m", "metatrain.cli", "train", "--workdir", workdir, *PREEMPTED_ARGS]
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while 10 not in saved_steps(store, "runs/tiny"):
        assert first.poll() is None, first.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint reached the store"
        time.sleep(0.05)
    assert "train.lock" in store.files("runs/tiny")
    first.send_signal(signal.SIGTERM)
    out, err = first.communicate(timeout=240)
    assert first.returncode == EXIT_PREEMPTED, err[-3000:]
    names = store.files("runs/tiny")
    assert "train.lock" not in names  # released on the way out
    steps = saved_steps(store, "runs/tiny")
    stopped = steps[-1]
    assert 10 <= stopped < PREEMPTED_STEPS, steps
    # Every step up to the checkpoint it stopped at reached metrics.jsonl in the store.
    logged = _losses(as_path(f"{workdir}/metrics.jsonl").read_text())
    assert set(range(1, stopped + 1)) <= set(logged)
    assert not any(n.startswith("metrics.jsonl.part") for n in names)
    for name in ("config.yaml", "tokenizer.model", "tags.yaml"):
        assert name in names
    assert any(n.startswith("tensorboard/events.out.tfevents") for n in names)

    # The same command again: it resumes from the checkpoint in the store to the end.
    again = run_cli("train", "--workdir", workdir, *PREEMPTED_ARGS, env=store.variables)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"trained steps {stopped} -> {PREEMPTED_STEPS}" in again.stdout
    resumed = _losses(as_path(f"{workdir}/metrics.jsonl").read_text())
    for step in range(1, PREEMPTED_STEPS + 1):  # CPU runs are exact
        assert resumed[step] == preempted_reference[step], f"step {step}: {resumed[step]} != {preempted_reference[step]}"


# -- checks before work ----------------------------------------------------------------------


@pytest.mark.hostile
def test_an_empty_eval_split_is_refused_before_anything_is_written_and_the_fix_then_works(tmp_path):
    from metatrain.data.split import id_hash, in_split

    # A small corpus whose ids all hash into the train split at the default eval_fraction.
    docs = [d for d in make_docs(60, seed=3) if not in_split(id_hash(d["id"]), "eval", 0.05)][:16]
    corpus = write_jsonl(tmp_path / "corpus.jsonl", docs)
    assert not any(in_split(id_hash(d["id"]), "eval", 0.05) for d in docs)
    assert any(in_split(id_hash(d["id"]), "eval", 0.5) for d in docs)
    workdir = tmp_path / "run"
    common = (f"data.sources=[{{path: {corpus}}}]", "trainer.seq_len=32", "checkpoint.every=1",
              "trainer.eval_every=2", "checkpoint.async_save=false")
    with pytest.raises(UserError, match=r"the eval split is empty.*raise data.eval_fraction"):
        train(tiny_config(*common), workdir)
    assert not workdir.exists() or not any(workdir.iterdir())  # no step, no checkpoint, no config
    summary = train(tiny_config(*common, "data.eval_fraction=0.5"), workdir)  # the fix it names
    assert summary.final_step == STEPS and summary.eval_metrics.get("eval/loss") is not None


@pytest.mark.hostile
def test_progress_is_a_line_every_log_every_steps_when_stderr_is_not_a_terminal(tmp_path, capsys):
    # As under nohup or a scheduler: stderr is a file, so no bar, but a line per window.
    train(tiny_config("trainer.steps=4", "trainer.log_every=2", "checkpoint.every=4", "trainer.eval_every=0",
                      "trainer.progress=true"),
          tmp_path)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("metatrain train: step")]
    assert [line.split()[3] for line in lines] == ["2/4", "4/4"], lines
    assert all(" loss " in line and "tokens/s" in line for line in lines)
    # trainer.progress=false turns it off, as it turns off the bar.
    train(tiny_config("trainer.steps=5", "trainer.log_every=1", "trainer.eval_every=0"), tmp_path)
    assert "metatrain train: step" not in capsys.readouterr().err


@pytest.mark.hostile
def test_sigterm_while_the_stream_skips_bad_records_stops_the_run_promptly(tmp_path):
    corpus = tmp_path / "mostly_bad.jsonl"
    good = json.dumps({"id": "ok", "segments": [{"kind": "text", "text": "The river floods in spring."}]})
    corpus.write_text("\n".join([good, *(["not json"] * 400_000)]) + "\n")  # a pass takes many seconds
    workdir = tmp_path / "run"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    env.pop("METATRAIN_DEBUG", None)
    child = subprocess.Popen(
        [sys.executable, "-m", "metatrain.cli", "train", "--config", str(TINY), "--workdir", str(workdir),
         "--set", f"data.sources=[{{path: {corpus}}}]", "--set", "data.eval_fraction=0.0",
         "--set", "trainer.eval_every=0", "--set", "trainer.seq_len=32"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 120
        # TensorBoard's event file is the last thing written before the first batch is read.
        while not list((workdir / "tensorboard").glob("events.*")):
            assert child.poll() is None and time.monotonic() < deadline, child.communicate()
            time.sleep(0.1)
        time.sleep(2.0)
        child.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        _, err = child.communicate(timeout=90)
        stopped_after = time.monotonic() - signalled
    finally:
        child.kill()
    assert child.returncode == 143, err[-2000:]
    assert stopped_after < 30  # the grace for a batch, not a whole pass over 400,000 bad records
    lines = error_lines(err)
    assert "SIGTERM while waiting for a batch" in lines[-2] and "no checkpoint was saved" in lines[-2], lines
    assert lines[-1] == "metatrain train: terminated (SIGTERM)"
