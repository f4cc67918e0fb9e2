"""Known-answer corpora: synthetic documents where what a helpful thought says is known.

`metatrain data synthetic --task NAME --documents N --out DIR/x.jsonl` writes four files:

    DIR/x.jsonl               training documents annotated by the exact rule-based teacher
                              (metatrain documents: {"id", "segments", ...metadata})
    DIR/x.raw.jsonl           the same documents raw ({"id", "text", ...metadata}), for annotation
    DIR/x.heldout.jsonl       the held-out split, annotated by the teacher
    DIR/x.heldout.raw.jsonl   the held-out split, raw

The teacher is generation 0 of the generational loop: it writes the thoughts a perfect
annotator would write, so a model trained on its corpus can learn to think usefully, and
a model's own annotations can be checked against the truth. Text is paragraphs separated
by "\\n\\n"; each problem is a question paragraph followed by an answer paragraph, and the
teacher's thought sits right after the question, which is exactly where `metatrain
annotate --where passage --split paragraph` has a point (after a paragraph unit, whose
trailing "\\n\\n" stays with it). The thought's offset in the text is therefore the start
of the answer paragraph.

Every document carries metadata `"known": [{"at": OFFSET, "answer": STRING}, ...]`: at
character offset `at` of the text, a thought that helps contains `answer` (which the
answer paragraph starting there also contains). `thought_answers(record)` counts how many
of a record's known points have a thought there that carries the answer, for the
teacher's corpus, a model's annotations (annotate keeps metadata) or raw text (none).

Tasks (`TASKS`):

- `chain`: "Let h be 3 and q be 5. Let m be h plus q, and w be m times 2." then
  "So w is 6." Arithmetic is mod 10 so every value is one digit; operations are plus,
  minus and times; the letters and the second operand (a digit or one of the first two
  variables) vary, so copying is not enough. The teacher thinks "m is 8, so w is 6.":
  the intermediate result and the answer. Known answer: "w is 6".
- `chain-control`: the same raw documents as `chain` (same generator, same seed), but
  the teacher's thoughts carry nothing: "Let me work out w." Known answers are those of
  `chain`, so the control's thoughts carry none of them.

Output is a pure function of the options: the same task, counts and seed give the same
bytes. The training and held-out splits draw from separate random streams, have
distinct ids (`train-000000`, `heldout-000000`), and no held-out problem repeats a
training problem's question. Only plain ASCII is written.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from metatrain.errors import UserError
from metatrain.io.outputs import check_output_file, write_atomically

#: Problems per document, drawn uniformly from this range (inclusive). Two problems with
#: their thoughts and the default 7-line mantra fit in 256 tokens of the sample tokenizer.
PROBLEMS_PER_DOCUMENT: tuple[int, int] = (2, 2)
#: Held-out documents when `--heldout` is not given: a tenth of the training documents, at least this many.
MIN_HELDOUT: int = 50
#: Letters used as variables: consonants, so no variable reads as an English word ("a", "I").
_LETTERS = "bcdfghjkmnpqrstvwxyz"
_OPERATIONS: dict[str, Callable[[int, int], int]] = {
    "plus": lambda x, y: (x + y) % 10,
    "minus": lambda x, y: (x - y) % 10,
    "times": lambda x, y: (x * y) % 10,
}
#: The four files of a corpus, by role, as suffixes replacing `.jsonl` of `--out`.
_SUFFIXES: dict[str, str] = {
    "train": ".jsonl",
    "train_raw": ".raw.jsonl",
    "heldout": ".heldout.jsonl",
    "heldout_raw": ".heldout.raw.jsonl",
}


@dataclasses.dataclass(frozen=True)
class Problem:
    """One question and its answer, with what the teacher may think between them.

    Attributes:
        question: the question paragraph (no trailing line break).
        answer: the answer paragraph (no trailing line break).
        known: the string a helpful thought contains; `answer` contains it too.
        thought: the informative thought (e.g. the intermediate result and the answer).
        control_thought: a fluent thought of the same shape that carries nothing.
    """

    question: str
    answer: str
    known: str
    thought: str
    control_thought: str


@dataclasses.dataclass(frozen=True)
class Task:
    """A known-answer task: how to draw a problem and which thought the teacher writes.

    Attributes:
        name: the `--task` name.
        summary: one line for `--help` and the docs.
        problem: draws one problem from a random generator.
        informative: whether the teacher writes `Problem.thought` (else `control_thought`).
    """

    name: str
    summary: str
    problem: Callable[[random.Random], Problem]
    informative: bool

    def thought(self, problem: Problem) -> str:
        """The teacher's thought after `problem`'s question."""
        return problem.thought if self.informative else problem.control_thought


def chain_problem(rng: random.Random) -> Problem:
    """A two-step computation mod 10: `c = a OP b`, `d = c OP e` with e a digit, a or b."""
    a, b, c, d = rng.sample(_LETTERS, 4)
    va, vb = rng.randrange(10), rng.randrange(10)
    op1, op2 = rng.choice(sorted(_OPERATIONS)), rng.choice(sorted(_OPERATIONS))
    second = rng.choice([a, b, str(rng.randrange(10))])
    vc = _OPERATIONS[op1](va, vb)
    ve = va if second == a else vb if second == b else int(second)
    vd = _OPERATIONS[op2](vc, ve)
    return Problem(
        question=f"Let {a} be {va} and {b} be {vb}. Let {c} be {a} {op1} {b}, and {d} be {c} {op2} {second}.",
        answer=f"So {d} is {vd}.",
        known=f"{d} is {vd}",
        thought=f"{c} is {vc}, so {d} is {vd}.",
        control_thought=f"Let me work out {d}.",
    )


#: The tasks `--task` names.
TASKS: dict[str, Task] = {
    "chain": Task("chain", "two-step arithmetic mod 10; the thought states the intermediate result and the answer",
                  chain_problem, informative=True),
    "chain-control": Task("chain-control", "the same documents as chain; the thought says nothing useful",
                          chain_problem, informative=False),
}


@dataclasses.dataclass(frozen=True)
class SyntheticDocument:
    """One generated document: its id and its problems, in order."""

    id: str
    problems: tuple[Problem, ...]

    @property
    def paragraphs(self) -> list[str]:
        return [p for problem in self.problems for p in (problem.question, problem.answer)]

    @property
    def text(self) -> str:
        """The raw text: question and answer paragraphs joined by "\\n\\n"."""
        return "\n\n".join(self.paragraphs)

    def known(self) -> list[dict[str, Any]]:
        """`[{"at", "answer"}]`: the start of each answer paragraph and the answer it states."""
        points, offset = [], 0
        for problem in self.problems:
            offset += len(problem.question) + 2
            points.append({"at": offset, "answer": problem.known})
            offset += len(problem.answer) + 2
        return points

    def raw_record(self, task: Task) -> dict[str, Any]:
        """`{"id", "text", "task", "known"}`."""
        return {"id": self.id, "text": self.text, "task": task.name, "known": self.known()}

    def teacher_record(self, task: Task) -> dict[str, Any]:
        """`{"id", "segments", "task", "known"}`: the text with the teacher's thought after each question."""
        segments: list[dict[str, str]] = []
        pending = ""
        for i, problem in enumerate(self.problems):
            segments.append({"kind": "text", "text": pending + problem.question + "\n\n"})
            segments.append({"kind": "thinking", "text": task.thought(problem)})
            pending = problem.answer + ("\n\n" if i + 1 < len(self.problems) else "")
        segments.append({"kind": "text", "text": pending})
        return {"id": self.id, "segments": segments, "task": task.name, "known": self.known()}


