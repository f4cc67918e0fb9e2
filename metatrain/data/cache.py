"""The token cache: documents tokenized once, stored as tensorstore (zarr) arrays.

Layout of a cache directory:

    cache.json   what built it (tokenizer and tag registry SHA-256, vocab size, mantra
                 and policy) and what it holds (documents, tokens per role, skips)
    ids/         int32  [tokens]      every document's `[BOS] body [EOS]`, end to end
    roles/       int8   [tokens]      the role of each token
    offsets/     int64  [docs + 1]    document d is ids[offsets[d]:offsets[d + 1]]
    id_hash/     uint64 [docs]        `split.id_hash` of each document id (train/eval split)

Training reads a cache like the source it was built from (same document order, same
split, so the same batches when no record was skipped), and refuses one built with a different
tokenizer, tag registry or mantra: the ids would silently mean something else.

A cache may be in object storage (`gs://b/cache`): tensorstore reads and writes its
arrays through its own GCS driver. Written there, it is built in place (a prefix cannot
be renamed into place) and `cache.json` is written last, so a cache without it is an
unfinished build, never read; a failed build is removed.

`cache_stats` counts what a cache holds; `format_cache_stats` prints it as a table.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import tensorstore as ts

from metatrain.data.packing import shift_document
from metatrain.data.sources import EncoderSpec, JsonlReader, SkipLog, expand_jsonl_paths, open_records
from metatrain.data.split import check_split, id_hash, in_split
from metatrain.documents import SkipCounter
from metatrain.errors import FaultError, UserError, describe_cause
from metatrain.io.compression import MAX_LINE_BYTES
from metatrain.io.outputs import built_dir, check_output_dir
from metatrain.io.storage import StoragePath, as_path, join, tensorstore_kvstore
from metatrain.roles import LOSS_ROLES, LOSS_ROLE_LABELS, ROLE_DTYPE

CACHE_FORMAT = "metatrain-token-cache"
CACHE_VERSION = 1
META_FILE = "cache.json"
_ARRAYS = {"ids": "<i4", "roles": "|i1", "offsets": "<i8", "id_hash": "<u8"}
_TOKEN_CHUNK = 1 << 20  # elements per zarr chunk of ids/roles
_DOC_CHUNK = 1 << 16
_WRITE_EVERY = 1 << 22  # tokens buffered before a write
_READ_CACHE_BYTES = 256 << 20


def is_cache_dir(path: str | StoragePath) -> bool:
    """Whether `path` (local or remote) is a token cache directory: it holds `cache.json`."""
    return (as_path(path) / META_FILE).is_file()


def _sha256(path: str | StoragePath) -> str:
    """The SHA-256 of a file; a remote one is streamed from its bucket."""
    h = hashlib.sha256()
    with as_path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def encoder_fingerprint(spec: EncoderSpec, vocab_size: int | None = None) -> dict[str, Any]:
    """What decides the meaning of the ids in a cache: tokenizer, tag registry, mantra."""
    from metatrain.tokenizer import DEFAULT_MANTRA

    for name, path in (("tokenizer", spec.tokenizer), ("tag registry", spec.tags)):
        if not as_path(path).is_file():
            raise UserError(f"{name} file {path} does not exist")
    out: dict[str, Any] = {
        "tokenizer": {"path": str(spec.tokenizer), "sha256": _sha256(spec.tokenizer)},
        "tags": {"path": str(spec.tags), "sha256": _sha256(spec.tags)},
        "mantra": DEFAULT_MANTRA if spec.mantra is None else spec.mantra,
        "mantra_policy": spec.mantra_policy,
    }
    if vocab_size is not None:
        out["tokenizer"]["vocab_size"] = vocab_size
    return out


def check_cache_matches(directory: str | Path, meta: dict[str, Any], spec: EncoderSpec) -> None:
    """Raises UserError when the cache was built with another tokenizer, registry or mantra."""
    want = encoder_fingerprint(spec)
    problems = []
    for key, label, flag in (("tokenizer", "tokenizer", "--tokenizer"), ("tags", "tag registry", "--tags")):
        if meta[key]["sha256"] != want[key]["sha256"]:
            problems.append(
                f"{label}: cache built with {meta[key]['path']} (sha256 {meta[key]['sha256'][:12]}), "
                f"this run uses {want[key]['path']} (sha256 {want[key]['sha256'][:12]})"
            )
    for key in ("mantra", "mantra_policy"):
        if meta[key] != want[key]:
            problems.append(f"{key}: cache built with {_short(meta[key])}, this run uses {_short(want[key])}")
    if problems:
        raise UserError(
            f"token cache {directory} does not match this run's encoder:\n  "
            + "\n  ".join(problems)
            + "\nRebuild it with `metatrain data cache --input ... --tokenizer ... --out DIR` using the run's "
            "tokenizer, tags and mantra, or point data.tokenizer / data.tags / data.mantra at the ones it was built with."
        )


def _short(text: str, limit: int = 40) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= limit else text[: limit - 1] + "…")


def _array_spec(directory: StoragePath, name: str) -> dict[str, Any]:
    return {"driver": "zarr", "kvstore": tensorstore_kvstore(join(directory, name))}


def _create_array(directory: StoragePath, name: str) -> ts.TensorStore:
    chunk = _DOC_CHUNK if name in ("offsets", "id_hash") else _TOKEN_CHUNK
    spec = _array_spec(directory, name)
    spec["metadata"] = {"shape": [0], "chunks": [chunk], "dtype": _ARRAYS[name], "compressor": None}
    return ts.open(spec, create=True).result()


def _append(array: ts.TensorStore, values: np.ndarray) -> ts.TensorStore:
    start = array.shape[0]
    array = array.resize(exclusive_max=[start + len(values)]).result()
    array[start:start + len(values)].write(values).result()
    return array


class _CacheWriter:
    """Buffers encoded documents and appends them to the arrays in large writes."""

    def __init__(self, directory: StoragePath):
        self.arrays = {name: _create_array(directory, name) for name in _ARRAYS}
        self.ids: list[np.ndarray] = []
        self.roles: list[np.ndarray] = []
        self.hashes: list[int] = []
        self.offsets: list[int] = [0]
        self.buffered = 0
        self.role_counts = np.zeros(256, np.int64)

    def add(self, doc_id: str, ids: np.ndarray, roles: np.ndarray) -> None:
        self.ids.append(ids)
        self.roles.append(roles)
        self.hashes.append(id_hash(doc_id))
        self.offsets.append(self.offsets[-1] + len(ids))
        self.buffered += len(ids)
        if self.buffered >= _WRITE_EVERY:
            self.flush()

    def flush(self) -> None:
        if self.ids:
            roles = np.concatenate(self.roles).astype(ROLE_DTYPE)
            self.role_counts += np.bincount(roles.view(np.uint8), minlength=256)
            self.arrays["ids"] = _append(self.arrays["ids"], np.concatenate(self.ids).astype(np.int32))
            self.arrays["roles"] = _append(self.arrays["roles"], roles)
            self.arrays["id_hash"] = _append(self.arrays["id_hash"], np.asarray(self.hashes, np.uint64))
        self.ids, self.roles, self.hashes, self.buffered = [], [], [], 0

    def close(self) -> None:
        self.flush()
        self.arrays["offsets"] = _append(self.arrays["offsets"], np.asarray(self.offsets, np.int64))


def write_cache(
    inputs: Iterable[str | Path],
    out: str | Path,
    encoder: EncoderSpec,
    *,
    strict: bool = False,
    progress: bool = True,
    max_line_bytes: int = MAX_LINE_BYTES,
) -> dict[str, Any]:
    """Tokenizes documents once into a token cache directory.

    Args:
        inputs: JSON Lines, Parquet or ArrayRecord files, or globs of them, read in order
            (a Parquet file one row group at a time).
        out: the cache directory to create (must not exist, or be empty). Local, it is
            built beside `out` and renamed into place; remote (`gs://...`), it is built
            in place with `cache.json` written last, and removed if the build fails.
        encoder: tokenizer, tag registry and mantra to encode with.
        strict: stop at the first bad record instead of skipping it.
        progress: show a progress bar (tqdm, on stderr).
        max_line_bytes: the longest JSON Lines line read (its newline not counted); a
            longer one is a bad record, never read.

    Returns:
        The cache's metadata (also written to `out/cache.json`).

    Raises:
        UserError: bad inputs or output directory; a bad record in strict mode; no
            valid document at all.
    """
    from tqdm import tqdm

    out = check_output_dir(out, option="--out")
    files = [f for pattern in inputs for f in expand_jsonl_paths(pattern)]
    records = open_records(files, max_line_bytes=max_line_bytes)
    log = SkipLog()
    reader = JsonlReader(encoder, split=None, eval_fraction=0.0, strict=strict, skips=log)
    fingerprint = encoder_fingerprint(encoder, vocab_size=reader.encoder.vocab_size)
    skips = SkipCounter()
    with built_dir(out, what="the token cache") as tmp:
        writer = _CacheWriter(tmp)
        for i in tqdm(range(len(records)), desc="tokenizing", unit="doc", disable=not progress, mininterval=0.5):
            encoded = reader.encode_record(records[i])
            for error in log.drain():
                skips.add(error)
            if encoded is not None:
                writer.add(encoded.doc_id, encoded.ids, encoded.roles)
        writer.close()
        documents = len(writer.offsets) - 1
        if documents == 0:
            first = "; ".join(skips.messages[:3]) or "the inputs have no non-blank line"
            raise UserError(f"no valid document in {', '.join(map(str, files))}: {first}")
        meta = {
            "format": CACHE_FORMAT,
            "version": CACHE_VERSION,
            **fingerprint,
            "documents": documents,
            "tokens": int(writer.offsets[-1]),
            "tokens_by_role": {r.label: int(writer.role_counts[int(r)]) for r in LOSS_ROLES},
            "skipped_records": skips.count,
            "skipped_examples": skips.messages,
            "inputs": [str(f) for f in files],
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def read_meta(directory: str | StoragePath) -> dict[str, Any]:
    """The metadata of a cache directory (local or remote); UserError if it is not one."""
    path = as_path(directory) / META_FILE
    if not path.is_file():
        raise UserError(f"{directory} is not a token cache (no {META_FILE}); build one with `metatrain data cache`")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e}); rebuild the cache") from None
    if meta.get("format") != CACHE_FORMAT or meta.get("version") != CACHE_VERSION:
        raise UserError(
            f"{path}: unsupported cache format {meta.get('format')!r} version {meta.get('version')!r} "
            f"(this metatrain reads {CACHE_FORMAT} version {CACHE_VERSION}); rebuild the cache"
        )
    return meta


class TokenCache:
    """Read access to a cache directory (local, or remote through tensorstore's GCS
    driver); arrays are opened lazily in each process.

    Attributes:
        directory: the cache directory.
        meta: its metadata (`cache.json`).
    """

    def __init__(self, directory: str | StoragePath):
        self.directory = as_path(directory)
        self.meta = read_meta(self.directory)
        self._arrays: dict[str, ts.TensorStore] | None = None
        self._offsets: np.ndarray | None = None
        self._hashes: np.ndarray | None = None

    def _open(self) -> dict[str, ts.TensorStore]:
        if self._arrays is None:
            context = ts.Context({"cache_pool": {"total_bytes_limit": _READ_CACHE_BYTES}})
            # A complete cache never changes: a chunk read once is used as it is, not
            # revalidated by every read (a conditional request each, in a bucket).
            fresh = {"recheck_cached_data": "open", "recheck_cached_metadata": "open"}
            self._arrays = {
                name: ts.open({**_array_spec(self.directory, name), **fresh}, read=True, context=context).result()
                for name in _ARRAYS
            }
        return self._arrays

    @property
    def offsets(self) -> np.ndarray:
        """int64 [docs + 1]: document d is tokens offsets[d]:offsets[d + 1]."""
        if self._offsets is None:
            self._offsets = self._open()["offsets"].read().result()
        return self._offsets

    @property
    def id_hashes(self) -> np.ndarray:
        """uint64 [docs]: `split.id_hash` of each document's id."""
        if self._hashes is None:
            self._hashes = self._open()["id_hash"].read().result()
        return self._hashes

    def __len__(self) -> int:
        return int(self.meta["documents"])

    def document(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids int32 [n], roles int8 [n]) of document `index`."""
        a, b = int(self.offsets[index]), int(self.offsets[index + 1])
        arrays = self._open()
        ids, roles = arrays["ids"][a:b].read(), arrays["roles"][a:b].read()
        return ids.result(), roles.result()

    def role_counts(self, chunk: int = 1 << 24) -> np.ndarray:
        """int64 [256]: tokens of each role, counted from the `roles` array itself."""
        roles = self._open()["roles"]
        counts = np.zeros(256, np.int64)
        n = roles.shape[0]
        for start in range(0, n, chunk):
            part = roles[start:min(start + chunk, n)].read().result()
            counts += np.bincount(part.view(np.uint8), minlength=256)
        return counts

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_arrays"] = None  # tensorstore handles are reopened in each process
        return state


class CacheReader:
    """Document index -> training example, or None when the document is in the other split."""

    def __init__(self, cache: TokenCache, *, split: str, eval_fraction: float):
        self.cache = cache
        self.split = check_split(split)
        self.eval_fraction = eval_fraction

    def __call__(self, index: int) -> dict[str, np.ndarray] | None:
        try:
            if not in_split(int(self.cache.id_hashes[index]), self.split, self.eval_fraction):
                return None
            ids, roles = self.cache.document(index)
            return shift_document(ids, roles)
        except Exception as e:  # name the document, also when this runs in a worker process
            raise FaultError(
                f"token cache {self.cache.directory}, document {index}: cannot read it ({describe_cause(e)}); "
                "rebuild the cache with `metatrain data cache`"
            ) from e


def cache_stats(directory: str | Path) -> dict[str, Any]:
    """Documents, tokens per role and the share of tokens on mantra and tags.

    Counts come from the arrays themselves (not the metadata), so they also check them.
    """
    cache = TokenCache(directory)
    counts = cache.role_counts()
    tokens = {r.label: int(counts[int(r)]) for r in LOSS_ROLES}
    total = int(counts.sum())
    other = total - sum(tokens.values())
    documents = len(cache.offsets) - 1
    out: dict[str, Any] = {
        "documents": documents,
        "tokens": tokens,
        "total_tokens": total,
        "mean_document_tokens": total / documents if documents else 0.0,
        "mantra_share": tokens["mantra"] / total if total else 0.0,
        "tag_share": tokens["tag"] / total if total else 0.0,
        "skipped_records": cache.meta.get("skipped_records", 0),
        "tokenizer": cache.meta["tokenizer"],
        "tags": cache.meta["tags"],
        "mantra_policy": cache.meta["mantra_policy"],
    }
    if other:
        out["tokens_other_roles"] = other
    return out


def format_cache_stats(stats: dict[str, Any]) -> str:
    """`stats` (from `cache_stats`) as the table `metatrain data stats` prints."""
    total = stats["total_tokens"]
    lines = [
        f"documents  {stats['documents']:>14,}",
        f"tokens     {total:>14,}   ({stats['mean_document_tokens']:.1f} per document)",
    ]
    for label in LOSS_ROLE_LABELS:
        n = stats["tokens"][label]
        lines.append(f"  {label:<8} {n:>14,}   {100 * n / total if total else 0:5.1f}%")
    lines.append(f"mantra share {100 * stats['mantra_share']:.2f}%, tag share {100 * stats['tag_share']:.2f}%")
    if stats["skipped_records"]:
        lines.append(f"skipped {stats['skipped_records']} bad records when the cache was built")
    return "\n".join(lines)
