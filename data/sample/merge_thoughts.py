"""Merges the text skeleton, the written thinking blocks and the synthetic documents.

Inputs:
    - the skeleton from `build_corpus.py` (text segments only);
    - `thoughts/*.txt`: thinking blocks, one section per document:

          # europe/fr 13
          1 A thought that goes after passage 1.
          3 A thought that goes after passage 3.

      The header names the document and how many passages it has in the skeleton (a
      guard: if the splitting ever changes, the numbers no longer match and the merge
      stops instead of putting thoughts after the wrong passages). Each line is a
      1-based passage number and the thought placed right after that passage.
    - `synthetic.jsonl`: documents written for metatrain (AI mode, control tokens),
      copied as they are.

Only skeleton documents that have a section in `thoughts/` go into the output, in
skeleton order, followed by the synthetic documents.

Usage:
    python data/sample/merge_thoughts.py /tmp/factbook_skeleton.jsonl --out data/sample/factbook.jsonl
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
_HEADER = re.compile(r"#\s+(\S+)\s+(\d+)\s*$")
_THOUGHT = re.compile(r"(\d+)\s+(\S.*)$")


def read_thoughts(paths: list[Path]) -> dict[str, tuple[int, dict[int, str]]]:
    """Parses thought files into {doc id: (passage count, {passage number: thought})}."""
    sections: dict[str, tuple[int, dict[int, str]]] = {}
    for path in paths:
        current: dict[int, str] | None = None
        doc_id = ""
        for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            where = f"{path}:{line_no}"
            if not line.strip():
                continue
            if header := _HEADER.match(line):
                doc_id = header.group(1)
                if doc_id in sections:
                    raise SystemExit(f"{where}: document {doc_id} already has a section; merge the two")
                current = {}
                sections[doc_id] = (int(header.group(2)), current)
            elif thought := _THOUGHT.match(line):
                if current is None:
                    raise SystemExit(f"{where}: thought before any `# id count` header")
                number = int(thought.group(1))
                if number in current:
                    raise SystemExit(f"{where}: {doc_id} has two thoughts after passage {number}; keep one")
                current[number] = thought.group(2).strip()
            else:
                raise SystemExit(f"{where}: expected `# id count` or `N thought`, got {line[:60]!r}")
    return sections


def interleave(doc: dict, count: int, thoughts: dict[int, str]) -> dict:
    """A copy of skeleton `doc` with each thought after its passage."""
    passages = doc["segments"]
    if len(passages) != count:
        raise SystemExit(
            f"{doc['id']}: thoughts were written for {count} passages but the skeleton has "
            f"{len(passages)}; the skeleton changed, renumber the thoughts for this document"
        )
    bad = sorted(n for n in thoughts if not 1 <= n <= count)
    if bad:
        raise SystemExit(f"{doc['id']}: thoughts after passages {bad}, which do not exist (1..{count})")
    segments = []
    for number, passage in enumerate(passages, 1):
        segments.append(passage)
        if number in thoughts:
            segments.append({"kind": "thinking", "text": thoughts[number]})
    return {**doc, "segments": segments}


def merge(skeleton: Path, thought_files: list[Path], synthetic: Path) -> list[dict]:
    """The final corpus: annotated skeleton documents, then the synthetic ones."""
    sections = read_thoughts(thought_files)
    documents = [json.loads(line) for line in skeleton.read_text(encoding="utf-8").splitlines() if line.strip()]
    known = {d["id"] for d in documents}
    unknown = sorted(set(sections) - known)
    if unknown:
        raise SystemExit(f"thoughts for documents not in {skeleton}: {unknown}")
    out = [interleave(d, *sections[d["id"]]) for d in documents if d["id"] in sections]
    if synthetic.exists():
        out += [json.loads(line) for line in synthetic.read_text(encoding="utf-8").splitlines() if line.strip()]
    return out


def count_table(documents: list[dict]) -> list[tuple[str, int]]:
    """The counts `README.md` states, as (row name, value); `tests/data/test_sample_corpus.py` checks them."""
    segments = [s for d in documents for s in d["segments"]]
    synthetic = sum(d["source"] != documents[0]["source"] for d in documents) if documents else 0
    return [
        ("documents", len(documents)),
        ("Factbook documents", len(documents) - synthetic),
        ("synthetic documents", synthetic),
        ("text segments", sum(s["kind"] == "text" for s in segments)),
        ("thinking segments", sum(s["kind"] == "thinking" for s in segments)),
        ("characters in text segments", sum(len(s["text"]) for s in segments if s["kind"] == "text")),
        ("characters in thinking segments", sum(len(s["text"]) for s in segments if s["kind"] == "thinking")),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("skeleton", type=Path, help="output of build_corpus.py")
    parser.add_argument("--thoughts", type=Path, default=HERE / "thoughts", help="folder of thought files (*.txt)")
    parser.add_argument("--synthetic", type=Path, default=HERE / "synthetic.jsonl")
    parser.add_argument("--out", type=Path, default=HERE / "factbook.jsonl")
    args = parser.parse_args(argv)
    documents = merge(args.skeleton, sorted(args.thoughts.glob("*.txt")), args.synthetic)
    args.out.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in documents), encoding="utf-8")
    print(f"wrote {len(documents)} documents to {args.out}; counts for README.md:", file=sys.stderr)
    for name, value in count_table(documents):
        print(f"| {name} | {value} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
