"""`metatrain export` and `metatrain import`: thin wrappers over `export.py` and `importer.py`."""

from __future__ import annotations

import argparse
from pathlib import Path

from metatrain.io.paths import DEFAULT_TAGS


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds `export` and `import` to the `metatrain` command."""
    export = subparsers.add_parser(
        "export",
        help="write a run's checkpoint as a Hugging Face Llama model directory",
        description="Write a checkpoint of a work directory as a directory that transformers loads with "
        "AutoModelForCausalLM.from_pretrained and AutoTokenizer.from_pretrained (no custom code): "
        "config.json, safetensors weights, the tokenizer with every tag a special token, "
        "generation_config.json, tags.yaml, mantra.txt and a model card. Needs the `hf` extra.",
    )
    export.add_argument("--workdir", required=True, help="a `metatrain train` work directory (local or gs://)")
    export.add_argument("--out", required=True, metavar="DIR",
                        help="directory to create (absent or empty; local or gs://, built in place there)")
    export.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest intact one)")
    export.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="dtype of the saved weights (default: %(default)s)")
    export.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                        help="weights above this are sharded, with model.safetensors.index.json (default: %(default)s)")
    export.set_defaults(func=_run_export)

    imp = subparsers.add_parser(
        "import",
        help="turn a Llama-family Hugging Face checkpoint into a work directory to train on",
        description="Make a work directory from a Hugging Face Llama-family model directory (config.json, "
        "safetensors weights, SentencePiece tokenizer.model): the model section comes from config.json, the "
        "registry's missing tags are appended to the tokenizer with new embedding rows, and "
        "`metatrain train --workdir OUT` continues from the imported weights. Architectures metatrain cannot "
        "compute exactly are refused. Needs the `hf` extra.",
    )
    imp.add_argument("--from", dest="source", type=Path, required=True, metavar="DIR",
                     help="Hugging Face model directory")
    imp.add_argument("--out", type=Path, required=True, metavar="WORKDIR", help="work directory to create (absent or empty)")
    imp.add_argument("--tags", type=Path, default=DEFAULT_TAGS, metavar="TAGS.yaml",
                     help="tag registry (default: %(default)s)")
    imp.add_argument("--config", type=Path, default=None,
                     help="run config for everything but the model's architecture (default: configs/default.yaml)")
    imp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value, e.g. --set trainer.seq_len=1024 (repeatable)")
    imp.add_argument("--seed", type=int, default=0, help="seed of the new tag rows' noise (default: %(default)s)")
    imp.add_argument("--noise-scale", type=float, default=None,
                     help="noise of the new tag rows, as a fraction of each feature's spread (default: 0.01)")
    imp.set_defaults(func=_run_import)


def _run_export(args: argparse.Namespace) -> int:
    from metatrain.hf.export import export_workdir

    report = export_workdir(args.workdir, args.out, step=args.step, dtype=args.dtype,
                               max_shard_size=_shard_size(args.max_shard_size))
    print(report.summary())
    return 0


def _run_import(args: argparse.Namespace) -> int:
    from metatrain.hf.importer import import_checkpoint
    from metatrain.tokenizer.resize import DEFAULT_NOISE_SCALE

    report = import_checkpoint(
        args.source, args.out, tags=args.tags, config_file=args.config, overrides=args.overrides, seed=args.seed,
        noise_scale=DEFAULT_NOISE_SCALE if args.noise_scale is None else args.noise_scale,
    )
    print(report.summary())
    return 0


def _shard_size(text: str) -> int | str:
    """`--max-shard-size`: bytes as a number, or a size such as 5GB / 500MB (transformers' form)."""
    return int(text) if text.isdigit() else text
