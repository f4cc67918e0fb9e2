"""The work directory: what a run is, where it came from, and its self-contained files.

    WORKDIR/train.lock       held while a trainer runs (host, pid, start time)
    WORKDIR/run.json         the config file the run was created from
    WORKDIR/config.yaml      the resolved config (written once the run has started)
    WORKDIR/tokenizer.model  copies of what the run uses
    WORKDIR/tags.yaml
    WORKDIR/checkpoints/     `metatrain.run.checkpoint`
    WORKDIR/metrics.jsonl, WORKDIR/tensorboard/
    WORKDIR/goodput.json, WORKDIR/wandb.json    `metatrain.run.goodput`, `metatrain.run.wandb_log`

The lock (`train.lock`, one trainer at a time) lives in `metatrain.run.lock`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from metatrain.errors import FaultError, UserError, describe_cause
from metatrain.io.outputs import write_atomically
from metatrain.io.storage import absolute, as_path
from metatrain.run.layout import (
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    LOCK_FILE,
    RUN_FILE,
    TAGS_FILE,
    TOKENIZER_FILE,
    refuse_inside_checkpoints,
)

def check_trainable(workdir: Any, option: str = "--workdir") -> None:
    """Refuse a work directory a run cannot start or resume in, before anything is written.

    A run trains in a directory that does not exist yet, an empty one (a lock file left by
    a dead trainer does not count), or a run's own: one with `config.yaml` or
    `checkpoints/`. Anything else (a regular file, a half-built `import`, any folder of
    other files) is refused rather than trained on as if it were empty; so is a
    directory inside another run's `checkpoints/`, which that run would move aside.

    Raises:
        UserError: the path is a file, a non-empty directory that is not a run, or
            inside another run's checkpoints; the message says what to give instead.
    """
    refuse_inside_checkpoints(workdir, option)
    path = as_path(workdir)
    if path.is_file():
        raise UserError(f"{option} {workdir} is a file, not a directory: give a new or empty directory, "
                        "or the work directory of a run to resume")
    if not path.is_dir():
        return
    names = sorted(p.name for p in path.iterdir())
    if CONFIG_FILE in names or CHECKPOINTS_DIR in names or not set(names) - {LOCK_FILE}:
        return
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    raise UserError(
        f"{option} {workdir} is not empty and is not a run: it has no {CONFIG_FILE} and no {CHECKPOINTS_DIR}/ "
        f"(it holds {shown}); give a new or empty directory, or the work directory of a run to resume "
        f"(a half-finished `metatrain import`: run the import again)"
    )


# -- where the run came from ----------------------------------------------------------------


def read_run_file(workdir: Path) -> dict[str, Any]:
    path = as_path(workdir) / RUN_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read it ({describe_cause(e)}); delete it if the run's origin does not matter") from None
    return data if isinstance(data, dict) else {}


def check_origin(workdir: Path, config_file: Path | None, allow_other_config: bool) -> None:
    """Refuse a work directory created from another config file than `config_file`.

    Resuming with the work directory's own `config.yaml` (or without `--config`) is always
    fine; `allow_other_config` (the `--allow-other-config` flag) accepts any file.
    """
    if config_file is None or allow_other_config:
        return
    config_file = absolute(config_file)
    workdir = absolute(workdir)
    if str(config_file) == str(workdir / CONFIG_FILE):
        return
    origin = read_run_file(workdir).get("config_file")
    if origin and str(absolute(origin)) != str(config_file):
        raise UserError(
            f"work directory {workdir} was created from {origin}, not {config_file}; "
            "train in another --workdir, resume without --config, or pass --allow-other-config "
            "to continue this run with the other file"
        )


def prepare_workdir(config: Any, workdir: Path, config_file: Path | None) -> None:
    """Make the work directory self-contained: resolved config, tokenizer, tag registry and
    `run.json`. Called once the run has started from a validated state (process 0 only).

    Raises:
        UserError: the tokenizer or tag registry does not exist.
        FaultError: the files cannot be written.
    """
    from metatrain.config import save_config

    workdir = as_path(workdir)
    copies = []
    for src, name in ((config.data.tokenizer, TOKENIZER_FILE), (config.data.tags, TAGS_FILE)):
        src_path = as_path(src)
        if not src_path.is_file():
            raise UserError(f"data: file {src} does not exist (needed by the run, copied into {workdir})")
        copies.append((src_path, workdir / name))
    try:
        save_config(config, workdir / CONFIG_FILE)
        for src_path, dst in copies:
            data = src_path.read_bytes()
            if not dst.exists() or dst.read_bytes() != data:
                write_atomically(dst, data, option="run file")
        run = read_run_file(workdir)
        if config_file is not None and str(absolute(config_file)) != str(absolute(workdir / CONFIG_FILE)):
            # `check_origin` refused any other file unless the user adopted it explicitly.
            run["config_file"] = str(absolute(config_file))
            run.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
            write_atomically(workdir / RUN_FILE, json.dumps(run, indent=1) + "\n", option="run file")
    except OSError as e:
        raise FaultError(f"cannot write the run's files into {workdir}: {describe_cause(e)}") from None
