"""Flags that several commands share, defined once so they read and check alike."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from metatrain.io.compression import MAX_LINE_BYTES
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
