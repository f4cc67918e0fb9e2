"""`metatrain serve` start-up (`metatrain.serve.server`): what can be known before the
engines allocate is checked first and refused in one line with the fix (exit 2), never
as a divergence (3) with a traceback."""

from __future__ import annotations

import json
import shutil

import pytest

from ..conftest import error_lines, free_port, run_cli


def _serve(workdir, *args: str):
    return run_cli("serve", "--workdir", str(workdir), "--port", str(free_port()), *args, timeout=240)


@pytest.mark.hostile
def test_a_batch_larger_than_memory_is_refused_before_anything_is_allocated(workdir):
    done = _serve(workdir, "--max-batch", "10000000")
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    (line,) = error_lines(done.stderr)
    assert line.startswith("metatrain serve: error: --max-batch 10000000") and "give --max-batch" in line


@pytest.mark.hostile
@pytest.mark.parametrize("context", [10**12, 10**9])
def test_a_context_too_large_to_serve_is_refused_in_one_line(workdir, tmp_path, context):
    run = tmp_path / "run"
    shutil.copytree(workdir, run)
    stored = run / "checkpoints" / "1" / "config" / "metadata"  # as a bad import would have written it
    config = json.loads(stored.read_text())
    config["model"]["max_seq_len"] = context
    stored.write_text(json.dumps(config))
    done = _serve(run)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    (line,) = error_lines(done.stderr)
    assert line.startswith("metatrain serve: error:") and f"max_seq_len={context}" in line
