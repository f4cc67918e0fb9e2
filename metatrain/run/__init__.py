"""A training run as a library: its directory, its state and its compiled program.

    layout.py      the name of every file and folder of a work directory
    workdir.py     creating a work directory, its origin, the lock (local and gs://)
    checkpoint.py  `Checkpointer`: orbax saves, retention, restore, damaged steps aside
    resume.py      which config keys may change on resume
    metrics.py     metrics.jsonl and TensorBoard events
    state.py       `TrainState` and its sharded initialisation
    optimizer.py   the optax optimizer and learning-rate schedule
    step.py        the pure train and eval steps
    program.py     `build_train_program`: mesh, model, optimizer, shardings, jitted steps

Training (`metatrain.train`) writes runs through this package; generation,
evaluation, export, import, serving and annotation read them through it and never
import `metatrain.train`.
"""
