"""Real multi-process runs on this CPU: `metatrain launch local` with jax.distributed over gloo.

- 2 processes x 4 devices train the same losses as 1 process x 8 devices, step by step,
  across a SIGTERM (every process saves collectively at the step reached, exit 75) and a
  resume with the same command.
- SIGKILL of one process: the launcher stops the other within seconds and names the
  dead process and its last lines; the newest complete checkpoint still restores.
- A checkpoint written by 2 processes x 4 devices restores on this one process with
  another mesh (data x fsdp x tensor = 2 x 2 x 2), to the same values.
- One process (no launcher): SIGTERM saves at the step reached, exit 75, and the rerun
  ends with the uninterrupted run's final loss.

The reference is an uninterrupted run in this (8-device) test process.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from metatrain.config import load_config
from metatrain.errors import EXIT_PREEMPTED
from metatrain.models import Transformer
from metatrain.parallel.mesh import MeshConfig, build_mesh
from metatrain.run.checkpoint import Checkpointer
from metatrain.run.optimizer import build_optimizer
from metatrain.run.state import abstract_state, state_shardings
from metatrain.train.loop import train

from .conftest import (
    TINY,
    complete_checkpoints,
    launched_pids,
    tiny_overrides,
    tiny_train_args,
    train_losses,
    wait_until,
)

#: Steps of every run here. JAX's preemption service agrees on the step to stop at a second
#: or so after the SIGTERM (its notifier polls once a second), several steps later here.
STEPS = 20
#: Same config, different device layouts and reduction orders: float32 rounding only.
RTOL, ATOL = 2e-5, 2e-5


def launch_local(processes: int, devices: int, train_args: list[str]) -> list[str]:
    return ["launch", "local", "--processes", str(processes), "--devices-per-process", str(devices), "--", *train_args]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, float]:
    """Per-step losses of an uninterrupted 1 process x 8 devices run."""
    workdir = tmp_path_factory.mktemp("reference")
    config = load_config(TINY, tiny_overrides(STEPS))
    assert jax.device_count() == 8
    train(config, workdir)
    losses = train_losses(workdir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses


def assert_same_losses(actual: dict[int, float], expected: dict[int, float]) -> None:
    assert sorted(actual) == sorted(expected), f"steps {sorted(actual)} != {sorted(expected)}"
    steps = sorted(expected)
    np.testing.assert_allclose([actual[s] for s in steps], [expected[s] for s in steps], rtol=RTOL, atol=ATOL)


def restore_here(workdir: Path, mesh: MeshConfig):
    """The run's newest checkpoint restored on this process's 8 devices over `mesh`."""
    config = load_config(workdir / "config.yaml")
    config = dataclasses.replace(config, mesh=mesh)
    model = Transformer(config.model)
    optimizer = build_optimizer(config.optimizer, config.trainer.steps)
    shardings = state_shardings(model, optimizer, build_mesh(mesh), mesh.rules)
    checkpointer = Checkpointer(workdir, config.checkpoint)
    try:
        restored = checkpointer.restore_latest(abstract_state(model, optimizer, shardings))
    finally:
        checkpointer.close()
    return restored.step, restored.state, restored.data_state


def assert_restores_on_another_mesh(workdir: Path) -> int:
    """Restore over data=8 (as written) and over 2x2x2: same values, the requested layouts."""
    step, as_written, data_a = restore_here(workdir, MeshConfig(data=-1))
    _, resharded, data_b = restore_here(workdir, MeshConfig(data=2, fsdp=2, tensor=2))
    assert int(resharded.step) == step
    assert data_a == data_b
    for a, b in zip(jax.tree.leaves(as_written), jax.tree.leaves(resharded), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    specs = {tuple(leaf.sharding.spec) for leaf in jax.tree.leaves(resharded.params)}
    assert any("tensor" in str(spec) for spec in specs) and any("fsdp" in str(spec) for spec in specs), specs
    return step


def test_two_processes_train_the_losses_of_one_across_a_sigterm_and_resume(reference, tmp_path, start):
    workdir = tmp_path / "run"
    command = launch_local(2, 4, tiny_train_args(workdir, STEPS))
    first = start(command, "first")
    wait_until(lambda: len(train_losses(workdir)) >= 1, "first step", first)
    first.popen.send_signal(signal.SIGTERM)  # the launcher forwards it to both processes
    assert first.wait() == EXIT_PREEMPTED, first.output[-3000:]

    reached = max(train_losses(workdir))
    assert reached < STEPS, "the run finished before the SIGTERM took effect; raise STEPS"
    assert complete_checkpoints(workdir)[-1] == reached  # saved collectively at the step reached
    assert "preempted" in first.output and "[process 1]" in first.output

    second = start(command, "second")  # the same command resumes
    assert second.wait() == 0, second.output[-3000:]
    assert complete_checkpoints(workdir)[-1] == STEPS
    assert_same_losses(train_losses(workdir), reference)

    # Written by 2 processes x 4 devices, read by 1 process x 8 devices over another mesh.
    assert assert_restores_on_another_mesh(workdir) == STEPS

    # A damaged newest checkpoint: both processes fall back together to the one before it,
    # process 0 moves it aside, and the steps after it come out the same again.
    for path in (workdir / "checkpoints" / str(STEPS) / "state").rglob("d/*"):
        path.write_bytes(bytes(path.stat().st_size))
    third = start(command, "third")
    assert third.wait() == 0, third.output[-3000:]
    reports = [line for line in third.output.splitlines() if "cannot be restored" in line]
    assert len(reports) == 1 and "[process 0]" in reports[0] and "moved it aside" in reports[0], reports
    assert any(p.name.startswith(f"{STEPS}.corrupt-") for p in (workdir / "checkpoints").iterdir())
    assert complete_checkpoints(workdir)[-1] == STEPS
    assert_same_losses(train_losses(workdir), reference)


def test_sigkill_of_one_process_stops_the_others_and_leaves_a_checkpoint(tmp_path, start):
    workdir = tmp_path / "run"
    launcher = start(launch_local(2, 4, tiny_train_args(workdir, 500, every=2)), "launcher")
    wait_until(lambda: len(complete_checkpoints(workdir)) >= 1, "first checkpoint", launcher)
    wait_until(lambda: len(launched_pids(launcher.output)) == 2, "process ids", launcher)
    pids = launched_pids(launcher.output)

    os.kill(pids[1], signal.SIGKILL)
    killed_at = time.monotonic()
    code = launcher.wait(timeout=60)
    elapsed = time.monotonic() - killed_at

    out = launcher.output
    assert code == 128 + signal.SIGKILL, out[-3000:]
    assert elapsed < 15, f"the launcher took {elapsed:.1f} s to stop the run"
    assert "process 1" in out and "killed by SIGKILL" in out
    assert "last lines of process 1:" in out
    # Process 0 was stopped, or had already failed on losing its peer.
    assert "stopped the other processes: 0" in out or "process 0 had already ended" in out
    with pytest.raises(ProcessLookupError):
        os.kill(pids[0], 0)  # process 0 is gone, not left hanging in a collective

    step = assert_restores_on_another_mesh(workdir)
    assert step == complete_checkpoints(workdir)[-1]


@pytest.mark.slow  # the multi-process SIGTERM test above covers the launcher's path; this, one process's
def test_one_process_sigterm_saves_at_the_step_reached_and_resumes_to_the_same_loss(reference, tmp_path, start):
    workdir = tmp_path / "run"
    command = tiny_train_args(workdir, STEPS)
    first = start(command, "first")
    wait_until(lambda: len(train_losses(workdir)) >= 1, "first step", first)
    first.popen.send_signal(signal.SIGTERM)
    assert first.wait() == EXIT_PREEMPTED, first.output[-3000:]
    reached = max(train_losses(workdir))
    assert reached < STEPS
    assert complete_checkpoints(workdir)[-1] == reached

    second = start(command, "second")
    assert second.wait() == 0, second.output[-3000:]
    losses = train_losses(workdir)
    assert losses[STEPS] == pytest.approx(reference[STEPS], rel=RTOL, abs=ATOL)
    assert_same_losses(losses, reference)
