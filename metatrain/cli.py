"""The `metatrain` command: parses arguments and hands off to the part that owns them.

Each part registers its own subcommands from a small `cli` module exposing
`register(subparsers)`; every subcommand sets `func(args) -> int`.

Commands that run on every process of a multi-host run (`DISTRIBUTED_COMMANDS`) first
join the run with `jax.distributed.initialize` when the environment says this is one
of several processes (`metatrain.launch.distributed`), before any device is touched.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from metatrain.errors import UserError

COMMAND_MODULES: tuple[str, ...] = (
    "metatrain.tokenizer.cli",
    "metatrain.data.cli",
    "metatrain.models.cli",
    "metatrain.train.cli",
    "metatrain.generate.cli",
    "metatrain.launch.cli",
    "metatrain.sweep.cli",
)

#: Commands that, started by a launcher on every host, join the run before they start.
DISTRIBUTED_COMMANDS: frozenset[str] = frozenset({"train"})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metatrain", description="Metacognitive pretraining in JAX."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and name.startswith(e.name):  # part not built yet
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command in DISTRIBUTED_COMMANDS:
            from metatrain.launch.distributed import initialize_from_env

            initialize_from_env()
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"metatrain {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"metatrain {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
