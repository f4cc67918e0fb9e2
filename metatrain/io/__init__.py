"""The base layer: where bytes live and how they are read and written.

    storage         local paths and gs:// URLs behind one `as_path`, appends, globs
    compression     .gz/.zst/.bz2/.xz streams and their limits
    formats         JSON Lines, Parquet and ArrayRecord corpora, records by position
    strict_parsing  YAML and JSON that refuse duplicate keys and bad text
    dataclass_yaml  YAML files as frozen dataclasses: `base:` overlays, overrides, type checks
    outputs         write-aside-then-rename outputs, output-directory checks
    spill           the private directory of spill files, removed when the process exits
    paths           where the shipped files (configs, sample corpus, tags) are

Everything above may import this folder; it imports only `metatrain.errors` (the
import-linter contract in pyproject.toml).
"""
