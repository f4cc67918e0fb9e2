"""Where metatrain's shipped files live: the default tag registry, configs and the sample.

metatrain is installed from its source tree (`pip install -e .`), so the shipped
files are found relative to the repository root.
"""

from __future__ import annotations

from pathlib import Path

REPO_ROOT: Path = Path(__file__).resolve().parent.parent.parent
CONFIGS_DIR: Path = REPO_ROOT / "configs"
DEFAULT_CONFIG: Path = CONFIGS_DIR / "default.yaml"
DEFAULT_TAGS: Path = REPO_ROOT / "tokenizer" / "tags.yaml"
SAMPLE_DIR: Path = REPO_ROOT / "data" / "sample"
SAMPLE_CORPUS: Path = SAMPLE_DIR / "factbook.jsonl"
SAMPLE_TOKENIZER: Path = REPO_ROOT / "tokenizer" / "sample.model"
