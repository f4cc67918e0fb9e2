"""`metatrain launch local|tpu|gke|slurm [options] -- train [train args]` and `metatrain compile`.

Parsing only; the work is in `local`, `tpu`, `gke`, `slurm`, `plan` and `fits` (imported
when their command runs, so `--help` and dry runs stay light).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from metatrain.launch.validate import placeholder

_COMMAND_HELP = "the metatrain command every process runs, after --: train [train args]"
_EPILOG = "See launch/README.md for the path from a cluster to a training run."


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_launch(subparsers)
    _register_compile(subparsers)


# -- launch ---------------------------------------------------------------------------------


def _register_launch(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "launch",
        help="start a multi-process run: on this machine, a TPU pod, GKE or Slurm",
        description="Start `metatrain train` on every process of a run. " + _EPILOG,
    )
    targets = p.add_subparsers(dest="target", required=True, metavar="TARGET")
    _register_local(targets)
    _register_tpu(targets)
    _register_gke(targets)
    _register_slurm(targets)


def _placeholder_arg(p: argparse.ArgumentParser, option: str, text: str) -> None:
    default = placeholder(option)
    p.add_argument(option, default=default, help=f"{text} (default: {default}, to fill in)")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dry-run", action="store_true", help="print exactly what would run or be submitted, run nothing")
    p.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE",
        help="extra environment variable for every process (repeatable)",
    )
    p.add_argument("train_command", nargs=argparse.REMAINDER, metavar="-- train ...", help=_COMMAND_HELP)


def _register_local(targets: argparse._SubParsersAction) -> None:
    p = targets.add_parser(
        "local",
        help="P processes on this machine (CPU devices, gloo collectives)",
        description=(
            "Start P processes on this machine, joined by jax.distributed over the loopback, each "
            "with D CPU devices, running train, eval or annotate; stream their output with a [process N] prefix; stop them all if "
            "one dies. Exit status: 0, 75 when preempted (a checkpoint was saved; run again to "
            "resume), or the failing process's status (128+N for signal N)."
        ),
    )
    p.add_argument("--processes", type=int, required=True, metavar="P", help="number of processes")
    p.add_argument("--devices-per-process", type=int, default=1, metavar="D", help="CPU devices per process (default 1)")
    p.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
    p.add_argument("--dry-run", action="store_true", help="print the processes' command lines, run nothing")
    p.add_argument("train_command", nargs=argparse.REMAINDER, metavar="-- train|eval|annotate ...",
                   help="the metatrain command every process runs, after --: train [train args], or eval or "
                        "annotate [their args] (one model sharded over every process's devices, process 0 writes)")
    p.set_defaults(func=run_launch_local)


def _register_tpu(targets: argparse._SubParsersAction) -> None:
    p = targets.add_parser(
        "tpu",
        help="a TPU slice (gcloud) or several (xpk)",
        description=(
            "Run train on every worker of a TPU slice (gcloud compute tpus tpu-vm ssh --worker=all) "
            "or, for multi-slice, as an xpk workload with the mesh's data axis across slices. " + _EPILOG
        ),
    )
    p.add_argument("--topology", default="v5e:4x4", help="slice topology as `metatrain compile` takes it (default v5e:4x4)")
    p.add_argument("--num-slices", type=int, default=1, help="slices (multi-slice when > 1; default 1)")
    p.add_argument("--via", choices=("gcloud", "xpk"), default=None, help="gcloud for one slice, xpk for several (default)")
    _placeholder_arg(p, "--project", "Google Cloud project")
    _placeholder_arg(p, "--zone", "zone of the TPU")
    _placeholder_arg(p, "--tpu-name", "name of the TPU VM (gcloud)")
    _placeholder_arg(p, "--cluster", "GKE cluster (xpk)")
    _placeholder_arg(p, "--image", "container image with metatrain installed (xpk)")
    _placeholder_arg(p, "--git-url", "repository every worker clones (gcloud setup)")
    p.add_argument("--git-ref", default="main", help="branch or tag to clone (default main)")
    p.add_argument("--code-dir", default="~/metatrain", help="checkout on each worker (default ~/metatrain)")
    p.add_argument("--no-setup", dest="setup", action="store_false", help="skip cloning and installing (gcloud)")
    p.add_argument("--workload", default="metatrain", help="xpk workload name (default metatrain)")
    p.add_argument("--max-restarts", type=int, default=3, help="xpk restarts after a failure or preemption (default 3)")
    _common(p)
    p.set_defaults(func=run_launch_tpu)


def _register_gke(targets: argparse._SubParsersAction) -> None:
    p = targets.add_parser(
        "gke",
        help="a JobSet for TPU slices on GKE (kubectl apply)",
        description="Make a JobSet manifest (one pod per TPU host) and apply it with kubectl. " + _EPILOG,
    )
    p.add_argument("--topology", default="v5e:4x4", help="slice topology (default v5e:4x4)")
    p.add_argument("--num-slices", type=int, default=1, help="slices (default 1)")
    _placeholder_arg(p, "--image", "container image with metatrain installed")
    _placeholder_arg(p, "--bucket", "Cloud Storage bucket for the work directory")
    _placeholder_arg(p, "--service-account", "Kubernetes service account allowed to use the bucket")
    p.add_argument("--name", default="metatrain", help="JobSet name (default metatrain)")
    p.add_argument("--namespace", default="default", help="Kubernetes namespace (default default)")
    p.add_argument("--code-dir", default="/app", help="metatrain's directory in the image (default /app)")
    p.add_argument("--max-restarts", type=int, default=3, help="JobSet restarts after a failure or preemption (default 3)")
    p.add_argument("--grace-period", type=int, default=300, help="seconds between SIGTERM and SIGKILL (default 300)")
    _common(p)
    p.set_defaults(func=run_launch_gke)


def _register_slurm(targets: argparse._SubParsersAction) -> None:
    p = targets.add_parser(
        "slurm",
        help="an sbatch script for a GPU cluster",
        description="Make an sbatch script (one task per GPU or per node, coordinator on the first node) and submit it. " + _EPILOG,
    )
    _placeholder_arg(p, "--partition", "Slurm partition")
    p.add_argument("--account", default=None, help="Slurm account (default: none)")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    p.add_argument("--tasks", choices=("per-gpu", "per-node"), default="per-gpu", help="one process per GPU (default) or per node")
    p.add_argument("--time", default="24:00:00", help="time limit (default 24:00:00)")
    p.add_argument("--job-name", default="metatrain", help="job name (default metatrain)")
    p.add_argument("--cpus-per-task", type=int, default=None, help="CPUs per task (default: the partition's)")
    p.add_argument("--port", type=int, default=8476, help="coordinator port on the first node (default 8476)")
    p.add_argument("--signal-seconds", type=int, default=300, help="SIGTERM this long before the time limit (default 300)")
    p.add_argument("--code-dir", default=None, help="metatrain checkout on the cluster (default: this one)")
    p.add_argument("--python", default=None, help="Python on the cluster (default: this one)")
    _common(p)
    p.set_defaults(func=run_launch_slurm)


def parse_train_words(words: Sequence[str]) -> argparse.Namespace:
    """`words` (`train [train args]`) parsed by metatrain's own parser, as the job will be."""
    from metatrain.cli import build_parser

    return build_parser().parse_args(list(words))


