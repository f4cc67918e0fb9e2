"""Scaling-law sweeps: size families, planning, running, fitting L(N, D), plots.

    family.py    model presets defined by one number (`tiny-1` ... `base-48`, `tiny-width-1024`)
    spec.py      the sweep spec (SWEEP.yaml) as frozen typed dataclasses
    plan.py      spec -> one resolved run config per point + DIR/manifest.jsonl
    manifest.py  reading and writing the manifest (the contract `sweep fit` reads)
    run.py       train the points here (resumable) or emit launch commands
    law.py       L(N, D) = E + A/N^alpha + B/D^beta by Huber + L-BFGS (approach 3)
    isoflop.py   IsoFLOP parabolas and N_opt(C), D_opt(C) power laws (approach 2)
    fit.py       manifest -> checked series -> fits -> JSON report
    plots.py     PNGs of the fits
    steps.py     the steps as `metatrain sweep` runs them, each printing what it did

Parameter counts and FLOPs per token are `ModelConfig`'s (metatrain.models.config);
training is the real trainer (metatrain.train.loop). Nothing here is imported by them.
"""
