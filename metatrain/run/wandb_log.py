"""Mirroring a run's metrics to Weights & Biases (`trainer.wandb`, the optional `wandb` extra).

`WandbRun.start` opens the W&B run of a work directory, or continues it on resume: its id
is kept in `W/wandb.json` and passed to `wandb.init(id=..., resume="allow")`. The run's
resolved config goes up as the W&B run's config.

Every record `MetricsWriter.write` writes to `metrics.jsonl` goes up as one W&B row with
the same keys, the step included as the key `step`, which every chart takes as its x axis
(`define_metric("*", step_metric="step")`). W&B's own row counter `_step` is left to W&B:
W&B drops a row whose `_step` is below the run's last one, and a run resumed from a
checkpoint older than its last logged step logs those steps again. Both copies stay, in
W&B as in `metrics.jsonl` (two points at one step). Values that are None (a role with no
tokens in the window, MFU where the chip's peak is unknown) are left out of the row.

The API key is wandb's own business: it reads `WANDB_API_KEY` or its login (`wandb
login`, `~/.netrc`); nothing here reads, passes or writes it. W&B's local files (its logs,
an offline run to `wandb sync` later) go to `W/wandb/`; for a work directory in a bucket,
to `$WANDB_DIR`, else to a fresh temporary folder named on stderr. Only process 0 logs
(`MetricsWriter` is enabled there only).
"""

from __future__ import annotations

import json
import os
import secrets
import string
import sys
import tempfile
from collections.abc import Mapping
from typing import Any

from metatrain.config import WandbConfig
from metatrain.errors import UserError, fault_from_os_error, one_line
from metatrain.io.storage import as_path, is_remote
from metatrain.run.layout import WANDB_RUN_FILE

#: The key of a row that holds the run's step: the x axis of every W&B chart.
STEP_KEY = "step"

PACKAGE_MISSING = ("trainer.wandb is set but the wandb package is not installed: pip install 'metatrain[wandb]' "
                   "(or remove trainer.wandb)")


def import_wandb():
    """The `wandb` module.

    Raises:
        UserError: it is not installed (names the extra that installs it).
    """
    try:
        import wandb
    except ImportError:
        raise UserError(PACKAGE_MISSING) from None
    return wandb


def run_id(workdir: Any) -> str:
    """The id of `workdir`'s W&B run: the one in `W/wandb.json`, or a new one written there
    (before the W&B run starts, so a run stopped at any point resumes the same W&B run).

    Raises:
        UserError: `wandb.json` is there but holds no id (it is left as it is).
        FaultError: it cannot be written.
    """
    path = as_path(workdir) / WANDB_RUN_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        text = None
    except OSError as e:
        raise fault_from_os_error(e, f"cannot read {path}") from None
    if text is not None:
        try:
            found = json.loads(text).get("id")
        except (ValueError, AttributeError):
            found = None
        if not isinstance(found, str) or not found:
            raise UserError(f"{path} holds no W&B run id ({{\"id\": \"...\"}}): write the id of the W&B run to "
                            "continue there, or delete the file to start a new W&B run")
        return found
    new = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # as wandb's own ids
    try:
        path.write_text(json.dumps({"id": new}) + "\n")
    except OSError as e:
        raise fault_from_os_error(e, f"cannot write {path}") from None
    return new


def local_dir(workdir: Any) -> str:
    """Where W&B keeps its local files: the work directory (W&B adds `wandb/`), or for a
    work directory in a bucket `$WANDB_DIR`, else a new temporary folder."""
    if not is_remote(str(workdir)):
        return os.path.abspath(str(workdir))
    chosen = os.environ.get("WANDB_DIR")
    if chosen:
        return chosen
    folder = tempfile.mkdtemp(prefix="metatrain-wandb-")
    print(f"metatrain train: W&B keeps its local files for {workdir} in {folder} (a work directory in a bucket; "
          "set WANDB_DIR to choose the folder)", file=sys.stderr, flush=True)
    return folder


