"""The training application: the loop, its hooks, and resizing a run's vocabulary.

    loop.py     `train(config, workdir)`: one jitted, donating step; hooks around it
    hooks.py    the `Hook` protocol and the trainer's hooks (metrics, checkpoints, eval, ...)
    resize.py   `resize_checkpoint`: a run's checkpoint grown to a larger vocabulary
    session.py  `run_training`: one `metatrain train` invocation, summary and closing sample

What a run *is* (its directory, state, compiled program, checkpoints, lock, metrics)
lives in `metatrain.run`, which generation, evaluation and export read without
importing this package. Model code lives in `metatrain.models`; the loss in
`metatrain.loss`; batches come from `metatrain.data`.
"""
