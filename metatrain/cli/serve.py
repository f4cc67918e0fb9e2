"""`metatrain serve`: a trained model behind an OpenAI-compatible HTTP API (uvicorn).

Parsing only; the work is `metatrain.serve.server.serve_workdir`.
"""

from __future__ import annotations

import argparse

from metatrain.cli.options import add_mesh_option
from metatrain.io.storage import as_path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve a checkpoint over the OpenAI API",
        description=(
            "Serve the latest checkpoint of a work directory over the OpenAI API: GET /v1/models, "
            "POST /v1/completions (human-mode text; \"mode\": \"ai\" locks the reply into AI mode) and "
            "POST /v1/chat/completions (replies always under the AI-mode lock; thinking comes back as "
            "reasoning_content). Concurrent requests are decoded together, up to --max-batch rows at once. "
            "Requests may add \"control\" (a control of the tag registry, e.g. \"good\")."
        ),
    )
    p.add_argument("--workdir", type=as_path, required=True, metavar="DIR",
                   help="a `metatrain train` work directory, or gs://BUCKET/PATH (its latest checkpoint); "
                        "its name is the model's id")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, metavar="N", help="port to listen on (default 8000)")
    p.add_argument("--max-batch", type=int, default=8, metavar="B",
                   help="rows decoded together by each engine (locked, unlocked); default 8. Checked "
                        "against the device's free memory before anything is allocated")
    p.add_argument("--hide-thinking", action="store_true",
                   help="leave thinking out of every reply (a request can hide it, never reveal it)")
    add_mesh_option(p)
    p.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    """Load the checkpoint (errors end the command before the server starts), then serve."""
    from metatrain.engine.compilation_cache import enable_compilation_cache
    from metatrain.serve.server import serve_workdir

    enable_compilation_cache()

    serve_workdir(args.workdir, host=args.host, port=args.port, max_batch=args.max_batch,
                  hide_thinking=args.hide_thinking, mesh_settings=args.mesh_settings)
    return 0
