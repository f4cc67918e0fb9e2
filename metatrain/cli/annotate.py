"""`metatrain annotate`: LLM-written thinking for a corpus (see docs/annotate.md).

Parsing only; the work is `metatrain.annotate.pipeline.annotate_corpus`.
"""

from __future__ import annotations

import argparse
import sys

from metatrain.cli.options import add_mesh_option, output_path, positive_int
from metatrain.io.paths import SAMPLE_TOKENIZER


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds `annotate` to the `metatrain` command."""
    from metatrain.annotate.generators import GENERATOR_MODULES
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
    p.add_argument("--out", required=True, type=output_path("--out"), metavar="DOCS.jsonl", help="annotated documents (appended; resumable), a local file or gs://BUCKET/NAME")
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
    pick = p.add_argument_group("candidates and selection (see docs/annotate.md)")
    pick.add_argument("--samples", type=int, default=None, metavar="K",
                      help="candidate thoughts asked for at each point (default 1)")
    pick.add_argument("--select", choices=("gain", "random", "first"), default=None,
                      help="which candidate is kept: the largest gain, a seeded uniform choice, or the first "
                           "that passes the checks (default first)")
    pick.add_argument("--gain-tokens", type=int, default=None, metavar="N",
                      help="text tokens after the point a gain scores (default 32)")
    pick.add_argument("--min-gain", type=float, default=None, metavar="G",
                      help="keep the chosen thought only if its gain is at least G nats (e.g. 0: only thoughts "
                           "that help the next text; one whose gain cannot be scored is dropped too)")
    pick.add_argument("--scorer", default=None, metavar="WORKDIR",
                      help="a trained metatrain run that scores the candidates (default: the checkpoint of "
                           "--generator metatrain; other generators record no gains without it)")
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
    local.add_argument("--max-batch", type=positive_int, default=None, metavar="N",
                       help="rows the engine decodes at once (default: --concurrency, one insertion point per "
                            "document in flight)")
    add_mesh_option(local)
    p.set_defaults(func=run_annotate)


def run_annotate(args: argparse.Namespace) -> int:
    from metatrain.annotate.pipeline import annotate_corpus
    from metatrain.annotate.runner import exit_status, raise_if_nothing_done

    if args.generator == "metatrain" or getattr(args, "scorer", None):
        from metatrain.engine.compilation_cache import enable_compilation_cache

        enable_compilation_cache()

    summary = annotate_corpus(args)
    print(summary.render(args.out), file=sys.stderr)
    raise_if_nothing_done(summary, args.out)  # 2 (settings, key) or 74 (the endpoint), in one line
    return exit_status(summary)
