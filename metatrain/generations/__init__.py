"""The generational loop as one resumable command (`metatrain generations run|report`).

Each generation annotates the raw corpus with the previous generation's model (generation
0: an existing annotated corpus, an endpoint or a checkpoint), trains a model on it and
evaluates that model on held-out documents; see docs/generations.md.

- `spec`: the SPEC.yaml of a loop, strictly parsed.
- `manifest`: `DIR/manifest.json`, the loop's state, rewritten after every stage.
- `child`: a stage as a supervised `metatrain` child process.
- `results`: what each stage gives the manifest, read from its files.
- `run`: the loop.
- `report`: the table per generation and `DIR/generations.png`.
"""
