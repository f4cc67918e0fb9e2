"""One process of the two-process data test (`test_multihost.py`); not a test module itself.

usage: python multihost_worker.py PROCESS_ID PORT OUT_DIR CORPUS
"""

import json
import sys

import jax
import numpy as np

jax.config.update("jax_cpu_collectives_implementation", "gloo")


def main() -> None:
    pid, port, out, corpus = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=pid)
    from metatrain.data import DataConfig, SourceConfig, make_batch_iterator

    it = make_batch_iterator(DataConfig(sources=(SourceConfig(corpus),)), batch_size=4, seq_len=61)
    for _ in range(3):
        next(it)
    state = it.get_state()  # a collective: the state of all lanes, on every process
    following = [next(it) for _ in range(2)]
    np.savez(f"{out}/batches{pid}.npz", **{f"{i}/{k}": v for i, b in enumerate(following) for k, v in b.items()})
    with open(f"{out}/state{pid}.json", "w") as f:
        json.dump(state, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
