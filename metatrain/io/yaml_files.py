"""YAML files read so that a hostile one costs little.

Only a regular file is opened (a FIFO would block the open, a device never ends), of at
most `MAX_YAML_FILE_BYTES`, as UTF-8 (the message gives the offset of the first bad
byte); `load_yaml` (`metatrain.io.strict_parsing`) then bounds nesting and alias
expansion and refuses duplicate keys. Run configs, sweep specs and tag registries are
all read through here.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import yaml

from metatrain.errors import UserError
from metatrain.io.outputs import describe_kind
from metatrain.io.storage import file_size, is_remote
from metatrain.io.strict_parsing import (
    DuplicateKeyError,
    describe_yaml_error,
    load_yaml,
)

#: Largest YAML file read, in bytes; a run config is a few KiB, the biggest tag registry
#: a few hundred. A file past it (or `/dev/zero` behind a link) is refused before it is read.
MAX_YAML_FILE_BYTES: int = 16 * 2**20

def read_yaml(path: Path, named_by: str = "config file") -> dict[str, Any]:
    """The mapping in YAML file `path`; `named_by` says who named it, for the messages.

    Only a regular file is opened (a FIFO would block the open, a device never ends),
    and only up to `MAX_YAML_FILE_BYTES`.

    Raises:
        UserError: the file is missing, not a regular file, too large, not UTF-8, not
            valid YAML (or past `load_yaml`'s limits), has a duplicate key, or holds
            something other than a mapping.
    """
    data = parse_yaml(path, read_yaml_text(path, named_by))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a config file is a mapping of sections, got {type(data).__name__}")
    return data


def read_yaml_text(path: Path, named_by: str) -> str:
    """The text of YAML file `path`, refused unless it is a regular UTF-8 file of a sane size."""
    if is_remote(str(path)):
        if path.is_dir():
            raise UserError(f"{named_by} {path} is a directory; give a YAML file")
        if not path.is_file():
            raise UserError(f"{named_by} {path} does not exist")
        size = file_size(path)
    else:
        try:
            info = os.stat(path)  # follows links; never opens, so a FIFO cannot block
        except FileNotFoundError:
            raise UserError(f"{named_by} {path} does not exist") from None
        if stat.S_ISDIR(info.st_mode):
            raise UserError(f"{named_by} {path} is a directory; give a YAML file")
        if not stat.S_ISREG(info.st_mode):
            raise UserError(f"{named_by} {path} is {describe_kind(info.st_mode)}, not a file; give a YAML file")
        size = info.st_size
    if size > MAX_YAML_FILE_BYTES:
        raise UserError(f"{path}: {size:,} bytes; a YAML file metatrain reads is at most "
                        f"{MAX_YAML_FILE_BYTES:,} (is it the right file?)")
    with path.open("rb") as handle:
        raw = handle.read(MAX_YAML_FILE_BYTES + 1)  # it may have grown since the stat
    if len(raw) > MAX_YAML_FILE_BYTES:
        raise UserError(f"{path}: more than {MAX_YAML_FILE_BYTES:,} bytes; a YAML file metatrain reads "
                        "is at most that (is it the right file?)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise UserError(f"{path}: not UTF-8 text: byte 0x{raw[e.start]:02x} at offset {e.start} (line {line}); "
                        "save it as UTF-8") from None


def parse_yaml(path: Path, text: str) -> Any:
    """`load_yaml(text)`, its errors one line naming `path`."""
    try:
        return load_yaml(text)
    except DuplicateKeyError as e:
        raise UserError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML: {describe_yaml_error(e)}") from None
