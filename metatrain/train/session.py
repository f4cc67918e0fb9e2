"""`run_training`: one `metatrain train` invocation, from its options to its exit status.

The run is resolved (`metatrain.run.resolve`), trained (`metatrain.train.loop.train`)
and its summary printed by the first process. The embedded default run (no config, no
overrides) then ends with a short sample of what it learnt
(`metatrain.generate.sample.training_sample`); a failure to sample is reported, never
raised, since training has succeeded by then.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from metatrain.errors import EXIT_PREEMPTED


def run_training(
    config_file: Path | None,
    workdir: Path | None,
    overrides: Sequence[str],
    *,
    allow_other_config: bool = False,
    allow_changes: Sequence[str] = (),
) -> int:
    """Train (or resume) the run the options name and print its summary.

    Args:
        config_file: the run config YAML (`--config`; None: the work directory's saved
            config, else the embedded default).
        workdir: the work directory (`--workdir`; None: `runs/<config name>`).
        overrides: `KEY=VALUE` config overrides (`--set`).
        allow_other_config: continue a work directory created from another config file.
        allow_changes: optimizer.* or loss.* keys that may change on resume.

    Returns:
        The exit status: 0, or `EXIT_PREEMPTED` when the run stopped for a preemption
        (a checkpoint was saved).
    """
    import jax

    from metatrain.run.resolve import resolve_run
    from metatrain.train.loop import format_summary, train

    config, workdir = resolve_run(config_file, workdir, list(overrides))
    summary = train(
        config, workdir, config_file=config_file,
        allow_other_config=allow_other_config, allow_changes=list(allow_changes),
    )
    if jax.process_index() == 0:
        print(format_summary(summary))
    if summary.preempted:
        return EXIT_PREEMPTED
    if config_file is None and not overrides and jax.process_index() == 0:
        # The embedded default run ends with a short sample of what it learnt. Training
        # has succeeded by now: a failure to sample is reported, never raised.
        try:
            from metatrain.generate.sample import training_sample

            print(training_sample(workdir))
        except Exception as e:  # noqa: BLE001
            print(f"metatrain train: (could not print a sample: {e})", file=sys.stderr)
    return 0
