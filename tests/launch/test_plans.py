"""The TPU, GKE and Slurm launchers: their dry-run plans, and that they run what they print.

Plans are checked for what makes a run start: the process count, the coordinator, the
mesh (dcn axis for multi-slice), the train command, and placeholders for every
cluster-specific option. Real launches run fake `gcloud`, `xpk`, `kubectl`, `sbatch`
from PATH that record what they were given; the Slurm script is run with fake `srun`
and `scontrol` to see the environment every task gets.
"""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

from metatrain.cli import main
from metatrain.launch import distributed as dist
from metatrain.launch.tpu import parse_topology

TRAIN = ["--", "train", "--config", "configs/default.yaml"]
#: The default run with a batch that splits over 128 devices (multi-slice plans).
BIG_BATCH = [*TRAIN, "--set", "trainer.batch_size=256"]


def dry_run(capsys, *argv: str, train: list[str] = TRAIN) -> str:
    assert main(["launch", *argv, "--dry-run", *train]) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def refused(capsys, *argv: str) -> str:
    assert main(["launch", *argv]) == 2
    return capsys.readouterr().err


def train_words(command: str) -> list[str]:
    """The words from `python3 -m metatrain.cli` on, in a shell command line."""
    words = shlex.split(command)
    start = words.index("metatrain.cli") + 1
    return words[start:]


# -- topologies --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "topology, chips, hosts, accelerator",
    [
        ("v5e:2x2", 4, 1, "v5litepod-4"),
        ("v5e:2x4", 8, 1, "v5litepod-8"),
        ("v5e:4x4", 16, 4, "v5litepod-16"),
        ("v5p:2x2x1", 4, 1, "v5p-8"),
        ("v5p:4x4x4", 64, 16, "v5p-128"),
        ("v4:2x2x2", 8, 2, "v4-16"),
        ("v6e:16x16", 256, 64, "v6e-256"),
    ],
)
def test_topologies_give_chips_hosts_and_accelerator_types(topology, chips, hosts, accelerator):
    tpu = parse_topology(topology)
    assert (tpu.chips, tpu.hosts, tpu.accelerator_type) == (chips, hosts, accelerator)


@pytest.mark.parametrize("topology, words", [
    ("v5e-16", ["GENERATION:SHAPE"]), ("v5p:4x4", ["3 dimensions", "v5p:2x2x2"]), ("v9:2x2", ["GENERATION one of", "v5e", "v6e"]),
])
def test_bad_topologies_are_refused(topology, words, capsys):
    err = refused(capsys, "tpu", "--topology", topology, "--dry-run", *TRAIN)
    for word in words:
        assert word in err


@pytest.mark.tpu
@pytest.mark.parametrize("topology", ["v5e:2x2", "v5e:4x4", "v5p:2x2x2", "v5p:4x4x4", "v6e:4x4", "v6e:16x16"])
def test_host_counts_agree_with_libtpu(topology, monkeypatch):
    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    topologies = pytest.importorskip("jax.experimental.topologies")
    pytest.importorskip("libtpu")
    devices = topologies.get_topology_desc(topology, "tpu").devices
    tpu = parse_topology(topology)
    assert len(devices) == tpu.chips
    assert len({d.process_index for d in devices}) == tpu.hosts


# -- TPU ---------------------------------------------------------------------------------------


def test_tpu_dry_run_is_a_complete_plan_to_fill_in(capsys):
    out = dry_run(capsys, "tpu")
    for option in ("<PROJECT>", "<ZONE>", "<TPU_NAME>", "<GIT_URL>"):
        assert option in out
    commands = [line for line in out.splitlines() if line.startswith("gcloud compute tpus tpu-vm ssh")]
    assert len(commands) == 2  # setup, then train
    argv = shlex.split(commands[-1])
    assert "--worker=all" in argv and "<TPU_NAME>" in argv
    remote = next(a for a in argv if a.startswith("--command=")).removeprefix("--command=")
    assert f"{dist.ENV_MODE}=auto" in remote
    assert train_words(remote) == ["train", "--config", "configs/default.yaml"]
    assert "16 chips, 4 hosts x 4 chips" in out and "processes: 4" in out
    assert "mesh data=16 fsdp=1 tensor=1 over 16 devices" in out


