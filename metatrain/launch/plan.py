"""What the cluster launchers share: a plan (text + commands), the train command, checks.

A cluster launcher (`tpu`, `gke`, `slurm`) turns its options and a `train ...` command
into a `Plan`: the text `--dry-run` prints (shell commands, a manifest, a batch script)
and the commands that run without it. Options a cluster must supply (project, zone,
partition, image, ...) default to visible placeholders such as `<PROJECT>`; a plan that
still holds one is printed by `--dry-run` but refused for a real launch, naming the
options to set (`<TPU_NAME>` is filled by `--tpu-name`).

Before any plan is made, the train command is parsed and its config loaded here, so a
mesh that does not fit the devices or a batch that does not split over the processes is
refused on the laptop rather than on the pod.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import shutil
import subprocess
import sys
from typing import Sequence, TextIO

from metatrain.config import RunConfig
from metatrain.errors import UserError
from metatrain.launch import distributed as dist

PLACEHOLDER = re.compile(r"<([A-Z][A-Z0-9_]*)>")


def placeholder(option: str) -> str:
    """The placeholder an option defaults to under --dry-run: `--tpu-name` -> `<TPU_NAME>`."""
    return "<" + option.lstrip("-").replace("-", "_").upper() + ">"


def option_of(name: str) -> str:
    """The option that fills placeholder `<NAME>`: `TPU_NAME` -> `--tpu-name`."""
    return "--" + name.lower().replace("_", "-")


@dataclasses.dataclass(frozen=True)
class Command:
    """One command a launch runs: argv, and text fed to its standard input (or None)."""

    argv: tuple[str, ...]
    stdin: str | None = None

    def shell(self) -> str:
        return shlex.join(self.argv)


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a cluster launch does.

    Attributes:
        text: exactly what `--dry-run` prints.
        commands: what runs, in order, without `--dry-run`.
    """

    text: str
    commands: tuple[Command, ...]

    def placeholders(self) -> list[str]:
        """Placeholders left in what would run, e.g. ["PROJECT", "ZONE"] (in order, once each)."""
        found: list[str] = []
        for command in self.commands:
            found += PLACEHOLDER.findall(" ".join(command.argv) + (command.stdin or ""))
        return list(dict.fromkeys(found))


def execute(plan: Plan, out: TextIO | None = None) -> int:
    """Run the plan's commands in order; stop at the first that fails.

    Raises:
        UserError: a placeholder is left (names the options to set), or a program is
            missing from PATH.
    """
    out = sys.stdout if out is None else out
    left = plan.placeholders()
    if left:
        options = ", ".join(option_of(name) for name in left)
        raise UserError(
            f"the plan still has placeholders ({', '.join(f'<{n}>' for n in left)}); set {options} "
            "(or add --dry-run to print the plan as it is)"
        )
    for command in plan.commands:
        program = command.argv[0]
        if shutil.which(program) is None:
            raise UserError(
                f"{program} is not on PATH; install it (see launch/README.md), or use --dry-run "
                "to print the plan and run it elsewhere"
            )
    for command in plan.commands:
        out.write(f"[launch] $ {command.shell()}\n")
        out.flush()
        result = subprocess.run(list(command.argv), input=command.stdin, text=True, check=False)
        if result.returncode != 0:
            out.write(f"[launch] {command.argv[0]} exited with status {result.returncode}\n")
            return result.returncode
    return 0


@dataclasses.dataclass(frozen=True)
class TrainCommand:
    """The `train ...` command a launcher runs on every process, and its loaded config.

    Attributes:
        args: the metatrain arguments, starting with "train".
        config: the run config they describe (loaded here, to check the mesh).
        has_workdir: whether `--workdir` was given.
    """

    args: tuple[str, ...]
    config: RunConfig
    has_workdir: bool


def strip_separator(command: Sequence[str]) -> list[str]:
    """The words after `--` (argparse's REMAINDER keeps the separator)."""
    words = list(command)
    return words[1:] if words[:1] == ["--"] else words


def _load(words: Sequence[str]) -> TrainCommand:
    from metatrain.cli import build_parser
    from metatrain.train.cli import resolve_run

    try:
        parsed = build_parser().parse_args(list(words))
    except SystemExit:
        raise UserError(f"the train arguments are not valid: {shlex.join(words)}") from None
    config, _ = resolve_run(parsed.config, parsed.workdir, parsed.overrides)
    return TrainCommand(tuple(words), config, parsed.workdir is not None)


def parse_train_command(command: Sequence[str]) -> TrainCommand:
    """Parse `train [train args]` as `metatrain train` would, and load its config.

    Raises:
        UserError: no command, a command other than `train`, or bad train arguments or config.
    """
    words = strip_separator(command)
    if not words:
        raise UserError("no command to launch; add it after `--`, e.g. -- train --config configs/default.yaml")
    if words[0] != "train":
        raise UserError(f"can only launch `train` on every process, got {words[0]!r}; write -- train [train args]")
    return _load(words)


def set_override(train: TrainCommand, key: str, value: int) -> TrainCommand:
    """Add `--set key=value` to the train command (and its config), unless already so.

    Raises:
        UserError: the command already sets `key` to another value.
    """
    section, name = key.split(".")
    current = getattr(getattr(train.config, section), name)
    if current == value:
        return train
    if any(a.startswith(f"{key}=") for a in train.args):
        raise UserError(f"the train command sets {key}={current}, but this launch needs {key}={value}")
    return _load((*train.args, "--set", f"{key}={value}"))


def with_workdir(train: TrainCommand, workdir: str) -> TrainCommand:
    """Add `--workdir` to the train command (the config is unchanged by it)."""
    return dataclasses.replace(train, args=(*train.args, "--workdir", workdir), has_workdir=True)


def check_run_shape(config: RunConfig, num_devices: int, num_processes: int) -> str:
    """Check the run splits over the devices and processes; return a one-line mesh summary.

    Raises:
        UserError: the mesh does not multiply to the devices, the model does not split
            over it, or the batch does not split over the processes.
    """
    from metatrain.parallel.mesh import check_fits

    sizes = config.mesh.axis_sizes(num_devices)
    check_fits(config.model, sizes, config.trainer.batch_size, config.mesh.rules, grad_accum=config.trainer.grad_accum)
    if config.trainer.batch_size % num_processes:
        raise UserError(
            f"trainer.batch_size={config.trainer.batch_size} is not divisible by the {num_processes} "
            "processes; each process makes an equal share of the batch"
        )
    mesh = " ".join(f"{k}={v}" for k, v in sizes.items())
    slices = config.mesh.dcn_data
    across = f", data parallel across {slices} slices (mesh.dcn_data={slices})" if slices > 1 else ""
    return f"mesh {mesh} over {num_devices} devices{across}"


def parse_env_assignments(pairs: Sequence[str]) -> dict[str, str]:
    """`["KEY=VALUE", ...]` (from repeated --env) as a dict.

    Raises:
        UserError: an item without `=`, or one that sets a variable the launcher owns.
    """
    owned = {dist.ENV_MODE, dist.ENV_COORDINATOR, dist.ENV_NUM_PROCESSES, dist.ENV_PROCESS_ID}
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--env {pair!r}: expected KEY=VALUE, e.g. --env LIBTPU_INIT_ARGS=--xla_tpu_spmd_rng_bit_generator_unsafe=1")
        if key in owned:
            raise UserError(f"--env {key}: the launcher sets {key} itself")
        env[key] = value
    return env
