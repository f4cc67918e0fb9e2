"""`metatrain annotate`: LLM-written thinking for a corpus (see docs/annotate.md)."""

from __future__ import annotations

import argparse
import importlib
import sys

from metatrain.errors import UserError
from metatrain.io.paths import SAMPLE_TOKENIZER

#: Modules that register a generator (`metatrain.annotate.generators.register_generator`).
GENERATOR_MODULES: dict[str, str] = {
    "openai": "metatrain.annotate.openai_chat",
    "metatrain": "metatrain.annotate.local_model",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds `annotate` to the `metatrain` command."""
    from metatrain.annotate.openai_chat import add_openai_options
    from metatrain.annotate.prompts import DEFAULT_CONTEXT_CHARS

    p = subparsers.add_parser(
        "annotate",
        help="write thinking blocks into a corpus with an LLM (an endpoint, or a metatrain checkpoint)",
        description="Insert LLM-written thinking into documents: raw JSON Lines {id, text}, .txt files or "
        "metatrain documents in; metatrain documents out, text unchanged, ready for encode, data cache "
        "and train. Resumable: run the same command again after a crash or a stop.",
    )
    p.add_argument("--input", action="append", required=True, metavar="RAW",
                   help="JSON Lines ({id, text} or documents), .txt, compressed, a directory or a glob; repeatable")
    p.add_argument("--out", required=True, metavar="DOCS.jsonl", help="annotated documents (appended; resumable), a local file or gs://BUCKET/NAME")
    p.add_argument("--generator", required=True, choices=sorted(GENERATOR_MODULES), help="what writes the thinking")
    place = p.add_argument_group("placement")
    place.add_argument("--where", choices=("passage", "document", "chunk"), default="passage",
                       help="after passages (default), once after the whole document (TPT), or per chunk (BoLT)")
    place.add_argument("--split", default="paragraph", metavar="UNIT",
                       help="sentence | paragraph (default) | tokens:N: the passages or chunks")
    place.add_argument("--max-blocks", type=int, default=None, metavar="N", help="at most N blocks per document")
    place.add_argument("--order", choices=("before", "after", "random"), default=None,
                       help="chunk placement: thought before or after its chunk (default random)")
    place.add_argument("--replace-thinking", action="store_true",
                       help="drop thinking already in input documents (default: keep it)")
    place.add_argument("--tokenizer", default=str(SAMPLE_TOKENIZER), metavar="T.model",
                       help="SentencePiece model that counts tokens for --split tokens:N")
    prompt = p.add_argument_group("prompt and checks")
    prompt.add_argument("--prompt", default=None, metavar="FILE", help="template file (default: the placement's own)")
    prompt.add_argument("--context-chars", type=int, default=DEFAULT_CONTEXT_CHARS, metavar="N",
                        help=f"document characters a template sees (default {DEFAULT_CONTEXT_CHARS})")
    prompt.add_argument("--min-chars", type=int, default=8, metavar="N", help="shortest thought kept (default 8)")
    prompt.add_argument("--max-chars", type=int, default=4000, metavar="N", help="longest thought kept (default 4000)")
    prompt.add_argument("--filter", default=None, metavar="MODULE:FUNCTION",
                        help="your check: FUNCTION(thought, context) -> True to keep, False or a reason to reject")
    prompt.add_argument("--retries", type=int, default=2, metavar="N",
                        help="new requests after a rejected block, then the point goes without (default 2)")
    run = p.add_argument_group("run")
    run.add_argument("--concurrency", type=int, default=8, metavar="K", help="documents in flight (default 8)")
    run.add_argument("--seed", type=int, default=0, help="placement and sampling seed (default 0)")
    run.add_argument("--strict", action="store_true", help="stop at the first bad input record")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_openai_options(p)
    local = p.add_argument_group("metatrain generator (a checkpoint writes the thinking)")
    local.add_argument("--workdir", default=None, metavar="DIR", help="a trained run (its newest checkpoint)")
    local.add_argument("--checkpoint", default=None, metavar="PATH", help="one checkpoint step directory")
    local.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (default 0: all)")
    p.set_defaults(func=run_annotate)


def run_annotate(args: argparse.Namespace) -> int:
    from metatrain.annotate.checks import BlockChecks, load_filter
    from metatrain.annotate.generators import GENERATORS
    from metatrain.annotate.inputs import expand_inputs, read_raw_documents
    from metatrain.annotate.placement import PlacementConfig
    from metatrain.annotate.prompts import load_template
    from metatrain.annotate.runner import RunSettings, exit_status, run_annotation
    from metatrain.documents import SkipCounter

    try:
        placement = PlacementConfig(where=args.where, split=args.split, max_blocks=args.max_blocks,
                                    order=args.order, seed=args.seed, replace_thinking=args.replace_thinking)
    except ValueError as e:
        raise UserError(str(e)) from None
    files = [str(f) for f in expand_inputs(args.input)]
    template = load_template(args.prompt, args.where, context_chars=args.context_chars)
    user_filter = load_filter(args.filter) if args.filter else None
    checks = BlockChecks(min_chars=args.min_chars, max_chars=args.max_chars, user_filter=user_filter,
                         filter_name=args.filter)
    settings = RunSettings(placement, template, checks, retries=args.retries, seed=args.seed,
                           concurrency=args.concurrency)
    tokenizer = None
    if args.split.startswith("tokens:"):
        from metatrain.tokenizer.spm import SpmTokenizer

        tokenizer = SpmTokenizer.load(args.tokenizer)
    importlib.import_module(GENERATOR_MODULES[args.generator])
    generator = GENERATORS[args.generator](args)
    skips = SkipCounter()
    documents = read_raw_documents(files, strict=args.strict, skips=skips)
    summary = run_annotation(documents, generator, settings, args.out, inputs=files, tokenizer=tokenizer,
                             progress=not args.no_progress)
    summary.skipped_records = skips.count
    print(summary.render(args.out), file=sys.stderr)
    return exit_status(summary)
