"""Two real JAX processes (jax.distributed on CPU): the checkpointed data state covers both, and resumes on one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from metatrain.data import make_batch_iterator
from metatrain.io.paths import REPO_ROOT

from ..conftest import data_config, free_port, make_docs, take, write_jsonl

WORKER = Path(__file__).with_name("multihost_worker.py")


def test_two_processes_save_one_state_that_resumes_on_one_process(tmp_path):
    corpus = write_jsonl(tmp_path / "docs.jsonl", make_docs(40, seed=5))
    port = str(free_port())
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    procs = [
        subprocess.Popen([sys.executable, str(WORKER), str(p), port, str(tmp_path), str(corpus)],
                         cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for p in (0, 1)
    ]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out[-3000:]
    states = [json.loads((tmp_path / f"state{p}.json").read_text()) for p in (0, 1)]
    assert states[0] == states[1]
    assert list(states[0]["grain"]["lanes"]) == ["0", "1", "2", "3"]

    one = make_batch_iterator(data_config(corpus), batch_size=4, seq_len=61, process_index=0, process_count=1)
    one.set_state(states[0])
    parts = [np.load(tmp_path / f"batches{p}.npz") for p in (0, 1)]
    for i, batch in enumerate(take(one, 2)):
        for k, v in batch.items():
            np.testing.assert_array_equal(np.concatenate([parts[0][f"{i}/{k}"], parts[1][f"{i}/{k}"]]), v)
