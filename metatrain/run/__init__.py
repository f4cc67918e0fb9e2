"""A training run as a library: its directory, its state and its compiled program.

    layout.py      the name of every file and folder of a work directory
    workdir.py     creating a work directory, its origin, the lock (local and gs://)
    checkpoint.py  `Checkpointer`: orbax saves, retention, restore, damaged steps aside
    reader.py      `load_checkpoint`: one checkpoint's parameters, config and encoder, read-only
    resume.py      which config keys may change on resume
    metrics.py     metrics.jsonl and TensorBoard events (and W&B: wandb_log.py)
    goodput.py     where a run's wall time went, across restarts
    state.py       `TrainState` and its sharded initialisation
    optimizer.py   the optax optimizer and learning-rate schedule
    step.py        the pure train and eval steps
    program.py     `build_train_program`: mesh, model, optimizer, shardings, jitted steps
    model_info.py  a run config's model sized on its mesh, nothing allocated (`model-info`)

Training (`metatrain.train`) writes runs through this package; generation,
evaluation, export, import, serving and annotation read them through it (a trained
model through `reader.load_checkpoint`) and never import `metatrain.train`.
"""
