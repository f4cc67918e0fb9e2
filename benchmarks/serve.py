"""`metatrain serve` under load: N concurrent clients of the official `openai` package
against the server on 127.0.0.1.

    python benchmarks/serve.py [--workdir W] [--levels 1 8 32] [--requests 4] [--max-tokens 32]
                               [--max-batch 32] [--seconds 60] [--json OUT]

The server is started as its own process (`metatrain serve --workdir W --max-batch B`)
on a free port of 127.0.0.1 and warmed with one request. At each concurrency level N, N
clients each send `--requests` chat completions one after another (a closed loop: a
client sends its next request when its reply is complete), all with `max_tokens` tokens
at temperature 0.8 and different seeds; a level stops early after `--seconds`. Tokens
are the completion tokens the server reports (`usage.completion_tokens`), latency is
per request, from send to the complete reply.

Without `--workdir` a tiny run (configs/tiny.yaml, 20 steps) is trained into a
temporary directory first. The goal recorded in benchmarks/README.md: completion
tokens/s at concurrency 8 at least 3x the single-client rate.
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_tiny(directory: Path) -> Path:
    run = directory / "run"
    subprocess.run([sys.executable, "-m", "metatrain.cli", "train", "--config", str(REPO / "configs" / "tiny.yaml"),
                    "--workdir", str(run), "--set", "trainer.steps=20", "--set", "trainer.eval_every=0",
                    "--set", "trainer.progress=false"], check=True, capture_output=True,
                   env={**os.environ, "JAX_PLATFORMS": "cpu"})
    return run


def _start_server(workdir: Path, port: int, max_batch: int) -> subprocess.Popen:
    server = subprocess.Popen(
        [sys.executable, "-m", "metatrain.cli", "serve", "--workdir", str(workdir), "--port", str(port),
         "--max-batch", str(max_batch)],
        env={**os.environ, "JAX_PLATFORMS": "cpu"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
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


async def _level(client, model: str, concurrency: int, requests: int, max_tokens: int, seconds: float) -> dict:
    latencies: list[float] = []
    tokens = 0
    stop_at = time.monotonic() + seconds

    async def one_client(index: int) -> None:
        nonlocal tokens
        for k in range(requests):
            if time.monotonic() > stop_at:
                return
            t = time.perf_counter()
            reply = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": f"Question {index}.{k}: what is a river?"}],
                max_tokens=max_tokens, temperature=0.8, seed=1000 * index + k)
            latencies.append(time.perf_counter() - t)
            tokens += reply.usage.completion_tokens

    start = time.perf_counter()
    await asyncio.gather(*(one_client(i) for i in range(concurrency)))
    elapsed = time.perf_counter() - start
    ordered = sorted(latencies)
    return {"concurrency": concurrency, "requests": len(latencies), "seconds": elapsed,
            "requests_per_s": len(latencies) / elapsed, "tokens_per_s": tokens / elapsed,
            "p50_s": statistics.median(ordered), "p99_s": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]}


async def _bench(port: int, levels: list[int], requests: int, max_tokens: int, seconds: float) -> list[dict]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=300)
    model = (await client.models.list()).data[0].id
    await _level(client, model, 1, 2, max_tokens, seconds)  # warm-up: compiles the prompt buckets used
    results = [await _level(client, model, n, requests, max_tokens, seconds) for n in levels]
    await client.close()
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=None, help="a trained run (default: train a tiny one)")
    p.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32], help="concurrency levels")
    p.add_argument("--requests", type=int, default=4, help="requests per client at each level")
    p.add_argument("--max-tokens", type=int, default=32, help="max_tokens of every request")
    p.add_argument("--max-batch", type=int, default=32, help="the server's --max-batch")
    p.add_argument("--seconds", type=float, default=60.0, help="time limit per level")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="mt-serve-bench-") as tmp:
        workdir = args.workdir or _train_tiny(Path(tmp))
        port = _free_port()
        server = _start_server(workdir, port, args.max_batch)
        try:
            results = asyncio.run(_bench(port, args.levels, args.requests, args.max_tokens, args.seconds))
        finally:
            server.terminate()
            server.wait(timeout=60)

    single = next((r["tokens_per_s"] for r in results if r["concurrency"] == 1), None)
    print(f"\nserve benchmark  workdir={workdir.name if args.workdir else 'tiny (20 steps)'}  "
          f"max_tokens={args.max_tokens}  --max-batch {args.max_batch}  cores={len(os.sched_getaffinity(0))}")
    print("| clients | requests | requests/s | tokens/s | x 1 client | p50 s | p99 s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        ratio = f"{r['tokens_per_s'] / single:.1f}x" if single else ""
        print(f"| {r['concurrency']} | {r['requests']} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:,.0f} | "
              f"{ratio} | {r['p50_s']:.3f} | {r['p99_s']:.3f} |")
    at8 = next((r["tokens_per_s"] for r in results if r["concurrency"] == 8), None)
    if single and at8:
        print(f"goal: tokens/s at 8 clients >= 3x one client: {'met' if at8 >= 3 * single else 'NOT met'} "
              f"({at8 / single:.1f}x)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
