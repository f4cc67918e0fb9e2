"""`metatrain tokenizer train|extend|inspect|resize-checkpoint` and `metatrain encode`.

Thin wrappers: each parses its flags and calls a function that tests call directly
(`metatrain.tokenizer.build`, `.spm`, `.encode_file`). `resize-checkpoint` lives with the
trainer (`metatrain.train.resize`) and is imported only when it runs, so the other
commands never load JAX.
"""

from __future__ import annotations

import argparse
import json
import sys

from metatrain.cli.options import add_max_line_bytes, output_path
from metatrain.documents import SkipCounter
from metatrain.io.paths import DEFAULT_TAGS
from metatrain.io.storage import as_path
from metatrain.tokenizer.build import extend_tokenizer, train_tokenizer
from metatrain.tokenizer.encode_file import encode_files
from metatrain.tokenizer.mantra import MANTRA_POLICIES, read_mantra_file
from metatrain.tokenizer.registry import load_registry
from metatrain.tokenizer.resize import DEFAULT_NOISE_SCALE
from metatrain.tokenizer.spm import inspect_tokenizer

_INPUT_FORMATS = "JSON Lines (.jsonl, or compressed .jsonl.gz etc.), Parquet (.parquet) or ArrayRecord (.array_record)"


def _run_train(args: argparse.Namespace) -> int:
    skips = SkipCounter()
    report = train_tokenizer(
        args.input, vocab_size=args.vocab_size, out_prefix=args.out, registry=load_registry(args.tags),
        model_type=args.model_type, mantra=read_mantra_file(args.mantra_file), strict=args.strict, skips=skips,
        max_line_bytes=args.max_line_bytes,
    )
    print(f"wrote {report.model_path} ({report.vocab_size} pieces) from {report.documents} documents, "
          f"{report.texts} texts; {skips.summary()}", file=sys.stderr)
    return 0


def _run_extend(args: argparse.Namespace) -> int:
    report = extend_tokenizer(args.base, load_registry(args.tags), args.out)
    added = ", ".join(f"{t}={i}" for t, i in report.added.items()) or "none (all tags already present)"
    print(f"wrote {report.out_path} ({report.vocab_size} pieces); added: {added}", file=sys.stderr)
    return 0


def _run_inspect(args: argparse.Namespace) -> int:
    info = inspect_tokenizer(args.tokenizer, load_registry(args.tags))
    print(json.dumps(info.to_json(), ensure_ascii=False, indent=2) if args.json else info.render())
    return 0


def _run_resize_checkpoint(args: argparse.Namespace) -> int:
    from metatrain.train.resize import resize_checkpoint

    report = resize_checkpoint(args.workdir, args.tokenizer, args.out, tags=args.tags,
                               seed=args.seed, noise_scale=args.noise_scale)
    print(report.summary(), file=sys.stderr)
    return 0


def _run_encode(args: argparse.Namespace) -> int:
    skips = SkipCounter()
    report = encode_files(args.tokenizer, args.tags, args.input, args.output, mantra_file=args.mantra_file,
                          mantra_policy=args.mantra_policy, strict=args.strict, skips=skips,
                          max_line_bytes=args.max_line_bytes)
    print(f"wrote {report.documents} documents ({report.tokens} tokens) to {args.output}; "
          f"{skips.summary()}", file=sys.stderr)
    return 0