def _require_credentials(wandb) -> None:
    """Refuse an online run without an API key before `wandb.init` would prompt for one."""
    if wandb.run is not None or wandb.setup().settings.mode in ("offline", "dryrun", "disabled"):
        # Logged in already; or `WANDB_MODE` set W&B's session offline, where `login` cannot
        # tell (`wandb.init` then raises on a missing key, reported in one line).
        return
    if not wandb.login(prompt=False, verify=False):
        raise UserError("trainer.wandb.mode is online but no W&B API key is set: export WANDB_API_KEY or run "
                        "`wandb login`, or set trainer.wandb.mode=offline (and `wandb sync` later)")


def preflight(config: WandbConfig) -> None:
    """What can be checked before a run reads or writes anything: the package is there and
    an online run has an API key.

    Raises:
        UserError: either is missing.
    """
    if config.mode == "disabled":
        return
    wandb = import_wandb()
    if config.mode == "online":
        _require_credentials(wandb)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return one_line(text[0] if text else type(error).__name__)


class WandbRun:
    """One W&B run, fed the records of `metrics.jsonl`.

    A failure while logging (W&B's service gone) is reported once on stderr and ends the
    mirroring; training goes on, and `metrics.jsonl` keeps every record.
    """

    def __init__(self, run: Any):
        self.run = run

    @classmethod
    def start(cls, config: WandbConfig, workdir: Any, run_config: Mapping[str, object] | None) -> WandbRun | None:
        """Start (or continue) `workdir`'s W&B run; None when `config.mode` is "disabled".

        Raises:
            UserError: wandb is not installed, an online run has no API key, or W&B did
                not start (the one line names W&B's reason).
        """
        if config.mode == "disabled":
            return None
        wandb = import_wandb()
        if config.mode == "online":
            _require_credentials(wandb)
        rid = run_id(workdir)
        try:
            run = wandb.init(
                project=config.project,
                entity=config.entity,
                name=config.name or as_path(workdir).name,
                tags=list(config.tags),
                mode=config.mode,
                id=rid,
                resume="allow",
                dir=local_dir(workdir),
                config=dict(run_config or {}),
                job_type="train",
                reinit="create_new",  # a caller's own W&B run (a sweep script) stays open
                settings=wandb.Settings(console="off"),  # stdout and stderr are the launcher's
            )
            run.define_metric(STEP_KEY, hidden=True)
            run.define_metric("*", step_metric=STEP_KEY)
        except Exception as e:  # noqa: BLE001 - any reason W&B gives is reported in one line
            raise UserError(
                f"trainer.wandb: W&B did not start the run {rid} in project {config.project!r} ({_first_line(e)}); "
                "check trainer.wandb.project and .entity, the network and the API key, or set "
                "trainer.wandb.mode=offline (and `wandb sync` later)"
            ) from None
        return cls(run)

    def log(self, step: int, metrics: Mapping[str, object]) -> None:
        """One row: `metrics` (None values left out) at `step`."""
        if self.run is None:
            return
        row = {k: v for k, v in metrics.items() if v is not None}
        row[STEP_KEY] = int(step)
        try:
            self.run.log(row)
        except Exception as e:  # noqa: BLE001 - W&B is a mirror; training goes on without it
            print(f"metatrain train: W&B stopped taking metrics at step {step} ({_first_line(e)}); "
                  "metrics.jsonl keeps every record", file=sys.stderr, flush=True)
            self.run = None

    def finish(self, failed: bool = False) -> None:
        """End the W&B run (marked failed when the training failed); uploads what is left."""
        run, self.run = self.run, None
        if run is None:
            return
        try:
            run.finish(exit_code=1 if failed else 0)
        except Exception as e:  # noqa: BLE001 - the run's own outcome is what the caller reports
            print(f"metatrain train: W&B did not finish the run ({_first_line(e)})", file=sys.stderr, flush=True)
