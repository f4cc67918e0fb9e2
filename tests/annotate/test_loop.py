"""The generational loop from the README, run as written (toy scale): an endpoint
annotates the corpus, generation 0 trains on it, generation 0 annotates the same corpus,
generation 1 trains on that."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from metatrain.io.paths import REPO_ROOT, SAMPLE_CORPUS

from .chat_server import ChatServer
from .test_annotate import text_of

pytestmark = pytest.mark.slow


def readme_loop_command() -> str:
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"<!-- annotate-loop[^>]*-->\n```bash\n(.*?)\n```", readme, re.DOTALL)
    assert match, "README.md lost its annotate-loop command"
    return match.group(1)


def test_the_readme_loop_runs_and_each_generation_annotates_for_the_next(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(SAMPLE_CORPUS.read_text(encoding="utf-8").splitlines(keepends=True)[:10]))
    runs = tmp_path / "runs" / "loop"
    command = readme_loop_command()
    with ChatServer() as server:
        command = (command.replace("data/sample/factbook.jsonl", str(corpus))
                   .replace("http://localhost:8000/v1", server.base_url)
                   .replace("runs/loop", str(runs)))
        env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
        env.update(JAX_PLATFORMS="cpu", PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}")
        result = subprocess.run(["bash", "-c", command],
                                cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
        assert len(server.requests) >= 10
    inputs = [json.loads(line) for line in corpus.read_text().splitlines()]
    for generation, generator in (("gen0", "openai"), ("gen1", "metatrain")):
        out = [json.loads(line) for line in (runs / f"{generation}.jsonl").read_text().splitlines()]
        assert [r["id"] for r in out] == [r["id"] for r in inputs]
        assert [text_of(r) for r in out] == [text_of(r) for r in inputs]
        assert {r["annotation"]["generator"] for r in out} == {generator}
        assert all(r["annotation"]["points"] <= 2 for r in out)
        assert (runs / generation / "checkpoints").is_dir()
    gen1 = [json.loads(line) for line in (runs / "gen1.jsonl").read_text().splitlines()]
    assert gen1[0]["annotation"]["model"] == str((runs / "gen0").resolve())
