"""Test-wide setup: 8 simulated CPU devices, no accelerator, hermetic hypothesis profile."""

import os

# Must happen before jax is imported anywhere: sharding tests use 8 host devices.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci",
    deadline=None,
    max_examples=60,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    """A work directory with one checkpoint, written by the real trainer (tiny model, 1 step):
    what generation and the annotate `metatrain` generator read."""
    from metatrain.config import load_config
    from metatrain.io.paths import CONFIGS_DIR
    from metatrain.train.loop import train

    path = tmp_path_factory.mktemp("run")
    config = load_config(CONFIGS_DIR / "tiny.yaml", [
        "trainer.steps=1", "trainer.batch_size=8", "trainer.seq_len=32", "trainer.eval_every=0",
        "trainer.progress=false", "checkpoint.every=1", "checkpoint.async_save=false",
    ])
    train(config, path)
    return path


@pytest.fixture(scope="session")
def gcs_emulator():
    """A GCS emulator on 127.0.0.1 for the session, with this process pointed at it
    (`STORAGE_EMULATOR_HOST`, passed on to every library by `configure_emulator`)."""
    import importlib.util

    from metatrain.io.storage import configure_emulator

    spec = importlib.util.spec_from_file_location("gcs_emulator", os.path.join(os.path.dirname(__file__), "gcs_emulator.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    emulator = module.Emulator()
    os.environ["STORAGE_EMULATOR_HOST"] = emulator.url
    configure_emulator()
    yield emulator
    emulator.stop()


@pytest.fixture
def bucket(gcs_emulator):
    """`gs://NAME`: a fresh, empty bucket in the emulator."""
    return f"gs://{gcs_emulator.bucket()}"

