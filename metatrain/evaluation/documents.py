"""The documents an evaluation reads, whole and encoded: the resampling unit of its statistics.

The training stream packs and splits documents into rows; an evaluation that resamples
documents, or rebuilds them without their thinking, needs each document whole. Two
ways in:

    split_documents(data, encoder)   the run's held-out split, as `metatrain train`
                                     chooses it (document id hash < eval_fraction), from
                                     every source in order: JSON Lines, Parquet, ArrayRecord,
                                     token caches, seqio Tasks and Mixtures (the `seqio` extra)
    file_documents(paths, encoder)   every document of JSON Lines, Parquet or ArrayRecord files (`--data`)

Bad records are skipped and counted in a `SkipCounter` (the first few logged with
file:line), or stop with one line in strict mode; a file that cannot be read is a
`UserError`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from pathlib import Path

from metatrain.data.cache import TokenCache, check_cache_matches, is_cache_dir
from metatrain.data.config import DataConfig
from metatrain.data.sources import EncoderSpec, expand_jsonl_paths
from metatrain.data.split import id_hash, in_split
from metatrain.documents import SkipCounter, read_documents
from metatrain.errors import UserError
from metatrain.io.formats import RecordError
from metatrain.io.storage import as_path
from metatrain.tokenizer.encoder import EncodedDocument, EncodeError, Encoder


def _encoded(docs: Iterable, encoder: Encoder, *, strict: bool, skips: SkipCounter) -> Iterator[EncodedDocument]:
    for doc in docs:
        try:
            yield encoder.encode(doc)
        except EncodeError as e:
            error = e.record_error()
            if strict:
                raise UserError(f"bad record (strict mode is on): {error}") from None
            skips.add(error)


def _jsonl(paths: Iterable[Path], *, strict: bool, skips: SkipCounter):
    try:
        yield from read_documents(list(paths), strict=strict, skips=skips)
    except RecordError as e:
        if e.line == 0:  # the file itself cannot be read
            raise UserError(str(e)) from None
        raise UserError(f"bad record (strict mode is on): {e}") from None


def file_documents(
    paths: str | Path | Iterable[str | Path],
    encoder: Encoder,
    *,
    strict: bool = False,
    skips: SkipCounter | None = None,
    limit: int | None = None,
) -> list[EncodedDocument]:
    """Every valid document of JSON Lines files (plain or compressed, or a glob), encoded.

    Raises:
        UserError: a file is missing or unreadable; a bad record in strict mode.
    """
    skips = SkipCounter() if skips is None else skips
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files = [f for p in paths for f in expand_jsonl_paths(p)]
    out = []
    for doc in _encoded(_jsonl(files, strict=strict, skips=skips), encoder, strict=strict, skips=skips):
        out.append(doc)
        if limit is not None and len(out) >= limit:
            break
    return out


def split_documents(
    data: DataConfig,
    encoder: Encoder,
    split: str = "eval",
    *,
    skips: SkipCounter | None = None,
    limit: int | None = None,
) -> list[EncodedDocument]:
    """The documents of one split of the run's sources, in source order, encoded.

    The split is the trainer's (`metatrain.data.split`), so these are exactly the
    documents `metatrain train` held out (for "eval").

    Raises:
        UserError: a source is missing, a cache was built with another tokenizer, or a
            bad record in strict mode (`data.strict`).
    """
    return list(itertools.islice(iter_split_documents(data, encoder, split, skips=skips), limit))


def iter_split_documents(
    data: DataConfig, encoder: Encoder, split: str = "eval", *, skips: SkipCounter | None = None
) -> Iterator[EncodedDocument]:
    """`split_documents`, read lazily: a caller that needs a few documents of a large
    corpus stops reading when it has them."""
    skips = SkipCounter() if skips is None else skips
    for source in data.sources:
        if source.seqio is not None:
            yield from _seqio_documents(source, data, split)
        elif is_cache_dir(source.path):
            yield from _cache_documents(as_path(source.path), data, split)
        else:
            docs = (
                doc for doc in _jsonl(expand_jsonl_paths(source.path), strict=data.strict, skips=skips)
                if in_split(id_hash(doc.id), split, data.eval_fraction)
            )
            yield from _encoded(docs, encoder, strict=data.strict, skips=skips)


def _cache_documents(path: Path, data: DataConfig, split: str) -> Iterator[EncodedDocument]:
    cache = TokenCache(path)
    spec = EncoderSpec(str(data.tokenizer), str(data.tags), data.mantra, data.mantra_policy)
    check_cache_matches(path, cache.meta, spec)
    for index, h in enumerate(cache.id_hashes):
        if in_split(int(h), split, data.eval_fraction):
            ids, roles = cache.document(index)
            yield EncodedDocument(f"{path}#{index}", ids, roles)


def _seqio_documents(source, data: DataConfig, split: str) -> Iterator[EncodedDocument]:
    """The examples of a seqio Task or Mixture (the `seqio` extra) in `split`, in Task order."""
    from metatrain.data.seqio import open_seqio_source
    from metatrain.data.sources import SkipLog

    spec = EncoderSpec(str(data.tokenizer), str(data.tags), data.mantra, data.mantra_policy)
    for part in open_seqio_source(source, spec, split=split, eval_fraction=data.eval_fraction, strict=data.strict,
                                  skips=SkipLog()):
        examples = part.reader.examples
        for index in range(len(examples)):
            if in_split(int(examples.hashes[index]), split, data.eval_fraction):
                ids, roles = examples[index]
                yield EncodedDocument(f"{part.name}#{int(examples.numbers[index])}", ids, roles)
