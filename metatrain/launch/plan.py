"""What the cluster launchers share: a plan (text + commands), the train command, checks.

A cluster launcher (`tpu`, `gke`, `slurm`) turns its options and a `train ...` command
into a `Plan`: the text `--dry-run` prints (shell commands, a manifest, a batch script)
and the commands that run without it. Options a cluster must supply (project, zone,
partition, image, ...) default to visible placeholders such as `<PROJECT>`; a plan that
still holds one is printed by `--dry-run` but refused for a real launch, naming the
options to set (`<TPU_NAME>` is filled by `--tpu-name`).

Before any plan is made, the train command is parsed and its config loaded here, so a
mesh that does not fit the devices or a batch that does not split over the processes is
refused on the laptop rather than on the pod. Its paths are first resolved for where the
job runs (`PathView`: this directory, a filesystem the nodes share, or a clone or image
of this repository), so the config checked here is the one the job reads, and a word
with a control character is refused (`metatrain.launch.validate`).

`launch local` also starts `eval` and `annotate` (`INFERENCE_COMMANDS`) on every process:
for them the words are checked and the arguments parsed (`parse_inference_command`);
there is no train config to load.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Literal, Sequence, TextIO

from metatrain.config import RunConfig
from metatrain.errors import UserError
from metatrain.io.paths import REPO_ROOT
from metatrain.io.storage import as_path, is_remote
from metatrain.launch import distributed as dist
from metatrain.launch.validate import PLACEHOLDER, check_text, option_of, refusal
from metatrain.run.resolve import resolve_run


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


def carry_out(plan: Plan, *, dry_run: bool = False) -> int:
    """A cluster launch: with `dry_run`, print the plan's text and run nothing; otherwise
    `execute` it. Returns the exit status."""
    if dry_run:
        print(plan.text)
        return 0
    return execute(plan)


#: Parses `train [train args]` as `metatrain train` does. The command line owns its parser;
#: `metatrain.cli.launch` passes it in, so this library needs no command-line code.
TrainParser = Callable[[Sequence[str]], argparse.Namespace]


@dataclasses.dataclass(frozen=True)
class TrainCommand:
    """The `train ...` command a launcher runs on every process, and its loaded config.

    Attributes:
        args: the metatrain arguments, starting with "train", as the job runs them.
        config: the run config they describe (loaded here, to check the mesh).
        has_workdir: whether `--workdir` was given.
        read_from: the directory a relative path in `args` is read from here: the launch
            directory, or this checkout standing in for the workers' clone or image.
        parse: the parser of `args` (to parse them again with an override added).
    """

    args: tuple[str, ...]
    config: RunConfig
    has_workdir: bool
    read_from: Path
    parse: TrainParser = dataclasses.field(compare=False, repr=False)


#: Where a job finds the train command's relative paths (`parse_train_command(paths=...)`):
#: "here": its processes start in this directory (`launch local`); paths stay as typed.
#: "shared": it runs in this directory, on a filesystem the nodes share (Slurm);
#:   `--config` and `--workdir` are written out absolute.
#: "checkout": it runs in metatrain's directory of a clone or an image of this repository
#:   (TPU VMs, GKE); a relative `--config` must be a file of this checkout (written relative
#:   to its root); an absolute one elsewhere is read at that path on the workers too.
PathView = Literal["here", "shared", "checkout"]

_PATH_OPTIONS = ("--config", "--workdir")


def strip_separator(command: Sequence[str]) -> list[str]:
    """The words after `--` (argparse's REMAINDER keeps the separator)."""
    words = list(command)
    return words[1:] if words[:1] == ["--"] else words


def _parse(parse: TrainParser, words: Sequence[str]) -> argparse.Namespace:
    try:
        return parse(list(words))
    except SystemExit:
        raise UserError(f"the train arguments are not valid: {shlex.join(words)}") from None


def _load(parse: TrainParser, words: Sequence[str], read_from: Path) -> TrainCommand:
    parsed = _parse(parse, words)
    config_path = None if parsed.config is None else _under(read_from, parsed.config)
    workdir = None if parsed.workdir is None else _under(read_from, parsed.workdir)
    config, _ = resolve_run(config_path, workdir, parsed.overrides)
    return TrainCommand(tuple(words), config, parsed.workdir is not None, read_from, parse)


def _under(read_from: Path, value) -> Any:
    """`value` relative to `read_from` (an absolute path, or a `gs://` URL, stays itself)."""
    return as_path(str(value)) if is_remote(str(value)) else read_from / value


#: Commands `launch local` starts on every process besides `train`: inference on one model
#: sharded over a mesh of every process's devices (no train config to check).
INFERENCE_COMMANDS: tuple[str, ...] = ("eval", "annotate")


def launched_words(command: Sequence[str], commands: Sequence[str] = ("train",)) -> list[str]:
    """The words after `--`, when they start with one of `commands`.

    Raises:
        UserError: no command, or one that is not among `commands` (naming them).
    """
    words = strip_separator(command)
    if not words:
        raise UserError("no command to launch; add it after `--`, e.g. -- train --config configs/default.yaml")
    if words[0] not in commands:
        names = ", ".join(f"`{c}`" for c in commands[:-1]) + (" or " if len(commands) > 1 else "") + f"`{commands[-1]}`"
        forms = " or ".join(f"-- {c} [{c} args]" for c in commands)
        raise UserError(f"can only launch {names} on every process, got {words[0]!r}; write {forms}")
    return words


def parse_train_command(command: Sequence[str], *, parse: TrainParser, paths: PathView = "here") -> TrainCommand:
    """Parse `train [train args]` with `parse` (`metatrain train`'s parser), resolve its paths
    for where the job runs (`paths`, see `PathView`), and load its config.

    Raises:
        UserError: no command, a command other than `train`, a control character in a
            word, a `--config` the job would not find, or bad train arguments or config.
    """
    words = launched_words(command)
    check_train_words(words)
    if paths == "shared":
        return _load(parse, _rewrite_paths(parse, words, _absolute), Path.cwd())
    if paths == "checkout":
        return _load(parse, _rewrite_paths(parse, words, _in_checkout), REPO_ROOT)
    return _load(parse, words, Path.cwd())


def parse_inference_command(command: Sequence[str], *, parse: TrainParser) -> list[str]:
    """Check `eval [eval args]` or `annotate [annotate args]` (`INFERENCE_COMMANDS`) before
    `launch local` starts it on every process: no word with a control character, and
    arguments that `parse` (metatrain's own parser) takes. Its paths stay as typed (the
    processes start in this directory) and nothing is loaded: the checkpoint's mesh is
    checked by every process as it loads it.

    Returns:
        The words, starting with the command.

    Raises:
        UserError: no command or another one, a control character in a word, or
            arguments the command does not take.
    """
    words = launched_words(command, INFERENCE_COMMANDS)
    check_train_words(words, what=f"the {words[0]} command")
    try:
        parse(list(words))
    except SystemExit as e:
        if not e.code:  # `--help`: printed; nothing to launch
            raise
        raise UserError(f"the {words[0]} arguments are not valid: {shlex.join(words)} "
                        f"(see metatrain {words[0]} --help)") from None
    return words


def check_train_words(words: Sequence[str], what: str = "the train command") -> None:
    """Refuse a word with a control character, naming its option (`--workdir`, `--set`),
    or `what` for a word that follows none.

    Raises:
        UserError: the first such word.
    """
    for i, word in enumerate(words):
        option, value = what, word
        if word.startswith("--"):
            name, eq, rest = word.partition("=")
            option, value = (name, rest) if eq else (word, word)
        elif i and words[i - 1].startswith("--"):
            option = words[i - 1]
        check_text(option, value)


def _rewrite_paths(parse: TrainParser, words: Sequence[str], resolve: Callable[[str, str], str]) -> list[str]:
    """`words` with the value of each `--config` and `--workdir` replaced by `resolve(option, value)`.

    Raises:
        UserError: from `resolve`, or an option abbreviated (`--conf`), which is not rewritten.
    """
    out: list[str] = []
    remaining = iter(words)
    for word in remaining:
        name, eq, value = word.partition("=")
        if eq and name in _PATH_OPTIONS:
            out.append(f"{name}={resolve(name, value)}")
            continue
        out.append(word)
        if word in _PATH_OPTIONS:
            value = next(remaining, None)
            if value is not None:
                out.append(resolve(word, value))
    parsed = _parse(parse, out)
    for option, value in (("--config", parsed.config), ("--workdir", parsed.workdir)):
        if value is not None and resolve(option, str(value)) != str(value):
            raise refusal(option, str(value), f"write {option} out in full after `--`, so the launcher can "
                          "resolve the path for the job")
    return out


def _absolute(option: str, value: str) -> str:
    """("shared") `value` made absolute against this directory, which the job runs in too
    (a `gs://` URL is the same everywhere)."""
    if is_remote(value):
        return value
    path = Path(os.path.abspath(value))
    if option == "--config" and not path.is_file():
        in_repo = REPO_ROOT / value
        hint = f"; did you mean --config {in_repo}?" if in_repo.is_file() and not Path(value).is_absolute() else ""
        raise refusal(
            option, value,
            f"no such file: {path} (relative paths are relative to the directory you launch from, "
            f"where the job runs too){hint}",
        )
    return str(path)


def _in_checkout(option: str, value: str) -> str:
    """("checkout") `--config` for a job that runs in metatrain's directory of a clone or an
    image of this repository: a file of this checkout, relative to its root (an absolute
    path into this checkout is made so); an absolute path elsewhere is kept, for storage
    the workers see at the same path (a sweep directory). `--workdir` is kept as given (a
    path on the worker, relative to that directory).
    """
    if option != "--config" or is_remote(value):
        return value
    path = (REPO_ROOT / value).resolve()  # an absolute value stays itself
    if path.is_relative_to(REPO_ROOT) and path.is_file():
        return str(path.relative_to(REPO_ROOT))
    if Path(value).is_absolute() and not path.is_relative_to(REPO_ROOT):
        return value  # the job reads it at that path; the launcher checks it here
    here = Path(value).resolve()
    if here.is_file() and here.is_relative_to(REPO_ROOT):
        hint = f"; did you mean --config {here.relative_to(REPO_ROOT)}?"
    elif here.is_file():
        hint = f"; {here} is on this machine: give it absolute if the workers see it at that path"
    else:
        hint = ""
    raise refusal(
        option, value,
        f"no such file in this checkout: {path} (the workers run in a clone or an image of this repository, "
        f"where relative paths are relative to the repository root){hint}",
    )


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
    return _load(train.parse, (*train.args, "--set", f"{key}={value}"), train.read_from)


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
    """`["KEY=VALUE", ...]` (from repeated --env) as a dict (names and values are checked
    by the launcher's options, `validate.check_env`).

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