def get_task(name: str) -> Task:
    """The task called `name`; a `UserError` naming `--task` and the known tasks otherwise."""
    task = TASKS.get(name)
    if task is None:
        raise UserError(f"--task {name!r} is not a known task; choose one of {', '.join(TASKS)}")
    return task


def make_documents(
    task: Task | str,
    count: int,
    *,
    seed: int = 0,
    split: str = "train",
    exclude: Iterable[str] = (),
) -> list[SyntheticDocument]:
    """`count` documents of `task`, ids `{split}-000000`, ...

    The random stream depends only on (seed, split) (Python's `random.Random` seeded by a
    string, which hashes it with SHA-512), so `chain` and `chain-control` draw the same
    documents. A problem whose question is in `exclude` is drawn again.
    """
    task = get_task(task) if isinstance(task, str) else task
    rng = random.Random(f"metatrain-synthetic/{seed}/{split}")
    excluded = set(exclude)
    low, high = PROBLEMS_PER_DOCUMENT
    docs = []
    for i in range(count):
        problems = []
        for _ in range(rng.randint(low, high)):
            problem = task.problem(rng)
            while problem.question in excluded:
                problem = task.problem(rng)
            problems.append(problem)
        docs.append(SyntheticDocument(f"{split}-{i:06d}", tuple(problems)))
    return docs


