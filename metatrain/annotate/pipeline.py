"""`annotate_corpus`: a corpus annotated the way `metatrain annotate` does it.

The command's options become the run's parts: the placement, the prompt template, the
block checks (with a user filter), the token counter for `--split tokens:N`, the
generator (`generators.build_generator`) and the raw documents; `runner.run_annotation`
then does the resumable run.
"""

from __future__ import annotations

import argparse

from metatrain.annotate.checks import BlockChecks, load_filter
from metatrain.annotate.generators import build_generator
from metatrain.annotate.inputs import expand_inputs, read_raw_documents
from metatrain.annotate.placement import PlacementConfig
from metatrain.annotate.prompts import load_template
from metatrain.annotate.runner import RunSettings, RunSummary, run_annotation
from metatrain.documents import SkipCounter
from metatrain.errors import UserError


def annotate_corpus(options: argparse.Namespace) -> RunSummary:
    """Annotate `options.input` into `options.out` with the generator `options.generator`.

    Args:
        options: the parsed `metatrain annotate` options (generators read their own
            options from it).

    Returns:
        The run's summary, with the bad input records skipped counted.

    Raises:
        UserError: a bad option, template, filter or input.
    """
    try:
        placement = PlacementConfig(where=options.where, split=options.split, max_blocks=options.max_blocks,
                                    order=options.order, seed=options.seed, replace_thinking=options.replace_thinking)
    except ValueError as e:
        raise UserError(str(e)) from None
    files = [str(f) for f in expand_inputs(options.input)]
    template = load_template(options.prompt, options.where, context_chars=options.context_chars)
    user_filter = load_filter(options.filter) if options.filter else None
    checks = BlockChecks(min_chars=options.min_chars, max_chars=options.max_chars, user_filter=user_filter,
                         filter_name=options.filter)
    settings = RunSettings(placement, template, checks, retries=options.retries, seed=options.seed,
                           concurrency=options.concurrency)
    tokenizer = None
    if options.split.startswith("tokens:"):
        from metatrain.tokenizer.spm import SpmTokenizer

        tokenizer = SpmTokenizer.load(options.tokenizer)
    generator = build_generator(options.generator, options)
    skips = SkipCounter()
    documents = read_raw_documents(files, strict=options.strict, skips=skips)

    def input_ids():  # the inputs read again, quietly (their bad records are reported by the run)
        return (raw.id for raw in read_raw_documents(files, strict=options.strict, skips=SkipCounter(max_messages=0)))

    summary = run_annotation(documents, generator, settings, options.out, inputs=files, input_ids=input_ids,
                             tokenizer=tokenizer, progress=not options.no_progress)
    summary.skipped_records = skips.count
    return summary
