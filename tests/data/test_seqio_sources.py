"""seqio Tasks and Mixtures as metatrain sources: document Tasks, text Tasks, mixture rates,
exact resume, and the refusals (another vocabulary, a missing module, an unknown name).

seqio and TensorFlow come from the `seqio` extra; this module skips without them. The Tasks
the tests read are registered by one registry module (the `registry` fixture), a file the
tests import through metatrain.
"""

from __future__ import annotations

import random
import textwrap

import numpy as np
import pytest

seqio = pytest.importorskip("seqio")

from metatrain.data import DataConfig, SourceConfig, make_batch_iterator  # noqa: E402
from metatrain.data.seqio import load_provider, read_task  # noqa: E402
from metatrain.data.sources import SkipLog  # noqa: E402
from metatrain.documents import Document, Segment, parse_document  # noqa: E402
from metatrain.errors import UserError  # noqa: E402
from metatrain.io.paths import DEFAULT_TAGS, SAMPLE_TOKENIZER  # noqa: E402
from metatrain.tokenizer import Encoder  # noqa: E402

from ..conftest import write_jsonl  # noqa: E402
from .conftest import TRICKY_TEXTS  # noqa: E402

B, L = 4, 67  # global batch rows, row length (prime)

_WORDS = "the of and to in a is that for it as was with study found river climate percent".split()


def short_docs(n: int, first_word: str, prefix: str, seed: int) -> list[dict]:
    """`n` short documents, each opening with `first_word` (so a test can tell the task apart)."""
    rng = random.Random(seed)
    docs = []
    for d in range(n):
        words = [first_word] + [rng.choice(_WORDS) for _ in range(rng.randint(2, 5))]
        segments = [{"kind": "text", "text": " ".join(words) + "."}]
        if rng.random() < 0.5:
            segments.append({"kind": "thinking", "text": " ".join(rng.choice(_WORDS) for _ in range(3))})
        docs.append({"id": f"{prefix}-{d}", "segments": segments})
    return docs


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict[str, list[dict]]:
    """The documents behind the registry's Tasks, by Task."""
    tricky = [{"id": "tricky-0", "segments": [
        {"kind": "text", "text": TRICKY_TEXTS[0]},
        {"kind": "thinking", "text": TRICKY_TEXTS[2]},
        {"kind": "text", "text": TRICKY_TEXTS[3], "mode": "ai"},
        {"kind": "thinking", "text": "a good thought", "control": "good"},
    ]}]
    return {"alpha": short_docs(60, "alpha", "a", 1), "bravo": short_docs(60, "bravo", "b", 2), "tricky": tricky}


@pytest.fixture(scope="module")
def registry(tmp_path_factory, corpora) -> str:
    """A `.py` registry module: document Tasks `mt_alpha`, `mt_bravo`, `mt_tricky`, a Mixture
    `mt_mix` at rates 3:1, a text Task `mt_text` and a Task with a byte vocabulary."""
    root = tmp_path_factory.mktemp("registry")
    alpha = write_jsonl(root / "alpha.jsonl", corpora["alpha"])
    bravo = write_jsonl(root / "bravo.jsonl", corpora["bravo"])
    tricky = write_jsonl(root / "tricky.jsonl", corpora["tricky"])
    texts = [t for t in TRICKY_TEXTS if t.strip()] + [f"plain line {i}" for i in range(20)]
    module = root / "my_registry.py"
    module.write_text(textwrap.dedent(f"""
        import functools

        import seqio
        import tensorflow as tf

        from metatrain.data.seqio import MetatrainVocabulary, register_document_task

        TOKENIZER, TAGS = {str(SAMPLE_TOKENIZER)!r}, {str(DEFAULT_TAGS)!r}
        TEXTS = {texts!r}

        register_document_task("mt_alpha", {{"train": {str(alpha)!r}}}, TOKENIZER, TAGS)
        register_document_task("mt_bravo", {str(bravo)!r}, TOKENIZER, TAGS)
        register_document_task("mt_tricky", {str(tricky)!r}, TOKENIZER, TAGS, mantra_policy="first")
        seqio.MixtureRegistry.add("mt_mix", [("mt_alpha", 3.0), ("mt_bravo", 1.0)])

        def texts_fn(split, shuffle_files, seed=None):
            return tf.data.Dataset.from_tensor_slices({{"text": TEXTS}})

        def text_task(name, vocabulary):
            seqio.TaskRegistry.add(
                name,
                source=seqio.FunctionDataSource(texts_fn, splits=["train"]),
                preprocessors=[functools.partial(seqio.preprocessors.rekey, key_map={{"targets": "text"}}),
                               seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
                output_features={{"targets": seqio.Feature(vocabulary, add_eos=True)}},
            )

        text_task("mt_text", MetatrainVocabulary(TOKENIZER, TAGS))
        text_task("mt_bytes", seqio.ByteVocabulary())
    """), encoding="utf-8")
    return str(module)


