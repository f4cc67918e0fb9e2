"""The names of a work directory's files and folders: the one place they are spelled.

A work directory (`metatrain train --workdir W`, local or `gs://`) holds:

    W/config.yaml        the run's resolved config, written when the run is created
    W/tokenizer.model    the run's copy of its SentencePiece model
    W/tags.yaml          the run's copy of its tag registry
    W/run.json           where the run came from (the config file it was created from)
    W/train.lock         held by the one trainer writing the directory
    W/checkpoints/STEP/  orbax checkpoints, one folder per step (`metatrain.run.checkpoint`)
    W/metrics.jsonl      one JSON object per logged step and evaluation
    W/tensorboard/       TensorBoard event files
    W/wandb.json         the id of the run's Weights & Biases run (`trainer.wandb`)
    W/wandb/             W&B's own local files (offline runs, its logs; local work directories)
    W/goodput.json       where the run's time went, to count restarts (`metatrain.run.goodput`)

Everything that reads or writes a run names these through this module.
"""

from __future__ import annotations

import os

CONFIG_FILE = "config.yaml"
TOKENIZER_FILE = "tokenizer.model"
TAGS_FILE = "tags.yaml"
RUN_FILE = "run.json"
LOCK_FILE = "train.lock"
CHECKPOINTS_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
WANDB_RUN_FILE = "wandb.json"
WANDB_DIR = "wandb"
GOODPUT_FILE = "goodput.json"



def enclosing_checkpoints(path: str | os.PathLike[str]):
    """The `checkpoints` folder of a work directory that `path` is in, at or under, else None.

    A path counts as inside a run's checkpoints when it or one of its ancestors is named
    `checkpoints` and sits beside a `config.yaml`: whatever is written there, that run's
    checkpointer later lists, moves aside as corrupt or deletes.
    """
    from metatrain.io.storage import absolute, as_path

    try:
        p = absolute(path)
    except (OSError, RuntimeError):  # a symlink loop: whoever opens the path reports it
        p = as_path(path)
    for folder in (p, *p.parents):
        if folder.name == CHECKPOINTS_DIR and (folder.parent / CONFIG_FILE).exists():
            return folder
    return None


def refuse_inside_checkpoints(path: str | os.PathLike[str], option: str) -> None:
    """Raise `UserError` when `path` (the value of `option`) lies inside a run's checkpoints."""
    from metatrain.errors import UserError

    folder = enclosing_checkpoints(path)
    if folder is not None:
        raise UserError(
            f"{option} {path} is inside {folder}, the checkpoints of the run {folder.parent}, which that run "
            f"lists, moves aside and deletes: choose a {option} outside it"
        )
