"""The train/eval split: a document is held out when its id hashes below `eval_fraction`.

The hash is of the document id alone (first 8 bytes of its SHA-256), so the split is
the same in every run, on every process count and for the raw JSON Lines and the token
cache of the same corpus. A document without an `id` gets `file:line` as its id (see
`metatrain.documents`), so its split follows its file's path; give documents ids to
keep the split stable when files move.
"""

from __future__ import annotations

import hashlib

SPLITS: tuple[str, ...] = ("train", "eval")
_SCALE = float(2**64)


def id_hash(doc_id: str) -> int:
    """A uint64 hash of a document id, stable across runs and machines."""
    return int.from_bytes(hashlib.sha256(doc_id.encode("utf-8")).digest()[:8], "little")


def in_split(hash_value: int, split: str, eval_fraction: float) -> bool:
    """Whether a document with this `id_hash` belongs to `split` ("train" or "eval")."""
    held_out = hash_value / _SCALE < eval_fraction
    return held_out if split == "eval" else not held_out


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return split
