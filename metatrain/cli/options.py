"""Flags that several commands share, defined once so they read and check alike."""

from __future__ import annotations

import argparse

from metatrain.io.compression import MAX_LINE_BYTES


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
