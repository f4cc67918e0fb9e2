"""Which run a `metatrain train` command means: its config and its work directory.

Without `--config`, a work directory's own `config.yaml` is the config (a resume); where
that is missing but checkpoints exist, the config stored in the newest readable
checkpoint. Without `--workdir`, the run goes to `runs/<config name>` in this checkout.
"""

from __future__ import annotations

from pathlib import Path

from metatrain.config import RunConfig, load_config, load_config_dict
from metatrain.io.paths import DEFAULT_CONFIG, REPO_ROOT
from metatrain.run.checkpoint import Checkpointer
from metatrain.run.layout import CHECKPOINTS_DIR, CONFIG_FILE


def resolve_run(config_path: Path | None, workdir: Path | None, overrides: list[str]) -> tuple[RunConfig, Path]:
    """The config and work directory a `train` invocation means (`metatrain train`, and
    `metatrain launch` checking the command it will run).

    Without `--config`, a work directory's own `config.yaml` is used; where that is
    missing but checkpoints exist, the config stored in the newest readable checkpoint.
    """
    if workdir is None:
        name = (config_path or DEFAULT_CONFIG).stem
        workdir = REPO_ROOT / "runs" / name
    saved = workdir / CONFIG_FILE
    if config_path is None:
        if saved.is_file():
            config_path = saved  # resuming: the run's own resolved config
        else:
            stored = _checkpoint_config(workdir)
            if stored is not None:
                step, config = stored
                return load_config_dict(config, overrides, where=f"{workdir}/{CHECKPOINTS_DIR}/{step} (config)"), workdir
    return load_config(config_path, overrides), workdir


def _checkpoint_config(workdir: Path) -> tuple[int, dict] | None:
    """(step, config) of the newest checkpoint whose config item reads, or None."""
    if not (workdir / CHECKPOINTS_DIR).is_dir():
        return None
    checkpointer = Checkpointer(workdir, read_only=True)
    for step in reversed(checkpointer.all_steps()):
        try:
            return step, checkpointer.read_config(step)
        except Exception:  # noqa: BLE001 - damaged: the trainer reports it and falls back
            continue
    return None
