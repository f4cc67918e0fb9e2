"""Self-thinking evaluation: the text scored after the thoughts the model writes itself.

    metatrain eval --workdir W --self-think [--samples K] [--self-think-tokens N]

The thinking ablation (`ablation.py`) asks how much the corpus's own thinking helps the
text after it. A deployed model has no such thinking: it reads raw text and writes its
own. This pass measures that. For every evaluated document, each thinking block marks an
insertion point; the block is replaced by the thought the model writes there
(`metatrain.generate.thoughts.ThoughtWriter`, under the thinking lock), given the
document so far with its own earlier thoughts in place of the originals (the blocks'
own text is never shown to it). Then

    self    the documents with the self-written thoughts, scored as `kept` is
    none    the same encoded documents with every block removed (`remove_thinking`)

so the text tokens are identical (checked for every document, as the ablation does),
and `self - none` (bits per byte of text) says whether the model's own thinking pays at
inference, with a percentile-bootstrap interval over documents (`stats.py`). An empty
thought puts no block, so a model that never thinks scores exactly `none`.

Thoughts are greedy by default; with `samples` K, K trajectories per document are
sampled (temperature `settings.temperature`, each point's seed derived from the seed,
the document's id, the trajectory and the point), and a document's nll is the mean over
its K trajectories. Points decode round by round: round r writes the r-th point of
every trajectory that has one, all together on the engine (`ThoughtWriter.write`), so
the cost is one decode of up to `max_new_tokens` per point and trajectory.

The thought is written in the mode the document's block is in (the mode tags into it
forced, when the text before it is in another mode, as they stand in the document), so
the text and its modes are the document's own. A block's control tag is not carried
over: the thought is the model's own.

Documents come with their segments (`read_documents`): the run's held-out split (JSON
Lines sources only: a token cache keeps no segments) or `--data`, read as
`documents.py` reads them, so the same documents in the same order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from metatrain.config import LossConfig
from metatrain.data.cache import is_cache_dir
from metatrain.data.config import DataConfig
from metatrain.data.sources import expand_jsonl_paths
from metatrain.data.split import id_hash, in_split
from metatrain.documents import (
    DEFAULT_DOCUMENT_MODE,
    Document,
    Segment,
    SkipCounter,
    parse_document,
)
from metatrain.engine.sampling import MAX_SEED, SamplingConfig
from metatrain.errors import UserError
from metatrain.evaluation.ablation import check_same_text, remove_thinking
from metatrain.evaluation.report import EvalSettings, score_documents
from metatrain.evaluation.stats import paired_ratio_difference
from metatrain.evaluation.text_bytes import LN2, bits_per_byte, token_byte_lengths
from metatrain.generate.generator import Generator
from metatrain.generate.thoughts import (
    Thought,
    ThoughtPrefix,
    ThoughtWriter,
    with_modes,
)
from metatrain.io.formats import RecordError, read_records
from metatrain.tokenizer.encoder import EncodedDocument, EncodeError, Encoder

#: Record keys that are the document itself; the others are metadata, kept as they are.
_DOCUMENT_KEYS = frozenset({"id", "segments", "mode"})


@dataclasses.dataclass(frozen=True)
class SourceDocument:
    """An evaluated document with its segments, and its record's other keys (metadata)."""

    document: Document
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)


# -- reading ---------------------------------------------------------------------------------------


def _records(paths: Iterable, *, strict: bool, skips: SkipCounter) -> Iterator[SourceDocument]:
    """The documents of `paths` with their metadata, as `read_documents` reads them."""
    for path in paths:
        try:
            items = iter(read_records(path, metadata=True))
            for item in items:
                if not isinstance(item, RecordError):
                    number, obj = item
                    try:
                        doc = parse_document(obj, path=str(path), line=number)
                    except RecordError as e:
                        item = e
                if isinstance(item, RecordError):
                    if strict or item.line == 0:
                        raise item
                    skips.add(item)  # counted where the encoded documents are read
                    continue
                yield SourceDocument(doc, {k: v for k, v in obj.items() if k not in _DOCUMENT_KEYS})
        except RecordError as e:
            if e.line == 0:  # the file itself cannot be read
                raise UserError(str(e)) from None
            raise UserError(f"bad record (strict mode is on): {e}") from None


