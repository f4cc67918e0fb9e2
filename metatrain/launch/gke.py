"""`metatrain launch gke`: a JobSet manifest for TPU slices on GKE, applied with kubectl.

One replicated Job per slice (`replicas` = slices), each an Indexed Job with one pod per
TPU host (`parallelism` = `completions` = hosts); the pods select the slice's node pool
by GKE's TPU labels and request the host's chips (`google.com/tpu`). Every container
runs `python3 -m metatrain.cli train ...` with `METATRAIN_DISTRIBUTED=auto`: JAX reads
the coordinator, process count and id from the variables GKE's TPU webhook sets
(`TPU_WORKER_HOSTNAMES`, `TPU_WORKER_ID`, and `MEGASCALE_*` for multi-slice).

The work directory lives on a Cloud Storage bucket mounted with the GCS FUSE CSI driver
(every host sees it; checkpoints are written collectively). On preemption every process
saves and exits 75; the JobSet's failure policy restarts it and the run resumes.

Paths: the container runs in `--code-dir` of the image, which holds this repository, so
a relative `--config` is a file of this repository, relative to its root (an absolute one
is read at that path in the pod); `--workdir` and `--set` paths are the pod's (the bucket
is at /workdir). Names are validated before
the manifest is made (`metatrain.launch.validate`): the YAML serializer quotes values,
but only a valid name gets past Kubernetes and JobSet's webhook.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import yaml

from metatrain.launch import distributed as dist
from metatrain.launch import validate
from metatrain.launch.plan import Command, Plan, TrainCommand, check_run_shape, set_override, with_workdir
from metatrain.launch.tpu import parse_topology

WORKDIR_MOUNT = "/workdir"
#: The manifest's one replicated Job (one per slice); part of every Job's and pod's name.
REPLICATED_JOB = "slice"


def max_name_length(num_slices: int, hosts: int) -> int:
    """The longest JobSet name whose pods' names are DNS-1035 labels (63 characters).

    A pod is named `<jobset>-<replicatedJob>-<jobIndex>-<podIndex>-<5 random characters>`;
    JobSet's webhook checks the longest one, with the last job and pod index
    (kubernetes-sigs/jobset, pkg/webhooks/jobset_webhook.go, ValidateCreate, and
    pkg/util/placement GenPodName). Job names (`<jobset>-<replicatedJob>-<jobIndex>`) are
    shorter, so the pods set the limit.
    """
    longest_pod_suffix = f"-{REPLICATED_JOB}-{num_slices - 1}-{hosts - 1}-abcde"
    return 63 - len(longest_pod_suffix)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GkeOptions:
    """Options of `metatrain launch gke` (placeholders such as `<IMAGE>` under --dry-run)."""

    topology: str
    num_slices: int = 1
    image: str
    bucket: str
    service_account: str
    name: str = "metatrain"
    namespace: str = "default"
    code_dir: str = "/app"
    max_restarts: int = 3
    grace_period_s: int = 300
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        hosts = parse_topology(self.topology).hosts
        validate.check_range("--num-slices", self.num_slices, 1, what="the slice count")
        limit = max_name_length(self.num_slices, hosts)
        validate.JOBSET_NAME.check(
            "--name", self.name, max_len=limit,
            why_max=f" here (its pods are named <name>-{REPLICATED_JOB}-<slice>-<host>-<5 random characters>, "
            f"at most 63 characters, with {self.num_slices} slice(s) of {hosts} host(s))",
        )
        validate.NAMESPACE.check("--namespace", self.namespace)
        validate.IMAGE.check("--image", self.image)
        validate.GCS_BUCKET.check("--bucket", self.bucket)
        validate.SERVICE_ACCOUNT.check("--service-account", self.service_account)
        if not validate.check_path("--code-dir", self.code_dir).startswith("/"):
            raise validate.refusal("--code-dir", self.code_dir, "metatrain's directory in the image (the "
                                   "container's working directory) must be an absolute path, e.g. --code-dir /app")
        validate.check_range("--max-restarts", self.max_restarts, 0, what="the restart count")
        validate.check_range("--grace-period", self.grace_period_s, 0, what="the grace period in seconds")
        validate.check_env("--env", self.env)


def _container(options: GkeOptions, train: TrainCommand, chips_per_host: int) -> dict[str, Any]:
    env = {dist.ENV_MODE: "auto", **options.env}
    return {
        "name": "metatrain",
        "image": options.image,
        "workingDir": options.code_dir,
        "command": ["python3", "-m", "metatrain.cli", *train.args],
        "env": [{"name": k, "value": v} for k, v in env.items()],
        "ports": [{"containerPort": 8471}, {"containerPort": 8080}, {"containerPort": 8476}],
        "resources": {"limits": {"google.com/tpu": chips_per_host}},
        "volumeMounts": [{"name": "workdir", "mountPath": WORKDIR_MOUNT}],
    }


def jobset_manifest(options: GkeOptions, train: TrainCommand) -> dict[str, Any]:
    """The JobSet as a dict (after `--set mesh.dcn_data` and `--workdir` were added to `train`)."""
    tpu = parse_topology(options.topology)
    pod = {
        "metadata": {"annotations": {"gke-gcsfuse/volumes": "true"}},
        "spec": {
            "restartPolicy": "Never",
            "serviceAccountName": options.service_account,
            "hostNetwork": True,
            "dnsPolicy": "ClusterFirstWithHostNet",
            "terminationGracePeriodSeconds": options.grace_period_s,
            "nodeSelector": {
                "cloud.google.com/gke-tpu-accelerator": tpu.generation.gke_accelerator,
                "cloud.google.com/gke-tpu-topology": tpu.shape,
            },
            "containers": [_container(options, train, tpu.chips_per_host)],
            "volumes": [
                {
                    "name": "workdir",
                    "csi": {
                        "driver": "gcsfuse.csi.storage.gke.io",
                        # Pods on the host network mount with their own service account only
                        # when they opt in (GoogleCloudPlatform/gcs-fuse-csi-driver,
                        # docs/authentication.md: hostNetwork pods set hostNetworkPodKSA: "true").
                        "volumeAttributes": {"bucketName": options.bucket, "hostNetworkPodKSA": "true"},
                    },
                }
            ],
        },
    }
    return {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": {
            "name": options.name,
            "namespace": options.namespace,
            "annotations": {"alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"},
        },
        "spec": {
            "failurePolicy": {"maxRestarts": options.max_restarts},
            "replicatedJobs": [
                {
                    "name": REPLICATED_JOB,
                    "replicas": options.num_slices,
                    "template": {
                        "spec": {
                            "parallelism": tpu.hosts,
                            "completions": tpu.hosts,
                            "completionMode": "Indexed",
                            "backoffLimit": 0,
                            "template": pod,
                        }
                    },
                }
            ],
        },
    }


def gke_plan(options: GkeOptions, train: TrainCommand) -> Plan:
    """The plan for `metatrain launch gke`: the manifest, applied with `kubectl apply -f -`.

    Raises:
        UserError: bad topology or slices, or a run that does not fit the chips.
    """
    tpu = parse_topology(options.topology)
    train = set_override(train, "mesh.dcn_data", options.num_slices)
    if not train.has_workdir:
        train = with_workdir(train, f"{WORKDIR_MOUNT}/{options.name}")
    processes = tpu.hosts * options.num_slices
    mesh = check_run_shape(train.config, tpu.chips * options.num_slices, processes)
    manifest = yaml.safe_dump(jobset_manifest(options, train), sort_keys=False, default_flow_style=False)
    header = [
        "# metatrain launch gke: a JobSet for GKE with TPU node pools; it is submitted with",
        "#   kubectl apply -f -   (this manifest on standard input)",
        f"# TPU {tpu.accelerator_type} (topology {tpu.topology}) x {options.num_slices} slice(s): "
        f"{tpu.chips * options.num_slices} chips, {processes} pods (processes) x {tpu.chips_per_host} chips",
        f"# coordinator: pod 0 of slice 0, found by jax.distributed ({dist.ENV_MODE}=auto)",
        f"# {mesh}",
        f"# work directory: gs://{options.bucket} mounted at {WORKDIR_MOUNT} (GCS FUSE CSI driver)",
    ]
    text = "\n".join(header) + "\n" + manifest
    return Plan(text.rstrip("\n"), (Command(("kubectl", "apply", "-f", "-"), stdin=manifest),))
