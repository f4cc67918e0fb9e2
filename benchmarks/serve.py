"""`metatrain serve` under load: concurrent clients of the official `openai` package against
the server on 127.0.0.1, at several `--max-batch` settings, with replies of mixed lengths.

    python benchmarks/serve.py [--workdir W] [--max-batches 1 8 32] [--levels 1 8 32]
                               [--lengths 8 32 96] [--requests 3] [--seconds 60] [--json OUT]

For each `--max-batch` B the server is started as its own process (`metatrain serve
--workdir W --max-batch B`, JAX's compilation cache in a fresh directory of this run) on a
free port of 127.0.0.1 and warmed up: bursts of 1, 2, 4, ... B concurrent requests, then
the whole measurement once, unmeasured, so that every admission, prompt and row-count
bucket it uses is compiled before it starts. Then:

  * a lone request: one client, one chat completion of `max_tokens` 32 at a time, 5 times
    (the same request: its median latency and time to first token);
  * at each concurrency level N, N clients each send `--requests` streamed chat
    completions one after another (a closed loop), their `max_tokens` cycling through
    `--lengths` (client i starts at the i-th length, so every level mixes short and
    long replies), temperature 0.8, each with its own seed (the same requests at every
    B). Tokens are the completion tokens the server reports (`usage`, streamed), latency
    is from send to the last chunk, time to first token (TTFT) from send to the first
    chunk that carries text (the role chunk that opens a stream carries none);
  * head-of-line blocking: a long streamed completion (`max_tokens` 100) is sent; once
    its first text arrives, a short one (`max_tokens` 4) is sent. With continuous
    batching the short one takes a free slot at the next call and finishes first; with
    B = 1 it waits for the long one's slot.

Without `--workdir` a tiny run (configs/tiny.yaml, 30 steps) is trained into a temporary
directory first. Goals (benchmarks/README.md, Serving): a lone request's latency at
B = 32 within 1.5x of B = 1; tokens/s at 8 clients (B = 8 or 32) at least 2x one
client's at B = 1; p50 TTFT at 8 clients at most 2x a lone client's; a short request
sent during a long reply finishes first.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LONE_TOKENS = 32


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_tiny(directory: Path, steps: int) -> Path:
    run = directory / "run"
    subprocess.run([sys.executable, "-m", "metatrain.cli", "train", "--config", str(REPO / "configs" / "tiny.yaml"),
                    "--workdir", str(run), "--set", f"trainer.steps={steps}", "--set", "trainer.eval_every=0",
                    "--set", "trainer.progress=false", "--set", "checkpoint.async_save=false"],
                   check=True, capture_output=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    return run


def _start_server(workdir: Path, port: int, max_batch: int, cache: Path) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "METATRAIN_COMPILATION_CACHE": str(cache)}
    server = subprocess.Popen(
        [sys.executable, "-m", "metatrain.cli", "serve", "--workdir", str(workdir), "--port", str(port),
         "--max-batch", str(max_batch)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"metatrain serve exited: {server.stderr.read()[-3000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1).read()
            return server
        except OSError:
            time.sleep(0.2)
    server.kill()
    raise RuntimeError("metatrain serve did not start in 300 s")


def _text(kind: str, choice) -> str:
    if kind == "chat":
        delta = choice.delta
        return (delta.content or "") + ((delta.model_extra or {}).get("reasoning_content") or "")
    return choice.text or ""


async def _request(client, model: str, max_tokens: int, seed: int, *, kind: str = "chat",
                   content: str = "What is a river?") -> dict:
    """One streamed request: its latency, TTFT, completion tokens and when it ended."""
    start = time.perf_counter()
    options = {"model": model, "max_tokens": max_tokens, "temperature": 0.8, "seed": seed, "stream": True,
               "stream_options": {"include_usage": True}}
    if kind == "chat":
        stream = await client.chat.completions.create(messages=[{"role": "user", "content": content}], **options)
    else:
        stream = await client.completions.create(prompt=content, **options)
    first, tokens = None, 0
    async for chunk in stream:
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
        if first is None and any(_text(kind, c) for c in chunk.choices):
            first = time.perf_counter()
    end = time.perf_counter()
    return {"latency": end - start, "ttft": (first or end) - start, "tokens": tokens, "start": start, "end": end,
            "max_tokens": max_tokens}


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _level(client, model: str, clients: int, requests: int, lengths: list[int], seconds: float) -> dict:
    done: list[dict] = []
    stop_at = time.monotonic() + seconds

    async def one_client(index: int) -> None:
        for k in range(requests):
            if time.monotonic() > stop_at:
                return
            max_tokens = lengths[(index + k) % len(lengths)]
            done.append(await _request(client, model, max_tokens, 1000 * index + k,
                                       content=f"Question {index}.{k}: what is a river?"))

    start = time.perf_counter()
    await asyncio.gather(*(one_client(i) for i in range(clients)))
    elapsed = time.perf_counter() - start
    latencies, ttfts = [r["latency"] for r in done], [r["ttft"] for r in done]
    return {"clients": clients, "requests": len(done), "seconds": elapsed,
            "tokens": sum(r["tokens"] for r in done), "tokens_per_s": sum(r["tokens"] for r in done) / elapsed,
            "p50_s": statistics.median(latencies), "p99_s": _percentile(latencies, 0.99),
            "ttft_p50_s": statistics.median(ttfts), "ttft_p99_s": _percentile(ttfts, 0.99)}


async def _warm_up(client, model: str, max_batch: int, args) -> None:
    """Bursts of 1, 2, 4, ... max_batch concurrent requests, then every level once
    unmeasured: every admission, prompt and row-count bucket the measurement meets is
    compiled before it starts."""
    n = 1
    while True:
        await asyncio.gather(*(_request(client, model, args.lengths[i % len(args.lengths)], i,
                                        content=f"Question {i}.0: what is a river?") for i in range(n)))
        if n >= max_batch:
            break
        n = min(2 * n, max_batch)
    for clients in args.levels:
        await _level(client, model, clients, args.requests, args.lengths, args.seconds)


async def _bench(port: int, args, max_batch: int) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600)
    model = (await client.models.list()).data[0].id
    await _warm_up(client, model, max_batch, args)
    await _head_of_line_probe(client, model)
    lone = [await _request(client, model, LONE_TOKENS, 42) for _ in range(5)]
    levels = [await _level(client, model, n, args.requests, args.lengths, args.seconds) for n in args.levels]
    hol = await _head_of_line_probe(client, model)
    await client.close()
    return {"max_batch": max_batch, "levels": levels, "head_of_line": hol,
            "lone": {"latency_s": statistics.median(r["latency"] for r in lone),
                     "ttft_s": statistics.median(r["ttft"] for r in lone),
                     "tokens": lone[0]["tokens"]}}


async def _head_of_line_probe(client, model: str) -> dict:
    """A long streamed completion (100 tokens); as soon as its first text has arrived, a
    short one (4 tokens). Returns both requests' times (relative to the long one's send)."""
    first_text = asyncio.Event()
    result: dict = {}

    async def long_reply() -> None:
        start = time.perf_counter()
        stream = await client.completions.create(model=model, prompt="The river rises in the north and",
                                                 max_tokens=100, temperature=0.8, seed=7, stream=True,
                                                 stream_options={"include_usage": True})
        tokens = 0
        async for chunk in stream:
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
            if any(c.text for c in chunk.choices):
                first_text.set()
        result["long"] = {"start": start, "end": time.perf_counter(), "tokens": tokens}
        first_text.set()

    task = asyncio.ensure_future(long_reply())
    await first_text.wait()
    short = await _request(client, model, 4, 8, kind="completion", content="A short one:")
    await task
    long = result["long"]
    t0 = long["start"]
    return {"long_tokens": long["tokens"], "long_end_s": long["end"] - t0, "short_tokens": short["tokens"],
            "short_sent_s": short["start"] - t0, "short_end_s": short["end"] - t0,
            "short_first": short["end"] < long["end"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=None, help="a trained run (default: train a tiny one)")
    p.add_argument("--train-steps", type=int, default=30, help="steps of the tiny run trained when no --workdir")
    p.add_argument("--max-batches", type=int, nargs="+", default=[1, 8, 32], help="the server's --max-batch values")
    p.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32], help="concurrent clients")
    p.add_argument("--lengths", type=int, nargs="+", default=[8, 32, 96], help="max_tokens the requests cycle through")
    p.add_argument("--requests", type=int, default=3, help="requests per client at each level")
    p.add_argument("--seconds", type=float, default=60.0, help="time limit per level (no new requests after it)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)

    results = []
    with tempfile.TemporaryDirectory(prefix="mt-serve-bench-") as tmp:
        workdir = args.workdir or _train_tiny(Path(tmp), args.train_steps)
        for max_batch in args.max_batches:
            port = _free_port()
            server = _start_server(workdir, port, max_batch, Path(tmp) / f"compilation-cache-{max_batch}")
            try:
                t0 = time.perf_counter()
                results.append(asyncio.run(_bench(port, args, max_batch)))
                print(f"  --max-batch {max_batch}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            finally:
                server.terminate()
                server.wait(timeout=60)
    _report(args, results, workdir)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def _report(args, results: list[dict], workdir: Path) -> None:
    import jax

    by = {r["max_batch"]: r for r in results}
    level = {(r["max_batch"], lv["clients"]): lv for r in results for lv in r["levels"]}
    print(f"\nserve benchmark: {f'tiny ({args.train_steps} steps)' if not args.workdir else workdir.name}, "
          f"max_tokens cycling {'/'.join(map(str, args.lengths))}, {args.requests} streamed chat requests a client, "
          f"temperature 0.8; {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, jax {jax.__version__}\n")
    print("| --max-batch | clients | requests | tokens | tokens/s | x 1 client at --max-batch 1 | p50 s | p99 s "
          "| TTFT p50 s | TTFT p99 s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    base = level.get((1, 1))
    for r in results:
        for lv in r["levels"]:
            ratio = f"{lv['tokens_per_s'] / base['tokens_per_s']:.1f}x" if base else "-"
            print(f"| {r['max_batch']} | {lv['clients']} | {lv['requests']} | {lv['tokens']:,} "
                  f"| {lv['tokens_per_s']:,.0f} | {ratio} | {lv['p50_s']:.3f} | {lv['p99_s']:.3f} "
                  f"| {lv['ttft_p50_s']:.3f} | {lv['ttft_p99_s']:.3f} |")
    print(f"\nA lone request (chat, max_tokens {LONE_TOKENS}, median of 5) and head-of-line blocking (a 100-token "
          "completion streaming, then a 4-token one sent; times from the long one's send):\n")
    print("| --max-batch | lone latency s | x at --max-batch 1 | lone TTFT s | long reply tokens | long ends s "
          "| short sent s | short ends s | short finished first |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in results:
        lone, hol = r["lone"], r["head_of_line"]
        ratio = f"{lone['latency_s'] / by[1]['lone']['latency_s']:.2f}x" if 1 in by else "-"
        print(f"| {r['max_batch']} | {lone['latency_s']:.3f} | {ratio} | {lone['ttft_s']:.3f} | {hol['long_tokens']} "
              f"| {hol['long_end_s']:.3f} | {hol['short_sent_s']:.3f} | {hol['short_end_s']:.3f} "
              f"| {'yes' if hol['short_first'] else 'no'} |")

    print("\nGoals:")
    if 1 in by and 32 in by:
        ratio = by[32]["lone"]["latency_s"] / by[1]["lone"]["latency_s"]
        print(f"  lone request at --max-batch 32 within 1.5x of --max-batch 1: {'met' if ratio <= 1.5 else 'MISSED'} "
              f"({ratio:.2f}x; before the engine: 7.9x)")
    for mb in (8, 32):
        at8, lone = level.get((mb, 8)), level.get((mb, 1))
        if at8 and base:
            ratio = at8["tokens_per_s"] / base["tokens_per_s"]
            print(f"  tokens/s at 8 clients, --max-batch {mb}, >= 2x one client at --max-batch 1: "
                  f"{'met' if ratio >= 2 else 'MISSED'} ({ratio:.1f}x)")
        if at8 and lone:
            ratio = at8["ttft_p50_s"] / lone["ttft_p50_s"]
            print(f"  p50 TTFT at 8 clients, --max-batch {mb}, <= 2x one client's: {'met' if ratio <= 2 else 'MISSED'} "
                  f"({ratio:.2f}x: {at8['ttft_p50_s']:.3f} s vs {lone['ttft_p50_s']:.3f} s)")
    for r in results:
        if r["max_batch"] > 1:
            hol = r["head_of_line"]
            print(f"  no head-of-line blocking at --max-batch {r['max_batch']}: "
                  f"{'met' if hol['short_first'] else 'MISSED'} (short ended at {hol['short_end_s']:.3f} s, "
                  f"long at {hol['long_end_s']:.3f} s)")


if __name__ == "__main__":
    sys.exit(main())
