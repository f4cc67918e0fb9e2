"""`metatrain launch slurm`: an `sbatch` script for GPU clusters, submitted with sbatch.

One task per GPU (default; each process drives one GPU, `METATRAIN_LOCAL_DEVICE_IDS`
= its local rank) or one task per node (each process drives all the node's GPUs). The
coordinator is the job's first node; process count and ids come from Slurm:

    METATRAIN_COORDINATOR_ADDRESS  first host of $SLURM_JOB_NODELIST, port --port
    METATRAIN_NUM_PROCESSES        nodes x tasks per node (checked against $SLURM_NTASKS)
    METATRAIN_PROCESS_ID           $SLURM_PROCID
    METATRAIN_LOCAL_DEVICE_IDS     $SLURM_LOCALID (one task per GPU only)

Preemption: Slurm sends SIGTERM `--signal-seconds` before the time limit (and on
preemption); every process saves a checkpoint and exits 75, and the script requeues
the job, which resumes from it.

Paths: the nodes share the login node's filesystem, so the job runs in the directory the
launcher ran in, and every relative path in the train command (`--config`, `--workdir`,
`--set data.path=...`) means on the nodes what it meant here; `--config` and `--workdir`
are also written out absolute. metatrain is imported from `--code-dir` (`PYTHONPATH`,
with `python -P` so that a `metatrain/` folder in the launch directory cannot shadow it).

Quoting: every value in a shell line is `shlex.quote`d. Values in `#SBATCH` lines are
not quoted but validated (`metatrain.launch.validate`): sbatch splits those lines its
own way, and stops reading directives at the first line that is not a comment, so one
newline would both run a command and drop `--requeue` and `--signal`.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import sys
from pathlib import Path
from typing import Literal, Mapping

from metatrain.errors import UserError
from metatrain.io.paths import REPO_ROOT
from metatrain.launch import distributed as dist
from metatrain.launch import validate
from metatrain.launch.plan import Command, Plan, TrainCommand, check_run_shape


@dataclasses.dataclass(frozen=True, kw_only=True)
class SlurmOptions:
    """Options of `metatrain launch slurm` (placeholders such as `<PARTITION>` under --dry-run).

    `launch_dir` is the directory the job runs in: the one the launcher runs in.
    """

    partition: str
    nodes: int = 1
    gpus_per_node: int = 8
    tasks: Literal["per-gpu", "per-node"] = "per-gpu"
    account: str | None = None
    time: str = "24:00:00"
    job_name: str = "metatrain"
    cpus_per_task: int | None = None
    port: int = 8476
    signal_seconds: int = 300
    code_dir: str = str(REPO_ROOT)
    python: str = sys.executable
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    launch_dir: str = dataclasses.field(default_factory=os.getcwd)

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise UserError(f"--nodes {self.nodes}: need at least 1 node")
        if self.gpus_per_node < 1:
            raise UserError(f"--gpus-per-node {self.gpus_per_node}: need at least 1 GPU per node")
        validate.SLURM_JOB_NAME.check("--job-name", self.job_name)
        validate.SLURM_PARTITION.check("--partition", self.partition)
        if self.account is not None:
            validate.SLURM_ACCOUNT.check("--account", self.account)
        validate.SLURM_TIME.check("--time", self.time)
        if self.cpus_per_task is not None:
            validate.check_range("--cpus-per-task", self.cpus_per_task, 1, what="CPUs per task")
        validate.check_port("--port", self.port)
        validate.check_range("--signal-seconds", self.signal_seconds, 0, 65535, "sbatch's --signal time")
        validate.check_path("--python", self.python)
        validate.check_path("the launch directory", self.launch_dir)
        if not Path(self.launch_dir, validate.check_path("--code-dir", self.code_dir)).is_dir():
            raise validate.refusal("--code-dir", self.code_dir, "no such directory; the job imports metatrain "
                                   "from it (the nodes share this filesystem)")
        validate.check_env("--env", self.env)

    @property
    def tasks_per_node(self) -> int:
        return self.gpus_per_node if self.tasks == "per-gpu" else 1

    @property
    def num_processes(self) -> int:
        return self.nodes * self.tasks_per_node


def _sbatch_header(options: SlurmOptions) -> list[str]:
    """The `#SBATCH` lines: contiguous, first in the script, every value validated (sbatch
    reads directives only up to the first line that is not a comment)."""
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={options.job_name}",
        f"#SBATCH --partition={options.partition}",
    ]
    if options.account:
        lines.append(f"#SBATCH --account={options.account}")
    lines += [
        f"#SBATCH --nodes={options.nodes}",
        f"#SBATCH --ntasks-per-node={options.tasks_per_node}",
        f"#SBATCH --gpus-per-node={options.gpus_per_node}",
    ]
    if options.cpus_per_task:
        lines.append(f"#SBATCH --cpus-per-task={options.cpus_per_task}")
    lines += [
        f"#SBATCH --time={options.time}",
        f"#SBATCH --signal=TERM@{options.signal_seconds}",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        f"#SBATCH --output={options.job_name}-%j.out",
    ]
    return lines


def _from_launch_dir(options: SlurmOptions, path: str) -> str:
    return os.path.abspath(os.path.join(options.launch_dir, path))


def _python(options: SlurmOptions) -> str:
    """`--python` as the job runs it: a path made absolute; a bare name (`python3`) is
    looked up on the node's PATH."""
    return _from_launch_dir(options, options.python) if "/" in options.python else options.python


