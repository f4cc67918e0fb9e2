"""The training loop: one jitted, donating step; checkpoints, metrics and eval as hooks.

`metatrain.train.loop.train(config, workdir)` is what `metatrain train` calls.
Model code lives in `metatrain.models`; the loss in `metatrain.loss`; batches come
from `metatrain.data`.
"""
