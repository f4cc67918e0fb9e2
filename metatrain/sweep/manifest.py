"""`DIR/manifest.jsonl`: one JSON object per run of a sweep, the only thing `sweep fit` reads.

Keys every run has (`REQUIRED_KEYS`; enough to fit runs made anywhere, by hand):

    name            unique run name
    params          non-embedding parameter count N
    tokens          training tokens D (padding included: batch_size x seq_len x steps)
    flops           training compute, flops_per_token x tokens
    status          "planned", "running", "done" or "failed"
    loss            final evaluation loss (the joint objective)
    loss/text       final evaluation loss of text tokens
    loss/thinking   final evaluation loss of thinking tokens

Keys `sweep plan` and `sweep run` add: `variant` (when the spec has variants), `budget`
(IsoFLOP sweeps), the shape (`size`, `n_layers`, `d_model`, ...), `embedding_params`,
`flops_per_token`, `steps`, `config` and `workdir` (relative to DIR), the final loss of
every role (`loss/mantra`, `loss/tag`), bits per UTF-8 byte of text (`bpb/text`), the
best evaluation values (`best_loss`, `best_loss/<role>`, `best_bpb/text`) and `error`
for failed runs. Losses are null until a run is done, a role's loss is null when the
evaluation split has no token of that role, and `bpb/text` is null where the trainer did
not log it. `sweep fit --loss-key KEY` fits any such numeric key.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from metatrain.errors import UserError
from metatrain.io.outputs import write_atomically
from metatrain.io.storage import StoragePath, as_path

MANIFEST = "manifest.jsonl"
REQUIRED_KEYS: tuple[str, ...] = ("name", "params", "tokens", "flops", "status", "loss", "loss/text", "loss/thinking")
STATUSES: tuple[str, ...] = ("planned", "running", "done", "failed")

Record = dict[str, Any]


def manifest_path(directory: str | os.PathLike) -> StoragePath:
    """`DIR/manifest.jsonl`, a local path or an object in a bucket (`gs://...`)."""
    return as_path(directory) / MANIFEST


def read_manifest(directory: str | os.PathLike) -> list[Record]:
    """The runs of the sweep in `directory`, in file order.

    Raises:
        UserError: no manifest, a line that is not a JSON object, a run without a
            name, or two runs with the same name (each with file:line).
    """
    path = manifest_path(directory)
    if not path.is_file():
        raise UserError(
            f"{path} does not exist: plan the sweep first (metatrain sweep plan --spec SWEEP.yaml "
            f"--out {directory}) or write a manifest with one JSON object per run"
        )
    records: list[Record] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{number}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}:{number}: each line is one JSON object (a run), got {line[:60]!r}")
        name = record.get("name")
        if not isinstance(name, str) or not name:
            raise UserError(f"{path}:{number}: the run has no `name`")
        if name in seen:
            raise UserError(f"{path}:{number}: run {name!r} is already on line {seen[name]}; names are unique")
        seen[name] = number
        records.append(record)
    if not records:
        raise UserError(f"{path} holds no runs")
    return records


def write_manifest(directory: str | os.PathLike, records: list[Record]) -> None:
    """Replace the manifest atomically (a crash leaves the old or the new one, never half).

    In a bucket the manifest is one object, replaced whole by each update (object
    storage has no rename and no append; readers see the old object or the new one)."""
    text = "".join(json.dumps(_json_safe(r), allow_nan=False) + "\n" for r in records)
    write_atomically(manifest_path(directory), text, option="manifest")


def _json_safe(record: Record) -> Record:
    """Non-finite floats as null: JSON has no NaN, and a NaN loss is no result."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
