"""Flags that several commands share, defined once so they read and check alike."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from metatrain.errors import UserError
from metatrain.io.compression import MAX_LINE_BYTES
from metatrain.parallel.mesh import parse_mesh_setting
from metatrain.run.layout import refuse_inside_checkpoints


def positive_int(text: str) -> int:
    """argparse `type=`: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not >= 1")
    return value


def add_max_line_bytes(parser: argparse.ArgumentParser) -> None:
    """`--max-line-bytes N`: the longest JSON Lines line read; a longer one is a bad record."""
    parser.add_argument("--max-line-bytes", type=positive_int, default=MAX_LINE_BYTES, metavar="N",
                        help="longest JSON Lines line read; a longer one is a bad record, skipped without "
                             "being held (default: %(default)s, 64 MiB)")


def output_path(option: str, convert: Callable[[str], Any] = str) -> Callable[[str], Any]:
    """argparse `type=` for an output flag: `convert(text)`, refused (one line, exit 2) when
    it lies inside a run's `checkpoints/`, which that run lists, moves aside and deletes."""

    def check(text: str) -> Any:
        value = convert(text)
        refuse_inside_checkpoints(value, option)
        return value

    return check


def mesh_setting(text: str) -> str:
    """argparse `type=` for `--set mesh.KEY=VALUE`: the text, refused (one line, exit 2)
    unless KEY is data, fsdp or tensor and VALUE an integer >= 1 or -1."""
    try:
        parse_mesh_setting(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--set ")) from None
    return text


def add_mesh_option(parser: argparse.ArgumentParser) -> None:
    """`--set mesh.KEY=VALUE` (repeatable, dest `mesh_settings`, [] when not given): the
    inference mesh, `metatrain.parallel.mesh.inference_mesh_config`."""
    parser.add_argument(
        "--set", dest="mesh_settings", action="append", default=[], type=mesh_setting, metavar="mesh.KEY=VALUE",
        help="the device mesh the model is sharded over, KEY one of data (rows split), fsdp (parameters "
             "sharded along d_model) and tensor (heads, MLP and vocab split), VALUE a size or -1 for the "
             "devices left over (repeatable). Default: every visible device, fsdp as large as d_model "
             "allows and the rest on data; axes not given are data=-1, fsdp=1, tensor=1, and sizes without "
             "a -1 may use fewer devices than there are (--set mesh.data=1: the first device only)",
    )
