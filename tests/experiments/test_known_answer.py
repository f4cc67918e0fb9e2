"""The known-answer experiment (docs/experiments.md) at toy scale: every step runs and the
results hold the three questions' numbers, each computed from the runs' own files."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from metatrain.io.paths import REPO_ROOT


@pytest.mark.slow
def test_the_small_version_answers_every_question(tmp_path):
    out = tmp_path / "ka"
    script = REPO_ROOT / "experiments" / "known_answer.py"
    done = subprocess.run([sys.executable, str(script), "--out", str(out), "--quick"], capture_output=True, text=True,
                          timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    used = results["uses_thoughts"]
    assert used["informative"]["ci"] is not None and used["control"]["ci"] is not None  # 40 held-out documents
    comparison = results["joint_vs_text_only"]
    assert [t["steps"] for t in comparison["text_only"]] == [15, 30]
    assert all(t["text_tokens"] > 0 and t["bpb/text"] > 0 for t in comparison["text_only"])
    assert comparison["joint_self_think_bpb"] > 0 and comparison["joint_self_minus_none"]["ci"] is not None
    for select in ("gain", "random"):
        rows = results["generations"][select]
        assert [r["generation"] for r in rows] == [0, 1]
        assert rows[0]["corpus_answers"] == 1.0  # generation 0: the exact teacher
        assert rows[1]["corpus_gain"]["blocks"] > 0 and rows[1]["corpus_gain"]["candidate_gain_mean"] is not None
        assert all(r["self_think_bpb"] is not None and r["self_think_answers"] is not None for r in rows)
    manifest = json.loads((out / "gain" / "manifest.json").read_text())
    chosen = [json.loads(line)["annotation"]["selection"] for line in
              (out / "gain" / "gen-1" / "corpus.jsonl").read_text().splitlines()]
    scored = [p for s in chosen for p in s["points"] if any(g is not None for g in p["gains"])]
    assert scored and all(p["gains"][p["chosen"]] == max(g for g in p["gains"] if g is not None)
                          for p in scored)  # --select gain kept the best candidate
    assert manifest["status"] == "done"
    for plot in ("known_answer_generations.png", "known_answer_text_only.png"):
        assert (out / plot).stat().st_size > 0
    # Run again: every step is found done, and the numbers are the same.
    again = subprocess.run([sys.executable, str(script), "--out", str(out), "--quick"], capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((out / "results.json").read_text()) == results
