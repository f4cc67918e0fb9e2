"""Which runs join with jax.distributed, from the environment, and how `initialize` calls it."""

from __future__ import annotations

import logging

import jax
import pytest
from jax._src import xla_bridge

from metatrain.cli import main
from metatrain.errors import UserError
from metatrain.launch import distributed as dist

EXPLICIT = {
    dist.ENV_COORDINATOR: "10.0.0.2:8476",
    dist.ENV_NUM_PROCESSES: "4",
    dist.ENV_PROCESS_ID: "3",
}


def test_a_single_process_needs_nothing():
    assert dist.distributed_from_env({}) is None
    assert dist.distributed_from_env({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) is None
    assert dist.distributed_from_env({"TPU_WORKER_HOSTNAMES": "localhost"}) is None
    assert dist.distributed_from_env({**EXPLICIT, dist.ENV_MODE: "off"}) is None


def test_explicit_settings():
    config = dist.distributed_from_env({**EXPLICIT, dist.ENV_LOCAL_DEVICE_IDS: "2,3", dist.ENV_INIT_TIMEOUT: "30"})
    assert config == dist.DistributedConfig(
        mode="explicit", coordinator_address="10.0.0.2:8476", num_processes=4, process_id=3,
        local_device_ids=(2, 3), init_timeout_s=30, source=config.source,
    )
    assert "process 3 of 4" in config.describe() and "10.0.0.2:8476" in config.describe()


@pytest.mark.parametrize(
    "environ, expected",
    [
        ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16", "SLURM_PROCID": "5"}, "Slurm job 7, 16 tasks"),
        ({"TPU_WORKER_HOSTNAMES": "t1k-w-0,t1k-w-1,t1k-w-2,t1k-w-3"}, "4 workers"),
        ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.9"}, "multi-slice"),
        ({dist.ENV_MODE: "auto"}, "METATRAIN_DISTRIBUTED=auto"),
    ],
)
def test_clusters_jax_detects_on_its_own_are_auto(environ, expected):
    config = dist.distributed_from_env(environ)
    assert config.mode == "auto" and expected in config.source


@pytest.mark.parametrize(
    "environ, words",
    [
        ({dist.ENV_COORDINATOR: "h:1"}, [dist.ENV_NUM_PROCESSES, dist.ENV_PROCESS_ID, "not"]),
        ({**EXPLICIT, dist.ENV_PROCESS_ID: "4"}, ["process id 4", "[0, 4)"]),
        ({**EXPLICIT, dist.ENV_NUM_PROCESSES: "four"}, [dist.ENV_NUM_PROCESSES, "'four'", "integer"]),
        ({**EXPLICIT, dist.ENV_COORDINATOR: "10.0.0.2"}, ["host:port"]),
        ({**EXPLICIT, dist.ENV_LOCAL_DEVICE_IDS: "0;1"}, [dist.ENV_LOCAL_DEVICE_IDS, "comma-separated"]),
        ({dist.ENV_MODE: "yes"}, [dist.ENV_MODE, "'auto' or 'off'"]),
    ],
)
def test_incomplete_or_invalid_settings_say_what_to_fix(environ, words):
    with pytest.raises(UserError) as e:
        dist.distributed_from_env(environ)
    for word in words:
        assert word in str(e.value)


@pytest.fixture
def fake_jax_distributed(monkeypatch):
    """Record `jax.distributed.initialize` calls; the backend counts as not yet started."""
    calls = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    monkeypatch.setattr(dist, "quiet_logging", lambda: calls.append("quiet"))
    return calls


def test_initialize_passes_the_explicit_settings_and_quiets_other_processes(fake_jax_distributed):
    config = dist.distributed_from_env({**EXPLICIT, dist.ENV_LOCAL_DEVICE_IDS: "0"})
    dist.initialize(config)
    assert fake_jax_distributed == [
        {
            "initialization_timeout": dist.DEFAULT_INIT_TIMEOUT_S,
            "local_device_ids": [0],
            "coordinator_address": "10.0.0.2:8476",
            "num_processes": 4,
            "process_id": 3,
        },
        "quiet",
    ]


def test_auto_leaves_the_cluster_to_jax(fake_jax_distributed):
    dist.initialize(dist.distributed_from_env({dist.ENV_MODE: "auto"}))
    assert fake_jax_distributed[0] == {"initialization_timeout": dist.DEFAULT_INIT_TIMEOUT_S}


def test_initialize_refuses_once_a_device_was_touched(monkeypatch):
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: True)
    with pytest.raises(UserError, match="before anything touches a device"):
        dist.initialize(dist.distributed_from_env(EXPLICIT))


def test_a_failed_join_names_the_coordinator(fake_jax_distributed, monkeypatch):
    def refuse(**kwargs):
        raise RuntimeError("DEADLINE_EXCEEDED: Barrier timed out")

    monkeypatch.setattr(jax.distributed, "initialize", refuse)
    with pytest.raises(UserError) as e:
        dist.initialize(dist.distributed_from_env(EXPLICIT))
    assert "10.0.0.2:8476" in str(e.value) and "Barrier timed out" in str(e.value)


def test_the_train_command_joins_before_it_runs(monkeypatch, capsys):
    """`metatrain train` reads the environment first: a half-set one stops it, naming what is missing."""
    monkeypatch.setenv(dist.ENV_COORDINATOR, "127.0.0.1:1")
    for name in (dist.ENV_NUM_PROCESSES, dist.ENV_PROCESS_ID, dist.ENV_MODE):
        monkeypatch.delenv(name, raising=False)
    assert main(["train", "--config", "configs/tiny.yaml"]) == 2
    err = capsys.readouterr().err
    assert "metatrain train: error:" in err and dist.ENV_NUM_PROCESSES in err


def test_quiet_logging_keeps_warnings_only():
    from absl import logging as absl_logging

    root = logging.getLogger()
    level, verbosity = root.level, absl_logging.get_verbosity()
    try:
        dist.quiet_logging()
        assert root.level == logging.WARNING
        assert absl_logging.get_verbosity() == absl_logging.WARNING
    finally:
        root.setLevel(level)
        absl_logging.set_verbosity(verbosity)
