"""Hostile generation inputs: bytes that are not UTF-8, temperatures float32 cannot divide
by, prompts that fill the context. Each is one line and exit status 2, or correct sampling."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metatrain.cli import main
from metatrain.engine.sampling import SamplingConfig, sample_tokens
from metatrain.errors import UserError

pytestmark = pytest.mark.hostile


def test_a_prompt_that_is_not_utf8_is_one_line_before_anything_loads(tmp_path):
    """The real command line: argv bytes that are not UTF-8 (Python sees lone surrogates)."""
    result = subprocess.run(
        [sys.executable, "-m", "metatrain.cli", "generate", "--workdir", str(tmp_path),
         "--prompt", b"caf\xe9 au lait"],
        capture_output=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=120,
    )
    err = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 2, err
    assert err.strip().splitlines() == [
        "metatrain generate: error: prompt 'caf\\udce9 au lait' is not valid UTF-8 (byte 0xe9 at "
        "character 3); give the prompt as UTF-8 text"]


@pytest.mark.parametrize("temperature", ["1e-39", "1e-45", "inf", "nan", "-1"])
def test_temperatures_outside_float32_are_refused(capsys, tmp_path, temperature):
    code = main(["generate", "--workdir", str(tmp_path), "--prompt", "x", "--temperature", temperature])
    err = capsys.readouterr().err
    assert code == 2 and "temperature must be 0 (greedy) or a finite number from 1.175e-38" in err


def test_the_smallest_normal_temperature_is_accepted_and_samples_the_best_token():
    assert not SamplingConfig(temperature=1.2e-38).greedy


def test_a_tiny_temperature_picks_the_best_token_not_one_of_several_tied_at_the_top():
    """Logits 40 and 41 at T = 1e-37: dividing first overflowed both to float32's maximum,
    a coin toss; the best token must win every draw."""
    logits = jnp.asarray([[40.0, 41.0, 0.0]] * 64, jnp.float32)
    allowed = jnp.ones(logits.shape, bool)
    picks = sample_tokens(logits, allowed, jax.random.key(0), SamplingConfig(temperature=1e-37))
    assert np.asarray(picks).tolist() == [1] * 64


def test_a_temperature_still_spreads_draws_after_the_shift():
    logits = jnp.asarray([[0.0, 0.0]] * 2000, jnp.float32)
    picks = np.asarray(sample_tokens(logits, jnp.ones(logits.shape, bool), jax.random.key(1),
                                     SamplingConfig(temperature=0.5)))
    assert 0.4 < picks.mean() < 0.6


def test_a_prompt_longer_than_the_context_says_how_long_it_may_be(capsys, workdir):
    long_prompt = " ".join(["population"] * 400)
    code = main(["generate", "--workdir", str(workdir), "--prompt", "short", "--prompt", long_prompt])
    err = capsys.readouterr().err
    assert code == 2
    assert "prompt 2 has" in err and "max_seq_len is 128: no room to generate; shorten it to at most 127 tokens" in err
    assert "at most 0" not in err


def test_max_new_tokens_below_one_is_refused(workdir):
    from metatrain.generate.generator import Generator

    generator = Generator.load(workdir)
    with pytest.raises(UserError, match="max-new-tokens must be >= 1, got 0"):
        generator.generate(["x"], max_new_tokens=0)
