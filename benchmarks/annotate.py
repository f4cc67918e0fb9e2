"""`metatrain annotate` throughput: concurrency against a local server, and the local model.

    python benchmarks/annotate.py [--latency 0.05] [--paragraphs 2] [--seconds 3]
                                  [--concurrency 1,8,32] [--server thread|process]
                                  [--local-docs 40] [--max-new-tokens 32] [--workdir DIR] [--smoke]

Endpoint (`--generator openai`): the test suite's OpenAI-compatible server
(`tests/annotate/chat_server.py`, uvicorn) answers every request after a fixed
`--latency` (asyncio.sleep, so requests overlap). A synthetic raw corpus (JSON Lines
`{id, text}`, `--paragraphs` paragraphs a document, so that many insertion points with
the default `--where passage --split paragraph`) is annotated by the real path the CLI
takes (`run_annotation` with `OpenAIChatGenerator`, `read_raw_documents`, the default
template and checks), into a fresh `--out` for each concurrency K. The corpus grows
with K (about `--seconds` of wall time at the ideal rate). The points of one document
are requested one after another, so K documents in flight can at best go K times the
serial rate: ratio = (documents/s at K) / (K x documents/s at K=1). The server's most
requests in flight at once shows whether K were really overlapped; CPU is the CPU time
of the process(es) over the wall time (100% = one core; one Python process holding the
GIL cannot go much past it).

`--server thread` (default) runs the server in a thread of this process, as the tests
do: client and server then share one GIL and this machine's cores. `--server process`
runs it in a child process, as a real server would be.

Local model (`--generator metatrain`): a tiny model trained for one step
(`configs/tiny.yaml`, as the tests' `workdir` fixture; or `--workdir`) annotates
`--local-docs` documents with `MetatrainGenerator` (`--max-new-tokens` a block), twice:
the first run compiles the decoding loop for each prompt length bucket, the second
reuses them. Decoded tokens/s = tokens the decoding loop produced / wall time of the
run, counted on the decoding loop itself; `tokens_out` (what the generator reports, and
`OUT`'s provenance records) should equal it (the forced `<thinking>` and mantra prefix
of every block is read in the prefill and counted in `tokens_in`).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import multiprocessing
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

ROOT = Path(__file__).resolve().parents[1]
CHAT_SERVER = ROOT / "tests" / "annotate" / "chat_server.py"

WORDS = ("the river rises in the north and reaches the sea after nine hundred kilometres while the "
         "towns along its banks grew from trade in grain timber and salt over several centuries").split()


def load_chat_server():
    """`tests/annotate/chat_server.py` as a module (it imports only uvicorn and the stdlib)."""
    spec = importlib.util.spec_from_file_location("annotate_chat_server", CHAT_SERVER)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def write_corpus(path: Path, docs: int, paragraphs: int, words: int = 40) -> Path:
    """`docs` raw documents of `paragraphs` paragraphs of `words` words each."""
    with open(path, "w", encoding="utf-8") as f:
        for i in range(docs):
            paras = []
            for j in range(paragraphs):
                start = (7 * i + 3 * j) % len(WORDS)
                body = " ".join(WORDS[(start + n) % len(WORDS)] for n in range(words))
                paras.append(f"Paragraph {j + 1} of document {i}: {body}.")
            f.write(json.dumps({"id": f"doc-{i}", "text": "\n\n".join(paras) + "\n"}) + "\n")
    return path


# -- the server, in a thread or a child process -------------------------------------------


def _serve_in_child(latency: float, conn) -> None:
    chat_server = load_chat_server()
    with chat_server.ChatServer(latency=latency) as server:
        conn.send(server.port)
        cpu = time.process_time()
        conn.recv()  # "stop"
        conn.send((server.max_in_flight, len(server.requests), time.process_time() - cpu))


class ServerHandle:
    """`base_url`, and (after `close`) `max_in_flight` and `requests`, wherever it runs."""

    def __init__(self, latency: float, where: str):
        self.where = where
        self.max_in_flight = 0
        self.requests = 0
        self.cpu_seconds = None  # the server process's CPU time (a child's only)
        if where == "thread":
            self._server = load_chat_server().ChatServer(latency=latency).start()
            self.base_url = self._server.base_url
        else:
            ctx = multiprocessing.get_context("spawn")
            self._conn, child = ctx.Pipe()
            self._process = ctx.Process(target=_serve_in_child, args=(latency, child), daemon=True)
            self._process.start()
            port = self._conn.recv()
            self.base_url = f"http://127.0.0.1:{port}/v1"

    def close(self) -> None:
        if self.where == "thread":
            self.max_in_flight, self.requests = self._server.max_in_flight, len(self._server.requests)
            self._server.stop()
        else:
            self._conn.send("stop")
            self.max_in_flight, self.requests, self.cpu_seconds = self._conn.recv()
            self._process.join(timeout=20)


# -- one annotation run -------------------------------------------------------------------


def annotate(corpus: Path, out: Path, generator, concurrency: int, *, min_chars: int = 8, retries: int = 2):
    """The CLI's path (`metatrain.annotate.pipeline.annotate_corpus`) without argument parsing."""
    from metatrain.annotate.checks import BlockChecks
    from metatrain.annotate.inputs import read_raw_documents
    from metatrain.annotate.placement import PlacementConfig
    from metatrain.annotate.prompts import load_template
    from metatrain.annotate.runner import RunSettings, run_annotation

    placement = PlacementConfig(where="passage", split="paragraph")
    settings = RunSettings(placement, load_template(None, "passage"), BlockChecks(min_chars=min_chars),
                           retries=retries, concurrency=concurrency)
    documents = read_raw_documents([str(corpus)])
    return run_annotation(documents, generator, settings, out, inputs=[str(corpus)], progress=False)


