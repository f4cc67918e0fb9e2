"""`metatrain data cache`, `metatrain data stats` and `metatrain data synthetic`: thin wrappers
over `cache.py` and `synthetic.py`."""

from __future__ import annotations

import argparse
import json
import sys

from metatrain.cli.options import add_max_line_bytes, output_path, positive_int
from metatrain.data.cache import cache_stats, format_cache_stats, write_cache
from metatrain.data.sources import EncoderSpec
from metatrain.data.synthetic import TASKS, write_corpus
from metatrain.errors import UserError
from metatrain.io.paths import DEFAULT_TAGS
from metatrain.tokenizer.mantra import MANTRA_POLICIES, check_mantra


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds `data cache`, `data stats` and `data synthetic` to the `metatrain` command."""
    data = subparsers.add_parser("data", help="token cache: build it, inspect it; known-answer corpora")
    commands = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")

    cache = commands.add_parser(
        "cache",
        help="tokenize documents (JSON Lines, Parquet, ArrayRecord) once into a tensorstore token cache",
        description="Tokenize documents once into a token cache directory that training can read "
        "instead of the documents (a data source path may name the directory).",
    )
    cache.add_argument("--input", action="append", required=True, metavar="DOCS",
                       help="JSON Lines, Parquet or ArrayRecord file, or a glob; repeat for several (read in order)")
    cache.add_argument("--tokenizer", required=True, metavar="T.model", help="SentencePiece model with the tags")
    cache.add_argument("--tags", default=str(DEFAULT_TAGS), metavar="TAGS.yaml",
                       help="tag registry (default: %(default)s)")
    cache.add_argument("--out", required=True, type=output_path("--out"), metavar="DIR", help="cache directory to create")
    cache.add_argument("--mantra", default=None, help="mantra text (default: the default mantra)")
    cache.add_argument("--mantra-policy", default="every", choices=MANTRA_POLICIES,
                       help="which thinking blocks open with the mantra; `none` for no mantra")
    cache.add_argument("--strict", action="store_true", help="stop at the first bad record instead of skipping it")
    add_max_line_bytes(cache)
    cache.add_argument("--no-progress", action="store_true", help="no progress bar")
    cache.set_defaults(func=_run_cache)

    stats = commands.add_parser("stats", help="documents, tokens per role, mantra and tag share of a token cache")
    stats.add_argument("directory", metavar="DIR", help="token cache directory")
    stats.add_argument("--json", action="store_true", help="print JSON instead of a table")
    stats.set_defaults(func=_run_stats)

    synthetic = commands.add_parser(
        "synthetic",
        help="write a known-answer corpus: raw and teacher-annotated, with a held-out split",
        description="Write a synthetic corpus whose helpful thoughts are known: for --out DIR/x.jsonl, "
        "DIR/x.jsonl (annotated by the exact rule-based teacher), DIR/x.raw.jsonl (the same documents raw), "
        "DIR/x.heldout.jsonl and DIR/x.heldout.raw.jsonl. Every document's `known` metadata says where a "
        "helpful thought goes and what it contains. The output depends only on the options.",
    )
    synthetic.add_argument("--task", required=True, metavar="NAME",
                           help="; ".join(f"{name}: {task.summary}" for name, task in TASKS.items()))
    synthetic.add_argument("--documents", required=True, type=positive_int, metavar="N", help="training documents")
    synthetic.add_argument("--heldout", type=positive_int, default=None, metavar="N",
                           help="held-out documents (default: a tenth of --documents, at least 50)")
    synthetic.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    synthetic.add_argument("--out", required=True, type=output_path("--out"), metavar="FILE.jsonl",
                           help="teacher corpus to write; the raw and held-out files go beside it")
    synthetic.add_argument("--force", action="store_true", help="replace the corpus if its files exist")
    synthetic.set_defaults(func=_run_synthetic)


def _run_cache(args: argparse.Namespace) -> int:
    if args.mantra is not None:
        try:
            check_mantra(args.mantra, "--mantra")
        except ValueError as e:
            raise UserError(str(e)) from None
    spec = EncoderSpec(args.tokenizer, args.tags, args.mantra, args.mantra_policy)
    meta = write_cache(args.input, args.out, spec, strict=args.strict, progress=not args.no_progress,
                       max_line_bytes=args.max_line_bytes)
    print(
        f"wrote {args.out}: {meta['documents']} documents, {meta['tokens']} tokens, "
        f"skipped {meta['skipped_records']} bad records"
    )
    return 0


def _run_stats(args: argparse.Namespace) -> int:
    stats = cache_stats(args.directory)
    if args.json:
        json.dump(stats, sys.stdout, indent=2)
        print()
        return 0
    print(format_cache_stats(stats))
    return 0


def _run_synthetic(args: argparse.Namespace) -> int:
    summary = write_corpus(args.out, args.task, args.documents, heldout=args.heldout, seed=args.seed,
                           force=args.force)
    paths = summary["paths"]
    print(
        f"wrote {paths['train']} and {paths['train_raw']} ({summary['documents']} documents, "
        f"{summary['problems']} problems), {paths['heldout']} and {paths['heldout_raw']} "
        f"({summary['heldout']} held-out documents): task {summary['task']}, seed {summary['seed']}"
    )
    return 0
