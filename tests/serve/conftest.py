"""Fixtures of the serving tests: `metatrain serve`'s real app under uvicorn, on 127.0.0.1."""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
from pathlib import Path

import pytest
import uvicorn
from starlette.applications import Starlette

from metatrain.generate.generator import Generator
from metatrain.serve.app import create_app


@dataclasses.dataclass
class Served:
    """A running server: where it listens, its app (and engines), and the model it serves."""

    port: int
    app: Starlette
    generator: Generator
    model: str

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


@pytest.fixture(scope="module")
def served(workdir: Path):
    """The app for the tiny trained run (`workdir`), 4 rows a batch, in a background thread."""
    generator = Generator.load(workdir)
    app = create_app(generator, model_id=workdir.name, max_batch=4)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, http="h11", lifespan="on", log_level="critical", log_config=None,
                            access_log=False, timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="serve-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 120.0
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the serve app did not start")
        time.sleep(0.01)
    yield Served(sock.getsockname()[1], app, generator, workdir.name)
    server.should_exit = True
    thread.join(timeout=30.0)
    sock.close()
