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

Everything that reads or writes a run names these through this module.
"""

from __future__ import annotations

CONFIG_FILE = "config.yaml"
TOKENIZER_FILE = "tokenizer.model"
TAGS_FILE = "tags.yaml"
RUN_FILE = "run.json"
LOCK_FILE = "train.lock"
CHECKPOINTS_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