@pytest.fixture(scope="module")
def encoder():
    return Encoder.from_files(SAMPLE_TOKENIZER, DEFAULT_TAGS)


def seqio_config(registry: str, name: str, **source) -> DataConfig:
    return DataConfig(sources=(SourceConfig(seqio=name, module=registry, **source),), eval_fraction=0.0,
                      tokenizer=SAMPLE_TOKENIZER, tags=DEFAULT_TAGS)


@pytest.mark.parametrize("name, mantra_policy", [("alpha", "every"), ("tricky", "first")])
def test_a_document_task_emits_the_encoder_s_ids_and_roles(registry, corpora, name, mantra_policy):
    encoder = Encoder.from_files(SAMPLE_TOKENIZER, DEFAULT_TAGS, mantra_policy=mantra_policy)
    task = load_provider(f"mt_{name}", registry)
    examples = list(task.get_dataset(sequence_length=None, split="train", shuffle=False).as_numpy_iterator())
    docs = corpora[name]
    assert len(examples) == len(docs)
    for example, doc in zip(examples, docs):
        want = encoder.encode(parse_document(doc, path="", line=0))
        np.testing.assert_array_equal(example["ids"], want.ids)
        np.testing.assert_array_equal(example["roles"], want.roles)


def test_a_text_task_reads_as_one_text_segment_per_example(registry, encoder):
    task = load_provider("mt_text", registry)
    examples = read_task(task, "train", "targets", _fingerprint(), strict=True, skips=SkipLog())
    texts = [t for t in TRICKY_TEXTS if t.strip()]
    for i, text in enumerate(texts):  # append_eos's EOS is the document's own EOS, not a second one
        want = encoder.encode(Document(f"t{i}", (Segment("text", text),)))
        ids, roles = examples[i]
        np.testing.assert_array_equal(ids, want.ids)
        np.testing.assert_array_equal(roles, want.roles)


def _fingerprint() -> str:
    from metatrain.data.seqio import file_fingerprint

    return file_fingerprint(SAMPLE_TOKENIZER, DEFAULT_TAGS)


def _doc_starts(batches, first_ids: dict[int, str], bos_id: int) -> dict[str, int]:
    """Documents begun in `batches` (their BOS is an input), by the Task their first text token names."""
    counts = dict.fromkeys(first_ids.values(), 0)
    for batch in batches:
        starts = (batch["inputs"] == bos_id) & (batch["segment_ids"] > 0)
        for token in batch["targets"][starts].tolist():
            counts[first_ids[token]] += 1
    return counts


def test_a_mixture_s_rates_hold_in_the_stream(registry, encoder):
    first = {encoder.tokenizer.encode_texts([w])[0][0]: w for w in ("alpha", "bravo")}
    assert len(first) == 2
    it = make_batch_iterator(seqio_config(registry, "mt_mix"), batch_size=B, seq_len=L)
    counts = _doc_starts([next(it) for _ in range(150)], first, encoder.bos_id)
    total = counts["alpha"] + counts["bravo"]
    assert total > 800
    # grain interleaves exactly (3 of every 4 documents of a lane), so only the lanes'
    # unfinished windows (< 4 documents each) separate the count from 3:1.
    assert abs(counts["alpha"] - 0.75 * total) <= 3 * B


def test_resume_is_exact(registry):
    cfg = seqio_config(registry, "mt_mix", weight=2.0)
    it = make_batch_iterator(cfg, batch_size=B, seq_len=L)
    for _ in range(7):
        next(it)
    state = it.get_state()
    want = [next(it) for _ in range(5)]
    resumed = make_batch_iterator(cfg, batch_size=B, seq_len=L)
    resumed.set_state(state)
    got = [next(resumed) for _ in range(5)]
    for a, b in zip(want, got):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_the_eval_split_holds_out_examples_of_the_task(registry, encoder):
    cfg = DataConfig(sources=(SourceConfig(seqio="mt_alpha", module=registry),), eval_fraction=0.3,
                     tokenizer=SAMPLE_TOKENIZER, tags=DEFAULT_TAGS)
    train = make_batch_iterator(cfg, batch_size=B, seq_len=L)
    evals = list(make_batch_iterator(cfg, batch_size=B, seq_len=L, split="eval"))
    held_out = sum(int(((b["inputs"] == encoder.bos_id) & (b["segment_ids"] > 0)).sum()) for b in evals)
    assert 0 < held_out < 60
    assert next(train)["segment_ids"].all()


def test_another_vocabulary_is_refused_naming_task_feature_and_vocabulary(registry):
    with pytest.raises(UserError) as e:
        make_batch_iterator(seqio_config(registry, "mt_bytes"), batch_size=B, seq_len=L)
    message = str(e.value)
    assert "mt_bytes" in message and "'targets'" in message and "ByteVocabulary" in message
    assert "MetatrainVocabulary" in message