def sbatch_script(options: SlurmOptions, train: TrainCommand, mesh: str) -> str:
    """The batch script (submitted on sbatch's standard input)."""
    n = options.num_processes
    per = "GPU" if options.tasks == "per-gpu" else "node"
    task_env = [f"{dist.ENV_PROCESS_ID}=$SLURM_PROCID"]
    if options.tasks == "per-gpu":
        task_env.append(f"{dist.ENV_LOCAL_DEVICE_IDS}=$SLURM_LOCALID")
    train_line = f"exec {shlex.quote(_python(options))} -P -m metatrain.cli {shlex.join(train.args)}"
    task = " ".join(task_env) + " " + train_line
    lines = _sbatch_header(options) + [
        "# metatrain launch slurm: submitted with `sbatch` (this script on standard input)",
        f"# processes: {n} ({options.nodes} nodes x {options.tasks_per_node} tasks, one per {per}); "
        f"{options.nodes * options.gpus_per_node} GPUs",
        f"# {mesh}",
        "# paths are as the launcher resolved them, in the directory it ran in; metatrain is --code-dir's",
        "",
        "set -uo pipefail",
        f"cd {shlex.quote(os.path.abspath(options.launch_dir))} || exit 1",
        f'export PYTHONPATH={shlex.quote(_from_launch_dir(options, options.code_dir))}"${{PYTHONPATH:+:$PYTHONPATH}}"',
        "",
        "# coordinator: the job's first node",
        'head_node="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
        f'export {dist.ENV_COORDINATOR}="$head_node:{options.port}"',
        f"export {dist.ENV_NUM_PROCESSES}={n}",
        f'if [ "$SLURM_NTASKS" != "{n}" ]; then',
        f'  echo "metatrain: expected {n} tasks, Slurm gave $SLURM_NTASKS" >&2; exit 1',
        "fi",
    ]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in options.env.items()]
    lines += [
        "",
        "# one process per task; when one ends the others get 120 s to end too: enough to finish",
        "# a collective save after a preemption, and a crashed process's peers are stopped after it",
        f"srun --wait=120 --label bash -c {shlex.quote(task)}",
        "status=$?",
        "",
        "# preempted or out of time: a checkpoint was saved; requeue to resume from it",
        'if [ "$status" -eq 75 ]; then scontrol requeue "$SLURM_JOB_ID"; fi',
        'exit "$status"',
    ]
    return "\n".join(lines)


def slurm_plan(options: SlurmOptions, train: TrainCommand) -> Plan:
    """The plan for `metatrain launch slurm`: the script, submitted with `sbatch`.

    Raises:
        UserError: a run that does not fit the GPUs or processes.
    """
    mesh = check_run_shape(train.config, options.nodes * options.gpus_per_node, options.num_processes)
    script = sbatch_script(options, train, mesh)
    return Plan(script, (Command(("sbatch",), stdin=script + "\n"),))
