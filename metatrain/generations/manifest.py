"""`DIR/manifest.json`: the state of a generational loop, rewritten atomically after every stage.

    {
      "kind": "metatrain generations", "version": 1,
      "spec": {"path": ..., "sha256": ..., "data": {...the resolved spec...}},
      "status": "running" | "done" | "failed" | "stopped",
      "error": null | "one line",
      "generations": [                          # the compared part: equal for equal runs
        {"generation": 0,
         "stages": {"corpus": {"status": "done", "error": null}, "train": {...}, "eval": {...}},
         "results": {"corpus": {...}, "train": {...}, "eval": {...}}},
        ...
      ],
      "timings": {"gen-0/corpus": {"seconds": 1.5, "attempts": 1}, ...},   # how long, how often
      "current": null | {"stage": "gen-1/train", "pid": 1234}              # the child running now
    }

A stage's status is "pending", "running", "done" or "failed". `generations` holds only
what the run computed from its files (statuses, errors and results), so a run killed at
any point and resumed ends with the same `generations` as one that never stopped;
timings, attempts and the running child's pid are kept apart (`timings`, `current`).

`DIR` is a loop's directory when it is absent, empty, or holds a manifest of this
kind; anything else is refused without being touched.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from metatrain.errors import UserError
from metatrain.io.outputs import write_atomically

MANIFEST = "manifest.json"
KIND = "metatrain generations"
VERSION = 1
STAGES: tuple[str, ...] = ("corpus", "train", "eval")
STATUSES: tuple[str, ...] = ("pending", "running", "done", "failed")

Manifest = dict[str, Any]


def generation_dir(n: int) -> str:
    """`gen-<n>`, the generation's directory relative to DIR."""
    return f"gen-{n}"


def stage_name(n: int, stage: str) -> str:
    """`gen-<n>/<stage>`: how messages, logs and timings name a stage."""
    return f"{generation_dir(n)}/{stage}"


def new_generation(n: int) -> dict[str, Any]:
    """Generation `n`'s entry, every stage pending and no result yet."""
    return {"generation": n, "stages": {s: {"status": "pending", "error": None} for s in STAGES}, "results": {}}


def new_manifest(spec_path: str, spec_sha256: str, spec_data: dict[str, Any], generations: int) -> Manifest:
    """The manifest of a loop that has not started."""
    return {
        "kind": KIND, "version": VERSION,
        "spec": {"path": spec_path, "sha256": spec_sha256, "data": spec_data},
        "status": "running", "error": None,
        "generations": [new_generation(n) for n in range(generations)],
        "timings": {}, "current": None,
    }


def check_out_dir(directory: Path) -> bool:
    """Whether `directory` holds a loop to resume (False: absent or empty, a new loop).

    Raises:
        UserError: `directory` is a file or a link, or is not empty and holds no manifest
            of a generational loop (nothing in it is touched).
    """
    if directory.is_symlink() or (directory.exists() and not directory.is_dir()):
        raise UserError(f"--out {directory} exists and is not a directory; choose another --out")
    if not directory.exists() or not any(directory.iterdir()):
        return False
    path = directory / MANIFEST
    if not path.is_file() or path.is_symlink():
        raise UserError(f"--out {directory} is not empty and holds no {MANIFEST} of `metatrain generations run`; "
                        "it is left as it is: choose another --out")
    read_manifest(directory)
    return True


def read_manifest(directory: Path) -> Manifest:
    """The manifest in `directory`.

    Raises:
        UserError: no manifest, or a file that is not a generations manifest.
    """
    path = directory / MANIFEST
    if not path.is_file():
        raise UserError(f"{path} does not exist: start the loop with `metatrain generations run SPEC --out {directory}`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); it is left as it is: choose another --out") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != KIND:
        raise UserError(f"{path} is not the manifest of `metatrain generations run`; it is left as it is: "
                        "choose another --out")
    if manifest.get("version") != VERSION or not isinstance(manifest.get("generations"), list):
        raise UserError(f"{path}: a manifest of version {manifest.get('version')!r}, which this metatrain "
                        f"(version {VERSION}) cannot resume; choose another --out")
    return manifest


def write_manifest(directory: Path, manifest: Manifest) -> None:
    """Replace the manifest atomically (a crash leaves the old one or the new one)."""
    text = json.dumps(_json_safe(manifest), indent=1, allow_nan=False) + "\n"
    write_atomically(directory / MANIFEST, text, option="--out")


def compared_part(manifest: Manifest) -> dict[str, Any]:
    """What equal runs agree on: the spec, the final status and every generation's
    statuses and results (not the timings or the running child)."""
    return {k: manifest.get(k) for k in ("kind", "version", "spec", "status", "error", "generations")}


def _json_safe(value: Any) -> Any:
    """Non-finite floats as null (JSON has none)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value
