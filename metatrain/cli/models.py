"""`metatrain model-info --config FILE [--set k=v ...] [--devices N] [--json]`.

Parsing only; the sizing is `metatrain.run.model_info` (imported when the command runs:
every `metatrain` invocation imports this module to register the subcommand, and should
not pay for jax, flax and the model).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "model-info",
        help="parameter counts, FLOPs per token and per-device memory of a config's model",
        description=(
            "Print a model's parameter counts (total, embedding, non-embedding), its training "
            "FLOPs per token at trainer.seq_len, and the parameters + optimizer state each "
            "device holds on the configured mesh. Nothing is allocated."
        ),
    )
    p.add_argument("--config", type=Path, default=None, help="run config YAML (default: configs/default.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set model.n_layers=4 (repeatable)")
    p.add_argument("--devices", type=int, default=None,
                   help="device count to lay the mesh over (default: the mesh's fixed size, "
                        "or this machine's devices when an axis is -1)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=run_model_info)


def run_model_info(args: argparse.Namespace) -> int:
    from metatrain.config import load_config
    from metatrain.run.model_info import format_model_info, model_info, model_info_json

    config = load_config(args.config, args.overrides)
    info = model_info(config, args.devices)
    if args.json:
        print(model_info_json(info))
    else:
        print(format_model_info(config, info))
    return 0
