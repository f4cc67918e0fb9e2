"""`serve_workdir`: a run's latest checkpoint behind the OpenAI API, served by uvicorn.

The options are checked and the checkpoint loads before the server starts, so a bad
option or run ends the command before anything listens. The app is `app.create_app`;
uvicorn is imported when serving starts.
"""

from __future__ import annotations

from pathlib import Path

from metatrain.errors import UserError


def serve_workdir(workdir: Path, *, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 8,
                  hide_thinking: bool = False) -> None:
    """Load the latest checkpoint of `workdir` and serve it until the server stops.

    Args:
        workdir: a `metatrain train` work directory; its name is the model's id.
        host: address to listen on.
        port: port to listen on (0-65535).
        max_batch: rows decoded together by each engine.
        hide_thinking: leave thinking out of every reply.

    Raises:
        UserError: `max_batch` < 1, `port` out of range, or no loadable checkpoint.
    """
    import uvicorn

    from metatrain.generate.generator import Generator
    from metatrain.serve.app import create_app

    if max_batch < 1:
        raise UserError(f"--max-batch must be >= 1, got {max_batch}")
    if not 0 <= port <= 65535:
        raise UserError(f"--port must be between 0 and 65535, got {port}")
    generator = Generator.load(workdir)
    app = create_app(generator, model_id=workdir.name, max_batch=max_batch, hide_thinking=hide_thinking)
    uvicorn.run(app, host=host, port=port, lifespan="on", log_level="info")