def run_launch_local(args: argparse.Namespace) -> int:
    from metatrain.launch.local import launch_local

    return launch_local(args.train_command, parse=parse_train_words, processes=args.processes,
                        devices_per_process=args.devices_per_process, port=args.port, dry_run=args.dry_run)


def run_launch_tpu(args: argparse.Namespace) -> int:
    from metatrain.launch.plan import (
        carry_out,
        parse_env_assignments,
        parse_train_command,
    )
    from metatrain.launch.tpu import TpuOptions, tpu_plan

    options = TpuOptions(
        topology=args.topology, num_slices=args.num_slices, via=args.via, project=args.project,
        zone=args.zone, tpu_name=args.tpu_name, cluster=args.cluster, image=args.image,
        workload=args.workload, git_url=args.git_url, git_ref=args.git_ref, code_dir=args.code_dir,
        setup=args.setup, max_restarts=args.max_restarts, env=parse_env_assignments(args.env),
    )
    return carry_out(tpu_plan(options, parse_train_command(args.train_command, parse=parse_train_words, paths="checkout")),
                     dry_run=args.dry_run)


def run_launch_gke(args: argparse.Namespace) -> int:
    from metatrain.launch.gke import GkeOptions, gke_plan
    from metatrain.launch.plan import (
        carry_out,
        parse_env_assignments,
        parse_train_command,
    )

    options = GkeOptions(
        topology=args.topology, num_slices=args.num_slices, image=args.image, bucket=args.bucket,
        service_account=args.service_account, name=args.name, namespace=args.namespace,
        code_dir=args.code_dir, max_restarts=args.max_restarts, grace_period_s=args.grace_period,
        env=parse_env_assignments(args.env),
    )
    return carry_out(gke_plan(options, parse_train_command(args.train_command, parse=parse_train_words, paths="checkout")),
                     dry_run=args.dry_run)


