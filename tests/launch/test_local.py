"""The local launcher's processes and supervision, with small Python children (no JAX).

The supervision rules are exercised with real processes: one that fails while another
runs, one killed by a signal, a preempted pair, one left hanging, a forwarded SIGTERM.
"""

from __future__ import annotations

import io
import os
import signal
import sys
import textwrap
import threading
import time
from pathlib import Path

from metatrain.cli import main
from metatrain.launch import distributed as dist
from metatrain.launch.local import Failure, ProcessSpec, Supervisor, cpu_device_flags, local_process_specs
from metatrain.errors import EXIT_PREEMPTED

#: A child that sleeps (long enough to be stopped, never long enough to hang the suite).
SLEEPER = "import time; print('sleeping', flush=True); time.sleep(60)"


def child(index: int, code: str) -> ProcessSpec:
    return ProcessSpec(index, (sys.executable, "-c", textwrap.dedent(code)), dict(os.environ))


def supervise(specs, **kwargs):
    out = io.StringIO()
    start = time.monotonic()
    result = Supervisor(out, **{"kill_grace_s": 2.0, **kwargs}).run(specs)
    return result, out.getvalue(), time.monotonic() - start


# -- the processes' command lines and environments --------------------------------------------


def test_each_process_gets_the_coordinator_its_id_and_its_cpu_devices():
    base = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_dump_to=/tmp/x", dist.ENV_MODE: "auto"}
    specs = local_process_specs(["train", "--config", "c.yaml"], processes=3, devices_per_process=4, port=12345, base_env=base)
    assert [s.index for s in specs] == [0, 1, 2]
    for spec in specs:
        assert spec.argv[1:] == ("-m", "metatrain.cli", "train", "--config", "c.yaml")
        assert spec.env[dist.ENV_COORDINATOR] == "127.0.0.1:12345"
        assert spec.env[dist.ENV_NUM_PROCESSES] == "3"
        assert spec.env[dist.ENV_PROCESS_ID] == str(spec.index)
        assert spec.env["JAX_PLATFORMS"] == "cpu"
        assert spec.env["XLA_FLAGS"] == "--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=4"
        assert dist.ENV_MODE not in spec.env  # the explicit settings win over an inherited "auto"
        assert dist.distributed_from_env(spec.env).process_id == spec.index


def test_one_process_needs_no_distributed_settings():
    (spec,) = local_process_specs(["train"], processes=1, devices_per_process=8, port=1, base_env={})
    assert dist.distributed_from_env(spec.env) is None
    assert spec.env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8"


def test_cpu_device_flags_replace_any_previous_count():
    assert cpu_device_flags("", 2) == "--xla_force_host_platform_device_count=2"
    assert cpu_device_flags("--a=1 --xla_force_host_platform_device_count=8 --b", 3) == (
        "--a=1 --b --xla_force_host_platform_device_count=3"
    )


