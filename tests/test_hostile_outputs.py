"""Hostile output paths: no command that writes may destroy an input or anything that is
not a regular file, and a failed write leaves the old output as it was.

Each case runs the real command line (`metatrain.cli.main`) on the shipped sample
tokenizer and documents.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from metatrain.cli import main
from metatrain.errors import UserError
from metatrain.io.outputs import atomic_output, check_output_file, publish_dir, staging_dir, write_atomically
from metatrain.io.paths import SAMPLE_TOKENIZER

pytestmark = pytest.mark.hostile

DOCS = [
    {"id": "a", "segments": [{"kind": "text", "text": "The capital is on the coast.\n"},
                             {"kind": "thinking", "text": "Which coast?"}]},
    {"id": "b", "segments": [{"kind": "text", "text": "Exports grew by 3 percent.\n"}]},
]


@pytest.fixture()
def docs(tmp_path: Path) -> Path:
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    return path


def encode(docs: Path, output: Path | str, *extra: str) -> int:
    return main(["encode", "--tokenizer", str(SAMPLE_TOKENIZER), "--input", str(docs),
                 "--output", str(output), *extra])


def snapshot(directory: Path) -> dict[str, tuple[str, bytes | str]]:
    """Every entry under `directory`: its kind and its bytes (or a link's target)."""
    out = {}
    for path in sorted(directory.rglob("*")):
        mode = path.lstat().st_mode
        if stat.S_ISLNK(mode):
            out[str(path)] = ("link", os.readlink(path))
        elif stat.S_ISREG(mode):
            out[str(path)] = ("file", path.read_bytes())
        else:
            out[str(path)] = (stat.filemode(mode)[0], b"")
    return out


# --- encode ---------------------------------------------------------------------------

def test_encode_refuses_its_own_input_as_output(docs, capsys):
    before = docs.read_bytes()
    assert encode(docs, docs) == 2
    assert "is one of the inputs" in capsys.readouterr().err
    assert docs.read_bytes() == before


def test_encode_refuses_a_hard_link_or_a_relative_spelling_of_its_input(docs, tmp_path, monkeypatch, capsys):
    before = docs.read_bytes()
    os.link(docs, tmp_path / "same.jsonl")
    assert encode(docs, tmp_path / "same.jsonl") == 2
    monkeypatch.chdir(tmp_path)
    assert encode(docs, "./sub/../docs.jsonl") == 2
    assert capsys.readouterr().err.count("is one of the inputs") == 2
    assert docs.read_bytes() == before


def test_encode_refuses_the_tokenizer_as_output(docs, tmp_path, capsys):
    model = tmp_path / "t.model"
    model.write_bytes(SAMPLE_TOKENIZER.read_bytes())
    assert main(["encode", "--tokenizer", str(model), "--input", str(docs), "--output", str(model)]) == 2
    assert "is one of the inputs" in capsys.readouterr().err
    assert model.read_bytes() == SAMPLE_TOKENIZER.read_bytes()


def test_encode_never_replaces_a_symlink(docs, tmp_path, capsys):
    target = tmp_path / "elsewhere.jsonl"
    target.write_text("keep me\n")
    link = tmp_path / "out.jsonl"
    link.symlink_to(target)
    assert encode(docs, link) == 2
    assert "is a symbolic link" in capsys.readouterr().err
    assert link.is_symlink() and target.read_text() == "keep me\n"


def test_encode_never_replaces_a_symlink_to_its_input(docs, tmp_path, capsys):
    link = tmp_path / "out.jsonl"
    link.symlink_to(docs)
    before = docs.read_bytes()
    assert encode(docs, link) == 2
    assert link.is_symlink() and docs.read_bytes() == before


def test_encode_never_replaces_a_named_pipe(docs, tmp_path, capsys):
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    assert encode(docs, fifo) == 2
    assert "is a named pipe" in capsys.readouterr().err
    assert stat.S_ISFIFO(fifo.lstat().st_mode)


def test_encode_never_replaces_a_character_device(docs, tmp_path, capsys):
    """What `--output /dev/null` is for root; made here so the test cannot harm the real one."""
    device = tmp_path / "null"
    try:
        os.mknod(device, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except (PermissionError, OSError):
        pytest.skip("making a device node needs CAP_MKNOD")
    assert encode(docs, device) == 2
    assert "is a character device" in capsys.readouterr().err
    assert stat.S_ISCHR(device.lstat().st_mode)


def test_encode_refuses_a_directory_as_output(docs, tmp_path, capsys):
    (tmp_path / "outdir").mkdir()
    assert encode(docs, tmp_path / "outdir") == 2
    assert "is a directory" in capsys.readouterr().err


def test_encode_leaves_a_file_named_like_its_temporary_alone(docs, tmp_path):
    """A fixed `OUT.partial` name would overwrite (then delete) a user's file of that name."""
    theirs = tmp_path / "out.jsonl.partial"
    theirs.write_text("the user's\n")
    assert encode(docs, tmp_path / "out.jsonl") == 0
    assert theirs.read_text() == "the user's\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl", "out.jsonl", "out.jsonl.partial"]


def test_encode_that_writes_nothing_fails_and_keeps_the_old_output(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x", "segments": [{"kind": "poem", "text": "no"}]}\nnot json\n')
    out = tmp_path / "out.jsonl"
    out.write_text("previous results\n")
    assert encode(bad, out) == 2
    err = capsys.readouterr().err
    assert "no valid document" in err and "nothing was written" in err and f"{bad}:1" in err
    assert out.read_text() == "previous results\n"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    assert encode(empty, out) == 2
    assert "no non-blank line" in capsys.readouterr().err
    assert out.read_text() == "previous results\n"


def test_encode_replaces_a_regular_output_keeping_its_permissions(docs, tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text("old\n")
    out.chmod(0o640)
    assert encode(docs, out) == 0
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["a", "b"]
    assert stat.S_IMODE(out.stat().st_mode) == 0o640


# --- tokenizer train / extend ---------------------------------------------------------

def test_tokenizer_extend_refuses_to_write_over_its_base(tmp_path, capsys):
    model = tmp_path / "m.model"
    model.write_bytes(SAMPLE_TOKENIZER.read_bytes())
    assert main(["tokenizer", "extend", "--base", str(model), "--out", str(model)]) == 2
    assert "is one of the inputs" in capsys.readouterr().err
    assert model.read_bytes() == SAMPLE_TOKENIZER.read_bytes()


def test_tokenizer_train_refuses_a_symlinked_output_before_training(docs, tmp_path, capsys):
    target = tmp_path / "precious.vocab"
    target.write_text("keep\n")
    (tmp_path / "tok.vocab").symlink_to(target)
    assert main(["tokenizer", "train", "--input", str(docs), "--vocab-size", "400",
                 "--out", str(tmp_path / "tok")]) == 2
    assert "tok.vocab is a symbolic link" in capsys.readouterr().err
    assert target.read_text() == "keep\n" and not (tmp_path / "tok.model").exists()


def test_tokenizer_train_refuses_its_corpus_as_an_output(tmp_path, capsys):
    corpus = tmp_path / "c.model"  # a corpus unluckily named like the model to write
    corpus.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    before = corpus.read_bytes()
    assert main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "400",
                 "--out", str(tmp_path / "c")]) == 2
    assert "is one of the inputs" in capsys.readouterr().err
    assert corpus.read_bytes() == before


# --- data cache -----------------------------------------------------------------------

def cache(docs: Path, out: Path) -> int:
    return main(["data", "cache", "--input", str(docs), "--tokenizer", str(SAMPLE_TOKENIZER),
                 "--out", str(out), "--no-progress"])


def test_data_cache_refuses_its_input_as_out(docs, capsys):
    before = docs.read_bytes()
    assert cache(docs, docs) == 2
    assert "is a regular file, not a directory" in capsys.readouterr().err
    assert docs.read_bytes() == before


def test_data_cache_refuses_a_symlink_to_an_empty_directory(docs, tmp_path, capsys):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert cache(docs, tmp_path / "link") == 2
    assert "is a symbolic link" in capsys.readouterr().err
    assert (tmp_path / "link").is_symlink() and not any((tmp_path / "real").iterdir())


def test_data_cache_leaves_a_directory_named_like_its_temporary_alone(docs, tmp_path):
    """The old fixed `OUT.partial` staging directory was deleted with everything in it."""
    theirs = tmp_path / "cache.partial"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine\n")
    assert cache(docs, tmp_path / "cache") == 0
    assert (theirs / "notes.txt").read_text() == "mine\n"
    assert (tmp_path / "cache" / "cache.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# --- the module itself ----------------------------------------------------------------

def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    out = tmp_path / "out.txt"
    out.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_output(out) as handle:
            handle.write("half")
            raise RuntimeError("disk gone")
    assert out.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_an_output_swapped_for_a_symlink_while_writing_is_not_replaced(tmp_path):
    out, target = tmp_path / "out.txt", tmp_path / "target.txt"
    target.write_text("target")
    with pytest.raises(UserError, match="symbolic link"):
        with atomic_output(out) as handle:
            handle.write("new")
            out.symlink_to(target)  # planted between the check and the rename
    assert out.is_symlink() and target.read_text() == "target"


def test_write_atomically_takes_bytes_text_or_a_writer(tmp_path):
    assert write_atomically(tmp_path / "b", b"\x00\x01").read_bytes() == b"\x00\x01"
    assert write_atomically(tmp_path / "t", "h\u00e9").read_text(encoding="utf-8") == "h\u00e9"
    assert write_atomically(tmp_path / "w", lambda p: p.write_text("w")).read_text() == "w"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "t", "w"]


def test_check_output_file_names_the_flag(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(UserError, match=r"^--out .*/d is a directory; .*choose another --out$"):
        check_output_file(tmp_path / "d", option="--out")


def test_publish_dir_refuses_a_target_that_filled_up_meanwhile(tmp_path):
    out = tmp_path / "out"
    staging = staging_dir(out)
    (staging / "data").write_text("built")
    out.mkdir()
    (out / "theirs").write_text("theirs")
    with pytest.raises(UserError, match="not empty"):
        publish_dir(staging, out)
    assert (out / "theirs").read_text() == "theirs" and not staging.exists()
