"""Starting metatrain on many processes, and checking a config against a target first.

    distributed.py  `jax.distributed.initialize` from the environment, before any device
    local.py        `launch local`: P processes on this machine, supervised
    plan.py         what the cluster launchers share: plans, the train command, checks
    tpu.py          `launch tpu`: TPU topologies; gcloud (one slice) or xpk (multi-slice)
    gke.py          `launch gke`: a JobSet manifest
    slurm.py        `launch slurm`: an sbatch script for GPU clusters
    compile.py      `compile`: the train step compiled ahead of time for a TPU topology
    fits.py         `compile`'s verdict: the report printed, a config that does not fit refused

How to go from a cluster to a training run, and which environment variables each
launcher sets: `launch/README.md` at the repository root.
"""
