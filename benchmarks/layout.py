"""How the tree shows the architecture: modules, imports against the layers, cycles, sizes.

    python benchmarks/layout.py                 # the working tree
    python benchmarks/layout.py --before REV    # REV's tree beside the working tree

The layer order is the import-linter contract's (`[tool.importlinter]` in
pyproject.toml, read from the working tree), so both trees are judged by the same
design. A module belongs to the layer of the folder it sits in (in an older tree, a
part's `cli.py` counts as that part, and `train/checkpoint.py` as `train`), so the
table shows where code sat against the layering; only the I/O modules that lived at
the root (`storage`, `formats`, ...) are counted as `io`, since they had no folder.

Printed per tree:
    modules            .py files under metatrain/
    internal imports   import statements naming a metatrain module
    inside functions   of those, how many sit inside a function (hidden from a reader)
    back-arrows        imports from a layer to a layer above it
    subpackage cycles  pairs of top-level parts that import each other
    over 500 lines     modules longer than 500 lines
and the five longest modules and functions.
"""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
import tarfile
import tempfile
import tomllib
from collections import defaultdict
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
#: Root modules of older trees that now live in the base I/O layer.
MOVED_TO_IO = {"storage", "formats", "compression", "outputs", "strict_parsing", "paths"}


def layer_order() -> dict[str, int]:
    """Top-level part -> rank (0 = top), from the layers contract of the working tree."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    layers = next(c for c in config["contracts"] if c["type"] == "layers")["layers"]
    return {name.strip(): rank for rank, layer in enumerate(layers) for name in layer.split("|")}


def part_of(module: str) -> str:
    """The top-level part a module belongs to, by the current design."""
    parts = module.split(".")[1:]
    if not parts:
        return "(package)"
    if parts[0] in MOVED_TO_IO:
        return "io"
    return parts[0]


@dataclass
class Function:
    name: str
    lines: int


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    names = list(rel.parts)
    return ".".join(names[:-1] if names[-1] == "__init__" else names)


def imports_of(tree: ast.AST) -> list[tuple[str, bool]]:
    """(imported metatrain module, inside a function) for each import statement."""
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inside.update(id(sub) for sub in ast.walk(node) if isinstance(sub, (ast.Import, ast.ImportFrom)))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        else:
            continue
        found += [(n, id(node) in inside) for n in names if n.split(".")[0] == "metatrain"]
    return found


def measure(root: Path) -> dict:
    """The table's numbers for the package directory `root` (…/metatrain)."""
    order = layer_order()
    files = sorted(root.rglob("*.py"))
    sizes, functions, edges = {}, [], defaultdict(set)
    total = lazy = back = 0
    back_examples: list[str] = []
    for path in files:
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text)
        name = module_name(path, root)
        sizes[name] = len(text.splitlines())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.append(Function(f"{name}.{node.name}", node.end_lineno - node.lineno + 1))
        for target, inside in imports_of(tree):
            total += 1
            lazy += inside
            a, b = part_of(name), part_of(target)
            if a == b or a not in order or b not in order:
                continue
            edges[a].add(b)
            if order[b] < order[a]:
                back += 1
                back_examples.append(f"{name} -> {target}")
    cycles = sorted({tuple(sorted((a, b))) for a in edges for b in edges[a] if a in edges.get(b, ())})
    return {
        "modules": len(files),
        "lines": sum(sizes.values()),
        "internal imports": total,
        "inside functions": lazy,
        "back-arrows": back,
        "subpackage cycles": len(cycles),
        "over 500 lines": sum(n > 500 for n in sizes.values()),
        "_cycles": cycles,
        "_back": back_examples,
        "_longest": sorted(sizes.items(), key=lambda kv: -kv[1])[:5],
        "_functions": sorted(functions, key=lambda f: -f.lines)[:5],
    }


def tree_at(rev: str, into: Path) -> Path:
    """The metatrain/ folder of git revision `rev`, extracted under `into`."""
    archive = subprocess.run(["git", "archive", rev, "metatrain"], cwd=REPO, check=True, capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into / "metatrain"


def print_table(columns: dict[str, dict]) -> None:
    keys = ["modules", "lines", "internal imports", "inside functions", "back-arrows", "subpackage cycles", "over 500 lines"]
    names = list(columns)
    print("| measure | " + " | ".join(names) + " |")
    print("| --- | " + " | ".join("---:" for _ in names) + " |")
    for key in keys:
        print(f"| {key} | " + " | ".join(str(columns[n][key]) for n in names) + " |")
    for n in names:
        m = columns[n]
        print(f"\n{n}: longest modules: " + ", ".join(f"{k} ({v})" for k, v in m["_longest"]))
        print(f"{n}: longest functions: " + ", ".join(f"{f.name} ({f.lines})" for f in m["_functions"]))
        if m["_cycles"]:
            print(f"{n}: subpackage cycles: " + ", ".join(f"{a} <-> {b}" for a, b in m["_cycles"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", metavar="REV", help="also measure this git revision's tree")
    parser.add_argument("--show-back-arrows", action="store_true", help="list every import against the layers")
    args = parser.parse_args(argv)
    columns = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.before:
            columns[f"before ({args.before})"] = measure(tree_at(args.before, Path(tmp)))
        columns["now"] = measure(REPO / "metatrain")
    print_table(columns)
    if args.show_back_arrows:
        for name, m in columns.items():
            print(f"\n{name}: back-arrows\n  " + "\n  ".join(m["_back"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
