"""Test-wide setup: 8 simulated CPU devices, no accelerator, hermetic hypothesis profile; the
fixtures and helpers the test folders share.

- The trainer: `tiny_config`, `run_cli`, `train_losses`, a trained tiny run (`workdir`).
- Storage: the GCS emulator (`gcs_emulator`, `bucket`), and `store`, which runs a test twice,
  on local disk and in a bucket.
- Corpora and the data pipeline: `make_docs`, `write_jsonl`, `data_config`, Parquet and
  ArrayRecord files.

pytest imports test modules with `--import-mode=importlib`; a test module imports these
helpers as `from ..conftest import ...` (`from .conftest import ...` at the top level).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

# Must happen before jax is imported anywhere: sharding tests use 8 host devices.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
# The generating commands keep compiled programs on disk (`metatrain.engine.compilation_cache`):
# the suite's go to one directory of its own, never to the user's ~/.cache.
if "METATRAIN_COMPILATION_CACHE" not in os.environ:
    import tempfile

    os.environ["METATRAIN_COMPILATION_CACHE"] = tempfile.mkdtemp(prefix="metatrain-test-xla-")

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci",
    deadline=None,
    max_examples=60,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


import pytest  # noqa: E402

from metatrain.io.paths import REPO_ROOT  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "bucket: reads or writes the emulated bucket (the GCS emulator on 127.0.0.1)")


def pytest_collection_modifyitems(items):
    """Every test that reaches the emulator carries the `bucket` mark, however it gets there."""
    for item in items:
        if {"gcs_emulator", "bucket", "bucket_store"} & set(getattr(item, "fixturenames", ())):
            if item.get_closest_marker("bucket") is None:
                item.add_marker(pytest.mark.bucket)


# -- the trainer: the tiny preset with a handful of steps, its metrics, the command line -----

TINY = REPO_ROOT / "configs" / "tiny.yaml"
STEPS = 6


def tiny_config(*overrides: str):
    """The tiny preset for `STEPS` steps: metrics every step, evaluations and asynchronous
    checkpoints every 3, then `overrides`."""
    from metatrain.config import load_config

    return load_config(
        TINY,
        [
            f"trainer.steps={STEPS}",
            "trainer.log_every=1",
            "trainer.eval_every=3",
            "trainer.eval_batches=1",
            "trainer.progress=false",
            "checkpoint.every=3",
            "checkpoint.async_save=true",
            *overrides,
        ],
    )


def read_records(workdir) -> list[dict]:
    """The records of `workdir`'s metrics.jsonl (a local path, or an `epath.Path`)."""
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def train_losses(workdir) -> dict[int, float]:
    """Step -> loss; a step logged twice (replayed after a resume) keeps its last value."""
    return {r["step"]: r["loss"] for r in read_records(workdir) if "loss" in r}


def run_cli(*args: str, timeout: int = 300, env: dict | None = None):
    """`metatrain ARGS` in a fresh process on 2 CPU devices; `env` adds to (or replaces)
    this process's environment. The `subprocess.CompletedProcess`, text."""
    import subprocess
    import sys

    full = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    full.pop("METATRAIN_DEBUG", None)
    full.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "metatrain.cli", *args], env=full, capture_output=True, text=True, timeout=timeout
    )


def error_lines(stderr: str) -> list[str]:
    """stderr without the C++ runtime's start-up notices."""
    return [l for l in stderr.splitlines() if l.strip() and not l.startswith("WARNING: All log messages before absl")]


def leaves_by_name(tree) -> dict:
    """`{"params/embedding/table": array, ...}`: the leaves of a train state on the host."""
    import jax
    import numpy as np

    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        name = "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
        out[name] = np.asarray(jax.device_get(leaf))
    return out


