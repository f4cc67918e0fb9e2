"""`annotate_corpus`: a corpus annotated the way `metatrain annotate` does it.

The command's options become the run's parts: the placement, the prompt template, the
block checks (with a user filter), the token counter for `--split tokens:N`, the
generator (`generators.build_generator`), the candidates and their selection
(`--samples`, `--select`, `--gain-tokens`, `--scorer`: `selection.SelectionConfig`, the
scoring model `gain.build_gain_scorer`) and the raw documents; `runner.run_annotation`
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
from metatrain.annotate.selection import DEFAULT_GAIN_TOKENS, SelectionConfig
from metatrain.documents import SkipCounter
from metatrain.errors import UserError
from metatrain.io.storage import absolute


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
    selection = selection_config(options)
    settings = RunSettings(placement, template, checks, retries=options.retries, seed=options.seed,
                           concurrency=options.concurrency, selection=selection)
    tokenizer = None
    if options.split.startswith("tokens:"):
        from metatrain.tokenizer.spm import SpmTokenizer

        tokenizer = SpmTokenizer.load(options.tokenizer)
    gain_scorer = None
    if selection is not None and selection.scorer is not None:  # a bad --scorer fails before the generator loads
        from metatrain.annotate.gain import build_gain_scorer

        gain_scorer = build_gain_scorer(selection, None, mesh_settings=getattr(options, "mesh_settings", None))
    generator = build_generator(options.generator, options)
    if selection is not None and gain_scorer is None:
        from metatrain.annotate.gain import build_gain_scorer

        try:
            gain_scorer = build_gain_scorer(selection, generator)
        except BaseException:
            _close(generator)
            raise
    skips = SkipCounter()
    documents = read_raw_documents(files, strict=options.strict, skips=skips)

    def input_ids():  # the inputs read again, quietly (their bad records are reported by the run)
        return (raw.id for raw in read_raw_documents(files, strict=options.strict, skips=SkipCounter(max_messages=0)))

    summary = run_annotation(documents, generator, settings, options.out, inputs=files, input_ids=input_ids,
                             tokenizer=tokenizer, progress=not options.no_progress, gain_scorer=gain_scorer)
    summary.skipped_records = skips.count
    return summary


def selection_config(options: argparse.Namespace) -> SelectionConfig | None:
    """`--samples`, `--select`, `--gain-tokens`, `--scorer` (None: none given, today's run:
    one thought per point, no gains). `--select gain` with neither `--scorer` nor a
    generator that scores (`metatrain`) is refused here, before anything loads.

    Raises:
        UserError: a value out of range, or `--select gain` without a scoring model.
    """
    given = {name: getattr(options, name, None) for name in ("samples", "select", "gain_tokens", "scorer", "min_gain")}
    if all(v is None for v in given.values()):
        return None
    config = SelectionConfig(
        samples=1 if given["samples"] is None else given["samples"],
        select=given["select"] or "first",
        gain_tokens=DEFAULT_GAIN_TOKENS if given["gain_tokens"] is None else given["gain_tokens"],
        scorer=str(absolute(given["scorer"])) if given["scorer"] else None,
        min_gain=given["min_gain"],
    )
    if (config.select == "gain" or config.min_gain is not None) and config.scorer is None \
            and options.generator != "metatrain":
        from metatrain.annotate.gain import no_scorer_message

        if config.select == "gain":
            raise UserError(no_scorer_message(options.generator))
        raise UserError(f"--min-gain needs a scoring model, and --generator {options.generator} has none: give "
                        "--scorer WORKDIR (a trained metatrain run), or leave out --min-gain")
    return config


def _close(generator) -> None:
    """Release a generator that will not run (its devices, its connections)."""
    import asyncio

    try:
        asyncio.run(generator.aclose())
    except Exception:  # noqa: BLE001 - the error being raised matters more
        pass
