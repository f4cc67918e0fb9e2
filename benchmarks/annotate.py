"""`metatrain annotate` throughput: concurrency against a local server, and the local model.

    python benchmarks/annotate.py [--latency 0.05] [--paragraphs 2] [--seconds 3]
                                  [--concurrency 1,8,32] [--server thread|process] [--no-endpoint]
                                  [--local-docs 40] [--local-concurrency 16] [--max-new-tokens 32]
                                  [--workdir DIR] [--train-steps 30] [--no-local] [--smoke]

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

Local model: the tiny preset trained `--train-steps` steps (or `--workdir`) annotates
`--local-docs` documents, every run a `metatrain annotate` process of its own (as a
user runs it), `--min-chars 1 --retries 0 --max-tokens N` (every point one generation):

  * `--generator metatrain --concurrency 1 --max-batch 1`;
  * `--generator metatrain --concurrency K --max-batch K` (K = `--local-concurrency`);
  * `--generator openai --concurrency K` against `metatrain serve --max-batch K` (its own
    process, started before the run; its start is reported apart), with a template of
    the document so far only (`$document_so_far`, `--context-chars` 240: the default
    template's instructions do not fit a 128-token model).

Each twice: cold (`METATRAIN_COMPILATION_CACHE` a fresh directory) and warm (the
directory the cold run filled; for HTTP, a new server on it). Then hot, the two
`--generator metatrain` settings in this process, the second of two runs (nothing left
to trace or compile): the engine's decoding alone. documents/s is the run's
own (`metatrain annotate`'s summary: the annotation, after the generator is built);
the command's wall time, start-up included, is beside it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import multiprocessing
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
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


# -- the local model: in process, and served over HTTP ---------------------------------------

#: The template of the HTTP runs: the document so far only (a 128-token model has no room
#: for the default template's instructions), as the local generator reads it.
SHORT_TEMPLATE = "$document_so_far\n"


def train_tiny(path: Path, steps: int) -> Path:
    """The tiny preset trained `steps` steps (as benchmarks/serve.py)."""
    subprocess.run([sys.executable, "-m", "metatrain.cli", "train", "--config", str(ROOT / "configs" / "tiny.yaml"),
                    "--workdir", str(path), "--set", f"trainer.steps={steps}", "--set", "trainer.eval_every=0",
                    "--set", "trainer.progress=false", "--set", "checkpoint.async_save=false"],
                   check=True, capture_output=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_serve(workdir: Path, max_batch: int, cache: Path) -> tuple[subprocess.Popen, int, float]:
    """`metatrain serve` in its own process; (process, port, seconds until it answered)."""
    port = _free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "METATRAIN_COMPILATION_CACHE": str(cache)}
    t0 = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "metatrain.cli", "serve", "--workdir", str(workdir),
                               "--port", str(port), "--max-batch", str(max_batch)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while time.perf_counter() - t0 < 300:
        if server.poll() is not None:
            raise SystemExit(f"metatrain serve exited: {server.stderr.read()[-3000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1).read()
            return server, port, time.perf_counter() - t0
        except OSError:
            time.sleep(0.2)
    server.kill()
    raise SystemExit("metatrain serve did not start in 300 s")


_SUMMARY = re.compile(r"annotated (\d+) documents into .* \(([\d.]+) documents/s\)")
_BLOCKS = re.compile(r"blocks: (\d+) accepted, (\d+) rejected, (\d+) empty replies, at (\d+) points; "
                     r"tokens in ([\d,]+), out ([\d,]+)")


def annotate_command(corpus: Path, out: Path, cache: Path, options: list[str]) -> dict:
    """One `metatrain annotate` process: its whole wall time, and its summary (documents/s
    over the annotation itself, after the generator is built)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "METATRAIN_COMPILATION_CACHE": str(cache),
           "OPENAI_API_KEY": "unused"}
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "metatrain.cli", "annotate", "--input", str(corpus), "--out", str(out),
                           "--no-progress", *options], check=False, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    summary, blocks = _SUMMARY.search(done.stderr), _BLOCKS.search(done.stderr)
    if done.returncode != 0 or not summary or not blocks:
        raise SystemExit(f"metatrain annotate {' '.join(options)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    documents, rate = int(summary[1]), float(summary[2])
    accepted, rejected, empty, points = (int(blocks[i]) for i in range(1, 5))
    return {"documents": documents, "docs_s": rate, "seconds": documents / rate, "wall": wall, "points": points,
            "accepted": accepted, "rejected": rejected, "empty": empty,
            "tokens_in": int(blocks[5].replace(",", "")), "tokens_out": int(blocks[6].replace(",", ""))}


def bench_local(args, tmp: Path) -> list[dict]:
    """The tiny model annotating `--local-docs` documents: `--generator metatrain` at
    concurrency 1 / max-batch 1 and at `--local-concurrency` K / max-batch K, and
    `--generator openai` against `metatrain serve --max-batch K` at concurrency K; each
    twice, cold (a fresh compilation cache) and warm (the cache the cold run filled;
    every run is a new process, as a user's second command is)."""
    workdir = Path(args.workdir) if args.workdir else train_tiny(tmp / "run", args.train_steps)
    corpus = write_corpus(tmp / "raw-local.jsonl", args.local_docs, args.paragraphs)
    k = args.local_concurrency
    common = ["--min-chars", "1", "--retries", "0", "--max-tokens", str(args.max_new_tokens), "--seed", "0"]
    template = tmp / "short-template.txt"
    template.write_text(SHORT_TEMPLATE, encoding="utf-8")
    setups = [
        ("one", "metatrain, --concurrency 1 --max-batch 1", None,
         ["--generator", "metatrain", "--workdir", str(workdir), "--concurrency", "1", "--max-batch", "1"]),
        ("many", f"metatrain, --concurrency {k} --max-batch {k}", None,
         ["--generator", "metatrain", "--workdir", str(workdir), "--concurrency", str(k), "--max-batch", str(k)]),
        ("http", f"openai over `metatrain serve --max-batch {k}`, --concurrency {k}", k,
         ["--generator", "openai", "--model", workdir.name, "--concurrency", str(k), "--prompt", str(template),
          "--context-chars", str(args.http_context_chars)]),
    ]
    rows = []
    for key, name, serve_batch, options in setups:
        cache = tmp / f"cache-{len(rows)}"
        for run in ("cold", "warm"):
            server = None
            extra: list[str] = []
            started = None
            if serve_batch:
                server, port, started = start_serve(workdir, serve_batch, cache)
                extra = ["--base-url", f"http://127.0.0.1:{port}/v1"]
            try:
                result = annotate_command(corpus, tmp / f"out-{len(rows)}-{run}.jsonl", cache,
                                          options + common + extra)
            finally:
                if server:
                    server.terminate()
                    server.wait(timeout=60)
            rows.append({"key": key, "setup": name, "run": run, "serve_start": started, **result})
            print(f"  {name}, {run}: {result['docs_s']:.2f} documents/s ({result['wall']:.1f} s in all)",
                  file=sys.stderr)
    rows += bench_hot(args, tmp, workdir, corpus)
    return rows


#: Most runs `bench_hot` makes of one setting to find one that compiles nothing.
HOT_ATTEMPTS = 6


def bench_hot(args, tmp: Path, workdir: Path, corpus: Path) -> list[dict]:
    """`--generator metatrain` at 1/1 and K/K in this process (the CLI's in-process path,
    `run_annotation`), each run again (a new generator, the compiled programs kept by the
    process) until a run compiles nothing: which admission shapes a run meets depends on
    timing, so a second run may still meet new ones. That run is the engine's decoding
    alone, without tracing or compiling."""
    import jax

    from metatrain.annotate.local_model import MetatrainGenerator

    compiles = [0]

    def count(event: str, duration: float, **_) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compiles[0] += 1

    jax.monitoring.register_event_duration_secs_listener(count)
    rows = []
    for key, name, k in (("one", "metatrain, --concurrency 1 --max-batch 1", 1),
                         ("many", f"metatrain, --concurrency {args.local_concurrency} --max-batch "
                                  f"{args.local_concurrency}", args.local_concurrency)):
        for attempt in range(HOT_ATTEMPTS):
            generator = MetatrainGenerator(workdir, max_new_tokens=args.max_new_tokens, max_batch=k,
                                           temperature=0.7, top_p=1.0)
            compiles[0] = 0
            summary = annotate(corpus, tmp / f"out-hot-{k}-{attempt}.jsonl", generator, k, min_chars=1, retries=0)
            if attempt and not compiles[0]:
                break
        rows.append({"key": key, "setup": name, "run": "hot", "serve_start": None, "documents": summary.documents,
                     "docs_s": summary.documents / summary.seconds, "seconds": summary.seconds, "wall": float("nan"),
                     "points": summary.points, "accepted": summary.accepted, "rejected": summary.rejected,
                     "empty": summary.empty, "tokens_in": summary.tokens_in, "tokens_out": summary.tokens_out})
        print(f"  {name}, hot: {rows[-1]['docs_s']:.2f} documents/s (run {attempt + 1}, {compiles[0]} compiles)",
              file=sys.stderr)
    return rows


def print_local(args, local: list[dict]) -> None:
    k = args.local_concurrency
    print(f"\nThe tiny model ({'--workdir' if args.workdir else f'configs/tiny.yaml, {args.train_steps} steps'}) "
          f"annotating {args.local_docs} documents ({args.paragraphs} points each, up to {args.max_new_tokens} "
          "tokens a block, no retries); each run a new `metatrain annotate` process, cold = a fresh "
          "compilation cache, warm = the one the cold run filled; hot = a second run in one process (every "
          "program compiled already):\n")
    print("| generator | run | documents/s | x metatrain 1/1 (same run) | seconds annotating | command wall s "
          "| server start s | points | tokens in | tokens out |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    by = {(r["key"], r["run"]): r for r in local}
    for r in local:
        base = by.get(("one", r["run"]))
        ratio = f"{r['docs_s'] / base['docs_s']:.1f}x" if base else "-"
        start = "-" if r["serve_start"] is None else f"{r['serve_start']:.1f}"
        wall = "-" if r["wall"] != r["wall"] else f"{r['wall']:.1f}"
        print(f"| {r['setup']} | {r['run']} | {r['docs_s']:.2f} | {ratio} | {r['seconds']:.2f} | {wall} "
              f"| {start} | {r['points']} | {r['tokens_in']:,} | {r['tokens_out']:,} |")
    print("\nGoals:")
    for run in ("cold", "warm", "hot"):
        one, many, http = (by.get((key, run)) for key in ("one", "many", "http"))
        if one and many:
            ratio = many["docs_s"] / one["docs_s"]
            print(f"  {run}: --concurrency {k} --max-batch {k} >= 4x --concurrency 1 --max-batch 1: "
                  f"{'met' if ratio >= 4 else 'MISSED'} ({ratio:.1f}x)")
        if many and http:
            ratio = many["docs_s"] / http["docs_s"]
            print(f"  {run}: in process at least as fast as over HTTP at --concurrency {k}: "
                  f"{'met' if ratio >= 1 else 'MISSED'} ({ratio:.2f}x)")


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
    p.add_argument("--local-concurrency", type=int, default=16,
                   help="K of the local model's batched runs (--concurrency K --max-batch K)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens a block, local model")
    p.add_argument("--http-context-chars", type=int, default=240,
                   help="--context-chars of the HTTP runs (their prompt must fit the tiny model's 128 tokens)")
    p.add_argument("--workdir", default=None, help="a trained run for the local model (default: train tiny)")
    p.add_argument("--train-steps", type=int, default=30, help="steps of the tiny run trained when no --workdir")
    p.add_argument("--no-endpoint", action="store_true", help="skip the chat-server endpoint table")
    p.add_argument("--no-local", action="store_true", help="skip the local model")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: a quick check that it runs")
    args = p.parse_args(argv)
    if args.smoke:
        args.seconds, args.min_docs, args.local_docs, args.max_new_tokens = 0.5, 4, 4, 8
        args.local_concurrency, args.train_steps = 2, 2
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
        rows = [] if args.no_endpoint else bench_endpoint(args, tmp)
        local = [] if args.no_local else bench_local(args, tmp)

    if rows:
        print_endpoint(args, rows)
    if local:
        print_local(args, local)
    return 0


def print_endpoint(args, rows: list[dict]) -> None:
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


if __name__ == "__main__":
    sys.exit(main())