def thought_answers(record: Mapping[str, Any]) -> tuple[int, int]:
    """`(carried, total)` for one record: of its `known` points (`total`), how many have a
    thinking block at their text offset whose text contains the point's answer.

    `record` is a metatrain document record (`segments`) or a raw one (`text`: no
    thoughts, so nothing is carried); a record without `known` is (0, 0).
    """
    known = record.get("known") or []
    thoughts: dict[int, list[str]] = {}
    offset = 0
    for segment in record.get("segments") or []:
        if segment.get("kind") == "thinking":
            thoughts.setdefault(offset, []).append(str(segment.get("text", "")))
        else:
            offset += len(segment.get("text", ""))
    carried = sum(1 for point in known
                  if any(str(point["answer"]) in t for t in thoughts.get(int(point["at"]), ())))
    return carried, len(known)


def corpus_paths(out: str | Path) -> dict[str, Path]:
    """The four files of the corpus `out` (`DIR/x.jsonl`): train, train_raw, heldout, heldout_raw.

    Raises:
        UserError: `out` does not end in `.jsonl`.
    """
    text = str(out)
    if not text.endswith(".jsonl") or text.endswith((".raw.jsonl", ".heldout.jsonl")) \
            or not Path(text).name[: -len(".jsonl")]:
        raise UserError(f"--out {text} must name a .jsonl file (not .raw.jsonl or .heldout.jsonl), e.g. "
                        "corpus/chain.jsonl; the raw and held-out files are written beside it")
    stem = text[: -len(".jsonl")]
    return {role: Path(stem + suffix) for role, suffix in _SUFFIXES.items()}


def default_heldout(documents: int) -> int:
    """Held-out documents when none are asked for: a tenth of `documents`, at least `MIN_HELDOUT`."""
    return max(MIN_HELDOUT, documents // 10)


def _jsonl(records: Sequence[Mapping[str, Any]]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=True) + "\n" for r in records).encode("ascii")


def write_corpus(
    out: str | Path,
    task: str,
    documents: int,
    *,
    heldout: int | None = None,
    seed: int = 0,
    force: bool = False,
) -> dict[str, Any]:
    """Writes the four files of a known-answer corpus (see the module docstring).

    Args:
        out: the teacher corpus, `DIR/x.jsonl`; the other three go beside it.
        task: a name in `TASKS`.
        documents: training documents (>= 1).
        heldout: held-out documents (>= 1); None: `default_heldout(documents)`.
        seed: seeds both splits.
        force: replace existing files; otherwise an existing one is refused.

    Returns:
        A summary: task, seed, documents, heldout, problems (training), paths (role -> path).

    Raises:
        UserError: an unknown task, a bad count, an `out` that is not `*.jsonl`, an
            existing output without `force`, an output that is not a regular file.
    """
    spec = get_task(task)
    paths = corpus_paths(out)
    for option, value in (("--documents", documents), ("--heldout", heldout)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise UserError(f"{option} {value!r} must be a whole number >= 1")
    heldout = default_heldout(documents) if heldout is None else heldout
    for path in paths.values():
        check_output_file(path, option="--out")
        if path.exists() and not force:
            raise UserError(f"--out {paths['train']}: {path} exists; choose another --out, or pass --force "
                            "to replace the corpus")
    train = make_documents(spec, documents, seed=seed, split="train")
    seen = {p.question for d in train for p in d.problems}
    held = make_documents(spec, heldout, seed=seed, split="heldout", exclude=seen)
    for role, docs in (("train", train), ("heldout", held)):
        write_atomically(paths[role], _jsonl([d.teacher_record(spec) for d in docs]), option="--out")
        write_atomically(paths[f"{role}_raw"], _jsonl([d.raw_record(spec) for d in docs]), option="--out")
    return {
        "task": spec.name,
        "seed": seed,
        "documents": documents,
        "heldout": heldout,
        "problems": sum(len(d.problems) for d in train),
        "paths": {role: str(p) for role, p in paths.items()},
    }
