"""Documents files encoded to token ids and roles, one JSON line per document (`metatrain encode`).

`encode_jsonl` writes what an `Encoder` makes of every valid document of its inputs;
`encode_files` is the whole command: the output checked before anything loads, the
encoder built from its files, then `encode_jsonl`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

from metatrain.documents import SkipCounter, read_documents
from metatrain.errors import UserError
from metatrain.io.compression import MAX_LINE_BYTES
from metatrain.io.outputs import atomic_output, check_output_file
from metatrain.roles import Role
from metatrain.tokenizer.encoder import EncodeError, Encoder
from metatrain.tokenizer.mantra import read_mantra_file


@dataclasses.dataclass(frozen=True)
class EncodeReport:
    """What `encode_jsonl` wrote: documents, tokens, and bad records skipped."""

    documents: int
    tokens: int
    skipped: int


def encode_jsonl(
    encoder: Encoder,
    inputs: Sequence[str | Path],
    output: str | Path,
    *,
    strict: bool = False,
    skips: SkipCounter | None = None,
    also_reads: Sequence[str | Path] = (),
    max_line_bytes: int = MAX_LINE_BYTES,
) -> EncodeReport:
    """Writes one `{"id", "ids", "roles"}` line per valid document of `inputs` to `output`.

    `inputs` are JSON Lines, Parquet or ArrayRecord files (`metatrain.documents.read_documents`).

    Bad records (unreadable, invalid, a line longer than `max_line_bytes`, or rejected
    by the grammar) are skipped and counted, or in strict mode stop the run. `output` is replaced atomically when the
    run completes with at least one document (`metatrain.io.outputs`); it may not be one
    of `inputs` or of `also_reads` (the tokenizer, tags and mantra files), nor anything
    but a regular file.

    Raises:
        RecordError: in strict mode, the first bad record.
        UserError: `output` is unsafe to replace, or no document was valid.
    """
    skips = SkipCounter() if skips is None else skips
    labels = {int(role): role.label for role in Role}
    documents = tokens = 0
    with atomic_output(output, inputs=[*inputs, *also_reads]) as handle:
        for doc in read_documents(inputs, strict=strict, skips=skips, max_line_bytes=max_line_bytes):
            try:
                encoded = encoder.encode(doc)
            except EncodeError as e:
                if strict:
                    raise e.record_error() from None
                skips.add(e.record_error())
                continue
            record = {"id": doc.id, "ids": encoded.ids.tolist(),
                      "roles": [labels[r] for r in encoded.roles.tolist()]}
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            documents += 1
            tokens += len(encoded)
        if documents == 0:  # leaves `output` as it was
            first = "; ".join(skips.messages[:3]) or "the inputs have no non-blank line"
            raise UserError(f"no valid document in {', '.join(map(str, inputs))}, so nothing was "
                            f"written to {output}: {first}")
    return EncodeReport(documents, tokens, skips.count)


def encode_files(
    tokenizer: str | Path,
    tags: str | Path | None,
    inputs: Sequence[str | Path],
    output: str | Path,
    *,
    mantra_file: str | None = None,
    mantra_policy: str = "every",
    strict: bool = False,
    skips: SkipCounter | None = None,
    max_line_bytes: int = MAX_LINE_BYTES,
) -> EncodeReport:
    """`encode_jsonl` with an `Encoder` loaded from `tokenizer`, `tags` and `mantra_file`.

    `output` is checked first (`check_output_file`: it may not be one of the files read),
    before the tokenizer loads.

    Args:
        tokenizer: the SentencePiece model with the tags.
        tags: the tag registry YAML.
        inputs: document files (JSON Lines, Parquet or ArrayRecord).
        output: the JSON Lines file to write.
        mantra_file: the mantra's text (None: the built-in mantra).
        mantra_policy: which thinking blocks open with the mantra.
        strict: stop at the first bad record.
        skips: counts the bad records skipped.
        max_line_bytes: the longest JSON Lines line read (its newline not counted).

    Raises:
        UserError: as `encode_jsonl`, or a file cannot be read.
    """
    reads = [p for p in (tokenizer, tags, mantra_file) if p is not None]
    check_output_file(output, inputs=[*inputs, *reads])  # before anything is loaded
    encoder = Encoder.from_files(tokenizer, tags, mantra=read_mantra_file(mantra_file),
                                 mantra_policy=mantra_policy)
    return encode_jsonl(encoder, inputs, output, strict=strict, skips=skips, also_reads=reads,
                        max_line_bytes=max_line_bytes)