def test_tpu_multi_slice_uses_xpk_and_puts_data_parallelism_across_slices(capsys):
    out = dry_run(capsys, "tpu", "--topology", "v5p:4x4x4", "--num-slices", "2", "--cluster", "c1", train=BIG_BATCH)
    (command,) = [line for line in out.splitlines() if line.startswith("xpk workload create")]
    argv = shlex.split(command)
    assert {"--cluster=c1", "--tpu-type=v5p-128", "--num-slices=2", "--docker-image=<IMAGE>"} <= set(argv)
    remote = next(a for a in argv if a.startswith("--command=")).removeprefix("--command=")
    assert train_words(remote) == [*BIG_BATCH[1:], "--set", "mesh.dcn_data=2"]
    assert "128 chips, 32 hosts" in out and "processes: 32" in out
    assert "mesh data=128 fsdp=1 tensor=1 over 128 devices, data parallel across 2 slices" in out


def test_tpu_plans_refuse_runs_that_cannot_split(capsys):
    err = refused(capsys, "tpu", "--dry-run", "--", "train", "--set", "mesh.tensor=3")
    assert "mesh" in err and "3" in err
    err = refused(capsys, "tpu", "--topology", "v5p:4x4x4", "--dry-run", "--", "train", "--set", "trainer.batch_size=8")
    assert "trainer.batch_size=8 is not divisible by 64" in err
    # Tensor parallelism over 2 of the 16 GPUs: the mesh takes a batch of 8, the 16 processes cannot.
    err = refused(capsys, "slurm", "--nodes", "2", "--dry-run", "--", "train", "--set", "mesh.tensor=2",
                  "--set", "trainer.batch_size=8")
    assert "trainer.batch_size=8 is not divisible by the 16 processes" in err
    err = refused(capsys, "tpu", "--num-slices", "2", "--dry-run", "--", "train", "--set", "mesh.dcn_data=4")
    assert "mesh.dcn_data=4" in err and "mesh.dcn_data=2" in err
    err = refused(capsys, "tpu", "--num-slices", "2", "--via", "gcloud", "--dry-run", *TRAIN)
    assert "xpk" in err
    assert "no command to launch" in refused(capsys, "tpu", "--dry-run")


# -- GKE ---------------------------------------------------------------------------------------


def test_gke_dry_run_is_a_valid_jobset(capsys):
    out = dry_run(capsys, "gke", "--topology", "v5e:4x4", "--num-slices", "2", train=BIG_BATCH)
    manifest = yaml.safe_load(out)
    assert manifest["kind"] == "JobSet" and manifest["apiVersion"].startswith("jobset.x-k8s.io/")
    (job,) = manifest["spec"]["replicatedJobs"]
    assert job["replicas"] == 2
    spec = job["template"]["spec"]
    assert spec["parallelism"] == spec["completions"] == 4 and spec["completionMode"] == "Indexed"
    pod = spec["template"]["spec"]
    assert pod["nodeSelector"] == {
        "cloud.google.com/gke-tpu-accelerator": "tpu-v5-lite-podslice",
        "cloud.google.com/gke-tpu-topology": "4x4",
    }
    (container,) = pod["containers"]
    assert container["image"] == "<IMAGE>"
    assert container["resources"]["limits"]["google.com/tpu"] == 4
    assert {"name": dist.ENV_MODE, "value": "auto"} in container["env"]
    command = container["command"]
    assert command[:4] == ["python3", "-m", "metatrain.cli", "train"]
    assert command[command.index("--workdir") + 1] == "/workdir/metatrain"  # on the mounted bucket
    assert "mesh.dcn_data=2" in command
    assert pod["volumes"][0]["csi"]["volumeAttributes"]["bucketName"] == "<BUCKET>"
    assert "8 pods (processes)" in out and "data parallel across 2 slices" in out


