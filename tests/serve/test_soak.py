"""A soak of `metatrain serve` (`-m slow`, a few minutes): streaming clients that hang up
mid-reply next to clients that read to the end. No slot is lost (every engine is idle
at the end and still answers) and the process's memory stays flat."""

from __future__ import annotations

import asyncio
import http.client
import json
import random
import time

import pytest

pytestmark = pytest.mark.slow

SECONDS = 150.0
CLIENTS = 12


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        line = next(l for l in f if l.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def _hang_up_mid_stream(port: int, model: str, seed: int) -> None:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": f"Question {seed}: why?"}],
                       "max_tokens": 90, "temperature": 1.0, "seed": seed, "stream": True})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    response.read1(64)  # the first event, then the client goes away
    conn.sock.close()
    conn.close()


def test_clients_that_hang_up_lose_no_slot_and_memory_stays_flat(served):
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=served.base_url, api_key="unused", max_retries=0, timeout=120)
    rng = random.Random(0)
    counts = {"complete": 0, "hung_up": 0}
    samples: list[tuple[float, float]] = []

    async def one_client(index: int, stop_at: float) -> None:
        seed = 1000 * index
        while time.monotonic() < stop_at:
            seed += 1
            if rng.random() < 0.5:
                await asyncio.to_thread(_hang_up_mid_stream, served.port, served.model, seed)
                counts["hung_up"] += 1
                continue
            stream = await client.chat.completions.create(
                model=served.model, messages=[{"role": "user", "content": f"Tell me about rivers {seed}."}],
                max_tokens=rng.randint(4, 60), temperature=0.8, seed=seed, stream=True)
            async for _ in stream:
                pass
            counts["complete"] += 1

    async def monitor(stop_at: float) -> None:
        start = time.monotonic()
        while time.monotonic() < stop_at:
            samples.append((time.monotonic() - start, _rss_mib()))
            await asyncio.sleep(5)

    async def main() -> None:
        stop_at = time.monotonic() + SECONDS
        await asyncio.gather(monitor(stop_at), *(one_client(i, stop_at) for i in range(CLIENTS)))

    asyncio.run(main())
    deadline = time.monotonic() + 10
    while any(e.active_rows for e in served.app.state.engines) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(e.active_rows == 0 for e in served.app.state.engines), "a slot was lost"
    assert counts["hung_up"] >= 50 and counts["complete"] >= 50, counts
    assert served.app.state.service.hangups > 0  # rows really were cancelled mid-reply
    # Still serving, every engine, after the soak.
    from openai import OpenAI

    sync = OpenAI(base_url=served.base_url, api_key="unused", max_retries=0, timeout=60)
    assert sync.chat.completions.create(model=served.model, messages=[{"role": "user", "content": "Rain?"}],
                                        max_tokens=4).choices[0].finish_reason in {"stop", "length"}
    assert sync.completions.create(model=served.model, prompt="Rain:", max_tokens=4).choices[0].text is not None
    # Memory: after the first third (warm-up, compiles, caches), growth stays small.
    settled = [rss for t, rss in samples if t >= SECONDS / 3]
    assert max(settled) - min(settled) < 64, samples