def _add_tags_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tags", default=str(DEFAULT_TAGS), metavar="FILE",
                        help="tag registry YAML (default: the shipped tokenizer/tags.yaml)")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds `tokenizer train|extend|inspect|resize-checkpoint` and `encode` to the `metatrain` command."""
    tok = subparsers.add_parser("tokenizer", help="train, extend and inspect SentencePiece tokenizers with tags; resize checkpoints for them")
    tok_sub = tok.add_subparsers(dest="tokenizer_command", required=True, metavar="SUBCOMMAND")

    train = tok_sub.add_parser("train", help="train a SentencePiece model on documents, tags as control pieces")
    train.add_argument("--input", action="append", required=True, metavar="DOCS",
                       help=f"document file: {_INPUT_FORMATS} (repeat for several)")
    train.add_argument("--vocab-size", type=int, required=True, metavar="N")
    train.add_argument("--out", required=True, type=output_path("--out"), metavar="PREFIX",
                       help="writes PREFIX.model and PREFIX.vocab (PREFIX may be gs://BUCKET/PATH)")
    train.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    train.add_argument("--mantra-file", metavar="FILE", help="mantra text (default: the built-in mantra)")
    train.add_argument("--strict", action="store_true", help="stop at the first bad record")
    add_max_line_bytes(train)
    _add_tags_flag(train)
    train.set_defaults(func=_run_train)

    extend = tok_sub.add_parser("extend", help="append tags to an existing model; existing ids stay")
    extend.add_argument("--base", required=True, metavar="BASE.model")
    extend.add_argument("--out", required=True, type=output_path("--out"), metavar="NEW.model", help="the new model (may be gs://BUCKET/PATH)")
    _add_tags_flag(extend)
    extend.set_defaults(func=_run_extend)

    inspect = tok_sub.add_parser("inspect", help="print vocabulary size, special ids and tag ids")
    inspect.add_argument("--tokenizer", required=True, metavar="T.model")
    inspect.add_argument("--json", action="store_true", help="print a JSON object")
    _add_tags_flag(inspect)
    inspect.set_defaults(func=_run_inspect)

    resize = tok_sub.add_parser(
        "resize-checkpoint",
        help="copy a run into a new work directory for an extended tokenizer (rows for the new ids)",
        description=(
            "Write --out: the run in --workdir at its newest checkpoint, with embedding and output "
            "rows for the ids the extended --tokenizer adds (mean of the old rows plus small noise; "
            "old rows unchanged, Adam moments of the new rows zero). Continue it with "
            "`metatrain train --workdir OUT --set trainer.steps=N`."
        ),
    )
    resize.add_argument("--workdir", required=True, type=as_path, metavar="DIR",
                        help="the run to resize (only read; may be gs://BUCKET/PATH)")
    resize.add_argument("--tokenizer", required=True, type=as_path, metavar="NEW.model",
                        help="`metatrain tokenizer extend` of DIR/tokenizer.model")
    resize.add_argument("--out", required=True, type=output_path("--out", as_path), metavar="OUT",
                        help="the new work directory (must not exist, or be empty; may be gs://BUCKET/PATH)")
    resize.add_argument("--tags", type=as_path, default=None, metavar="FILE",
                        help="tag registry of NEW.model (default: DIR/tags.yaml)")
    resize.add_argument("--seed", type=int, default=0, help="seed of the new rows' noise (default: 0)")
    resize.add_argument("--noise-scale", type=float, default=DEFAULT_NOISE_SCALE, metavar="X",
                        help="noise std as a fraction of each feature's spread over the old rows "
                             f"(default: {DEFAULT_NOISE_SCALE})")
    resize.set_defaults(func=_run_resize_checkpoint)

    enc = subparsers.add_parser("encode", help="encode documents to token ids and roles (JSON Lines)")
    enc.add_argument("--tokenizer", required=True, metavar="T.model")
    enc.add_argument("--input", action="append", required=True, metavar="DOCS",
                     help=f"document file: {_INPUT_FORMATS} (repeat for several)")
    enc.add_argument("--output", required=True, type=output_path("--output"), metavar="OUT.jsonl")
    enc.add_argument("--mantra-policy", choices=MANTRA_POLICIES, default="every")
    enc.add_argument("--mantra-file", metavar="FILE", help="mantra text (default: the built-in mantra)")
    enc.add_argument("--strict", action="store_true", help="stop with an error at the first bad record")
    add_max_line_bytes(enc)
    _add_tags_flag(enc)
    enc.set_defaults(func=_run_encode)
