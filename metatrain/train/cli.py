"""`metatrain train [--config FILE] [--workdir DIR] [--set key=value ...]`."""

from __future__ import annotations

import argparse
from pathlib import Path

from metatrain.paths import DEFAULT_CONFIG, REPO_ROOT
from metatrain.storage import as_path


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


def resolve_run(config_path: Path | None, workdir: Path | None, overrides: list[str]):
    """The config and work directory a `train` invocation means (also used by `launch`).

    Without `--config`, a work directory's own `config.yaml` is used; where that is
    missing but checkpoints exist, the config stored in the newest readable checkpoint.
    """
    from metatrain.config import load_config, load_config_dict

    if workdir is None:
        name = (config_path or DEFAULT_CONFIG).stem
        workdir = REPO_ROOT / "runs" / name
    saved = workdir / "config.yaml"
    if config_path is None:
        if saved.is_file():
            config_path = saved  # resuming: the run's own resolved config
        else:
            stored = _checkpoint_config(workdir)
            if stored is not None:
                step, config = stored
                return load_config_dict(config, overrides, where=f"{workdir}/checkpoints/{step} (config)"), workdir
    return load_config(config_path, overrides), workdir


def _checkpoint_config(workdir: Path) -> tuple[int, dict] | None:
    """(step, config) of the newest checkpoint whose config item reads, or None."""
    if not (workdir / "checkpoints").is_dir():
        return None
    from metatrain.train.checkpoint import Checkpointer

    checkpointer = Checkpointer(workdir, read_only=True)
    for step in reversed(checkpointer.all_steps()):
        try:
            return step, checkpointer.read_config(step)
        except Exception:  # noqa: BLE001 - damaged: the trainer reports it and falls back
            continue
    return None


def run_train(args: argparse.Namespace) -> int:
    import sys

    import jax

    from metatrain.errors import EXIT_PREEMPTED
    from metatrain.train.loop import format_summary, train

    config, workdir = resolve_run(args.config, args.workdir, args.overrides)
    summary = train(
        config, workdir, config_file=args.config,
        allow_other_config=args.allow_other_config, allow_changes=args.allow_changes,
    )
    if jax.process_index() == 0:
        print(format_summary(summary))
    if summary.preempted:
        return EXIT_PREEMPTED
    if args.config is None and not args.overrides and jax.process_index() == 0:
        # The embedded default run ends with a short sample of what it learnt. Training
        # has succeeded by now: a failure to sample is reported, never raised.
        try:
            from metatrain.generate.cli import training_sample

            print(training_sample(workdir))
        except Exception as e:  # noqa: BLE001
            print(f"metatrain train: (could not print a sample: {e})", file=sys.stderr)
    return 0