def bench_endpoint(args, tmp: Path) -> list[dict]:
    from metatrain.annotate.openai_chat import OpenAIChatGenerator

    serial_rate = 1.0 / (args.paragraphs * args.latency)  # documents/s at K=1, ideally
    rows = []
    for k in args.concurrency:
        docs = max(args.min_docs, math.ceil(args.seconds * k * serial_rate))
        corpus = write_corpus(tmp / f"raw-{k}.jsonl", docs, args.paragraphs)
        server = ServerHandle(args.latency, args.server)
        try:
            generator = OpenAIChatGenerator(server.base_url, "scripted", timeout=30.0)
            cpu = time.process_time()
            summary = annotate(corpus, tmp / f"out-{k}.jsonl", generator, k)
            cpu = time.process_time() - cpu
        finally:
            server.close()
        assert summary.documents == docs and summary.failed == 0, summary.render(tmp / f"out-{k}.jsonl")
        rows.append({"k": k, "docs": docs, "points": summary.points, "requests": server.requests,
                     "seconds": summary.seconds, "docs_s": docs / summary.seconds,
                     "req_s": server.requests / summary.seconds, "max_in_flight": server.max_in_flight,
                     "cpu": cpu / summary.seconds,
                     "server_cpu": None if server.cpu_seconds is None else server.cpu_seconds / summary.seconds})
        print(f"  K={k}: {docs} documents in {summary.seconds:.2f} s", file=sys.stderr)
    base = next((r for r in rows if r["k"] == 1), None)
    for r in rows:
        r["ratio"] = r["docs_s"] / (r["k"] * base["docs_s"]) if base else float("nan")
    return rows


# -- the local model ----------------------------------------------------------------------


def train_tiny(path: Path) -> Path:
    """One training step of the tiny model (the tests' `workdir` fixture)."""
    from metatrain.config import load_config
    from metatrain.io.paths import CONFIGS_DIR
    from metatrain.train.loop import train

    config = load_config(CONFIGS_DIR / "tiny.yaml", [
        "trainer.steps=1", "trainer.batch_size=8", "trainer.seq_len=32", "trainer.eval_every=0",
        "trainer.progress=false", "checkpoint.every=1", "checkpoint.async_save=false",
    ])
    with contextlib.redirect_stdout(sys.stderr):
        train(config, path)
    return path


