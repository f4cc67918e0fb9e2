"""seqio interop: metatrain's tokenizer as a seqio `Vocabulary`, document Tasks, and seqio
Tasks and Mixtures as training sources (the `seqio` extra: `pip install 'metatrain[seqio]'`).

    MetatrainVocabulary(tokenizer_path, tags_path)   text <-> ids, exactly as the encoder
    register_document_task(name, paths, tokenizer_path, ...)
                                                     a Task of metatrain documents: `ids`, `roles`
    open_seqio_source(source_config, ...)            `{seqio: NAME, module: MODULE}` -> grain sources

A source `{seqio: NAME, module: MODULE, weight: W, split: train, feature: targets}`
imports MODULE (a dotted module name importable from `sys.path`, or a `.py` file),
which registers the Task or Mixture NAME. A Task whose output features hold `ids` and
`roles` gives encoded documents as they are; any other Task gives one text-only
document per example from its `feature` (`BOS ids EOS`, roles TAG TEXT... TAG, as the
encoder writes one text segment). Both must be tokenized with a `MetatrainVocabulary`
over the run's own tokenizer and tags (`data.tokenizer`, `data.tags`); any other
vocabulary is refused. A Mixture becomes one source per Task, weighted by
`W * rate / total rate`, so metatrain's mixer (grain's exact interleave) keeps the
Mixture's rates; with `data.schedule`, a stage's weight for the Mixture is split the
same way.

Design: a Task is read once, in its own order (`get_dataset(split, shuffle=False,
seed=0)`: seqio's random preprocessors are seeded), and its examples are written to a
spill file under `$TMPDIR` (int32 ids, int8 roles, an offset per example). That file is
a random-access record source like a token cache, so the Task's examples go through
the same shuffle, mixture, packing, role weights, per-role metrics and train/eval split
as native sources, and a checkpoint's data state (grain's positions) resumes exactly by
construction. The eval split is metatrain's: `eval_fraction` holds out examples by a
hash of their tokens (seqio examples carry no document id), from the seqio `split` read.

Limits: every Task of a source is read in full before the first batch (its tokens must
fit on local disk under `$TMPDIR`, about 5 bytes per token; memory holds 24 bytes per
example), each time a batch iterator is made (the train and eval streams read it
twice). A Task must be deterministic in `shuffle=False` order, or resume would read other
examples. The spill file and its reader live in `metatrain.data.spilled`, so worker
processes (`data.num_workers > 0`) read it without importing TensorFlow. Bad examples (wrong shapes, roles out of range, tag ids in text)
are skipped and counted like bad records, or stop the run in strict mode; bad records
in a document Task's own files are skipped and logged by the Task (seqio reads them),
not counted in the run's skips. Mixtures of document Tasks are plain seqio Mixtures
(`seqio.MixtureRegistry.add(name, [(task, rate), ...])`).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib
import importlib.util
import logging
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np
import seqio
import tensorflow as tf

from metatrain.data.config import SourceConfig
from metatrain.data.mixture import Source
from metatrain.data.sources import EncoderSpec, SkipLog, expand_jsonl_paths
from metatrain.data.spilled import SpilledExamples, SpillWriter, TaskReader
from metatrain.documents import SkipCounter, read_documents
from metatrain.errors import UserError
from metatrain.io.formats import RecordError
from metatrain.io.paths import DEFAULT_TAGS
from metatrain.io.storage import as_path
from metatrain.roles import LOSS_ROLES, NUM_ROLES, ROLE_DTYPE, Role

logger = logging.getLogger(__name__)

DOCUMENT_FEATURES: tuple[str, str] = ("ids", "roles")


def file_fingerprint(tokenizer_path: str | Path, tags_path: str | Path) -> str:
    """SHA-256 of a tokenizer and a tag registry: equal means the same ids for every text."""
    digest = hashlib.sha256()
    for path in (tokenizer_path, tags_path):
        try:
            digest.update(hashlib.sha256(as_path(path).read_bytes()).digest())
        except OSError as e:
            raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    return digest.hexdigest()


# -- the vocabulary -------------------------------------------------------------------------


class MetatrainVocabulary(seqio.Vocabulary):
    """A seqio `Vocabulary` over a metatrain tokenizer: ids equal `Encoder.tokenizer.encode_texts`.

    Tags are control pieces, so encoding text never yields a tag id (a literal
    `<thinking>` is ordinary characters); decoding renders tags as `Encoder.decode` does.
    The TensorFlow methods run the same Python encoder (`tf.numpy_function`), because
    SentencePiece alone spells a literal `▁` differently (see `SpmTokenizer.encode_texts`).

    seqio pads with `pad_id`: the tokenizer's pad piece, or seqio's 0 when it has none
    (metatrain's unk id, which text never produces under byte fallback); `decode` then
    drops the 0s as padding.

    Args:
        tokenizer_path: SentencePiece `.model` file holding the registry's tags.
        tags_path: the tag registry (default: the shipped one).

    Raises:
        UserError: the files cannot be read, or the tokenizer lacks a tag.
    """

    def __init__(self, tokenizer_path: str | Path, tags_path: str | Path | None = None):
        super().__init__(extra_ids=0)
        self.tokenizer_path = str(tokenizer_path)
        self.tags_path = str(DEFAULT_TAGS if tags_path is None else tags_path)
        self.fingerprint = file_fingerprint(self.tokenizer_path, self.tags_path)
        self._encoder = None
        tokenizer = self.encoder.tokenizer  # built now, so a bad tokenizer fails at registration
        self._bos, self._eos, self._unk, self._pad = tokenizer.bos_id, tokenizer.eos_id, tokenizer.unk_id, tokenizer.pad_id
        self._size = tokenizer.vocab_size
        special = {*tokenizer.tag_ids.values(), self._bos, self._eos} | ({self._pad} if self._pad >= 0 else set())
        self.special_ids = np.array(sorted(special), np.int32)  # never produced from text

    @property
    def encoder(self):
        """The metatrain `Encoder` (built lazily: SentencePiece does not pickle)."""
        if self._encoder is None:
            from metatrain.tokenizer import Encoder

            self._encoder = Encoder.from_files(self.tokenizer_path, self.tags_path)
        return self._encoder

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_encoder"] = None
        return state

    @property
    def bos_id(self) -> int:
        return self._bos

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def unk_id(self) -> int | None:
        return self._unk if self._unk >= 0 else None

    @property
    def pad_id(self) -> int:
        return self._pad if self._pad >= 0 else seqio.vocabularies.PAD_ID

    @property
    def _base_vocab_size(self) -> int:
        return self._size

    def _encode(self, s: str) -> list[int]:
        return self.encoder.tokenizer.encode_texts([s])[0]

    def _decode(self, ids) -> str:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if self._pad < 0:
            ids = ids[ids != self.pad_id]
        return self.encoder.decode(ids)

    def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
        """A scalar string -> int32 [n] (what seqio's `tokenize` preprocessor passes)."""
        s = tf.convert_to_tensor(s, dtype=tf.string)
        if s.shape.rank != 0:
            raise ValueError(f"MetatrainVocabulary.encode_tf takes one string (a scalar), got shape {s.shape}")
        ids = tf.numpy_function(self._encode_bytes, [s], tf.int32, stateful=False)
        ids.set_shape([None])
        return ids

    def _encode_bytes(self, s: bytes | np.ndarray) -> np.ndarray:
        # tf.numpy_function passes bytes inside tf.data, a 0-d object array when eager.
        value = s.item() if isinstance(s, np.ndarray) else s
        return np.asarray(self._encode(value.decode("utf-8")), dtype=np.int32)

    def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
        """int [..., n] -> string [...]: each row decoded up to its first EOS."""
        ids = tf.convert_to_tensor(ids)
        text = tf.numpy_function(self._decode_rows, [ids], tf.string, stateful=False)
        text.set_shape(ids.shape[:-1])
        return text

    def _decode_rows(self, ids: np.ndarray) -> np.ndarray:
        rows = ids.reshape(-1, ids.shape[-1])
        out = []
        for row in rows:
            # seqio replaced every id after the first EOS by `pad_id`; cut there instead.
            eos = np.flatnonzero(row == self._eos)
            out.append(self._decode(row[: eos[0]] if len(eos) else row).encode("utf-8"))
        return np.array(out, dtype=object).reshape(ids.shape[:-1])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MetatrainVocabulary) and other.fingerprint == self.fingerprint

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    def __str__(self) -> str:
        return f"MetatrainVocabulary(tokenizer={self.tokenizer_path}, tags={self.tags_path})"


# -- document tasks -------------------------------------------------------------------------


def document_features(vocabulary: MetatrainVocabulary) -> dict[str, seqio.Feature]:
    """The output features of a document Task: `ids` (tokens) and `roles` (a `Role` per token)."""
    return {
        "ids": seqio.Feature(vocabulary, add_eos=False, dtype=tf.int32),
        # Roles are not tokens; a pass-through vocabulary is how seqio carries integers.
        "roles": seqio.Feature(seqio.PassThroughVocabulary(NUM_ROLES), add_eos=False, dtype=tf.int32),
    }


def register_document_task(
    name: str,
    paths: str | Path | Sequence[str | Path] | Mapping[str, str | Path | Sequence[str | Path]],
    tokenizer_path: str | Path,
    tags_path: str | Path | None = None,
    *,
    mantra: str | None = None,
    mantra_policy: str = "every",
) -> seqio.Task:
    """Registers a seqio Task of metatrain documents (JSON Lines, Parquet, ArrayRecord).

    Each example is one document, `{"ids": int32 [n], "roles": int32 [n]}`, exactly
    `Encoder.encode(document)`. Bad records are skipped and logged, as `read_documents` does.

    Args:
        name: the Task's name in `seqio.TaskRegistry`.
        paths: files or globs of the "train" split, or a mapping split -> files or globs.
        tokenizer_path: the SentencePiece model (with the registry's tags).
        tags_path: the tag registry (default: the shipped one).
        mantra: text opening thinking blocks; None is the default mantra.
        mantra_policy: `every`, `first` or `none`.

    Returns:
        The registered `seqio.Task`.

    Raises:
        UserError: a file or glob matches nothing, or the tokenizer lacks a tag.
    """
    by_split = dict(paths) if isinstance(paths, Mapping) else {"train": paths}
    files = {split: _expand(value) for split, value in by_split.items()}
    vocabulary = MetatrainVocabulary(tokenizer_path, tags_path)
    spec = EncoderSpec(vocabulary.tokenizer_path, vocabulary.tags_path, mantra, mantra_policy)
    spec.build()  # a bad mantra policy fails here, not inside a tf.data pipeline
    source = seqio.FunctionDataSource(_DocumentDatasetFn(spec, files), splits=tuple(files))
    return seqio.TaskRegistry.add(name, source=source, output_features=document_features(vocabulary),
                                  preprocessors=[])


def _expand(value: str | Path | Sequence[str | Path]) -> tuple[str, ...]:
    values = [value] if isinstance(value, (str, Path)) else list(value)
    return tuple(str(f) for v in values for f in expand_jsonl_paths(v))


@dataclasses.dataclass(frozen=True)
class _DocumentDatasetFn:
    """`dataset_fn(split, shuffle_files, seed)` of a document Task: one ordered stream of documents."""

    spec: EncoderSpec
    files: Mapping[str, tuple[str, ...]]

    def __call__(self, split: str, shuffle_files: bool = False, seed: int | None = None) -> tf.data.Dataset:
        del shuffle_files, seed  # a file order is the order; seqio's `shuffle` shuffles examples
        signature = {k: tf.TensorSpec([None], tf.int32) for k in DOCUMENT_FEATURES}
        return tf.data.Dataset.from_generator(lambda: self._examples(split), output_signature=signature)

    def _examples(self, split: str) -> Iterator[dict[str, np.ndarray]]:
        from metatrain.tokenizer import EncodeError

        encoder = self.spec.build()
        skips = SkipCounter()
        for doc in read_documents(self.files[split], skips=skips):
            try:
                encoded = encoder.encode(doc)
            except EncodeError as e:
                skips.add(e.record_error())
                continue
            yield {"ids": encoded.ids, "roles": encoded.roles.astype(np.int32)}
        if skips.count:
            logger.warning("seqio document task: %s", skips.summary())


# -- seqio registries as metatrain sources ----------------------------------------------------


def import_registry(module: str) -> None:
    """Imports the user's registry module: a dotted name on `sys.path`, or a `.py` file.

    A file is imported once per process (seqio refuses to register a name twice).

    Raises:
        UserError: the module or file does not exist.
    """
    if module.endswith(".py") or os.sep in module:
        path = Path(module).resolve()
        if not path.is_file():
            raise UserError(f"seqio registry module {module} does not exist; give a .py file that registers "
                            "the Task or Mixture, or a dotted module name importable from sys.path")
        name = "_metatrain_seqio_registry_" + hashlib.sha256(str(path).encode()).hexdigest()[:16]
        if name in sys.modules:
            return
        spec = importlib.util.spec_from_file_location(name, path)
        loaded = importlib.util.module_from_spec(spec)
        sys.modules[name] = loaded
        try:
            spec.loader.exec_module(loaded)
        except BaseException:
            del sys.modules[name]
            raise
        return
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is not None and module != e.name and not module.startswith(e.name + "."):
            raise  # the registry module exists, but something it imports does not: the user's traceback
        raise UserError(f"cannot import seqio registry module {module!r}: no module named {e.name!r}; give a "
                        "dotted module name importable from sys.path (add its directory to PYTHONPATH) "
                        "or the path of a .py file") from None


def load_provider(name: str, module: str) -> seqio.Task | seqio.Mixture:
    """The Task or Mixture `name`, registered by `module`.

    Raises:
        UserError: the module cannot be imported, or does not register `name`.
    """
    import_registry(module)
    if name in seqio.TaskRegistry.names():
        return seqio.TaskRegistry.get(name)
    if name in seqio.MixtureRegistry.names():
        return seqio.MixtureRegistry.get(name)
    known = sorted({*seqio.TaskRegistry.names(), *seqio.MixtureRegistry.names()})
    close = difflib.get_close_matches(name, known, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise UserError(f"seqio: no Task or Mixture named {name!r} is registered after importing {module}{hint}; "
                    f"register it there with seqio.TaskRegistry.add or seqio.MixtureRegistry.add")


def open_seqio_source(
    cfg: SourceConfig, spec: EncoderSpec, *, split: str, eval_fraction: float, strict: bool, skips: SkipLog
) -> list[Source]:
    """The grain sources of a `{seqio: NAME, module: MODULE}` source: one per Task.

    Args:
        cfg: the source (its `seqio`, `module`, `split`, `feature`, `weight`).
        spec: the run's encoder (its tokenizer and tags must be the Tasks' vocabulary).
        split: metatrain's split, "train" or "eval" (by `eval_fraction`).
        eval_fraction: share of examples held out for eval, by a hash of their tokens.
        strict: stop at the first bad example instead of skipping it.
        skips: where skipped examples are noted.

    Raises:
        UserError: the module or name is unknown; a Task lacks the split or feature, has
            another vocabulary or tokenizer, or holds no example.
    """
    provider = load_provider(cfg.seqio, cfg.module)
    if isinstance(provider, seqio.Task):
        parts = [(provider, 1.0)]
    else:
        parts = [(task, float(provider.get_rate(task))) for task in provider.tasks]
        parts = [(task, rate) for task, rate in parts if rate > 0]  # rate 0: never sampled
        if not parts:
            raise UserError(f"seqio mixture {cfg.seqio}: every Task has rate 0")
    total = sum(rate for _, rate in parts)
    expected = file_fingerprint(spec.tokenizer, spec.tags)
    sources = []
    for task, rate in parts:
        name = cfg.name if task.name == cfg.seqio else f"{cfg.name}/{task.name}"
        examples = read_task(task, cfg.split, cfg.feature, expected, strict=strict, skips=skips)
        reader = TaskReader(examples, split=split, eval_fraction=eval_fraction)
        sources.append(Source(name=name, records=grain.MapDataset.range(len(examples)), reader=reader,
                              weight=cfg.weight * rate / total))
    return sources


def _check_vocabulary(task: seqio.Task, feature: str, fingerprint: str) -> None:
    vocabulary = task.output_features[feature].vocabulary
    if not isinstance(vocabulary, MetatrainVocabulary):
        raise UserError(
            f"seqio task {task.name}: feature {feature!r} is tokenized with {type(vocabulary).__name__} "
            f"({vocabulary}); metatrain reads Tasks tokenized with metatrain.data.seqio.MetatrainVocabulary "
            "over its own tokenizer (tags are structural ids), so re-register the Task with one"
        )
    if vocabulary.fingerprint != fingerprint:
        raise UserError(
            f"seqio task {task.name}: feature {feature!r} uses {vocabulary}, which is not the run's "
            "data.tokenizer and data.tags (their files differ); point them at the Task's tokenizer and tags"
        )


def _task_feature(task: seqio.Task, feature: str, fingerprint: str) -> str | None:
    """None for a document Task (`ids`, `roles`), else the text feature (checked)."""
    features = task.output_features
    if all(k in features for k in DOCUMENT_FEATURES):
        _check_vocabulary(task, "ids", fingerprint)
        return None
    if feature not in features:
        raise UserError(
            f"seqio task {task.name} has no feature {feature!r} (its features: {', '.join(features)}); "
            "set the source's `feature:` to the one holding the tokens, or emit `ids` and `roles`"
        )
    _check_vocabulary(task, feature, fingerprint)
    return feature


def read_task(
    task: seqio.Task, split: str, feature: str, fingerprint: str, *, strict: bool, skips: SkipLog
) -> "SpilledExamples":
    """Every example of a Task's split, in its order, as encoded documents in a spill file.

    Raises:
        UserError: the Task lacks the split, the feature or the vocabulary; it holds no
            usable example; a bad example in strict mode.
    """
    text_feature = _task_feature(task, feature, fingerprint)
    if split not in task.splits:
        raise UserError(f"seqio task {task.name} has no split {split!r} (its splits: {', '.join(task.splits)}); "
                        "set the source's `split:`")
    vocabulary = task.output_features["ids" if text_feature is None else text_feature].vocabulary
    where = f"seqio:{task.name}/{split}"
    dataset = task.get_dataset(sequence_length=None, split=split, shuffle=False, seed=0)
    writer = SpillWriter(task.name)
    try:
        for number, example in enumerate(dataset.as_numpy_iterator(), start=1):
            try:
                if text_feature is None:
                    ids, roles = _document_example(example, vocabulary)
                else:
                    ids, roles = _text_example(example[text_feature], vocabulary)
            except ValueError as e:
                error = RecordError(where, number, str(e))
                if strict:
                    raise UserError(f"bad example (strict mode is on): {error}") from None
                skips.add(error)
                continue
            writer.add(ids, roles, number)
    except BaseException:
        writer.discard()
        raise
    examples = writer.finish()
    if len(examples) == 0:
        raise UserError(f"seqio task {task.name}, split {split}: no usable example (see the skipped examples)")
    return examples


_VALID_ROLES = np.array([int(r) for r in LOSS_ROLES])


def _int_vector(value: Any, what: str) -> np.ndarray:
    array = np.asarray(value)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{what} must be a 1-D integer sequence, got {array.dtype} of shape {array.shape}")
    return array


def _document_example(example: Mapping[str, Any], vocabulary: MetatrainVocabulary) -> tuple[np.ndarray, np.ndarray]:
    ids, roles = _int_vector(example["ids"], "`ids`"), _int_vector(example["roles"], "`roles`")
    if len(ids) < 2 or len(roles) != len(ids):
        raise ValueError(f"a document needs >= 2 ids and one role per id, got {len(ids)} ids, {len(roles)} roles")
    if ids.min() < 0 or ids.max() >= vocabulary.vocab_size:
        raise ValueError(f"`ids` holds ids outside [0, {vocabulary.vocab_size})")
    if not np.isin(roles, _VALID_ROLES).all():
        raise ValueError(f"`roles` holds values other than the roles {_VALID_ROLES.tolist()} (metatrain.roles.Role)")
    return ids.astype(np.int32), roles.astype(ROLE_DTYPE)


def _text_example(value: Any, vocabulary: MetatrainVocabulary) -> tuple[np.ndarray, np.ndarray]:
    """`BOS ids EOS` with roles TAG TEXT... TAG: what the encoder writes for one text segment."""
    ids = _int_vector(value, "the text feature")
    if len(ids) and ids[-1] == vocabulary.eos_id:  # seqio's append_eos
        ids = ids[:-1]
    if len(ids) == 0:
        raise ValueError("the text is empty")
    if ids.min() < 0 or ids.max() >= vocabulary.vocab_size:
        raise ValueError(f"the text holds ids outside [0, {vocabulary.vocab_size})")
    where = np.flatnonzero(np.isin(ids, vocabulary.special_ids))
    if len(where):
        raise ValueError(f"the text holds the special id {int(ids[where[0]])} at position {int(where[0])}; "
                         "tags come only from document structure (emit `ids` and `roles` for documents)")
    n = len(ids)
    out = np.empty(n + 2, np.int32)
    out[0], out[1:-1], out[-1] = vocabulary.bos_id, ids, vocabulary.eos_id
    roles = np.full(n + 2, int(Role.TEXT), ROLE_DTYPE)
    roles[0] = roles[-1] = int(Role.TAG)
    return out, roles