def _encodable(docs: Iterable[SourceDocument], encoder: Encoder, limit: int | None) -> list[SourceDocument]:
    """The documents the encoder takes (as `documents.py` keeps them), the first `limit`."""
    out = []
    for doc in docs:
        try:
            encoder.encode(doc.document)
        except EncodeError:
            continue  # counted (or refused in strict mode) where the encoded documents are read
        out.append(doc)
        if limit is not None and len(out) >= limit:
            break
    return out


def file_source_documents(paths: Sequence[str], encoder: Encoder, *, strict: bool = False,
                          limit: int | None = None) -> list[SourceDocument]:
    """The documents of `--data` with their segments: those `documents.file_documents` reads."""
    files = [f for p in paths for f in expand_jsonl_paths(p)]
    return _encodable(_records(files, strict=strict, skips=SkipCounter()), encoder, limit)


def split_source_documents(data: DataConfig, encoder: Encoder, *, limit: int | None = None) -> list[SourceDocument]:
    """The run's held-out documents with their segments: those `documents.split_documents` reads.

    Raises:
        UserError: a source keeps no segments (a token cache, a seqio Task).
    """
    for source in data.sources:
        if source.seqio is not None or is_cache_dir(source.path):
            what = "a seqio Task" if source.seqio is not None else "a token cache"
            raise UserError(f"--self-think needs documents with their thinking blocks, and the run's source "
                            f"{source.name} is {what}; give --data DOCS.jsonl (e.g. the held-out split of an "
                            "annotated corpus)")

    def held_out():
        for source in data.sources:
            for doc in _records(expand_jsonl_paths(source.path), strict=data.strict, skips=SkipCounter()):
                if in_split(id_hash(doc.document.id), "eval", data.eval_fraction):
                    yield doc

    return _encodable(held_out(), encoder, limit)


# -- writing the thoughts ---------------------------------------------------------------------------


