"""The import-linter contract (pyproject.toml `[tool.importlinter]`) holds, and it can fail.

`lint-imports` runs on the real tree, then on copies of the package with one
deliberately wrong import each: a model importing the trainer, a reader of runs
importing `metatrain.train`, the base layer importing a part above it, and a cycle
between two sibling modules. Each copy must be refused, naming the import.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LINT_IMPORTS = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))

pytestmark = pytest.mark.skipif(not Path(LINT_IMPORTS).exists(), reason="import-linter is not installed (the dev extra)")


def _lint(root: Path) -> subprocess.CompletedProcess:
    """`lint-imports` with the repository's contract over the `metatrain` package under `root`."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [LINT_IMPORTS, "--config", str(REPO / "pyproject.toml"), "--no-cache"],
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )


def _copy_with(tmp_path: Path, module: str, line: str) -> Path:
    """A copy of the package with `line` appended to `module` (a path under metatrain/)."""
    shutil.copytree(REPO / "metatrain", tmp_path / "metatrain", ignore=shutil.ignore_patterns("__pycache__"))
    with open(tmp_path / "metatrain" / module, "a", encoding="utf-8") as handle:
        handle.write(f"\n{line}  # deliberately wrong\n")
    return tmp_path


def test_the_tree_keeps_every_contract():
    result = _lint(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "refusal"),
    [
        ("models/transformer.py", "import metatrain.train.loop",
         "metatrain.models.transformer -> metatrain.train.loop"),
        ("engine/sampling.py", "from metatrain.train import resize",
         "metatrain.engine.sampling -> metatrain.train"),
        ("io/storage.py", "import metatrain.data.packing",
         "metatrain.io.storage -> metatrain.data.packing"),
        ("roles.py", "import metatrain.loss",
         "metatrain.roles -> metatrain.loss"),
    ],
    ids=["model-imports-trainer", "reader-imports-train", "base-imports-data", "upward-between-roots"],
)
def test_a_wrong_import_breaks_the_contract(tmp_path, module, line, refusal):
    result = _lint(_copy_with(tmp_path, module, line))
    assert result.returncode != 0
    assert refusal in result.stdout, result.stdout[-3000:]


def test_a_cycle_between_sibling_modules_breaks_the_contract(tmp_path):
    # sweep.fit imports sweep.plots; plots importing fit closes a circle inside one layer.
    result = _lint(_copy_with(tmp_path, "sweep/plots.py", "import metatrain.sweep.fit"))
    assert result.returncode != 0
    assert "No cycles are allowed in metatrain.sweep" in result.stdout, result.stdout[-3000:]