def bench_local(args, tmp: Path) -> list[dict]:
    from metatrain.annotate.local_model import MetatrainGenerator

    workdir = Path(args.workdir) if args.workdir else train_tiny(tmp / "run")
    corpus = write_corpus(tmp / "raw-local.jsonl", args.local_docs, args.paragraphs)
    generator = MetatrainGenerator(workdir, max_new_tokens=args.max_new_tokens)
    decoded = [0]
    sample = generator.generator._sample

    def counting_sample(prompt_index, sample_index, prompt, generated, done):
        decoded[0] += len(generated)  # what the decoding loop produced (not the forced prefix)
        return sample(prompt_index, sample_index, prompt, generated, done)

    generator.generator._sample = counting_sample
    rows = []
    for run in ("first (compiles)", "second (compiled)"):
        decoded[0] = 0
        # min_chars=1, no retries: every point is one generation of up to max_new_tokens.
        summary = annotate(corpus, tmp / f"out-local-{len(rows)}.jsonl", generator, 1, min_chars=1, retries=0)
        rows.append({"run": run, "docs": summary.documents, "points": summary.points,
                     "tokens_in": summary.tokens_in, "tokens_out": summary.tokens_out, "decoded": decoded[0],
                     "seconds": summary.seconds})
        print(f"  local model, {run}: {decoded[0]} tokens decoded in {summary.seconds:.2f} s", file=sys.stderr)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--latency", type=float, default=0.05, help="seconds the server waits before each answer")
    p.add_argument("--paragraphs", type=int, default=2, help="paragraphs (insertion points) a document")
    p.add_argument("--seconds", type=float, default=3.0, help="wall time a concurrency aims at (ideal rate)")
    p.add_argument("--min-docs", type=int, default=8, help="fewest documents a concurrency annotates")
    p.add_argument("--concurrency", default="1,8,32", help="documents in flight, comma-separated (include 1)")
    p.add_argument("--server", choices=("thread", "process"), default="thread",
                   help="the chat server in a thread of this process (as the tests) or in a child process")
    p.add_argument("--local-docs", type=int, default=40, help="documents the local model annotates")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens a block, local model")
    p.add_argument("--workdir", default=None, help="a trained run for the local model (default: train tiny)")
    p.add_argument("--no-local", action="store_true", help="skip the local model")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: a quick check that it runs")
    args = p.parse_args(argv)
    if args.smoke:
        args.seconds, args.min_docs, args.local_docs, args.max_new_tokens = 0.5, 4, 2, 8
    args.concurrency = [int(x) for x in args.concurrency.split(",")]

    import jax
    import openai

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    print(f"machine: {cpu}, {os.cpu_count()} cores; Python {platform.python_version()}, jax {jax.__version__}, "
          f"openai {openai.__version__}; jax devices: {jax.devices()[0].platform} x{jax.device_count()}",
          file=sys.stderr)

    with tempfile.TemporaryDirectory(prefix="annotate-bench-") as d:
        tmp = Path(d)
        rows = bench_endpoint(args, tmp)
        local = [] if args.no_local else bench_local(args, tmp)

    print(f"\nEndpoint: local chat server ({args.server}), latency {1e3 * args.latency:g} ms a request, "
          f"{args.paragraphs} points a document (ideal serial rate {1 / (args.paragraphs * args.latency):.1f} "
          "documents/s):\n")
    who = "client + server" if args.server == "thread" else "client"
    print(f"| K | documents | requests | seconds | documents/s | requests/s | server max in flight "
          f"| x ideal (K x serial) | CPU, {who} | CPU, server process |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        server_cpu = "-" if r["server_cpu"] is None else f"{100 * r['server_cpu']:.0f}%"
        print(f"| {r['k']} | {r['docs']:,} | {r['requests']:,} | {r['seconds']:.2f} | {r['docs_s']:,.1f} "
              f"| {r['req_s']:,.1f} | {r['max_in_flight']} | {r['ratio']:.2f} | {100 * r['cpu']:.0f}% "
              f"| {server_cpu} |")
    if local:
        print(f"\nLocal model (`--generator metatrain`, max_new_tokens {args.max_new_tokens}, one request at a time, "
              f"{jax.devices()[0].platform}):\n")
        print("| run | documents | points | tokens_in | tokens_out | decoded tokens | seconds "
              "| decoded tokens/s | tokens_out/s |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in local:
            print(f"| {r['run']} | {r['docs']} | {r['points']} | {r['tokens_in']:,} | {r['tokens_out']:,} "
                  f"| {r['decoded']:,} | {r['seconds']:.2f} | {r['decoded'] / r['seconds']:,.1f} "
                  f"| {r['tokens_out'] / r['seconds']:,.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