def point_seed(seed: int, doc_id: str, sample: int, point: int) -> int:
    """The sampling seed of one point of one trajectory (0 .. MAX_SEED), from the run's seed."""
    digest = hashlib.blake2b(repr((seed, doc_id, sample, point)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (MAX_SEED + 1)


@dataclasses.dataclass
class Trajectory:
    """One document with self-written thoughts, built point by point.

    Attributes:
        source: the document read.
        sample: which trajectory of the document (0 when greedy).
        segments: the document so far (text, and the thoughts written at its points).
        at: the next segment of the source (with its modes written out) to take.
        points: insertion points passed so far; skipped: those where no thinking may open
            (none for a document the encoder took).
        thoughts: what the model wrote at each point written.
    """

    source: Document
    sample: int
    resolved: tuple[Segment, ...]
    segments: list[Segment] = dataclasses.field(default_factory=list)
    at: int = 0
    points: int = 0
    skipped: int = 0
    thoughts: list[Thought] = dataclasses.field(default_factory=list)

    def next_point(self, thinking_modes: Sequence[str]) -> tuple[int, str] | None:
        """Takes the text up to the next point it can write at: `(point, mode)`, or None at the end."""
        while self.at < len(self.resolved):
            seg = self.resolved[self.at]
            self.at += 1
            if seg.kind == "text":
                self.segments.append(seg)
                continue
            point = self.points
            self.points += 1
            if seg.mode in thinking_modes:  # always, for a document the encoder took
                return point, seg.mode
            self.skipped += 1
        return None

    def add(self, thought: Thought, mode: str) -> None:
        self.thoughts.append(thought)
        if thought.text:  # an empty thought puts no block
            self.segments.append(Segment("thinking", thought.text, mode=mode))

    def document(self) -> Document:
        return Document(self.source.id, tuple(self.segments), mode=self.source.mode)


def write_trajectories(writer: ThoughtWriter, docs: Sequence[Document], *, samples: int, seed: int,
                       ) -> list[list[Trajectory]]:
    """`samples` trajectories of every document (`[sample][document]`), point by point:
    each round writes the next point of every trajectory that has one, in one batch."""
    thinking_modes = writer.generator.encoder.grammar.registry.thinking_modes
    trajectories = [[Trajectory(d, k, with_modes(d.segments, d.mode)) for d in docs] for k in range(samples)]
    flat = [t for row in trajectories for t in row]
    pending = [(t, t.next_point(thinking_modes)) for t in flat]
    pending = [(t, p) for t, p in pending if p is not None]
    while pending:
        prefixes = [ThoughtPrefix(t.source.id, tuple(t.segments), t.source.mode,
                                  seed=point_seed(seed, t.source.id, t.sample, point), block_mode=mode)
                    for t, (point, mode) in pending]
        for (t, (_, mode)), thought in zip(pending, writer.write(prefixes), strict=True):
            t.add(thought, mode)
        pending = [(t, t.next_point(thinking_modes)) for t, _ in pending]
        pending = [(t, p) for t, p in pending if p is not None]
    return trajectories


# -- scoring -----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SelfThinkResult:
    """The report's `self_think` entry, and the records of sample 0 (`self_think.jsonl`)."""

    report: dict[str, Any]
    records: list[dict[str, Any]]

    def jsonl(self) -> str:
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.records)


def run_self_think(generator: Generator, loss_config: LossConfig, sources: Sequence[SourceDocument],
                   settings: EvalSettings, encoded: Sequence[EncodedDocument] | None = None) -> SelfThinkResult:
    """Writes the thoughts, scores the text with and without them (see the module docstring).

    Args:
        generator: the checkpoint (parameters on one device or a mesh).
        loss_config: the run's cross-entropy settings.
        sources: the documents, with their segments.
        settings: `seq_len` (filled in), `samples` (None: greedy), `temperature`,
            `self_think_tokens`, `batch_rows` (rows scored and decoded at once), the bootstrap.
        encoded: the same documents as the rest of the report read them (checked: the
            self-thought documents keep exactly their text tokens).

    Raises:
        UserError: no document, or a thought budget below 1.
    """
    if not sources:
        raise UserError("no document to evaluate: the data holds no valid document")
    encoder = generator.encoder
    samples = settings.samples
    sampling = SamplingConfig(0.0) if samples is None else SamplingConfig(settings.temperature)
    writer = ThoughtWriter(generator, sampling=sampling, max_new_tokens=settings.self_think_tokens,
                           max_batch=settings.batch_rows, flag="--self-think-tokens")
    docs = [s.document for s in sources]
    trajectories = write_trajectories(writer, docs, samples=samples or 1, seed=settings.seed)
    originals = list(encoded) if encoded is not None else [encoder.encode(d) for d in docs]
    written = [[encoder.encode(t.document()) for t in row] for row in trajectories]
    # Each trajectory's `none` is its own documents with every block removed. They are
    # the same ids for every trajectory unless an empty thought dropped a block that
    # stood in another mode (its mode tags then go with it, where `remove_thinking`
    # keeps them): each trajectory is paired with its own, scored once per distinct set.
    nones = [[remove_thinking(encoder, d) for d in row] for row in written]
    for k, (row, none) in enumerate(zip(written, nones)):
        check_same_text(originals, row, f"self_think sample {k}")
        check_same_text(originals, none, f"self_think none of sample {k}")

    token_bytes = token_byte_lengths(encoder.tokenizer)
    params, config = generator.params, generator.model_config
    scored: list[tuple[list[EncodedDocument], Any]] = []

    def none_score(none: list[EncodedDocument]) -> Any:
        for docs_seen, sums in scored:
            if all(np.array_equal(a.ids, b.ids) for a, b in zip(docs_seen, none)):
                return sums
        scored.append((none, score_documents(params, config, loss_config, none, token_bytes, settings)))
        return scored[-1][1]

    none_sums_all = [none_score(none) for none in nones]
    none_sums = none_sums_all[0]
    self_sums = [score_documents(params, config, loss_config, row, token_bytes, settings) for row in written]
    tokens = int(none_sums.count[:, 0].sum())
    for s in [*self_sums, *none_sums_all]:
        if int(s.count[:, 0].sum()) != tokens:
            raise AssertionError(f"self_think scored {int(s.count[:, 0].sum())} text tokens, none {tokens}")
    self_nll = np.mean([s.nll[:, 0] for s in self_sums], axis=0)  # [docs]: the mean over trajectories
    none_nll = np.mean([s.nll[:, 0] for s in none_sums_all], axis=0)
    text_bytes = none_sums.text_bytes
    interval = paired_ratio_difference(self_nll, none_nll, text_bytes, scale=1 / LN2, resamples=settings.resamples,
                                       level=settings.level, seed=settings.seed,
                                       min_documents=settings.min_documents)

    def scores(nll: np.ndarray) -> dict[str, Any]:
        return {"loss/text": float(nll.sum() / tokens) if tokens else None,
                "bpb/text": bits_per_byte(nll.sum(), text_bytes.sum())}

    flat = [t for row in trajectories for t in row]
    thoughts = [th for t in flat for th in t.thoughts]
    report: dict[str, Any] = {
        "self": scores(self_nll),
        "none": scores(none_nll),
        "self_minus_none": {
            "bpb/text": interval.estimate,
            "loss/text": float((self_nll.sum() - none_nll.sum()) / tokens) if tokens else None,
            "ci": interval.ci,
            "documents": interval.documents,
            **({"note": interval.reason} if interval.reason else {}),
        },
        "points": sum(t.points for t in trajectories[0]),
        "points_skipped": sum(t.skipped for t in trajectories[0]),
        "documents_with_points": sum(t.points > 0 for t in trajectories[0]),
        "samples": samples,
        "temperature": sampling.temperature,
        "max_new_tokens": writer.max_new_tokens,
        "thoughts": {
            "written": len(thoughts),
            "empty": sum(not th.text for th in thoughts),
            "cut_by_budget": sum(th.finish_reason == "length" for th in thoughts),
            "mean_tokens": float(np.mean([th.tokens_out for th in thoughts])) if thoughts else None,
        },
        "tokens/text": tokens,
        "level": settings.level,
        "resamples": settings.resamples,
    }
    provenance = {"samples": samples, "sample": 0, "temperature": sampling.temperature,
                  "max_new_tokens": writer.max_new_tokens, "seed": settings.seed}
    records = [_record(t, s.metadata, provenance) for t, s in zip(trajectories[0], sources, strict=True)]
    return SelfThinkResult(report, records)


def _record(trajectory: Trajectory, metadata: Mapping[str, Any], provenance: dict[str, Any]) -> dict[str, Any]:
    """The document with its self-written thoughts as a JSON record (modes written only where
    they change), its metadata kept, and `self_think` provenance."""
    doc = trajectory.document()
    segments, mode = [], doc.mode
    for seg in doc.segments:
        item: dict[str, Any] = {"kind": seg.kind, "text": seg.text}
        if seg.mode is not None and seg.mode != mode:
            item["mode"] = mode = seg.mode
        if seg.control is not None:
            item["control"] = seg.control
        segments.append(item)
    record: dict[str, Any] = {"id": doc.id}
    if doc.mode != DEFAULT_DOCUMENT_MODE:
        record["mode"] = doc.mode
    record["segments"] = segments
    record.update({k: v for k, v in metadata.items() if k != "self_think"})
    record["self_think"] = {**provenance, "points": trajectory.points, "skipped": trajectory.skipped,
                            "written": sum(bool(t.text) for t in trajectory.thoughts)}
    return record
