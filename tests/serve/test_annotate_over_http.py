"""The generational loop across processes: `metatrain serve` writes the thinking that
`metatrain annotate --generator openai` (the openai client) asks it for."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request

from metatrain.io.paths import SAMPLE_CORPUS

from ..conftest import free_port


def test_annotate_gets_its_thinking_from_a_served_model(workdir, tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "OPENAI_API_KEY": "unused"}
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "metatrain.cli", "serve", "--workdir", str(workdir),
                               "--port", str(port), "--max-batch", "4"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, server.stderr.read()[-3000:]
            try:
                models = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2))
                break
            except OSError:
                assert time.monotonic() < deadline, "metatrain serve did not start"
                time.sleep(0.2)
        model = models["data"][0]["id"]
        corpus = tmp_path / "corpus.jsonl"
        corpus.write_text("".join(SAMPLE_CORPUS.read_text(encoding="utf-8").splitlines(keepends=True)[:6]))
        out = tmp_path / "annotated.jsonl"
        done = subprocess.run(
            [sys.executable, "-m", "metatrain.cli", "annotate", "--generator", "openai", "--input", str(corpus),
             "--out", str(out), "--base-url", f"http://127.0.0.1:{port}/v1", "--model", model,
             "--max-tokens", "24", "--max-blocks", "1", "--min-chars", "1", "--no-progress"],
            env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    finally:
        server.terminate()
        server.wait(timeout=60)
    inputs = [json.loads(line) for line in corpus.read_text().splitlines()]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    failed = tmp_path / "annotated.jsonl.failed.jsonl"
    assert not failed.exists() or not failed.read_text().strip(), failed.read_text()
    assert [r["id"] for r in records] == [r["id"] for r in inputs]
    assert {r["annotation"]["generator"] for r in records} == {"openai"}
    assert {r["annotation"]["model"] for r in records} == {model}
    blocks = sum(1 for r in records for s in r["segments"] if s.get("kind") == "thinking")
    assert blocks >= 1  # thoughts the served model wrote went into the corpus