def train_tiny(path, *overrides: str):
    """`path` (a local path or a gs:// URL) trained by the real trainer: the tiny preset, 1
    step, one checkpoint, then `overrides`. Returns `path`."""
    from metatrain.config import load_config
    from metatrain.train.loop import train

    config = load_config(TINY, [
        "trainer.steps=1", "trainer.batch_size=8", "trainer.seq_len=32", "trainer.eval_every=0",
        "trainer.progress=false", "checkpoint.every=1", "checkpoint.async_save=false", *overrides,
    ])
    train(config, path)
    return path


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    """A work directory with one checkpoint, written by the real trainer (tiny model, 1 step):
    what generation and the annotate `metatrain` generator read."""
    return train_tiny(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="session")
def gcs_emulator():
    """A GCS emulator on 127.0.0.1 for the session, with this process pointed at it
    (`STORAGE_EMULATOR_HOST`, passed on to every library by `configure_emulator`)."""
    import importlib.util

    from metatrain.io.storage import configure_emulator

    spec = importlib.util.spec_from_file_location("gcs_emulator", os.path.join(os.path.dirname(__file__), "gcs_emulator.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    emulator = module.Emulator()
    os.environ["STORAGE_EMULATOR_HOST"] = emulator.url
    configure_emulator()
    yield emulator
    emulator.stop()


@pytest.fixture
def bucket(gcs_emulator):
    """`gs://NAME`: a fresh, empty bucket in the emulator."""
    return f"gs://{gcs_emulator.bucket()}"


# -- one store, two places: local disk and the emulated bucket ----------------------------
#
# A test that takes `store` runs twice: `[local]` with its files under `tmp_path`, and
# `[bucket]` with them in a fresh bucket of the GCS emulator; a fixture of another scope is
# parametrised the same way with `params=STORES` and `open_store`. Tests of what only a
# bucket does (generation preconditions, compose appends, remote globs) take `bucket` or
# `bucket_store` and say `@pytest.mark.bucket`. Every test that reaches the emulator carries
# that mark, so `pytest -m "not bucket"` runs everything that needs no emulator.

#: The `params` of a fixture parametrised over both stores.
STORES = (pytest.param("local", id="local"), pytest.param("bucket", id="bucket", marks=pytest.mark.bucket))




class Store:
    """A directory for one test's files: on local disk (`kind` "local") or under a prefix of a
    bucket of its own in the GCS emulator (`kind` "bucket").

    `url` (also `str(store)`) is the root, an absolute local path or `gs://BUCKET/store`;
    names are relative to it, `/`-separated. Reads and writes go through
    `metatrain.io.storage.as_path`; listings (`files`) and versions (`snapshot`) are read
    without it: from the file system, or the emulator's JSON API and the GCS client.
    """

    def __init__(self, kind: str, url: str, emulator=None):
        self.kind, self.url, self.emulator = kind, url, emulator
        self.bucket = url.removeprefix("gs://").split("/", 1)[0] if emulator is not None else None

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"Store({self.kind}: {self.url})"

    @property
    def is_bucket(self) -> bool:
        return self.kind == "bucket"

    def __truediv__(self, name: str):
        """`store / "a/b.jsonl"`: the path of a name (a `Path`, or an `epath.Path`)."""
        from metatrain.io.storage import as_path

        return as_path(f"{self.url}/{name}")

    def write_bytes(self, name: str, data: bytes) -> str:
        """Writes `data` as `name` (making local parents); returns its URL."""
        path = self / name
        if not self.is_bucket:
            path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return str(path)

    def write_text(self, name: str, text: str) -> str:
        return self.write_bytes(name, text.encode("utf-8"))

    def upload(self, name: str, local) -> str:
        """Copies the local file `local` to `name`; returns its URL."""
        return self.write_bytes(name, Path(local).read_bytes())

    def read_bytes(self, name: str) -> bytes:
        return (self / name).read_bytes()

    def read_text(self, name: str) -> str:
        return self.read_bytes(name).decode("utf-8")

    def exists(self, name: str) -> bool:
        return (self / name).exists()

    def files(self, under: str = "") -> list[str]:
        """The names of every file below `under` (relative to `under`), sorted.

        In the bucket every object is listed, and one outside the root fails the test: a
        store's bucket is its own, so nothing may be written beside it.
        """
        if self.is_bucket:
            prefix = self.url.removeprefix(f"gs://{self.bucket}/") + "/"
            names = self.emulator.objects(self.bucket)
            outside = [n for n in names if not n.startswith(prefix)]
            assert not outside, f"objects outside {self.url}: {outside}"
            names = [n[len(prefix):] for n in names]
        else:  # os.walk, since a writer may rename a directory while it is listed (orbax does)
            names = [os.path.relpath(os.path.join(directory, name), self.url).replace(os.sep, "/")
                     for directory, _, files in os.walk(self.url) for name in files]
        under = under.strip("/")
        if under:
            names = [n[len(under) + 1:] for n in names if n.startswith(under + "/")]
        return sorted(names)

    def snapshot(self) -> dict[str, tuple]:
        """Every file's version: a rewrite changes it, even to the same bytes (the generation
        and MD5 of an object; the inode, modification time, size and SHA-256 of a file)."""
        if self.is_bucket:
            from metatrain.io.storage import gcs_client

            return {b.name: (b.generation, b.md5_hash) for b in gcs_client().list_blobs(self.bucket)}
        import hashlib

        out = {}
        for name in self.files():
            path = Path(self.url) / name
            info = path.lstat()
            out[name] = (info.st_ino, info.st_mtime_ns, info.st_size, hashlib.sha256(path.read_bytes()).hexdigest())
        return out

    @property
    def variables(self) -> dict[str, str]:
        """What a process's environment needs to reach this store (the emulator's address)."""
        return {"STORAGE_EMULATOR_HOST": self.emulator.url} if self.is_bucket else {}

    def env(self) -> dict[str, str]:
        """The environment of a process that reads and writes this store: this one's, and `variables`."""
        return {**os.environ, **self.variables}


def open_store(kind: str, request, local_root) -> Store:
    """A new, empty `Store` of `kind`: `local_root` (made here) for "local"; a fresh bucket
    for "bucket" (the emulator starts only when a bucket is asked for). For fixtures of any
    scope: `@pytest.fixture(scope=..., params=STORES)`, then `open_store(request.param, ...)`."""
    if kind == "local":
        Path(local_root).mkdir(parents=True, exist_ok=True)
        return Store("local", str(Path(local_root).resolve()))
    emulator = request.getfixturevalue("gcs_emulator")
    return Store("bucket", f"gs://{emulator.bucket()}/store", emulator)


@pytest.fixture(params=STORES)
def store(request, tmp_path) -> Store:
    """An empty `Store`, once on local disk (`tmp_path/store`) and once in a bucket."""
    return open_store(request.param, request, tmp_path / "store")


@pytest.fixture
def bucket_store(request) -> Store:
    """An empty `Store` in a bucket alone: for a test of what only a bucket does."""
    return open_store("bucket", request, None)


@pytest.fixture(scope="session", params=STORES)
def stored_run(request, workdir, tmp_path_factory) -> Store:
    """A `Store` whose `run` is the session `workdir` run: a copy of it on local disk, and the
    same run (same config, same steps) trained into a bucket."""
    store = open_store(request.param, request, tmp_path_factory.mktemp("stored"))
    if store.is_bucket:
        train_tiny(f"{store}/run")
    else:
        import shutil

        shutil.copytree(workdir, f"{store}/run")
    return store


# -- corpora, their files and the data pipeline ------------------------------------------

#: Words of the synthetic corpora the data and tokenizer tests generate.
WORDS = (
    "the of and to in a is that for it as was with be by on not this are from at which have "
    "study found reduction symptoms after weeks treatment however placebo group showed improvement "
    "population country capital river climate exports percent million border coast mountains"
).split()


def write_jsonl(path, records) -> Path:
    """Writes one line per record to `path` (local or gs://): dicts as JSON (UTF-8, not
    escaped), strings as they are (for bad lines). Returns `path`."""
    from metatrain.io.storage import as_path

    text = "".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in records)
    as_path(path).write_bytes(text.encode("utf-8"))
    return path


def make_docs(n: int, *, prefix: str = "doc", first_word: str | None = None, seed: int = 0) -> list[dict]:
    """`n` documents with text and thinking segments of varied length and unique ids.

    `first_word`, when given, opens every document (so tests can tell sources apart).
    """
    rng = random.Random(seed)
    docs = []
    for d in range(n):
        segments = []
        for s in range(rng.randint(1, 4)):
            words = [rng.choice(WORDS) for _ in range(rng.randint(3, 40))]
            if s == 0 and first_word is not None:
                words[0] = first_word
            segments.append({"kind": "text", "text": " ".join(words) + ". "})
            if rng.random() < 0.6:
                segments.append({"kind": "thinking", "text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 25)))})
        docs.append({"id": f"{prefix}-{d}", "segments": segments})
    return docs


@pytest.fixture(scope="session")
def encoder_spec():
    """The sample tokenizer with the shipped tags, mantra policy `every`."""
    from metatrain.data.sources import EncoderSpec
    from metatrain.io.paths import DEFAULT_TAGS, SAMPLE_TOKENIZER

    return EncoderSpec(str(SAMPLE_TOKENIZER), str(DEFAULT_TAGS), None, "every")


def data_config(*paths: Path, weights: tuple[float, ...] | None = None, **kwargs):
    """A `DataConfig` over `paths` with the sample tokenizer."""
    from metatrain.data.config import DataConfig, SourceConfig
    from metatrain.io.paths import DEFAULT_TAGS, SAMPLE_TOKENIZER

    weights = weights or (1.0,) * len(paths)
    sources = tuple(SourceConfig(p, w) for p, w in zip(paths, weights))
    return DataConfig(sources=sources, tokenizer=SAMPLE_TOKENIZER, tags=DEFAULT_TAGS, **kwargs)


def take(iterator, n: int) -> list[dict]:
    """The next `n` batches."""
    return [next(iterator) for _ in range(n)]


def assert_batches_equal(a: list[dict], b: list[dict]) -> None:
    """The same batches, field by field, to the byte."""
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k].dtype == y[k].dtype and x[k].tobytes() == y[k].tobytes(), f"batch {i} field {k} differs"


def good_record(i: int) -> bytes:
    """A valid document `ok-{i}` as one JSON Lines record."""
    return json.dumps({"id": f"ok-{i}", "segments": [{"kind": "text", "text": f"Good document {i}."}]}).encode()


def write_lines(path, lines: list[bytes], opener=open) -> None:
    """Writes each of `lines` and a newline through `opener` (`gzip.open`, `zstandard.open`, ...)."""
    with opener(path, "wb") as f:
        f.write(b"".join(line + b"\n" for line in lines))


def line_records(lines) -> list[tuple[str, int, bytes]]:
    """Every `(path, line number, raw line)` of a `JsonlLines` index."""
    return [lines[i] for i in range(len(lines))]


def write_parquet(path, columns: dict, *, row_group_size: int = 5, schema=None):
    """`columns` as a Parquet file of row groups of `row_group_size` rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns, schema=schema), path, row_group_size=row_group_size)
    return path


def documents_parquet(path, docs, *, segments_as: str = "struct", row_group_size: int = 5):
    """`docs` (JSON Lines records) as a Parquet file with `id` and `segments` columns."""
    import pyarrow as pa

    if segments_as == "json":
        columns = {"id": [d["id"] for d in docs], "segments": [json.dumps(d["segments"]) for d in docs]}
        return write_parquet(path, columns, row_group_size=row_group_size)
    segments = [[{"mode": None, "control": None, **s} for s in d["segments"]] for d in docs]
    segment = pa.struct([("kind", pa.string()), ("text", pa.string()), ("mode", pa.string()), ("control", pa.string())])
    schema = pa.schema([("id", pa.string()), ("segments", pa.list_(segment))])
    return write_parquet(path, {"id": [d["id"] for d in docs], "segments": segments}, schema=schema,
                         row_group_size=row_group_size)


def write_array_record(path, records):
    """One record per item: dicts as JSON, strings verbatim (for bad records)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    writer = ArrayRecordWriter(str(path), "group_size:1")
    for r in records:
        writer.write((r if isinstance(r, str) else json.dumps(r)).encode("utf-8"))
    writer.close()
    return path


# -- servers ------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a server a test starts)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
