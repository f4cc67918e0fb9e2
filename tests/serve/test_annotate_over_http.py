"""The generational loop across processes: `metatrain serve` writes the thinking that
`metatrain annotate --generator openai` (the openai client) asks it for."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from metatrain.data.split import id_hash, in_split
from metatrain.io.paths import REPO_ROOT, SAMPLE_CORPUS

from ..conftest import free_port, run_cli


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


def serve_loop_commands() -> list[str]:
    """docs/serve.md's loop, one command a line (continuations joined)."""
    text = (REPO_ROOT / "docs" / "serve.md").read_text(encoding="utf-8")
    match = re.search(r"<!-- serve-loop[^>]*-->\n```sh\n(.*?)\n```", text, re.DOTALL)
    assert match, "docs/serve.md lost its serve-loop commands"
    return [line.strip() for line in match.group(1).replace("\\\n", " ").splitlines() if line.strip()]


def _wait_served(server: subprocess.Popen, port: int) -> dict:
    deadline = time.monotonic() + 300
    while True:
        assert server.poll() is None, server.stderr.read()[-3000:]
        try:
            return json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2))
        except OSError:
            assert time.monotonic() < deadline, "metatrain serve did not start"
            time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.hostile
def test_the_documented_loop_runs_as_written_against_a_served_default_preset_model(tmp_path):
    """docs/serve.md's three commands, as written, on a run of the default preset (1 step);
    and the issue's command (the default `--max-tokens 256`) refused in one line before
    any request, instead of `annotated 0 documents` and status 0."""
    runs = tmp_path / "runs"
    gen0 = runs / "gen0"
    trained = run_cli("train", "--workdir", str(gen0), "--set", "trainer.steps=1", "--set", "checkpoint.every=1",
                      "--set", "trainer.eval_every=0", "--set", "trainer.progress=false", timeout=600)
    assert trained.returncode == 0, trained.stderr[-3000:]
    corpus = tmp_path / "next.jsonl"
    # Three documents of the train split and one of the eval split (data.eval_fraction 0.05),
    # so that the documented training, evaluation included, has both.
    lines = SAMPLE_CORPUS.read_text(encoding="utf-8").splitlines(keepends=True)
    held_out = [in_split(id_hash(json.loads(line)["id"]), "eval", 0.05) for line in lines]
    corpus.write_text("".join([l for l, e in zip(lines, held_out) if not e][:3] + [l for l, e in zip(lines, held_out) if e][:1]))
    port = free_port()

    def as_here(command: str) -> str:
        return (command.replace("data/next.jsonl", str(corpus)).replace("runs/", f"{runs}/")
                .replace("8000", str(port)))

    serve, annotate, train = serve_loop_commands()
    assert serve.endswith("&") and annotate.startswith("metatrain annotate") and train.startswith("metatrain train")
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    env.update(JAX_PLATFORMS="cpu", PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}")
    server = subprocess.Popen(shlex.split(as_here(serve.rstrip("& "))), env=env, cwd=REPO_ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        (card,) = _wait_served(server, port)["data"]
        assert (card["id"], card["max_model_len"]) == ("gen0", 256)
        out = runs / "gen1-corpus.jsonl"
        undocumented = as_here(annotate).replace(" --max-tokens 32", "").replace("gen1-corpus", "refused")
        refused = subprocess.run(["bash", "-c", undocumented], cwd=REPO_ROOT, env=env, capture_output=True,
                                 text=True, timeout=300)
        assert refused.returncode == 2, refused.stderr[-3000:]
        (line,) = [l for l in refused.stderr.splitlines() if l.startswith("metatrain annotate:")]
        assert "--max-tokens 256 cannot fit the served model's context of 256 tokens" in line
        assert not (runs / "refused.jsonl").exists()
        done = subprocess.run(["bash", "-c", as_here(annotate)], cwd=REPO_ROOT, env=env, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    finally:
        server.terminate()
        server.wait(timeout=60)
    inputs = [json.loads(line) for line in corpus.read_text().splitlines()]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert not Path(f"{out}.failed.jsonl").exists()
    assert [r["id"] for r in records] == [r["id"] for r in inputs]
    assert {(r["annotation"]["generator"], r["annotation"]["model"]) for r in records} == {("openai", "gen0")}
    trained = subprocess.run(["bash", "-c", as_here(train) + " --set trainer.steps=2"],  # fewer steps: time only
                             cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert (runs / "gen1" / "checkpoints").is_dir()