def test_dry_run_prints_every_process_and_bad_counts_are_refused(capsys):
    assert main(["launch", "local", "--processes", "2", "--devices-per-process", "4", "--port", "9999",
                 "--dry-run", "--", "train", "--config", "configs/tiny.yaml"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[-1] == "wait"
    for i, line in enumerate(lines[:2]):
        assert f"{dist.ENV_PROCESS_ID}={i}" in line and f"{dist.ENV_COORDINATOR}=127.0.0.1:9999" in line
        assert "device_count=4" in line and line.endswith("-m metatrain.cli train --config configs/tiny.yaml &")
    assert main(["launch", "local", "--processes", "0", "--dry-run", "--", "train"]) == 2
    assert "--processes 0" in capsys.readouterr().err
    assert main(["launch", "local", "--processes", "2", "--dry-run", "--", "generate"]) == 2
    assert "can only launch `train`" in capsys.readouterr().err
    assert main(["launch", "local", "--processes", "3", "--dry-run", "--", "train", "--config", "configs/tiny.yaml"]) == 2
    assert "trainer.batch_size=8 is not divisible by 3" in capsys.readouterr().err


# -- supervision -------------------------------------------------------------------------------


def test_output_is_streamed_with_a_process_prefix_and_success_is_zero():
    specs = [child(i, f"print('hello from {i}')\nprint('bye', flush=True)") for i in range(2)]
    result, out, _ = supervise(specs)
    assert result.exit_code == 0 and result.returncodes == (0, 0)
    for i in range(2):
        assert f"[process {i}] hello from {i}" in out
        assert f"[process {i}] bye" in out
        assert f"[launch] process {i}: pid " in out


def test_a_failing_process_stops_the_others_and_is_reported_with_its_last_lines():
    failing = child(1, """
        import sys, time
        for i in range(30):
            print(f"line {i}", flush=True)
        time.sleep(0.5)
        sys.exit(3)
    """)
    result, out, elapsed = supervise([child(0, SLEEPER), failing], tail_lines=5)
    assert result.exit_code == 3
    assert result.failure.index == 1 and result.failure.how == "exited with status 3"
    assert result.failure.last_lines == tuple(f"line {i}" for i in range(25, 30))
    assert result.stopped == (0,) and result.returncodes[0] == -signal.SIGTERM
    assert elapsed < 20
    assert "process 1 (pid" in out and "exited with status 3" in out
    assert "last lines of process 1:\n  | line 25" in out
    assert "stopped the other processes: 0" in out


def test_a_process_killed_by_a_signal_is_named_with_the_signal():
    killed = child(0, "import os, signal; print('about to die', flush=True); os.kill(os.getpid(), signal.SIGKILL)")
    result, out, _ = supervise([killed, child(1, SLEEPER)])
    assert result.exit_code == 128 + signal.SIGKILL
    assert result.failure.index == 0 and "killed by SIGKILL" in out
    assert "  | about to die" in out


def test_a_peer_that_aborts_on_losing_the_killed_process_is_not_taken_for_the_cause(tmp_path):
    """As gloo does: process 1 is SIGKILLed, process 0 aborts (SIGABRT) when its peer's data
    stops. Seen in one check, the SIGKILL is the cause."""
    gone = tmp_path / "gone"
    aborts = child(0, f"""
        import os, pathlib, time
        while not pathlib.Path({str(gone)!r}).exists():
            time.sleep(0.01)
        os.abort()
    """)
    killed = child(1, f"import os, pathlib, signal; pathlib.Path({str(gone)!r}).touch(); os.kill(os.getpid(), signal.SIGKILL)")
    result, out, _ = supervise([aborts, killed], poll_s=1.0)
    assert result.exit_code == 128 + signal.SIGKILL, out
    assert result.failure.index == 1 and "killed by SIGKILL" in out


def stubborn_child(index: int, ready: Path) -> ProcessSpec:
    """A child that ignores SIGTERM, then touches `ready` and sleeps."""
    return child(index, f"""
        import pathlib, signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        pathlib.Path({str(ready)!r}).touch()
        time.sleep(60)
    """)


def sigterm_to_self_when(*ready: Path) -> None:
    """From a thread: SIGTERM to this (the launcher's) process once every `ready` file exists."""

    def wait_then_signal() -> None:
        deadline = time.monotonic() + 30
        while not all(r.exists() for r in ready) and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=wait_then_signal, daemon=True).start()


def test_a_process_that_ignores_sigterm_is_killed_after_the_grace_period(tmp_path):
    ready = tmp_path / "ready"
    failing = child(1, f"""
        import pathlib, sys, time
        while not pathlib.Path({str(ready)!r}).exists():
            time.sleep(0.05)
        sys.exit(1)
    """)
    result, _, elapsed = supervise([stubborn_child(0, ready), failing], kill_grace_s=1.0)
    assert result.exit_code == 1 and result.returncodes[0] == -signal.SIGKILL
    assert elapsed < 20


def test_preempted_processes_give_the_preempted_exit_code():
    specs = [child(0, f"import sys; sys.exit({EXIT_PREEMPTED})"), child(1, "import time; time.sleep(0.5)")]
    result, out, _ = supervise(specs)
    assert result.exit_code == EXIT_PREEMPTED and result.failure is None
    assert "run the same command again to resume" in out


def test_a_process_left_running_after_the_others_finished_is_stopped():
    result, out, elapsed = supervise([child(0, "print('done')"), child(1, SLEEPER)], exit_grace_s=1.0)
    assert result.exit_code == 1 and result.stopped == (1,)
    assert "still running" in out and elapsed < 20


def test_sigterm_to_the_launcher_is_forwarded_to_every_process(tmp_path: Path):
    ready = [tmp_path / f"ready{i}" for i in range(2)]
    specs = [
        child(i, f"""
            import pathlib, signal, sys, time
            signal.signal(signal.SIGTERM, lambda *a: sys.exit({EXIT_PREEMPTED}))
            pathlib.Path({str(ready[i])!r}).touch()
            time.sleep(60)
        """)
        for i in range(2)
    ]

    sigterm_to_self_when(*ready)
    previous = signal.getsignal(signal.SIGTERM)
    result, out, elapsed = supervise(specs)
    assert signal.getsignal(signal.SIGTERM) is previous  # the launcher's handler is removed again
    assert result.exit_code == EXIT_PREEMPTED, out
    assert result.returncodes == (EXIT_PREEMPTED, EXIT_PREEMPTED)
    assert "SIGTERM to every process" in out and elapsed < 30


def test_processes_that_do_not_finish_after_a_forwarded_sigterm_are_killed(tmp_path):
    ready = tmp_path / "ready"
    sigterm_to_self_when(ready)
    result, out, elapsed = supervise([stubborn_child(0, ready)], preempt_timeout_s=1.0, kill_grace_s=0.5)
    assert result.exit_code == 1 and result.returncodes == (-signal.SIGKILL,)
    assert "after SIGTERM" in out and elapsed < 20


def test_processes_ended_by_a_forwarded_sigterm_before_saving_are_not_a_failure(tmp_path):
    ready = [tmp_path / f"ready{i}" for i in range(2)]
    specs = [child(i, f"import pathlib, time; pathlib.Path({str(ready[i])!r}).touch(); time.sleep(60)") for i in range(2)]
    sigterm_to_self_when(*ready)
    result, out, _ = supervise(specs)
    assert result.exit_code == 128 + signal.SIGTERM and result.failure is None
    assert result.returncodes == (-signal.SIGTERM, -signal.SIGTERM)
    assert "ended on SIGTERM before saving" in out


def test_the_failure_report_says_what_became_of_every_process():
    report = Supervisor.failure_report(Failure(1, 4242, -signal.SIGKILL, ("step 7", "step 8")), (2,), {0: 1})
    assert report.splitlines() == [
        "process 1 (pid 4242) killed by SIGKILL",
        "stopped the other processes: 2",
        "process 0 had already ended (exited with status 1)",
        "last lines of process 1:",
        "  | step 7",
        "  | step 8",
    ]
