"""`metatrain train [--config FILE] [--workdir DIR] [--set key=value ...]`."""

from __future__ import annotations

import argparse
from pathlib import Path

from metatrain.paths import DEFAULT_CONFIG, REPO_ROOT


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
    p.add_argument("--config", type=Path, default=None, help="run config YAML (default: the workdir's saved config, else configs/default.yaml)")
    p.add_argument("--workdir", type=Path, default=None, help="where checkpoints, metrics and the run's tokenizer go (default: runs/<config name>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config value, e.g. --set trainer.steps=50 (repeatable)")
    p.set_defaults(func=run_train)


def resolve_run(config_path: Path | None, workdir: Path | None, overrides: list[str]):
    """The config and work directory a `train` invocation means (also used by `launch`)."""
    from metatrain.config import load_config

    if workdir is None:
        name = (config_path or DEFAULT_CONFIG).stem
        workdir = REPO_ROOT / "runs" / name
    saved = workdir / "config.yaml"
    if config_path is None and saved.is_file():
        config_path = saved  # resuming: the run's own resolved config
    return load_config(config_path, overrides), workdir


def run_train(args: argparse.Namespace) -> int:
    import sys

    import jax

    from metatrain.train.loop import PREEMPTED_EXIT_CODE, format_summary, train

    config, workdir = resolve_run(args.config, args.workdir, args.overrides)
    summary = train(config, workdir)
    if jax.process_index() == 0:
        print(format_summary(summary))
    if summary.preempted:
        return PREEMPTED_EXIT_CODE
    if args.config is None and not args.overrides and jax.process_index() == 0:
        # The embedded default run ends with a short sample of what it learnt. Training
        # has succeeded by now: a failure to sample is reported, never raised.
        try:
            from metatrain.generate.cli import training_sample

            print(training_sample(workdir))
        except Exception as e:  # noqa: BLE001
            print(f"metatrain train: (could not print a sample: {e})", file=sys.stderr)
    return 0
