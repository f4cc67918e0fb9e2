"""`metatrain export --out gs://...` (a GCS emulator): the directory is built in the bucket,
config.json last, and transformers loads it (downloaded here: it cannot read gs:// itself)
with the logits of the local export; a non-empty or failed export is handled in one line."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from metatrain.cli import main  # noqa: E402
from metatrain.io.storage import as_path, gcs_blob, split_bucket  # noqa: E402

from .conftest import hf_logits, load_hf_model  # noqa: E402


def names_under(gcs_emulator, url):
    bucket, prefix = split_bucket(url)
    return sorted(name[len(prefix) + 1:] for name in gcs_emulator.objects(bucket, prefix + "/"))


def download(url, names, directory):
    """The objects under `url` as local files, read through the storage layer."""
    directory.mkdir()
    for name in names:
        (directory / name).write_bytes(as_path(f"{url}/{name}").read_bytes())
    return directory


def test_export_into_a_bucket_loads_with_the_local_exports_logits(workdir, exported_tied, bucket, gcs_emulator,
                                                                   tmp_path, capsys):
    out = f"{bucket}/export"
    assert main(["export", "--workdir", str(workdir), "--out", out]) == 0
    assert f"wrote {out}: step 1" in capsys.readouterr().out
    names = names_under(gcs_emulator, out)
    assert names == sorted(p.name for p in exported_tied.iterdir())
    written = {}
    for name in names:
        blob = gcs_blob(f"{out}/{name}")
        blob.reload()
        written[name] = blob.generation  # the emulator's generations are microsecond timestamps
    assert max(written, key=written.get) == "config.json"  # the file that marks it complete is last

    local = download(out, names, tmp_path / "export")
    for name in names:  # the same bytes as the local export, README and weights included
        assert (local / name).read_bytes() == (exported_tied / name).read_bytes(), name
    ids = np.array([[1, 5, 17, 300, 42, 2000, 7, 9]], np.int32)
    np.testing.assert_array_equal(hf_logits(load_hf_model(local), ids), hf_logits(load_hf_model(exported_tied), ids))
    tokenizer = transformers.AutoTokenizer.from_pretrained(local)
    assert tokenizer.convert_tokens_to_ids("<AI>") == transformers.AutoTokenizer.from_pretrained(
        exported_tied).convert_tokens_to_ids("<AI>")


def test_a_non_empty_bucket_out_is_refused_in_one_line(workdir, bucket, gcs_emulator, capsys):
    out = f"{bucket}/export"
    as_path(f"{out}/notes.txt").write_text("someone else's\n")
    assert main(["export", "--workdir", str(workdir), "--out", out]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and out in err and "not empty" in err
    assert names_under(gcs_emulator, out) == ["notes.txt"]


def test_a_failed_export_leaves_nothing_in_the_bucket(workdir, bucket, gcs_emulator, capsys):
    out = f"{bucket}/export"
    assert main(["export", "--workdir", str(workdir), "--out", out, "--max-shard-size", "lots"]) != 0
    assert "--max-shard-size" in capsys.readouterr().err
    assert names_under(gcs_emulator, out) == []
