"""`metatrain train [--config FILE] [--workdir DIR] [--set key=value ...]`.

Parsing only; the work is `metatrain.train.session.run_training` (imported when the
command runs).
"""

from __future__ import annotations

import argparse

from metatrain.io.storage import as_path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train (or resume) a model",
        description=(
            "Train a model on the joint objective. With no arguments trains the embedded "
            "default (configs/default.yaml: tiny model, bundled sample corpus and tokenizer). "
            "A work directory that already holds checkpoints is resumed from the latest."
        ),
    )
    p.add_argument("--config", type=as_path, default=None, help="run config YAML (default: the workdir's saved config, else configs/default.yaml)")
    p.add_argument("--workdir", type=as_path, default=None,
                   help="where checkpoints, metrics and the run's tokenizer go: a directory or gs://BUCKET/PATH "
                        "(default: runs/<config name>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config value, e.g. --set trainer.steps=50 (repeatable)")
    p.add_argument("--allow-other-config", action="store_true",
                   help="continue a work directory that was created from another config file than --config")
    p.add_argument("--allow-change", dest="allow_changes", action="append", default=[], metavar="KEY",
                   help="on resume, accept a changed optimizer.* or loss.* key (e.g. a lower learning rate "
                        "after a divergence); repeatable")
    p.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    from metatrain.train.session import run_training

    return run_training(args.config, args.workdir, args.overrides,
                        allow_other_config=args.allow_other_config, allow_changes=args.allow_changes)
