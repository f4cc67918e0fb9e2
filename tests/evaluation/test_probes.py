"""Linear probes: hidden states per layer, token labels, the probe fit, the report and its plot."""

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metatrain.documents import Document, Segment, parse_record
from metatrain.errors import UserError
from metatrain.evaluation.probes import (
    ROLE_CLASSES,
    fit_probe,
    layer_hidden_states,
    majority_baseline,
    plot_probes,
    run_probes,
    token_labels,
)
from metatrain.io.paths import DEFAULT_TAGS, SAMPLE_CORPUS, SAMPLE_TOKENIZER
from metatrain.models import ModelConfig, Transformer, init_params_shape
from metatrain.tokenizer.encoder import Encoder

CFG = ModelConfig(
    vocab_size=37, d_model=26, n_layers=3, n_heads=6, n_kv_heads=2, head_dim=10, d_ff=34,
    max_seq_len=16, dtype="float32",
)


def _params(cfg, seed=0):
    """Random parameters of the model's shapes, drawn by NumPy (no RNG kernels to compile)."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        if jax.tree_util.keystr(path).endswith("['scale']"):
            return jnp.asarray(1 + 0.1 * rng.normal(size=leaf.shape), leaf.dtype)
        fan_in = leaf.shape[-2] if leaf.ndim >= 2 else 1
        return jnp.asarray(rng.normal(size=leaf.shape) / np.sqrt(fan_in), leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, nn.unbox(init_params_shape(cfg)))


# -- layer_hidden_states -------------------------------------------------------------------

@pytest.mark.parametrize("scan_layers", [True, False])
def test_hidden_states_end_with_the_model_output(scan_layers):
    cfg = dataclasses.replace(CFG, scan_layers=scan_layers)
    params = _params(cfg)
    segments = np.array([[1, 1, 1, 1, 2, 2, 2, 0, 0, 0, 0], [1] * 11], np.int32)
    positions = np.array([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3], list(range(11))], np.int32)
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, segments.shape).astype(np.int32)

    hidden = layer_hidden_states(params, cfg, ids, positions, segments)

    assert hidden.shape == (cfg.n_layers + 2, 2, 11, cfg.d_model) and hidden.dtype == jnp.float32
    expected = Transformer(cfg).apply({"params": params}, ids, positions, segments)
    np.testing.assert_allclose(hidden[-1], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(hidden[0], np.asarray(params["embedding"]["table"])[ids])
    # Each block changes the residual stream: no entry is a copy of its neighbour.
    assert all(not np.allclose(hidden[i], hidden[i + 1]) for i in range(cfg.n_layers + 1))


def test_hidden_states_agree_scanned_and_unrolled():
    scanned, unrolled = dataclasses.replace(CFG, scan_layers=True), dataclasses.replace(CFG, scan_layers=False)
    params = _params(scanned)
    per_layer = {f"layers_{i}": jax.tree.map(lambda a, i=i: a[i], params["layers"]) for i in range(CFG.n_layers)}
    unrolled_params = {k: v for k, v in params.items() if k != "layers"} | per_layer
    ids = np.arange(14, dtype=np.int32).reshape(2, 7) % CFG.vocab_size
    positions = np.tile(np.arange(7, dtype=np.int32), (2, 1))
    segments = np.ones_like(ids)

    a = layer_hidden_states(params, scanned, ids, positions, segments)
    b = layer_hidden_states(unrolled_params, unrolled, ids, positions, segments)

    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


# -- token_labels --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def encoder():
    return Encoder.from_files(SAMPLE_TOKENIZER, DEFAULT_TAGS)


def test_token_labels_follow_the_grammar(encoder):
    doc = Document("d", (
        Segment("text", "Plain human text."),
        Segment("text", "You asked: ", mode="ai"),
        Segment("text", "what is a probe?", mode="ai_quoting_human"),
        Segment("text", " A linear classifier.", mode="ai"),
        Segment("thinking", "Short and right."),
    ))
    enc = encoder.encode(doc)
    tag = encoder.tag_ids

    modes, roles = token_labels(encoder, enc.ids, enc.roles)

    names = np.array(encoder.grammar.modes)[modes]
    assert modes.shape == roles.shape == enc.ids.shape
    expected_roles = {1: "text", 2: "thinking", 3: "mantra", 4: "tag"}
    assert [ROLE_CLASSES[r] for r in roles] == [expected_roles[int(r)] for r in enc.roles]
    ids = enc.ids.tolist()
    # The mode is the one *after* each token: an opening tag is already in its mode.
    assert names[ids.index(tag["<AI>"])] == "ai"
    assert names[ids.index(tag["<AI_quoting_human>"])] == "ai_quoting_human"
    assert names[ids.index(tag["</AI_quoting_human>"])] == "ai"
    assert names[ids.index(tag["</AI>"])] == "human"
    assert names[0] == "human" and names[-1] == "human"  # BOS and EOS
    # Thinking (and its mantra) opened in AI mode are in AI mode.
    thinking = np.isin(enc.roles, [2, 3])
    assert thinking.any() and set(names[thinking]) == {"ai"}
    quoted = slice(ids.index(tag["<AI_quoting_human>"]), ids.index(tag["</AI_quoting_human>"]))
    assert set(names[quoted]) == {"ai_quoting_human"}
    assert set(np.array(ROLE_CLASSES)[roles[quoted]][1:]) == {"text"}


def test_token_labels_refuse_padding(encoder):
    enc = encoder.encode(Document("d", (Segment("text", "hello"),)))
    with pytest.raises(ValueError, match="PAD"):
        token_labels(encoder, enc.ids, np.zeros_like(enc.roles))


# -- fit_probe -----------------------------------------------------------------------------

def _gaussian(n=3000, d=37, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def test_probe_finds_a_planted_linear_signal():
    x = _gaussian()
    y = np.argmax(x @ np.random.default_rng(1).normal(size=(37, 3)), axis=1)

    accuracy = fit_probe(x[:2100], y[:2100], x[2100:], y[2100:], 3)

    baseline = majority_baseline(y[:2100], y[2100:])
    assert accuracy > 0.9 and accuracy > baseline + 0.4


def test_probe_finds_nothing_in_random_labels():
    x = _gaussian()
    y = np.random.default_rng(2).choice(3, size=3000, p=(0.6, 0.3, 0.1))

    accuracy = fit_probe(x[:2100], y[:2100], x[2100:], y[2100:], 3)

    baseline = majority_baseline(y[:2100], y[2100:])
    assert abs(baseline - 0.6) < 0.05
    assert abs(accuracy - baseline) < 0.05


def test_probe_handles_a_class_seen_only_in_test():
    x = _gaussian(600)
    y = (x[:, 0] > 0).astype(int)
    test_y = y[400:].copy()
    test_y[:10] = 2  # never in training: predicted wrong, but no crash and no NaN

    accuracy = fit_probe(x[:400], y[:400], x[400:], test_y, 3)

    assert 0.85 < accuracy <= 1 - 10 / 200


def test_majority_baseline():
    assert majority_baseline(np.array([0, 1, 1, 2]), np.array([1, 1, 0, 2])) == 0.5


# -- run_probes and plot_probes on a trained checkpoint ----------------------------------

def _sample_documents(loaded, lines):
    raw = SAMPLE_CORPUS.read_bytes().splitlines()
    docs = [parse_record(raw[i - 1], path=str(SAMPLE_CORPUS), line=i) for i in lines]
    return [loaded.encoder.encode(d) for d in docs]


@pytest.fixture(scope="module")
def loaded(workdir):
    from metatrain.run.reader import load_checkpoint

    return load_checkpoint(workdir)


@pytest.fixture(scope="module")
def report(loaded):
    # Human documents and AI ones (with quoted humans), so both tasks have several classes.
    docs = _sample_documents(loaded, [*range(1, 17), *range(152, 168)])
    return run_probes(loaded.params, loaded.model_config, loaded.encoder, docs, seq_len=96, batch_rows=5)


def test_report_shape(report, loaded):
    n_layers = loaded.model_config.n_layers
    assert report["layer_names"] == ["embeddings", *(f"block_{i}" for i in range(1, n_layers + 1)), "final_norm"]
    assert report["mode"]["classes"] == list(loaded.encoder.grammar.modes)
    assert report["role"]["classes"] == ["text", "thinking", "mantra", "tag"]
    for task in ("mode", "role"):
        result = report[task]
        assert len(result["layers"]) == n_layers + 2
        assert all(0 <= a <= 1 for a in result["layers"]) and 0 <= result["baseline"] <= 1
        assert result["train_tokens"] > 0 and result["test_tokens"] > 0
        assert result["test_documents"] == 10 and "note" not in result  # round(0.3 * 32)
    assert json.loads(json.dumps(report)) == report


def test_role_probe_beats_its_baseline(report):
    assert report["role"]["layers"][-1] > report["role"]["baseline"] + 0.1


def test_report_is_deterministic_and_bounded(loaded):
    docs = _sample_documents(loaded, [1, 2, 3, 152, 153, 154])
    kwargs = dict(seq_len=64, max_tokens=150, seed=3, batch_rows=4)
    a = run_probes(loaded.params, loaded.model_config, loaded.encoder, docs, **kwargs)
    b = run_probes(loaded.params, loaded.model_config, loaded.encoder, docs, **kwargs)
    assert a == b
    assert a["role"]["train_tokens"] + a["role"]["test_tokens"] <= 150
    assert a["role"]["test_documents"] == 2  # round(0.3 * 6)
    assert a["tokens_capped_by_memory"] is False


def test_hidden_states_are_capped_to_the_memory_budget(loaded):
    docs = _sample_documents(loaded, [1, 2, 3, 152, 153, 154])
    cfg = loaded.model_config
    per_token = (cfg.n_layers + 2) * cfg.d_model * 4
    r = run_probes(loaded.params, cfg, loaded.encoder, docs, seq_len=64, max_tokens=150, seed=3, batch_rows=4,
                   memory_bytes=40 * per_token)
    assert r["tokens_capped_by_memory"] is True
    assert r["role"]["train_tokens"] + r["role"]["test_tokens"] <= 40


def test_one_class_task_is_reported_not_faked(loaded):
    docs = _sample_documents(loaded, [1, 2, 3])  # human documents only

    result = run_probes(loaded.params, loaded.model_config, loaded.encoder, docs, seq_len=32)

    assert result["mode"]["layers"] == [None] * (loaded.model_config.n_layers + 2)
    assert "one class" in result["mode"]["note"] and result["mode"]["baseline"] == 1.0
    assert all(isinstance(a, float) for a in result["role"]["layers"])


def test_probes_need_two_documents(loaded):
    docs = _sample_documents(loaded, [1])
    with pytest.raises(UserError, match="at least 2 documents"):
        run_probes(loaded.params, loaded.model_config, loaded.encoder, docs, seq_len=32)


def test_plot_writes_a_png(report, tmp_path):
    with_unfitted = report | {"mode": report["mode"] | {"layers": [None] * len(report["layer_names"])}}
    for name, data in (("probes.png", report), ("unfitted.png", with_unfitted)):
        path = plot_probes(data, tmp_path / name)
        assert path == tmp_path / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_accuracy_minus_baseline_has_an_interval_over_held_out_documents():
    """A planted signal split over 60 'documents': the interval of accuracy - baseline excludes 0."""
    from metatrain.evaluation.probes import _probe_task

    rng = np.random.default_rng(0)
    n, d = 3000, 11
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = (x[:, 0] > 0.5).astype(np.int64)  # imbalanced: baseline about 0.7
    doc = np.repeat(np.arange(60), n // 60)
    test = doc % 3 == 0
    signal = _probe_task(x[None], y, test, doc, ("a", "b"), 20, seed=0)
    assert len(signal["minus_baseline_ci"]) == 1
    low, high = signal["minus_baseline_ci"][0]
    assert low > 0.1 and low <= signal["layers"][0] - signal["baseline"] <= high
    noise = _probe_task(x[None], rng.permutation(y), test, doc, ("a", "b"), 20, seed=0)
    low, high = noise["minus_baseline_ci"][0]
    assert low <= 0.02 and high > -0.1
    few = _probe_task(x[None], y, doc % 12 == 0, doc, ("a", "b"), 5, seed=0)
    assert few["minus_baseline_ci"] == [None] and "too few documents" in few["interval_note"]
