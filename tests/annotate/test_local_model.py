"""`--generator metatrain`: a tiny metatrain checkpoint writes the thinking itself."""

from __future__ import annotations

import json

import pytest

from metatrain.cli import main

from .test_annotate import RAW, records, text_of, write_raw


def test_a_checkpoint_annotates_a_corpus_and_the_text_is_unchanged(workdir, tmp_path):
    raw = write_raw(tmp_path / "raw.jsonl")
    out = tmp_path / "gen1.jsonl"
    argv = ["annotate", "--input", str(raw), "--out", str(out), "--generator", "metatrain",
            "--workdir", str(workdir), "--max-tokens", "12", "--min-chars", "1", "--no-progress"]
    assert main(argv) == 0
    got = records(out)
    assert [r["id"] for r in got] == [r["id"] for r in RAW]
    assert [text_of(r) for r in got] == [r["text"] for r in RAW]
    a = got[0]["annotation"]
    assert a["generator"] == "metatrain" and a["model"] == str(workdir.resolve())
    assert a["settings"]["max_new_tokens"] == 12 and a["tokens_out"] > 0
    mantra_start = "I feel no fear."
    for r in got:
        assert not any(s["text"].startswith(mantra_start) for s in r["segments"] if s["kind"] == "thinking")
    # The same seed and settings write the same corpus again.
    again = tmp_path / "again.jsonl"
    assert main([*argv[:4], str(again), *argv[5:]]) == 0
    assert [json.dumps(r["segments"]) for r in records(again)] == [json.dumps(r["segments"]) for r in got]


def test_the_metatrain_generator_needs_a_run(tmp_path, capsys):
    raw = write_raw(tmp_path / "raw.jsonl")
    assert main(["annotate", "--input", str(raw), "--out", str(tmp_path / "o.jsonl"),
                 "--generator", "metatrain", "--no-progress"]) == 2
    assert "needs --workdir" in capsys.readouterr().err


def test_many_points_in_flight_write_what_one_at_a_time_writes(workdir, tmp_path):
    """The batched engine path (16 documents in flight, 16 rows) writes the corpus that one
    document at a time on one row writes: each point samples from its own seed."""
    raw = write_raw(tmp_path / "raw.jsonl")
    outs = []
    for concurrency, max_batch in ((1, 1), (16, 16)):
        out = tmp_path / f"c{concurrency}.jsonl"
        assert main(["annotate", "--input", str(raw), "--out", str(out), "--generator", "metatrain",
                     "--workdir", str(workdir), "--max-tokens", "12", "--min-chars", "1", "--no-progress",
                     "--concurrency", str(concurrency), "--max-batch", str(max_batch)]) == 0
        outs.append([json.dumps(r["segments"]) for r in records(out)])
    assert outs[0] == outs[1]


def test_a_max_batch_that_is_not_a_positive_integer_is_refused(workdir, tmp_path, capsys):
    raw = write_raw(tmp_path / "raw.jsonl")
    with pytest.raises(SystemExit) as exit_:
        main(["annotate", "--input", str(raw), "--out", str(tmp_path / "o.jsonl"), "--generator", "metatrain",
              "--workdir", str(workdir), "--max-batch", "0", "--no-progress"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "argument --max-batch: 0 is not >= 1" in err[-1]
