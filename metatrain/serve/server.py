"""`serve_workdir`: a run's latest checkpoint behind the OpenAI API, served by uvicorn.

Everything that can fail at start-up fails before anything listens, in one line with the
fix: the options; the checkpoint; the memory the engines' batches need (the KV cache of
`--max-batch` rows at the model's context, `engine.check_batch_fits`) and a context too
large to serve; then the engines compile and run once (an allocation that still fails is
one line, exit 2); then the port is bound (one in use is one line). Only then does
uvicorn run the app (`app.create_app`), whose start-up finds the engines warm. Left to
itself, uvicorn reports a failed start-up with a traceback and exits 3, the status that
means divergence here.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from metatrain.errors import FaultError, UserError, describe_cause, is_out_of_memory

#: Engines the app decodes with (locked, unlocked); each may hold a batch at once.
ENGINES: int = 2


def serve_workdir(workdir: Path, *, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 8,
                  hide_thinking: bool = False, mesh_settings: Sequence[str] = ()) -> None:
    """Load the latest checkpoint of `workdir` and serve it until the server stops.

    Args:
        workdir: a `metatrain train` work directory; its name is the model's id.
        host: address to listen on.
        port: port to listen on (0-65535).
        max_batch: rows decoded together by each engine.
        hide_thinking: leave thinking out of every reply.
        mesh_settings: `--set mesh.KEY=VALUE` values: the mesh the model is restored onto
            (empty: every visible device, in a layout the model allows).

    Raises:
        UserError: `max_batch` < 1 or more rows than memory holds, `port` out of range or
            taken, no loadable checkpoint, a context too large to serve, or the engines
            running out of memory at start-up.
        FaultError: uvicorn stopped before it served (its log says why).
    """
    import uvicorn

    from metatrain.engine.capacity import device_of
    from metatrain.engine.engine import check_batch_fits
    from metatrain.generate.generator import Generator
    from metatrain.serve.app import create_app

    if max_batch < 1:
        raise UserError(f"--max-batch must be >= 1, got {max_batch}")
    if not 0 <= port <= 65535:
        raise UserError(f"--port must be between 0 and 65535, got {port}")
    generator = Generator.load(workdir, mesh_settings=list(mesh_settings))
    check_batch_fits(generator.model_config, max_batch, engines=ENGINES, device=device_of(generator.params),
                     mesh=generator.mesh)
    app = create_app(generator, model_id=workdir.name, max_batch=max_batch, hide_thinking=hide_thinking)
    _warm_up(app.state.service, max_batch)
    try:
        listener = _listen(host, port)
    except BaseException:
        app.state.service.stop()  # the warmed engines' decode threads
        raise
    config = uvicorn.Config(app, lifespan="on", log_level="info")
    server = uvicorn.Server(config)
    print(f"metatrain serve: {workdir.name} on http://{host}:{listener.getsockname()[1]}/v1", file=sys.stderr,
          flush=True)
    try:
        server.run(sockets=[listener])
    except SystemExit as e:  # uvicorn's own start-up failure (sys.exit(3)): not a divergence
        if server.started:
            raise
        raise FaultError(f"the HTTP server stopped before it served (uvicorn: exit {e.code}; its log above says why)") from None
    finally:
        listener.close()


def _warm_up(service, max_batch: int) -> None:
    """Compile and run both engines once before anything listens (the app's start-up then
    finds them warm). Out of memory is one line with the fix; the engines are stopped."""
    try:
        asyncio.run(service.start())
    except Exception as e:  # only running out of memory is the user's to fix
        service.stop()
        if not is_out_of_memory(e):
            raise
        raise UserError(
            f"the engines ran out of memory at start-up with --max-batch {max_batch} ({describe_cause(e)}); "
            "give a smaller --max-batch"
        ) from None


def _listen(host: str, port: int) -> socket.socket:
    """A socket bound to `host:port` (uvicorn listens on it).

    Raises:
        UserError: the address cannot be bound (in use, not this machine's, not allowed).
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise UserError(f"--host {host}: {describe_cause(e)}; give an address of this machine") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {describe_cause(e)}; choose another --port") from None
    return sock
