"""Spill files: this process's private directory under `$TMPDIR`, removed at exit.

Decompressed corpora (`metatrain.io.compression.random_access_path`) and spilled seqio
Tasks (`metatrain.data.spilled`) are written here.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

_spill_dir: Path | None = None


def _remove_spill_dir(owner: int, directory: Path) -> None:
    if os.getpid() == owner:  # never from a forked child that inherited the handler
        shutil.rmtree(directory, ignore_errors=True)


def spill_directory() -> Path:
    """This process's private directory under `$TMPDIR` for spill files (decompressed
    corpora, seqio Tasks), removed when the process that made it exits."""
    global _spill_dir
    if _spill_dir is None:
        _spill_dir = Path(tempfile.mkdtemp(prefix="metatrain-spill-"))
        atexit.register(_remove_spill_dir, os.getpid(), _spill_dir)
    return _spill_dir
