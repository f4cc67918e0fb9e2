"""`metatrain annotate --samples K --select gain|random|first`: candidates, their gains,
the one kept. A tiny trained checkpoint writes and scores the thoughts (the real engine);
the gains are checked against an independent scoring of the same ids (the training
forward on the document as written, its block removed by the ablation code)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from metatrain.annotate.selection import candidate_seed, choose, gain_statistics
from metatrain.cli import main
from metatrain.documents import parse_document
from metatrain.evaluation.ablation import thinking_blocks
from metatrain.evaluation.scoring import token_losses
from metatrain.roles import Role
from metatrain.run.reader import load_checkpoint

from .test_annotate import records, text_of, write_raw

GAIN_TOKENS = 6
LONG = " ".join(f"Item {i} of the list is a small stone from the hills." for i in range(20))
DOCS = [
    {"id": "alpha", "text": "The river rises in the north.\n\nIt reaches the sea after nine hundred km, past towns.\n"},
    {"id": "beta", "text": "Exports grew by three percent.\n\nImports fell and the prices of coffee rose a lot.\n"},
    {"id": "gamma", "text": "Cats sleep most of the day.\n\nDogs like to walk in the park every morning.\n"},
    # a context longer than the model's 128 positions: cut from the front
    {"id": "long", "text": LONG + "\n\nThe last stone was the largest of them all.\n"},
]


def annotate(workdir, raw, out, *extra: str) -> int:
    return main(["annotate", "--input", str(raw), "--out", str(out), "--generator", "metatrain",
                 "--workdir", str(workdir), "--max-tokens", "10", "--min-chars", "1", "--no-progress", *extra])


@pytest.fixture(scope="module")
def runs(workdir, tmp_path_factory):
    """The corpus annotated several ways (each run once for the module)."""
    root = tmp_path_factory.mktemp("selection")
    raw = write_raw(root / "raw.jsonl", DOCS)
    settings = {
        "plain": (),
        "first": ("--samples", "1", "--select", "first", "--gain-tokens", str(GAIN_TOKENS)),
        "gain": ("--samples", "3", "--select", "gain", "--gain-tokens", str(GAIN_TOKENS)),
        "random": ("--samples", "3", "--select", "random"),
        "random_again": ("--samples", "3", "--select", "random"),
        "random_seed1": ("--samples", "3", "--select", "random", "--seed", "1"),
    }
    out = {}
    for name, extra in settings.items():
        path = root / f"{name}.jsonl"
        assert annotate(workdir, raw, path, *extra) == 0, name
        out[name] = records(path)
    # A floor between the gains `gain` kept, so that some points keep a thought and some lose it.
    best = sorted(e["gains"][e["chosen"]] for r in out["gain"] for e in r["annotation"]["selection"]["points"]
                  if e["chosen"] is not None and e["gains"][e["chosen"]] is not None)
    out["floor_value"] = best[len(best) // 2]
    path = root / "floor.jsonl"
    assert annotate(workdir, raw, path, "--samples", "3", "--select", "gain", "--gain-tokens", str(GAIN_TOKENS),
                    "--min-gain", repr(out["floor_value"])) == 0
    out["floor"] = records(path)
    out["raw"] = raw
    out["root"] = root
    return out


def direct_gain(loaded, record: dict, block_index: int, gain_tokens: int) -> float | None:
    """Σ log p of the first `gain_tokens` text tokens after thinking block `block_index`,
    with the block minus without (the block's tokens removed), by `token_losses` on the
    document as written; the context cut from the front (after BOS) to fit, as annotate does."""
    encoder, config = loaded.encoder, loaded.model_config
    doc = parse_document(record, path="test", line=1)
    encoded = encoder.encode(doc)
    ids, roles = np.asarray(encoded.ids), np.asarray(encoded.roles)
    block = thinking_blocks(encoder, encoded)[block_index]
    after = block.end + np.flatnonzero(roles[block.end:] == Role.TEXT)[:gain_tokens]
    if len(after) == 0:
        return None
    last = int(after[-1]) + 1
    cut = max(0, last - config.max_seq_len)
    keep = np.r_[0, np.arange(1 + cut, last)]  # positions kept in the `with` row
    bare = np.r_[0, np.arange(1 + cut, block.start), np.arange(block.end, last)]

    def log_likelihood(positions: np.ndarray) -> float:
        row, scored = ids[positions], np.isin(positions, after)
        n, width = len(row) - 1, config.max_seq_len  # one width: one program to compile
        batch = {name: np.zeros((1, width), np.int32) for name in ("inputs", "targets", "positions", "segment_ids")}
        batch["inputs"][0, :n], batch["targets"][0, :n] = row[:-1], row[1:]
        batch["positions"][0, :n], batch["segment_ids"][0, :n] = np.arange(n), 1
        batch["target_roles"] = np.zeros((1, width), np.int8)
        batch["target_roles"][0, :n] = np.where(scored[1:], Role.TEXT, Role.PAD)
        nll, _ = token_losses(loaded.params, batch, model_config=config, impl="naive", precision="float32")
        return -float(np.asarray(jax.device_get(nll))[0].sum())

    return log_likelihood(keep) - log_likelihood(bare)


def chosen_gains(record: dict) -> list[tuple[int, float | None]]:
    """(block index in the written document, recorded gain of the kept candidate) per point with a block."""
    out, block = [], 0
    for entry in record["annotation"]["selection"]["points"]:
        if entry["chosen"] is not None:
            out.append((block, entry["gains"][entry["chosen"]]))
            block += 1
    return out


@pytest.mark.parametrize("name", ["first", "gain"])
def test_a_gain_is_the_difference_of_two_independent_log_likelihoods(runs, workdir, name):
    loaded = load_checkpoint(workdir)
    checked = cut_checked = 0
    for record in runs[name]:
        for block, recorded in chosen_gains(record):
            want = direct_gain(loaded, record, block, GAIN_TOKENS)
            if recorded is None:
                assert want is None  # no text after the point
                continue
            if record["id"] == "long" and name == "gain":
                continue  # K candidates: the longest decides the cut, not the one written
            assert recorded == pytest.approx(want, abs=1e-4), (record["id"], block)
            checked += 1
            cut_checked += record["id"] == "long"
    assert checked >= 3 and cut_checked == (name == "first")


def test_select_gain_keeps_the_largest_gain(runs):
    points = [e for r in runs["gain"] for e in r["annotation"]["selection"]["points"]]
    scored = [e for e in points if any(g is not None for g in e["gains"])]
    assert scored
    for e in scored:
        known = [(g, -i) for i, g in enumerate(e["gains"]) if g is not None]
        assert e["chosen"] == -max(known)[1]
    assert any(e["chosen"] != 0 for e in scored) or all(len(set(e["gains"])) == 1 for e in scored)


def test_min_gain_keeps_only_thoughts_that_help(runs):
    """`--min-gain G`: a point keeps its best candidate only when that gain is >= G; a point
    whose best gain is lower or unknown gets no block."""
    floor = runs["floor_value"]
    kept = dropped = 0
    for record in runs["floor"]:
        selection = record["annotation"]["selection"]
        assert selection["min_gain"] == floor
        for e in selection["points"]:
            known = [(g, -i) for i, g in enumerate(e["gains"]) if g is not None]
            if e["chosen"] is not None:
                kept += 1
                assert e["gains"][e["chosen"]] >= floor and e["chosen"] == -max(known)[1]
            elif known:
                dropped += 1
                assert max(known)[0] < floor
        blocks = [s for s in record["segments"] if s["kind"] == "thinking"]
        assert len(blocks) == sum(e["chosen"] is not None for e in selection["points"])
    assert kept and dropped  # both happen on this corpus (else the test shows nothing)


def test_every_candidate_has_its_gain_in_the_provenance_and_the_summary_agrees(runs, workdir):
    for record in runs["gain"]:
        selection = record["annotation"]["selection"]
        assert {k: selection[k] for k in ("samples", "select", "gain_tokens")} == {
            "samples": 3, "select": "gain", "gain_tokens": GAIN_TOKENS}
        assert selection["scorer"] == str(workdir.resolve())  # the generator's own checkpoint
        assert len(selection["points"]) == record["annotation"]["points"]
        for k, e in enumerate(selection["points"]):
            assert e["point"] == k and len(e["gains"]) == 3
            if e["chosen"] is not None:
                assert all(isinstance(g, float) for g in e["gains"]) or all(g is None for g in e["gains"])
    stats = gain_statistics(runs["gain"])
    gains = [g for r in runs["gain"] for e in r["annotation"]["selection"]["points"] for g in e["gains"]
             if g is not None]
    kept = [g for r in runs["gain"] for _, g in chosen_gains(r) if g is not None]
    assert stats["candidate_gain_mean"] == pytest.approx(np.mean(gains))
    assert stats["chosen_gain_mean"] == pytest.approx(np.mean(kept))
    assert stats["chosen_gain_mean"] >= stats["candidate_gain_mean"]
    assert stats["positive_gain_share"] == pytest.approx(np.mean([g > 0 for g in gains]))
    assert stats["blocks"] == sum(r["annotation"]["accepted"] for r in runs["gain"])
    assert gain_statistics(runs["plain"]) == {"blocks": 0, "chosen_gain_mean": None, "candidate_gain_mean": None,
                                              "positive_gain_share": None}


def test_random_is_seeded(runs):
    def choices(name):
        return [e["chosen"] for r in runs[name] for e in r["annotation"]["selection"]["points"]]

    assert choices("random") == choices("random_again")
    assert [r["segments"] for r in runs["random"]] == [r["segments"] for r in runs["random_again"]]
    assert choices("random") != choices("random_seed1")
    assert any(c not in (0, None) for c in choices("random"))  # not the first each time
    assert choose("random", [0, 2], [None, None, None], seed=3, doc_id="d", point=1) == choose(
        "random", [0, 2], [1.0, None, 0.0], seed=3, doc_id="d", point=1)


def test_one_sample_first_writes_what_a_run_without_the_flags_writes(runs):
    assert [r["segments"] for r in runs["first"]] == [r["segments"] for r in runs["plain"]]
    assert [text_of(r) for r in runs["first"]] == [d["text"] for d in DOCS]
    assert all("selection" not in r["annotation"] for r in runs["plain"])
    assert all(len(e["gains"]) == 1 for r in runs["first"] for e in r["annotation"]["selection"]["points"])


def test_a_resume_with_other_selection_settings_is_refused(runs, workdir, capsys):
    out = runs["root"] / "gain.jsonl"
    before = out.read_bytes()
    assert annotate(workdir, runs["raw"], out, "--samples", "2", "--select", "gain",
                    "--gain-tokens", str(GAIN_TOKENS)) == 2
    assert out.read_bytes() == before
    assert "samples" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (("--samples", "0"), "--samples must be >= 1"),
    (("--gain-tokens", "0"), "--gain-tokens must be >= 1"),
    (("--select", "gain"), "--select gain needs a scoring model"),
    (("--scorer", "/nonexistent/run"), "/nonexistent/run"),
    (("--min-gain", "0"), "--min-gain needs a scoring model"),
    (("--min-gain", "nan", "--scorer", "/nonexistent/run"), "--min-gain must be a finite number"),
])
def test_bad_selection_flags_are_one_line(tmp_path, capsys, extra, message):
    raw = write_raw(tmp_path / "raw.jsonl", DOCS[:1])
    out = tmp_path / "o.jsonl"
    status = main(["annotate", "--input", str(raw), "--out", str(out), "--generator", "openai",
                   "--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--no-progress", *extra])
    assert status == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()



def test_an_endpoint_proposes_and_a_checkpoint_judges(workdir, tmp_path, monkeypatch):
    """`--generator openai --scorer WORKDIR`: K requests a point, each with its own seed
    (the first with the seed of a run without `--samples`); the thought written is the
    reply of the candidate with the largest recorded gain."""
    from metatrain.annotate.runner import derive_seed

    from .chat_server import ChatServer

    words = ["north", "river", "sea", "coffee", "stone", "park", "morning", "towns"]

    def reply(body):  # a different thought per seed
        seed = body["seed"]
        return f"Note {seed % 97}: " + " ".join(words[(seed >> s) % len(words)] for s in range(0, 12, 3))

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    raw = write_raw(tmp_path / "raw.jsonl", DOCS[:2])
    out = tmp_path / "out.jsonl"
    with ChatServer(reply=reply) as server:
        assert main(["annotate", "--input", str(raw), "--out", str(out), "--generator", "openai",
                     "--base-url", server.base_url, "--model", "scripted", "--no-progress", "--samples", "3",
                     "--select", "gain", "--gain-tokens", str(GAIN_TOKENS), "--scorer", str(workdir)]) == 0
        bodies = server.requests
    seeds = [b["seed"] for b in bodies]
    assert len(seeds) == 2 * 2 * 3 and len(set(seeds)) == len(seeds)  # 2 documents x 2 points x 3
    assert derive_seed(0, "alpha", 0, 0) in seeds
    for record in records(out):
        selection = record["annotation"]["selection"]
        assert selection["scorer"].startswith(str(workdir.resolve()) + "/")  # the checkpoint step that scored
        first = selection["points"][0]
        assert all(isinstance(g, float) for g in first["gains"]) and len(set(first["gains"])) == 3
        best = max(range(3), key=lambda i: (first["gains"][i], -i))
        assert first["chosen"] == best
        want = reply({"seed": candidate_seed(0, record["id"], 0, 0, best)})
        assert [s["text"] for s in record["segments"] if s["kind"] == "thinking"][0] == want
