"""`metatrain.io.storage`: which paths are remote, the emulator's settings, appends by compose
and listings that see other writers (in a bucket of a GCS emulator on 127.0.0.1), moving a
directory and a failed write (on local disk and in a bucket: `store`)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from metatrain.errors import UserError
from metatrain.io.storage import (
    ObjectAppender,
    as_path,
    configure_emulator,
    configure_storage,
    gcs_blob,
    glob_paths,
    is_remote,
    move_tree,
    split_bucket,
    tensorstore_kvstore,
)


def test_a_bucket_url_keeps_its_double_slash_and_a_local_path_stays_a_path():
    remote = as_path("gs://team/runs/r1")
    assert is_remote("gs://team/runs/r1") and str(remote / "checkpoints") == "gs://team/runs/r1/checkpoints"
    assert (remote / "config.yaml").name == "config.yaml" and str(remote.parent) == "gs://team/runs"
    assert as_path("runs/r1") == Path("runs/r1") and not is_remote("runs/r1") and not is_remote(Path("gs:/x"))
    assert split_bucket("gs://team/runs/r1/") == ("team", "runs/r1")
    assert tensorstore_kvstore("gs://team/cache/ids") == {"driver": "gcs", "bucket": "team", "path": "cache/ids/"}
    assert tensorstore_kvstore("/data/cache/ids") == {"driver": "file", "path": "/data/cache/ids"}


@pytest.mark.parametrize("url", ["gcs://team/x", "http://example.com/x", "ftp://h/x"])
def test_an_unsupported_scheme_is_one_clear_line(url):
    with pytest.raises(UserError, match=r"reads and writes local paths, gs:// and s3://"):
        as_path(url)


def test_the_emulator_variable_reaches_every_library_and_the_users_own_settings_win():
    env = {"STORAGE_EMULATOR_HOST": "127.0.0.1:4443", "CLOUD_STORAGE_EMULATOR_ENDPOINT": "http://mine:1"}
    configure_storage(env)
    assert env["STORAGE_EMULATOR_HOST"] == "http://127.0.0.1:4443"
    assert env["TENSORSTORE_GCS_HTTP_URL"] == "http://127.0.0.1:4443"
    assert env["CLOUD_STORAGE_EMULATOR_ENDPOINT"] == "http://mine:1"  # set by the user: kept
    assert env["EPATH_USE_TF"] == "false" and env["FSSPEC_GCS_TOKEN"] == "anon"
    real = {}
    configure_emulator(real)
    assert real == {}  # no emulator: nothing changes


@pytest.mark.bucket
def test_appends_compose_whole_lines_and_leave_no_parts(bucket, gcs_emulator):
    path = f"{bucket}/metrics.jsonl"
    appender = ObjectAppender(path, flush_every_s=3600)
    appender.write('{"step": 1}\n')
    assert not as_path(path).exists()  # buffered until a flush
    appender.flush()
    appender.write('{"step": 2}\n')
    appender.write('{"step": 3}\n')
    appender.close()
    assert as_path(path).read_text() == '{"step": 1}\n{"step": 2}\n{"step": 3}\n'
    assert gcs_emulator.objects(bucket.removeprefix("gs://")) == ["metrics.jsonl"]
    # A second writer (a resumed run) appends to what is there.
    again = ObjectAppender(path, flush_every_s=0)
    again.write('{"step": 4}\n')
    assert as_path(path).read_text().splitlines()[-1] == '{"step": 4}'


@pytest.mark.bucket
def test_listings_see_objects_other_writers_added(bucket):
    directory = as_path(f"{bucket}/run/checkpoints")
    (directory / "1" / "a").write_text("x")
    assert [p.name for p in directory.iterdir()] == ["1"]
    gcs_blob(f"{bucket}/run/checkpoints/2/a").upload_from_string(b"y")  # another process's client
    assert sorted(p.name for p in directory.iterdir()) == ["1", "2"]
    assert [str(p) for p in glob_paths(f"{bucket}/run/checkpoints/*/a")] == [
        f"{bucket}/run/checkpoints/1/a", f"{bucket}/run/checkpoints/2/a"]


def test_moving_a_directory_moves_every_file(store):
    for name in ("state/d/0", "state/manifest", "commit_success.txt"):
        store.write_text(f"ckpt/6/{name}", name)
    move_tree(f"{store}/ckpt/6", f"{store}/ckpt/6.corrupt-1")
    assert store.files() == ["ckpt/6.corrupt-1/commit_success.txt", "ckpt/6.corrupt-1/state/d/0",
                             "ckpt/6.corrupt-1/state/manifest"]
    assert not as_path(f"{store}/ckpt/6").exists()


@pytest.mark.bucket
def test_a_long_append_is_compacted_and_keeps_every_line(bucket, monkeypatch):
    monkeypatch.setattr(ObjectAppender, "COMPACT_AFTER", 3)
    path = f"{bucket}/annotated.jsonl"
    appender = ObjectAppender(path, flush_every_s=0)
    for i in range(8):
        appender.write(f"line {i}\n")
    assert as_path(path).read_text() == "".join(f"line {i}\n" for i in range(8))
    blob = gcs_blob(path)
    blob.reload()
    assert (blob.component_count or 0) < 3


def test_a_failed_write_leaves_the_old_file(store):
    from metatrain.io.outputs import atomic_output, write_atomically

    path = f"{store}/out.jsonl"
    write_atomically(path, "old\n")
    for binary in (False, True):
        with pytest.raises(RuntimeError):
            with atomic_output(path, binary=binary) as handle:
                handle.write(b"partial" if binary else "partial")
                raise RuntimeError("the writer failed")
        del handle
    import gc

    gc.collect()  # a file left open would upload its buffer now
    assert as_path(path).read_text() == "old\n"
    assert store.files() == ["out.jsonl"]  # no partial file left beside it


@pytest.mark.hostile
@pytest.mark.parametrize("url, words", [
    ("gs://", "names no bucket"),
    ("gs:///x", "names no bucket"),
    ("gs://bad_bucket!/x", "bucket name 'bad_bucket!'"),
    ("gs://Team/x", "bucket name 'Team'"),
    ("gs://ab/x", "bucket name 'ab'"),
    ("gs://-team/x", "bucket name '-team'"),
    ("gs://my bucket/x", "bucket name 'my bucket'"),
    ("gs://google-team/x", "bucket name 'google-team'"),
    ("gs://192.168.5.4/x", "bucket name '192.168.5.4'"),
    ("gs://" + "b" * 64 + "/x", "bucket name 'bbbb"),
    ("gs://team/../x", "'..' is not a folder"),
    ("gs://team/runs/./r1", "'.' is not a folder"),
    ("gs://team/runs\nr1", "control character"),
    ("gs://team/runs/\x7fr1", "control character"),
    ("gs://team/" + "x" * 1025, "1,025 bytes"),
])
def test_a_malformed_bucket_url_is_one_line_before_any_request(url, words):
    from metatrain.io.storage import absolute, join

    for build in (as_path, absolute, lambda u: join(u, "config.yaml"), split_bucket, tensorstore_kvstore):
        with pytest.raises(UserError, match=re.escape(words)) as info:
            build(url)
        assert "\n" not in str(info.value).replace(url, "") and "gs://BUCKET/PATH" in str(info.value)
    # Names the rules allow: dots, underscores, spaces and unicode in object names, a bare bucket.
    for good in ("gs://team.example.com/x", "gs://my_team-1/runs/a b/é", "gs://team", "gs://team/"):
        assert str(as_path(good)).startswith("gs://")


@pytest.mark.hostile
def test_a_malformed_url_in_a_config_names_the_key_and_fails_before_any_work(gcs_emulator):
    from ..conftest import TINY, error_lines, run_cli

    url = "gs://bad_bucket!/tok.model"
    result = run_cli("train", "--config", str(TINY), "--set", f"data.tokenizer={url}", "--set", "trainer.steps=1",
                     env={"STORAGE_EMULATOR_HOST": gcs_emulator.url}, timeout=120)
    lines = error_lines(result.stderr)
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert re.search(rf"^metatrain train: error: .*'data.tokenizer': {re.escape(url)}: bucket name 'bad_bucket!'",
                     lines[0])


@pytest.mark.hostile
def test_a_malformed_workdir_url_fails_at_once_with_exit_2(gcs_emulator):
    from ..conftest import TINY, error_lines, run_cli

    for url in ("gs://bad_bucket!/run", "gs:///run", "gs://b/../run"):
        result = run_cli("train", "--config", str(TINY), "--set", "trainer.steps=1", "--workdir", url,
                         env={"STORAGE_EMULATOR_HOST": gcs_emulator.url}, timeout=120)
        lines = error_lines(result.stderr)
        assert result.returncode == 2 and url in result.stderr, result.stderr[-2000:]
        assert not any(line.startswith("Traceback") for line in lines)


@pytest.mark.hostile
def test_a_symlink_loop_is_one_line(tmp_path):
    from metatrain.io.storage import absolute

    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(UserError, match=rf"^{tmp_path}/a/x is a loop of symbolic links"):
        absolute(tmp_path / "a" / "x")