# -- Slurm -------------------------------------------------------------------------------------


def test_slurm_dry_run_is_a_batch_script_with_processes_and_coordinator(capsys):
    out = dry_run(capsys, "slurm", "--nodes", "2", "--gpus-per-node", "8")
    assert out.startswith("#!/bin/bash\n")
    for line in ("#SBATCH --partition=<PARTITION>", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8",
                 "#SBATCH --gpus-per-node=8", f"export {dist.ENV_NUM_PROCESSES}=16", "#SBATCH --requeue"):
        assert line in out.splitlines()
    assert f'export {dist.ENV_COORDINATOR}="$head_node:8476"' in out
    assert "mesh data=16 fsdp=1 tensor=1 over 16 devices" in out
    subprocess.run(["bash", "-n"], input=out, text=True, check=True)  # valid bash

    per_node = dry_run(capsys, "slurm", "--nodes", "2", "--tasks", "per-node")
    assert "#SBATCH --ntasks-per-node=1" in per_node and f"export {dist.ENV_NUM_PROCESSES}=2" in per_node
    assert dist.ENV_LOCAL_DEVICE_IDS not in per_node


def write_tool(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.fixture
def fake_bin(tmp_path, monkeypatch) -> Path:
    """A directory first on PATH for fake cluster tools; each records argv and stdin in $RECORD."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("RECORD", str(tmp_path / "record"))
    for tool in ("gcloud", "xpk", "kubectl", "sbatch"):
        write_tool(bin_dir, tool, f'printf "%s\\n" "{tool}" "$@" >> "$RECORD.argv"; cat > "$RECORD.stdin"\n')
    return bin_dir


def test_slurm_script_gives_every_task_its_id_and_the_coordinator_and_requeues_on_preemption(tmp_path, capsys, fake_bin):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    python = tmp_path / "python"  # stands in for the Python that runs metatrain: records its environment
    write_tool(tmp_path, "python", (
        f'env | grep ^METATRAIN_ | sort > {tasks}/"$METATRAIN_PROCESS_ID"\n'
        f'echo "$@" > {tasks}/argv\n'
        'exit "${FAKE_EXIT:-0}"\n'
    ))
    write_tool(fake_bin, "scontrol", (
        'if [ "$1 $2" = "show hostnames" ]; then echo gpu-node-007; echo gpu-node-008;\n'
        'else echo "$@" >> "$RECORD.scontrol"; fi\n'
    ))
    # srun: start every task of the job (2 nodes x 2 GPUs) with Slurm's per-task variables.
    write_tool(fake_bin, "srun", (
        'while [ "$1" != bash ]; do shift; done\n'
        "status=0\n"
        "for id in 0 1 2 3; do SLURM_PROCID=$id SLURM_LOCALID=$((id % 2)) \"$@\" || status=$?; done\n"
        'exit "$status"\n'
    ))
    script = dry_run(capsys, "slurm", "--nodes", "2", "--gpus-per-node", "2", "--port", "9123", "--python",
                     str(python), "--code-dir", str(tmp_path), "--env", "NCCL_DEBUG=WARN")
    # The suite's own METATRAIN_ settings (its compilation cache) are left out: only the script's are checked.
    env = {key: value for key, value in os.environ.items() if not key.startswith("METATRAIN_")}
    env |= {"SLURM_JOB_NODELIST": "gpu-node-[007-008]", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "42"}

    assert subprocess.run(["bash"], input=script, text=True, env=env, timeout=60).returncode == 0
    for task in range(4):
        assert (tasks / str(task)).read_text().splitlines() == [
            f"{dist.ENV_COORDINATOR}=gpu-node-007:9123",
            f"{dist.ENV_LOCAL_DEVICE_IDS}={task % 2}",
            f"{dist.ENV_NUM_PROCESSES}=4",
            f"{dist.ENV_PROCESS_ID}={task}",
        ]
    # -P: metatrain comes from --code-dir (PYTHONPATH), not the launch directory; the config path is absolute
    assert (tasks / "argv").read_text().split() == [
        "-P", "-m", "metatrain.cli", "train", "--config", os.path.abspath("configs/default.yaml"),
    ]
    assert not Path(os.environ["RECORD"] + ".scontrol").exists()

    preempted = subprocess.run(["bash"], input=script, text=True, env={**env, "FAKE_EXIT": "75"}, timeout=60)
    assert preempted.returncode == 75
    assert Path(os.environ["RECORD"] + ".scontrol").read_text().split() == ["requeue", "42"]

    wrong_count = subprocess.run(["bash"], input=script, text=True, env={**env, "SLURM_NTASKS": "3"},
                                 capture_output=True, timeout=60)
    assert wrong_count.returncode == 1 and "expected 4 tasks" in wrong_count.stderr


# -- launching for real ------------------------------------------------------------------------


def test_a_plan_with_placeholders_is_not_launched(capsys, fake_bin):
    err = refused(capsys, "slurm", *TRAIN)
    assert "<PARTITION>" in err and "--partition" in err
    err = refused(capsys, "tpu", *TRAIN)
    assert "--project" in err and "--zone" in err and "--tpu-name" in err and "--git-url" in err
    assert not Path(os.environ["RECORD"] + ".argv").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["slurm", "--partition", "gpu"],
        ["gke", "--image", "img:1", "--bucket", "my-bucket", "--service-account", "sa"],
        ["tpu", "--project", "my-project", "--zone", "us-east5-a", "--tpu-name", "t", "--git-url", "https://example.com/m.git"],
        ["tpu", "--project", "my-project", "--zone", "us-east5-a", "--num-slices", "2", "--cluster", "c", "--image", "img:1"],
    ],
)
def test_a_launch_runs_exactly_the_printed_plan(argv, capsys, fake_bin):
    printed = dry_run(capsys, *argv, train=BIG_BATCH)
    assert main(["launch", *argv, *BIG_BATCH]) == 0, capsys.readouterr().err
    log = capsys.readouterr().out
    recorded = Path(os.environ["RECORD"] + ".argv").read_text().splitlines()
    stdin = Path(os.environ["RECORD"] + ".stdin").read_text()
    if argv[0] == "tpu":  # commands: each printed line ran, as printed
        ran = [line.removeprefix("[launch] $ ") for line in log.splitlines() if line.startswith("[launch] $ ")]
        planned = [line for line in printed.splitlines() if line and not line.startswith("#")]
        assert ran == planned
        assert recorded == [word for line in planned for word in shlex.split(line)]
    else:  # the manifest or script went to kubectl / sbatch as printed
        assert recorded[0] == {"gke": "kubectl", "slurm": "sbatch"}[argv[0]]
        body = printed if argv[0] == "slurm" else printed.split("\napiVersion", 1)[1]
        assert stdin.strip().endswith(body.strip())


def test_a_missing_cluster_tool_is_named(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    err = refused(capsys, "slurm", "--partition", "gpu", *TRAIN)
    assert "sbatch is not on PATH" in err


def test_a_work_directory_in_a_bucket_reaches_every_plan_as_it_was_given(capsys):
    # A pod's hosts share no disk: `--workdir gs://...` is the same path on every host, so no
    # launcher may make it "absolute" against a local directory (gs:// must keep its //).
    words = [*TRAIN, "--workdir", "gs://team-bucket/runs/r1"]
    for plan in (("tpu",), ("slurm",), ("gke",)):
        out = dry_run(capsys, *plan, train=words)
        assert "gs://team-bucket/runs/r1" in out, plan
        assert "gs:/team-bucket" not in out.replace("gs://", ""), plan
    tpu = dry_run(capsys, "tpu", train=words)
    command = [line for line in tpu.splitlines() if line.startswith("gcloud compute tpus tpu-vm ssh")][-1]
    remote = next(a for a in shlex.split(command) if a.startswith("--command=")).removeprefix("--command=")
    assert train_words(remote)[-2:] == ["--workdir", "gs://team-bucket/runs/r1"]
