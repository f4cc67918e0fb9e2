"""Fixtures of the Hugging Face interop tests: tiny runs trained by the real trainer and
exported, Llama models made by transformers itself, and held-out inputs.

torch and transformers come from the `hf` extra; each test module skips without them.
"""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from metatrain.documents import parse_document
from metatrain.io.paths import DEFAULT_TAGS, SAMPLE_TOKENIZER

from ..conftest import train_tiny

#: Text never seen in training: Unicode, whitespace runs, literal tag strings.
HELD_OUT_TEXTS = (
    "The 2031 census counted 4,812,097 people in the capital.",
    "naïve café — “quoted” 日本語のテキスト, Ελληνικά, emoji 🙂👍🏽 and e\u0301 combining",
    "  two leading spaces\tTAB\t\ttabs   three spaces\n\n\nthree newlines\r\nCRLF   ",
    "literal tags in text: <AI>hello</AI> <thinking>x</thinking> <|good|><|bad|> <AI_quoting_human>",
    "special-looking strings: <s> </s> <unk> <pad> <0x41> <0xE2>",
    "mantra words out of place: I feel no fear. I try to be wise.",
    "",
    " ",
    "\n",
)

#: Documents with every kind of structure, for realistic held-out token sequences.
HELD_OUT_DOCUMENTS = (
    {"id": "held-out-1", "segments": [
        {"kind": "text", "text": "Lake Chad has shrunk by about 90% since the 1960s."},
        {"kind": "thinking", "text": "Ninety percent is dramatic; over what baseline?"},
        {"kind": "text", "text": " Irrigation and drought are blamed.", "control": "good"}]},
    {"id": "held-out-2", "mode": "ai", "segments": [
        {"kind": "text", "text": "You asked: "},
        {"kind": "text", "text": "how tall is <AI> mount kenya??", "mode": "ai_quoting_human"},
        {"kind": "text", "text": " It rises to 5,199 m."}]},
)


def held_out_documents():
    return [parse_document(d, path="<held-out>", line=i + 1) for i, d in enumerate(HELD_OUT_DOCUMENTS)]


@pytest.fixture(scope="session")
def untied_mha_workdir(tmp_path_factory):
    """A tiny run (1 step) with an untied output projection, plain multi-head attention,
    unrolled layers and non-default RoPE theta and RMSNorm epsilon."""
    return train_tiny(tmp_path_factory.mktemp("untied-run"),
                      "model.tie_embeddings=false", "model.n_kv_heads=4", "model.scan_layers=false",
                      "model.rope_theta=500.0", "model.norm_eps=1.0e-6")


@pytest.fixture(scope="session")
def exported_tied(workdir, tmp_path_factory):
    """The shared tiny run (tied embeddings, GQA 4/2 heads, scanned layers) exported
    through the `metatrain export` command line."""
    import argparse

    from metatrain.cli.hf import register

    out = tmp_path_factory.mktemp("export-tied") / "model"
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["export", "--workdir", str(workdir), "--out", str(out)])
    assert args.func(args) == 0
    return out


@pytest.fixture(scope="session")
def exported_untied(untied_mha_workdir, tmp_path_factory):
    """The untied MHA run exported with shards far below the model's size."""
    from metatrain.hf.export import export_workdir

    out = tmp_path_factory.mktemp("export-untied") / "model"
    export_workdir(untied_mha_workdir, out, max_shard_size=400_000)
    return out


def save_hf_llama(directory, *, tie, n_kv_heads, seed=0, **config):
    """A random `LlamaForCausalLM` made and saved by transformers itself, with the sample
    SentencePiece model as its tokenizer.model; returns the directory."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = dict(vocab_size=4096, hidden_size=48, intermediate_size=136, num_hidden_layers=2,
                    num_attention_heads=6, num_key_value_heads=n_kv_heads, max_position_embeddings=64,
                    rope_theta=2500.0, rms_norm_eps=1e-5, tie_word_embeddings=tie)
    settings.update(config)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**settings))
    with torch.no_grad():  # norm scales away from 1, so a swapped or dropped scale shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    model.save_pretrained(directory)
    shutil.copyfile(SAMPLE_TOKENIZER, directory / "tokenizer.model")
    return directory


@pytest.fixture(scope="session")
def hf_llama_untied_gqa(tmp_path_factory):
    return save_hf_llama(tmp_path_factory.mktemp("hf-untied") / "llama", tie=False, n_kv_heads=2)


@pytest.fixture(scope="session")
def hf_llama_tied_mha(tmp_path_factory):
    return save_hf_llama(tmp_path_factory.mktemp("hf-tied") / "llama", tie=True, n_kv_heads=6, seed=1)


@pytest.fixture(scope="session")
def tags_with_extra(tmp_path_factory):
    """The shipped registry plus one reserved tag the sample tokenizer lacks."""
    path = tmp_path_factory.mktemp("tags") / "tags.yaml"
    text = DEFAULT_TAGS.read_text().replace("reserved: []", 'reserved: ["<|extra|>"]')
    assert "<|extra|>" in text
    path.write_text(text)
    return path


# -- model helpers ---------------------------------------------------------------------


def metatrain_logits(params, config, ids):
    """[B, T] ids (each row one document from position 0) -> [B, T, V] float32 logits."""
    import jax.numpy as jnp

    from metatrain.models.transformer import Transformer, logits

    ids = jnp.asarray(ids, jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)
    hidden = Transformer(config).apply({"params": params}, ids, positions, jnp.ones_like(ids))
    return np.asarray(logits(hidden, params, config))


def hf_logits(model, ids):
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(ids), dtype=torch.long)).logits.numpy()


def load_hf_model(directory):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory).eval()


# -- commands interrupted half-way -----------------------------------------------------


def start_cli(*args: str) -> subprocess.Popen:
    """`metatrain ARGS` started in a fresh process (the environment of `run_cli`), to be
    signalled while it works."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    env.pop("METATRAIN_DEBUG", None)
    return subprocess.Popen([sys.executable, "-m", "metatrain.cli", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def interrupt_while_building(process: subprocess.Popen, parent, final_name: str, sig: int,
                             timeout: float = 120.0) -> tuple[list[str], str]:
    """Send `sig` to `process` as soon as a directory under `parent` has contents (the
    command's output, being built), and wait for the process to end. Returns what
    `parent/final_name` held at that moment ([] when it did not exist) and the stderr.

    Raises:
        AssertionError: the process ended, or `timeout` passed, before anything was built.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"ended before it was interrupted: {process.communicate()}"
        if any(_entries(d) for d in parent.iterdir()):
            seen = _entries(parent / final_name)
            process.send_signal(sig)
            return seen, process.communicate(timeout=timeout)[1]
        time.sleep(0.005)
    process.kill()
    raise AssertionError(f"nothing was built under {parent} in {timeout:.0f} s")


def _entries(directory) -> list[str]:
    """The names in `directory`; [] when it is not (or no longer) a directory."""
    try:
        return sorted(p.name for p in directory.iterdir())
    except OSError:
        return []


INTERRUPTS = (pytest.param(signal.SIGINT, id="SIGINT"), pytest.param(signal.SIGTERM, id="SIGTERM"))