def test_a_missing_feature_names_the_task_s_features(registry):
    with pytest.raises(UserError, match=r"mt_text has no feature 'inputs' \(its features: targets\)"):
        make_batch_iterator(seqio_config(registry, "mt_text", feature="inputs"), batch_size=B, seq_len=L)


def test_another_tokenizer_is_refused(registry, tmp_path):
    other = tmp_path / "other.model"
    other.write_bytes(SAMPLE_TOKENIZER.read_bytes() + b"\n")  # other bytes: another model as far as a check can tell
    cfg = DataConfig(sources=(SourceConfig(seqio="mt_alpha", module=registry),), tokenizer=SAMPLE_TOKENIZER,
                     tags=DEFAULT_TAGS)
    from metatrain.data.seqio import open_seqio_source
    from metatrain.data.sources import EncoderSpec

    spec = EncoderSpec(str(other), str(DEFAULT_TAGS), None, "every")
    with pytest.raises(UserError, match="not the run's data.tokenizer"):
        open_seqio_source(cfg.sources[0], spec, split="train", eval_fraction=0.0, strict=False, skips=SkipLog())


@pytest.mark.parametrize("module, match", [
    ("no_such_registry_module", r"cannot import seqio registry module 'no_such_registry_module'.*PYTHONPATH"),
    ("/nowhere/registry.py", r"seqio registry module /nowhere/registry.py does not exist"),
])
def test_a_missing_module_is_one_clear_line(module, match):
    with pytest.raises(UserError, match=match) as e:
        load_provider("mt_alpha", module)
    assert "\n" not in str(e.value)


def test_an_unknown_name_is_one_clear_line(registry):
    with pytest.raises(UserError, match=r"no Task or Mixture named 'mt_mxi'.*did you mean mt_mix") as e:
        load_provider("mt_mxi", registry)
    assert "\n" not in str(e.value)


def test_the_source_config_checks_its_keys():
    with pytest.raises(ValueError, match="needs `path`"):
        SourceConfig()
    with pytest.raises(ValueError, match="`module` must be a non-empty string"):
        SourceConfig(seqio="mt_mix")
    with pytest.raises(ValueError, match="give one of them"):
        SourceConfig(path="a.jsonl", seqio="mt_mix", module="m")
    assert SourceConfig(seqio="mt_mix", module="m").name == "seqio:mt_mix"


def test_a_schedule_splits_a_mixture_s_stage_weight_by_its_rates(registry, encoder):
    first = {encoder.tokenizer.encode_texts([w])[0][0]: w for w in ("alpha", "bravo")}
    sources = (SourceConfig(seqio="mt_mix", module=registry), SourceConfig(seqio="mt_bravo", module=registry))
    cfg = DataConfig(sources=sources, schedule=({"step": 0, "weights": [1, 0]}, {"step": 40, "weights": [0, 1]}),
                     eval_fraction=0.0, tokenizer=SAMPLE_TOKENIZER, tags=DEFAULT_TAGS)
    it = make_batch_iterator(cfg, batch_size=B, seq_len=L)
    batches = [next(it) for _ in range(80)]
    early = _doc_starts(batches[:39], first, encoder.bos_id)
    total = early["alpha"] + early["bravo"]
    assert abs(early["alpha"] - 0.75 * total) <= 3 * B
    assert _doc_starts(batches[41:], first, encoder.bos_id)["alpha"] == 0


def test_worker_processes_read_the_spilled_task(registry):
    from metatrain.data.packing import check_batch

    cfg = DataConfig(sources=(SourceConfig(seqio="mt_mix", module=registry),), eval_fraction=0.0, num_workers=1,
                     tokenizer=SAMPLE_TOKENIZER, tags=DEFAULT_TAGS)
    with make_batch_iterator(cfg, batch_size=B, seq_len=L) as it:
        for _ in range(3):
            check_batch(next(it), B, L)


def test_evaluation_reads_the_held_out_examples_of_a_seqio_source(registry, encoder):
    """`metatrain eval`'s default data (and the in-loop ablation) read seqio sources too."""
    from metatrain.evaluation.documents import split_documents

    cfg = DataConfig(sources=(SourceConfig(seqio="mt_alpha", module=registry),), eval_fraction=0.3,
                     tokenizer=SAMPLE_TOKENIZER, tags=DEFAULT_TAGS)
    docs = split_documents(cfg, encoder, "eval")
    evals = list(make_batch_iterator(cfg, batch_size=B, seq_len=L, split="eval"))
    held_out = sum(int(((b["inputs"] == encoder.bos_id) & (b["segment_ids"] > 0)).sum()) for b in evals)
    assert len(docs) == held_out > 0
    for doc in docs:
        assert doc.ids[0] == encoder.bos_id and doc.ids[-1] == encoder.eos_id and len(doc.ids) == len(doc.roles)
        assert encoder.decode(doc.ids).startswith("alpha")
