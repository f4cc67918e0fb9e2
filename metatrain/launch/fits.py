"""`check_fit`: does a run config fit a TPU topology, as `metatrain compile` says it.

Compiles the run's real training step for the topology (`compile.compile_for_topology`),
prints the report and refuses a config that does not fit; or, asked for the largest
batch, finds it by compiling (`compile.find_max_batch`, progress on stderr) and prints
its report and the batch.
"""

from __future__ import annotations

import sys

from metatrain.config import RunConfig
from metatrain.errors import UserError


def check_fit(config: RunConfig, topology: str, num_slices: int = 1, *, max_batch: bool = False) -> int:
    """Compile `config`'s train step for `topology` and print what it needs.

    Args:
        config: the run config.
        topology: TPU topology, e.g. v5e:2x2.
        num_slices: slices of that topology (multi-slice).
        max_batch: find the largest global `trainer.batch_size` that fits instead.

    Returns:
        0 (the exit status) when it fits.

    Raises:
        UserError: the config does not fit (after the report is printed), or no batch does.
    """
    from metatrain.launch.compile import compile_for_topology, format_report, refusal

    if max_batch:
        return _max_batch(config, topology, num_slices)
    report = compile_for_topology(config, topology, num_slices)
    print(format_report(report))
    sys.stdout.flush()
    if report.fits is False:
        raise UserError(refusal(report))
    return 0


def _max_batch(config: RunConfig, topology: str, num_slices: int) -> int:
    """`check_fit(max_batch=True)`: the largest batch that fits, its report and the batch."""
    from metatrain.launch.compile import find_max_batch, format_report

    found = find_max_batch(
        config, topology, num_slices, log=lambda line: print(line, file=sys.stderr, flush=True)
    )
    if found.batch_size is None:
        raise UserError(
            f"not even the smallest batch ({found.tried[0][0]} sequences) fits {topology}; "
            "shard the state over more chips or lower the activation memory (model.remat)"
        )
    print(format_report(found.report))
    print(f"largest batch that fits: {found.batch_size} sequences ({found.per_chip:g} a chip), "
          f"found in {len(found.tried)} compiles")
    return 0
