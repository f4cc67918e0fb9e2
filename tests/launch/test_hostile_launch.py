"""Hostile values through every launcher: refused in one line, or quoted so that running
what the launcher printed or ran cannot run an injected command.

"Running" is real: the printed Slurm script and TPU command lines are run with bash
against stub `sbatch`, `srun`, `scontrol`, `gcloud`, `xpk`, `kubectl`, `git`, `pip`,
`python` and `python3`, which record their working directory and arguments (NUL
separated, so an argument is compared whole); `gcloud ... ssh --command=C` and
`xpk ... --command=C` run C with bash, as the worker would. Every injection tries to
`touch $PWNED`; the marker file must never appear. Also here: what sbatch reads from
the script (directives stop at the first command), the JobSet name limit, the GCS FUSE
attribute for host-network pods, where each launcher resolves `--config` from, and the
local launcher's port.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from metatrain.cli import main
from metatrain.io.paths import REPO_ROOT

pytestmark = pytest.mark.hostile

TINY = ["--config", "configs/tiny.yaml"]

#: Shell injections a launcher must quote (words of the train command, env values, paths).
INJECTIONS = [
    "a; touch $PWNED",
    "$(touch $PWNED)",
    "`touch $PWNED`",
    "a'; touch $PWNED; echo '",
    'a"; touch $PWNED; echo "',
    "a && touch $PWNED #",
    "a | touch $PWNED",
    "a\\'; touch $PWNED",
]
#: The same without spaces or quotes (a git URL cannot hold those).
URL_INJECTIONS = [
    "https://example.com/m.git;touch${IFS}$PWNED",
    "https://example.com/$(touch${IFS}$PWNED).git",
    "https://example.com/`touch${IFS}$PWNED`.git",
    "https://example.com/m.git&&touch${IFS}$PWNED",
    "https://example.com/m.git|touch${IFS}$PWNED",
]
#: Characters that end or split a line: refused wherever they appear.
CONTROL = [
    "a\ntouch $PWNED",
    "a\rtouch $PWNED",
    "a\r\ntouch $PWNED",
    "a\x85touch $PWNED",
    "a\u2028touch $PWNED",
    "a\x00b",
    "a\x1b[2Jb",
    "a\u202eb",
    "a\tb",
]
#: Names no launcher target accepts (quotes, spaces, '#', '%', too long, ...).
BAD_NAMES = [*CONTROL, *INJECTIONS, "a b", "a#b", "a%b", "a/b", "x" * 300]
#: Each injection (to be quoted) with a control character (to be refused), for the tests
#: that check both in one run.
PAIRS = list(zip([*INJECTIONS, *INJECTIONS], CONTROL))


# -- running the launcher and what it printed ------------------------------------------------


@dataclasses.dataclass
class Result:
    code: int
    out: str
    err: str


def opt(option: str, value: str) -> str:
    """`--option=value`: argparse would take a value starting with '-' for an option."""
    return f"{option}={value}"


def launch(capsys, *argv: str) -> Result:
    code = main(["launch", *argv])
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)


def assert_refused(result: Result, option: str, shown: object) -> None:
    """Exit 2 and one line naming the option and the value (repr'd)."""
    assert result.code == 2, result.out
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith("metatrain launch: error: "), lines[0]
    assert f"{option} {shown!r}" in lines[0], lines[0]


@dataclasses.dataclass(frozen=True)
class Call:
    """One run of a stub: its working directory, $HOSTILE_ENV, $PYTHONPATH and arguments."""

    cwd: str
    hostile_env: str
    pythonpath: str
    argv: list[str]


@dataclasses.dataclass
class Stubs:
    bin: Path
    log: Path
    marker: Path
    home: Path

    def env(self, **extra: str) -> dict[str, str]:
        """This process's environment (the stubs first on PATH), with the workers' home."""
        return {**os.environ, "HOME": str(self.home), **extra}

    def calls(self, name: str) -> list[Call]:
        calls = []
        for record in sorted(self.log.glob(f"{name}.*")):
            if record.suffix == ".stdin":
                continue
            cwd, hostile, pythonpath, *argv = record.read_bytes().decode().split("\0")[:-1]
            calls.append(Call(cwd, hostile, pythonpath, argv))
        return calls

    def stdin(self, name: str) -> str:
        (record,) = self.log.glob(f"{name}.*.stdin")
        return record.read_text()

    def bash(self, script: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash"], input=script, text=True, cwd=cwd, env=self.env(**env),
                              capture_output=True, timeout=60)


_RECORD = 'f=$(mktemp "$STUB_LOG/{name}.XXXXXX"); printf "%s\\0" "$PWD" "${{HOSTILE_ENV-}}" "${{PYTHONPATH-}}" "$@" > "$f"\n'
_STUB_BODIES = {
    "sbatch": 'cat > "$f.stdin"\n',
    "kubectl": 'cat > "$f.stdin"\n',
    # srun: run the task (bash -c TASK) as the job's only task
    "srun": 'while [ $# -gt 0 ] && [ "$1" != bash ]; do shift; done\nSLURM_PROCID=0 SLURM_LOCALID=0 exec "$@"\n',
    "scontrol": 'if [ "$1 $2" = "show hostnames" ]; then echo node-1; fi\n',
    # the worker runs the command with its shell, in its home directory
    "gcloud": 'for a in "$@"; do case "$a" in --command=*) cd "$HOME" && exec bash -c "${a#--command=}";; esac; done\n',
    "xpk": 'for a in "$@"; do case "$a" in --command=*) exec bash -c "${a#--command=}";; esac; done\n',
}


def write_stub(path: Path, name: str) -> None:
    path.write_text("#!/bin/bash\n" + _RECORD.format(name=name) + _STUB_BODIES.get(name, "") + "exit 0\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.fixture
def stubs(tmp_path, monkeypatch) -> Stubs:
    """Stub commands first on PATH (also for the launcher itself), and $PWNED, the marker."""
    s = Stubs(tmp_path / "bin", tmp_path / "log", tmp_path / "pwned", tmp_path / "home")
    for directory in (s.bin, s.log, s.home):
        directory.mkdir()
    for name in ("sbatch", "srun", "scontrol", "gcloud", "xpk", "kubectl", "git", "pip", "python", "python3"):
        write_stub(s.bin / name, name)
    monkeypatch.setenv("PATH", f"{s.bin}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("STUB_LOG", str(s.log))
    monkeypatch.setenv("PWNED", str(s.marker))
    return s


def commands_of(text: str) -> str:
    """The lines of a printed plan that a shell runs (comments and blank lines dropped)."""
    return "\n".join(line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#"))


# -- Slurm -------------------------------------------------------------------------------------


def sbatch_directives(script: str) -> list[str]:
    """The options sbatch reads from a script, as sbatch reads them (Slurm src/sbatch/opt.c,
    _opt_batch_script and _get_argument): the words of `#SBATCH` lines, up to the first
    line that is neither blank nor a comment; words split at ASCII whitespace, quotes and
    backslashes consumed, an unquoted '#' starts a comment."""
    words: list[str] = []
    for line in script.split("\n"):
        if line.startswith("#SBATCH"):
            words += _sbatch_words(line[len("#SBATCH"):])
        elif line.lstrip(" \t\v\f\r")[:1] not in ("", "#"):
            break
    return words


def _sbatch_words(text: str) -> list[str]:
    words: list[str] = []
    word: list[str] | None = None
    quote = None
    chars = iter(text)
    for c in chars:
        if quote is None and c in " \t\n\v\f\r":
            if word is not None:
                words.append("".join(word))
            word = None
            continue
        if quote is None and c == "#":
            break
        word = [] if word is None else word
        if c == "\\":
            word.append(next(chars, ""))
        elif quote is not None:
            quote = None if c == quote else quote
            if quote is not None:
                word.append(c)
        elif c in "\"'":
            quote = c
        else:
            word.append(c)
    if word is not None:
        words.append("".join(word))
    return words


SLURM_ONE_GPU = ["slurm", "--partition", "gpu", "--nodes", "1", "--gpus-per-node", "1"]
SLURM_JOB_ENV = {"SLURM_JOB_NODELIST": "node-1", "SLURM_NTASKS": "1", "SLURM_JOB_ID": "42"}


@pytest.mark.parametrize("option", ["--job-name", "--time", "--partition", "--account"])
@pytest.mark.parametrize("value", BAD_NAMES, ids=repr)
def test_slurm_directive_values_are_refused_or_cannot_break_the_directives(option, value, capsys, stubs, tmp_path):
    argv = [*SLURM_ONE_GPU, "--python", str(stubs.bin / "python"), opt(option, value)]
    result = launch(capsys, *argv, "--dry-run", "--", "train", *TINY)
    if result.code == 2 or value in CONTROL:
        assert_refused(result, option, value)
        return
    assert result.code == 0, result.err
    stubs.bash(result.out, tmp_path, **SLURM_JOB_ENV)
    assert not stubs.marker.exists(), "the injected command ran"
    directives = sbatch_directives(result.out)
    assert "--requeue" in directives and "--signal=TERM@300" in directives
    assert f"{option}={value}" in directives  # one intact word


def test_slurm_directives_are_contiguous_and_read_whole(capsys, stubs, tmp_path):
    # the parser reads what sbatch reads
    script = "#!/bin/bash\n#SBATCH --job-name='a b' --time=1 # note\n\n# c\n#SBATCH --requeue\necho\n#SBATCH --x"
    assert sbatch_directives(script) == ["--job-name=a b", "--time=1", "--requeue"]
    # a newline would end the directives before --requeue and --signal
    assert_refused(launch(capsys, *SLURM_ONE_GPU, "--job-name", "a\necho", "--dry-run", "--", "train", *TINY),
                   "--job-name", "a\necho")

    result = launch(capsys, *SLURM_ONE_GPU, "--partition", "gpu,gpu-long", "--account", "lab.x_1",
                    "--time", "1-12:30:00", "--job-name", "my.run_1", "--dry-run", "--", "train", *TINY)
    assert result.code == 0, result.err
    directives = sbatch_directives(result.out)
    for directive in ("--partition=gpu,gpu-long", "--account=lab.x_1", "--time=1-12:30:00", "--job-name=my.run_1",
                      "--output=my.run_1-%j.out", "--requeue", "--signal=TERM@300"):
        assert directive in directives
    header = result.out.split("\n\n")[0].splitlines()  # the directives and comments, up to the first blank line
    assert all(line.startswith("#") for line in header)
    assert [line for line in result.out.splitlines() if line.startswith("#SBATCH")] == [
        line for line in header if line.startswith("#SBATCH")
    ]


@pytest.mark.parametrize("value", INJECTIONS, ids=repr)
def test_slurm_quotes_train_args_env_and_paths_in_the_script(value, capsys, stubs, tmp_path, monkeypatch):
    launch_dir = tmp_path / "launch"
    (launch_dir / value).mkdir(parents=True)  # --code-dir, named by the injection
    python = tmp_path / value / "python"  # --python, under a directory named by the injection
    python.parent.mkdir()
    write_stub(python, "python")
    monkeypatch.chdir(launch_dir)
    launch_dir = Path.cwd()
    config = str(REPO_ROOT / "configs" / "tiny.yaml")
    result = launch(capsys, *SLURM_ONE_GPU, "--code-dir", value, "--python", str(python), "--env", f"HOSTILE_ENV={value}",
                    "--dry-run", "--", "train", "--config", config, "--workdir", value, "--set", f"data.tokenizer=tok{value}")
    assert result.code == 0, result.err

    run = stubs.bash(result.out, tmp_path, **SLURM_JOB_ENV)
    assert run.returncode == 0, run.stderr
    (call,) = stubs.calls("python")
    assert call.argv == ["-P", "-m", "metatrain.cli", "train", "--config", config, "--workdir", str(launch_dir / value),
                         "--set", f"data.tokenizer=tok{value}"]
    assert call.hostile_env == value and call.cwd == str(launch_dir)
    assert call.pythonpath.split(os.pathsep)[0] == str(launch_dir / value)
    assert not stubs.marker.exists()


@pytest.mark.parametrize("value", CONTROL, ids=repr)
def test_slurm_refuses_control_characters_in_every_shell_value(value, capsys, stubs):
    train = ["--", "train", *TINY]
    assert_refused(launch(capsys, *SLURM_ONE_GPU, "--env", f"HOSTILE_ENV={value}", "--dry-run", *train),
                   "--env", f"HOSTILE_ENV={value}")
    assert_refused(launch(capsys, *SLURM_ONE_GPU, "--code-dir", value, "--dry-run", *train), "--code-dir", value)
    assert_refused(launch(capsys, *SLURM_ONE_GPU, "--python", value, "--dry-run", *train), "--python", value)
    assert_refused(launch(capsys, *SLURM_ONE_GPU, "--dry-run", *train, "--workdir", value), "--workdir", value)
    assert_refused(launch(capsys, *SLURM_ONE_GPU, "--dry-run", *train, "--set", f"data.tokenizer={value}"),
                   "--set", f"data.tokenizer={value}")
    assert_refused(launch(capsys, *SLURM_ONE_GPU, "--env", "A;B=1", "--dry-run", *train), "--env", "A;B")


def test_slurm_paths_are_resolved_where_the_job_runs(capsys, stubs, tmp_path, monkeypatch):
    elsewhere = tmp_path / "experiments"
    elsewhere.mkdir()
    (elsewhere / "my.yaml").write_text((REPO_ROOT / "configs" / "tiny.yaml").read_text().replace(
        "base: default.yaml", f"base: {REPO_ROOT / 'configs' / 'default.yaml'}"))
    monkeypatch.chdir(elsewhere)
    elsewhere = Path.cwd()
    result = launch(capsys, *SLURM_ONE_GPU, "--python", str(stubs.bin / "python"), "--dry-run",
                    "--", "train", "--config", "my.yaml", "--workdir", "runs/x")
    assert result.code == 0, result.err
    run = stubs.bash(result.out, tmp_path, **SLURM_JOB_ENV)  # bash starts elsewhere: the script goes where it must
    assert run.returncode == 0, run.stderr
    (call,) = stubs.calls("python")
    words = call.argv[call.argv.index("train"):]
    assert words == ["train", "--config", str(elsewhere / "my.yaml"), "--workdir", str(elsewhere / "runs" / "x")]
    assert call.cwd == str(elsewhere)  # relative --set paths mean what they meant here, too

    # configs/tiny.yaml is not in this directory: refused before submission, pointing at the checkout's
    result = launch(capsys, *SLURM_ONE_GPU, "--dry-run", "--", "train", "--config", "configs/tiny.yaml")
    assert_refused(result, "--config", "configs/tiny.yaml")
    assert f"did you mean --config {REPO_ROOT / 'configs' / 'tiny.yaml'}?" in result.err
    assert "directory you launch from" in result.err


# -- TPU ---------------------------------------------------------------------------------------


TPU_GCLOUD = ["tpu", "--topology", "v5e:2x2", "--project", "my-project", "--zone", "us-east5-a", "--tpu-name", "my-tpu"]
TPU_XPK = ["tpu", "--via", "xpk", "--topology", "v5e:2x2", "--project", "my-project", "--zone", "us-east5-a",
           "--cluster", "my-cluster", "--image", "us-docker.pkg.dev/p/images/metatrain:1"]


@pytest.mark.parametrize("value, url", list(zip(INJECTIONS, URL_INJECTIONS * 2)), ids=repr)
def test_tpu_gcloud_commands_quote_every_value_for_the_worker_shell(value, url, capsys, stubs, tmp_path):
    (stubs.home / value).mkdir()  # the checkout the worker clones into: --code-dir ~/<value>
    result = launch(capsys, *TPU_GCLOUD, "--git-url", url, "--code-dir", f"~/{value}", "--env", f"HOSTILE_ENV={value}",
                    "--dry-run", "--", "train", *TINY, "--workdir", value, "--set", f"data.tokenizer=tok{value}")
    assert result.code == 0, result.err
    run = stubs.bash(commands_of(result.out), tmp_path)
    assert run.returncode == 0, run.stderr

    (clone,) = stubs.calls("git")
    assert clone.argv == ["clone", "--branch", "main", "--", url, str(stubs.home / value)]  # ~ expanded, the rest whole
    (install,) = stubs.calls("pip")
    assert install.cwd == str(stubs.home / value)
    (train,) = stubs.calls("python3")
    assert train.cwd == str(stubs.home / value) and train.hostile_env == value
    assert train.argv == ["-m", "metatrain.cli", "train", *TINY, "--workdir", value, "--set", f"data.tokenizer=tok{value}"]
    assert not stubs.marker.exists()


@pytest.mark.parametrize("value, control", PAIRS, ids=repr)
def test_tpu_xpk_command_quotes_every_value_for_the_container_shell(value, control, capsys, stubs, tmp_path):
    assert_refused(launch(capsys, *TPU_XPK, "--env", f"HOSTILE_ENV={control}", "--dry-run", "--", "train", *TINY),
                   "--env", f"HOSTILE_ENV={control}")
    assert_refused(launch(capsys, *TPU_XPK, "--dry-run", "--", "train", *TINY, "--set", f"data.tokenizer={control}"),
                   "--set", f"data.tokenizer={control}")
    result = launch(capsys, *TPU_XPK, "--env", f"HOSTILE_ENV={value}",
                    "--dry-run", "--", "train", *TINY, "--workdir", value, "--set", f"data.tokenizer=tok{value}")
    assert result.code == 0, result.err
    run = stubs.bash(commands_of(result.out), tmp_path)
    assert run.returncode == 0, run.stderr
    (xpk,) = stubs.calls("xpk")
    assert "--docker-image=us-docker.pkg.dev/p/images/metatrain:1" in xpk.argv
    (train,) = stubs.calls("python3")
    assert train.hostile_env == value
    assert train.argv == ["-m", "metatrain.cli", "train", *TINY, "--workdir", value, "--set", f"data.tokenizer=tok{value}"]
    assert not stubs.marker.exists()


TPU_NAMED = [("--tpu-name", TPU_GCLOUD), ("--project", TPU_GCLOUD), ("--zone", TPU_GCLOUD), ("--git-ref", TPU_GCLOUD),
             ("--git-url", TPU_GCLOUD), ("--code-dir", TPU_GCLOUD), ("--cluster", TPU_XPK), ("--workload", TPU_XPK),
             ("--image", TPU_XPK)]


@pytest.mark.parametrize("option, base", TPU_NAMED, ids=[o for o, _ in TPU_NAMED])
@pytest.mark.parametrize("value", CONTROL + ["a b", "-x", "UPPER_case", "x" * 64, "a'b"], ids=repr)
def test_tpu_names_are_refused_or_cannot_escape_their_line(option, base, value, capsys, stubs, tmp_path):
    url = [] if option == "--git-url" else ["--git-url", "https://example.com/m.git"]
    result = launch(capsys, *base, *url, opt(option, value), "--dry-run", "--", "train", *TINY)
    if result.code == 2 or value in CONTROL:
        assert_refused(result, option, value)
        return
    # Accepted: every printed line is a comment or a whole command; running them runs no injection.
    assert result.code == 0, result.err
    stubs.bash(commands_of(result.out), tmp_path)
    assert not stubs.marker.exists(), "the injected command ran"
    commands = commands_of(result.out).splitlines()
    assert all(line.startswith(("gcloud ", "xpk ")) for line in commands), commands


def test_tpu_names_longer_than_the_target_accepts_are_refused_with_the_limit(capsys):
    for option, base, limit in (("--tpu-name", TPU_GCLOUD, 63), ("--cluster", TPU_XPK, 40), ("--workload", TPU_XPK, 40)):
        assert launch(capsys, *base, option, "a" * limit, "--dry-run", "--", "train", *TINY).code == 0
        result = launch(capsys, *base, option, "a" * (limit + 1), "--dry-run", "--", "train", *TINY)
        assert_refused(result, option, "a" * (limit + 1))
        assert f"at most {limit} characters" in result.err


def test_tpu_config_paths_are_relative_to_the_repository_the_workers_clone(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside the checkout
    mine = Path.cwd() / "my.yaml"
    mine.write_text("base: " + str(REPO_ROOT / "configs" / "tiny.yaml") + "\n")

    def remote_config(given: str) -> list[str]:
        result = launch(capsys, *TPU_GCLOUD, "--dry-run", "--", "train", "--config", given)
        assert result.code == 0, result.err
        (train,) = [line for line in result.out.splitlines() if "metatrain.cli" in line]
        remote = next(a for a in shlex.split(train) if a.startswith("--command=")).removeprefix("--command=")
        return shlex.split(remote)[-2:]

    # the workers' clone has the repository's files at the same relative paths
    assert remote_config("configs/tiny.yaml") == ["--config", "configs/tiny.yaml"]
    assert remote_config(str(REPO_ROOT / "configs" / "tiny.yaml")) == ["--config", "configs/tiny.yaml"]
    # an absolute path elsewhere is read there (storage the workers share, e.g. a sweep directory)
    assert remote_config(str(mine)) == ["--config", str(mine)]
    # a relative path that is not in the repository is not in the clone either
    result = launch(capsys, *TPU_GCLOUD, "--dry-run", "--", "train", "--config", "my.yaml")
    assert_refused(result, "--config", "my.yaml")
    assert "relative to the repository root" in result.err and f"{mine} is on this machine" in result.err


# -- GKE ---------------------------------------------------------------------------------------


GKE = ["gke", "--topology", "v5e:2x2", "--image", "us-docker.pkg.dev/p/images/metatrain:1", "--bucket", "my-bucket", "--service-account", "metatrain"]


def gke_manifest(out: str) -> dict:
    return yaml.safe_load(out)


def longest_pod_name(manifest: dict) -> str:
    """The longest name JobSet gives a pod of this manifest, as its webhook computes it."""
    (job,) = manifest["spec"]["replicatedJobs"]
    completions = job["template"]["spec"]["completions"]
    return f"{manifest['metadata']['name']}-{job['name']}-{job['replicas'] - 1}-{completions - 1}-abcde"


@pytest.mark.parametrize("option, value", [
    *[("--name", v) for v in ("1abc", "Abc", "a_b", "a.b", "abc-", "-abc", "a b", *CONTROL)],
    *[("--namespace", v) for v in ("Default", "a_b", "a.b", "x" * 64, *CONTROL)],
    *[("--service-account", v) for v in ("SA", "a b", "a_b", *CONTROL)],
    *[("--bucket", v) for v in ("ab", "My-Bucket", "-bucket", "a b", "x" * 64, *CONTROL)],
    *[("--image", v) for v in ("a b", "img'1", *CONTROL)],
    *[("--code-dir", v) for v in ("app", *CONTROL)],
], ids=repr)
def test_gke_refuses_values_kubernetes_or_jobset_would_reject(option, value, capsys):
    assert_refused(launch(capsys, *GKE, opt(option, value), "--dry-run", "--", "train", *TINY), option, value)


@pytest.mark.parametrize("topology, slices, hosts, batch", [
    ("v5e:4x4", 1, 4, 16), ("v5p:4x4x4", 2, 16, 256), ("v6e:16x16", 11, 64, 2816),
])
def test_gke_name_limit_is_the_longest_that_keeps_pod_names_within_63(topology, slices, hosts, batch, capsys):
    limit = 63 - len(f"-slice-{slices - 1}-{hosts - 1}-abcde")
    train = ["--", "train", "--set", f"trainer.batch_size={batch}"]
    name = "a" * limit
    result = launch(capsys, *GKE, "--topology", topology, "--num-slices", str(slices), "--name", name, "--dry-run", *train)
    assert result.code == 0, result.err
    pod = longest_pod_name(gke_manifest(result.out))
    assert len(pod) == 63 and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", pod)
    result = launch(capsys, *GKE, "--topology", topology, "--num-slices", str(slices), "--name", name + "a", "--dry-run", *train)
    assert_refused(result, "--name", name + "a")
    assert f"at most {limit} characters" in result.err


def test_gke_pods_on_the_host_network_can_mount_the_bucket(capsys):
    result = launch(capsys, *GKE, "--dry-run", "--", "train", *TINY)
    assert result.code == 0, result.err
    pod = gke_manifest(result.out)["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    (volume,) = pod["volumes"]
    assert volume["csi"]["driver"] == "gcsfuse.csi.storage.gke.io"
    assert volume["csi"]["volumeAttributes"] == {"bucketName": "my-bucket", "hostNetworkPodKSA": "true"}


@pytest.mark.parametrize("value, control", PAIRS, ids=repr)
def test_gke_manifest_keeps_every_value_whole(value, control, capsys, stubs, tmp_path):
    assert_refused(launch(capsys, *GKE, "--code-dir", f"/app/{control}", "--dry-run", "--", "train", *TINY),
                   "--code-dir", f"/app/{control}")
    result = launch(capsys, *GKE, "--code-dir", f"/app/{value}", "--env", f"HOSTILE_ENV={value}",
                    "--", "train", *TINY, "--workdir", value, "--set", f"data.tokenizer=tok{value}")
    assert result.code == 0, result.err
    (kubectl,) = stubs.calls("kubectl")
    assert kubectl.argv == ["apply", "-f", "-"]
    manifest = gke_manifest(stubs.stdin("kubectl"))
    (container,) = manifest["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"]
    assert container["workingDir"] == f"/app/{value}"
    assert {"name": "HOSTILE_ENV", "value": value} in container["env"]
    # the container runs its command as argv, no shell: run it so against the stubs
    subprocess.run(container["command"], cwd=tmp_path, env=stubs.env(HOSTILE_ENV=value), check=True, timeout=60)
    (train,) = stubs.calls("python3")
    assert train.argv == ["-m", "metatrain.cli", "train", *TINY, "--workdir", value, "--set", f"data.tokenizer=tok{value}"]
    assert not stubs.marker.exists()


@pytest.mark.parametrize("value", CONTROL, ids=repr)
def test_gke_refuses_control_characters_in_env_and_train_args(value, capsys):
    train = ["--", "train", *TINY]
    assert_refused(launch(capsys, *GKE, "--env", f"HOSTILE_ENV={value}", "--dry-run", *train), "--env", f"HOSTILE_ENV={value}")
    assert_refused(launch(capsys, *GKE, "--dry-run", *train, "--workdir", value), "--workdir", value)


# -- local -------------------------------------------------------------------------------------


LOCAL = ["local", "--processes", "2", "--port", "12345", "--dry-run"]


@pytest.mark.parametrize("value, control", PAIRS, ids=repr)
def test_local_dry_run_lines_quote_the_train_args_and_refuse_control_characters(value, control, capsys, stubs, tmp_path):
    assert_refused(launch(capsys, *LOCAL, "--", "train", *TINY, "--workdir", control), "--workdir", control)
    assert_refused(launch(capsys, *LOCAL, "--", "train", *TINY, f"--workdir={control}"), "--workdir", control)
    assert_refused(launch(capsys, *LOCAL, "--", "train", *TINY, "--set", f"data.tokenizer={control}"),
                   "--set", f"data.tokenizer={control}")
    result = launch(capsys, *LOCAL, "--", "train", *TINY, "--workdir", value, "--set", f"data.tokenizer=tok{value}")
    assert result.code == 0, result.err
    python = f" {shlex.quote(sys.executable)} -m metatrain.cli "
    lines = result.out.replace(python, f" {stubs.bin / 'python'} -m metatrain.cli ")
    run = stubs.bash(lines, tmp_path)
    assert run.returncode == 0, run.stderr
    calls = stubs.calls("python")
    assert len(calls) == 2
    for call in calls:
        assert call.argv == ["-m", "metatrain.cli", "train", *TINY, "--workdir", value, "--set", f"data.tokenizer=tok{value}"]
    assert not stubs.marker.exists()


def test_local_port_must_be_a_tcp_port(capsys):
    for port in (99999, 65536, 0, -1):
        result = launch(capsys, "local", "--processes", "2", "--port", str(port), "--dry-run", "--", "train", *TINY)
        assert_refused(result, "--port", port)
        assert "1..65535" in result.err
    for port in (1, 65535):
        result = launch(capsys, "local", "--processes", "2", "--port", str(port), "--dry-run", "--", "train", *TINY)
        assert result.code == 0 and f"127.0.0.1:{port}" in result.out