def run_launch_slurm(args: argparse.Namespace) -> int:
    from metatrain.launch.plan import (
        carry_out,
        parse_env_assignments,
        parse_train_command,
    )
    from metatrain.launch.slurm import SlurmOptions, slurm_plan

    extra = {k: v for k, v in (("code_dir", args.code_dir), ("python", args.python)) if v is not None}
    options = SlurmOptions(
        partition=args.partition, nodes=args.nodes, gpus_per_node=args.gpus_per_node, tasks=args.tasks,
        account=args.account, time=args.time, job_name=args.job_name, cpus_per_task=args.cpus_per_task,
        port=args.port, signal_seconds=args.signal_seconds, env=parse_env_assignments(args.env), **extra,
    )
    return carry_out(slurm_plan(options, parse_train_command(args.train_command, parse=parse_train_words, paths="shared")),
                     dry_run=args.dry_run)


# -- compile --------------------------------------------------------------------------------


def _register_compile(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "compile",
        help="compile the training step (or, with --inference, the inference engine) ahead of time for a TPU "
             "topology; report memory",
        description=(
            "Compile the run's real training step (its model, optimizer, mesh and shardings) for a "
            "TPU topology on this CPU, and print per-device memory (arguments, temporaries, total) "
            "against the chip's HBM and the model FLOPs per step. Exits 2 when the config does not "
            "fit, or (before compiling) when model.vocab_size is not the piece count of data.tokenizer "
            "(checked when that file exists). Needs libtpu: pip install 'metatrain[tpu]'. "
            "With --inference: compile the inference engine's prefill and decode programs instead, for "
            "--batch slots of --context tokens, on the inference mesh (--set mesh.data|fsdp|tensor=N; "
            "default: fsdp as large as the model allows, the rest on data), and print per-chip memory "
            "(parameters, KV cache, temporaries, total) against the chip's HBM; exits 2, in one line, when "
            "the mesh does not divide the model or the engine does not fit."
        ),
    )
    p.add_argument("--config", type=Path, default=None, help="run config YAML (default configs/default.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (repeatable); with --inference, mesh.data, mesh.fsdp and "
                        "mesh.tensor choose the inference mesh (-1: the chips left over)")
    p.add_argument("--topology", required=True, help="TPU topology, e.g. v5e:2x2, v5p:4x4x4, v6e:8x8")
    p.add_argument("--num-slices", type=int, default=1, help="slices of that topology (multi-slice; sets mesh.dcn_data)")
    p.add_argument("--max-batch", action="store_true",
                   help="find the largest global trainer.batch_size that fits, by compiling (doubling, then bisecting)")
    engine = p.add_argument_group("the inference engine (--inference)")
    engine.add_argument("--inference", action="store_true",
                        help="compile the inference engine's prefill and decode programs, not the training step")
    engine.add_argument("--batch", type=int, default=None, metavar="B",
                        help="slots: rows decoded at once, as serve's --max-batch (default 32; rounded up to a "
                             "multiple of mesh.data)")
    engine.add_argument("--context", type=int, default=None, metavar="TOKENS",
                        help="tokens a row holds, prompt and reply (default model.max_seq_len)")
    engine.add_argument("--prompt", type=int, default=None, metavar="TOKENS",
                        help="prefill width: the longest prompt prefilled in one call (default min(512, context - 1); "
                             "every slot's prompt at once, as a batch job's first call)")
    p.set_defaults(func=run_compile)


#: The options that only the inference compile takes.
_ENGINE_OPTIONS = (("batch", "--batch"), ("context", "--context"), ("prompt", "--prompt"))


def run_compile(args: argparse.Namespace) -> int:
    from metatrain.config import load_config
    from metatrain.errors import UserError

    if not args.inference:
        given = [flag for name, flag in _ENGINE_OPTIONS if getattr(args, name) is not None]
        if given:
            raise UserError(f"{', '.join(given)}: {'options' if len(given) > 1 else 'an option'} of the inference compile; add --inference (the training "
                            "compile takes trainer.batch_size and trainer.seq_len through --set)")
        from metatrain.launch.fits import check_fit

        return check_fit(load_config(args.config, args.overrides), args.topology, args.num_slices,
                         max_batch=args.max_batch)
    if args.max_batch:
        raise UserError("--max-batch searches the training batch; with --inference give --batch B and read the report")
    from metatrain.launch.inference_compile import (
        DEFAULT_BATCH,
        check_inference_fit,
        split_settings,
    )

    overrides, mesh_settings = split_settings(args.overrides)
    return check_inference_fit(
        load_config(args.config, overrides), args.topology,
        batch=DEFAULT_BATCH if args.batch is None else args.batch, context=args.context, prompt=args.prompt,
        mesh_settings=mesh_settings, num_slices=args.num_slices,
    )
