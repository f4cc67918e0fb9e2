"""`TagGrammarLogitsProcessor`: metatrain's grammar, mantra and lock in `transformers` generate.

Two claims: (a) whatever the model's logits say (tags pushed up by +20, infinities),
sampled output is a valid document under the grammar, every due mantra is present and
the AI-mode lock holds; (b) greedy `generate` with the processor reproduces metatrain's
greedy decoder token for token on the same weights.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    LlamaConfig,
    LlamaForCausalLM,
    LogitsProcessor,
    LogitsProcessorList,
)

from metatrain.hf.logits_processor import TagGrammarLogitsProcessor  # noqa: E402
from metatrain.io.paths import DEFAULT_TAGS, REPO_ROOT, SAMPLE_TOKENIZER  # noqa: E402
from metatrain.tokenizer.encoder import Encoder  # noqa: E402
from metatrain.tokenizer.mantra import DEFAULT_MANTRA, block_gets_mantra  # noqa: E402

#: A short mantra, so that sampled rows fit many thinking blocks in their budget.
SHORT_MANTRA = "I feel no fear.\n"
PAD = 0  # <unk> of the sample tokenizer: what `metatrain export` pads with (it has no PAD)


def write_export_files(directory: Path, *, policy: str = "every", mantra: str | None = DEFAULT_MANTRA,
                       tokenizer: Path = SAMPLE_TOKENIZER, tags: Path = DEFAULT_TAGS,
                       pad_id: int | None = PAD, **extra) -> Path:
    """The metatrain files of an exported directory, as `from_pretrained` reads them."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tokenizer, directory / "tokenizer.model")
    shutil.copyfile(tags, directory / "tags.yaml")
    meta = {"mantra_policy": policy, "tags": "tags.yaml", "bos_id": 1, "eos_id": 2, **extra}
    if mantra is not None:
        (directory / "mantra.txt").write_text(mantra, encoding="utf-8")
        meta["mantra_file"] = "mantra.txt"
    if pad_id is not None:
        meta["pad_id"] = pad_id
    (directory / "metatrain.json").write_text(json.dumps(meta), encoding="utf-8")
    return directory


@pytest.fixture(scope="module")
def random_llama():
    """Random weights at the sample tokenizer's vocabulary size: logits close to flat."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2, pad_token_id=PAD, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


class TagBias(LogitsProcessor):
    """Adversary: +20 on a random half of the tags and EOS at each step, and now and then
    +inf on one of them or NaN on a row; placed before the grammar."""

    def __init__(self, ids: list[int], bias: float = 20.0):
        self.ids = torch.as_tensor(ids)
        self.bias = bias

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        rows = scores.shape[0]
        on = torch.rand(rows, len(self.ids)) < 0.5
        scores[:, self.ids] += self.bias * on
        for row in range(rows):
            draw = float(torch.rand(()))
            if draw < 0.05:
                scores[row, self.ids[torch.randint(len(self.ids), ())]] = torch.inf
            elif draw < 0.07:
                scores[row, :] = torch.nan
        return scores


def left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.as_tensor(prompt)
        mask[row, width - len(prompt):] = 1
    return ids, mask


@dataclasses.dataclass
class Coverage:
    blocks: int = 0
    mantras: int = 0
    eos: int = 0
    lock_exits: int = 0


def check_row(encoder: Encoder, proc: TagGrammarLogitsProcessor, prompt: list[int], generated: list[int],
              budget: int, coverage: Coverage) -> None:
    """Independent of the processor's own bookkeeping: walks the prompt and the output with
    the scalar grammar (`Grammar.next_state` raises on an illegal tag)."""
    grammar = encoder.grammar
    id_to_tag = {i: t for t, i in encoder.tag_ids.items()}
    mantra = encoder.mantra_ids.tolist()
    opening = encoder.tag_ids[grammar.registry.thinking_open]
    ids = proc.sample_ids(generated)
    after = generated[len(ids):]
    full = prompt + ids
    state, blocks, due = grammar.initial_state(), 0, []
    for i, token in enumerate(full):
        generated_here = i >= len(prompt)
        if due and not generated_here:
            due = due[1:] if token == due[0] else []
        elif due:
            assert token == due[0], f"mantra token {due[0]} expected at {i}, got {token}: {full}"
            due = due[1:]
            if not due:
                coverage.mantras += 1
        before = state
        if token in id_to_tag:
            state = grammar.next_state(state, id_to_tag[token])
        if token == opening:
            if block_gets_mantra(encoder.mantra_policy, blocks):
                due = list(mantra)
            blocks += 1
            coverage.blocks += generated_here
        if token == encoder.eos_id and generated_here:
            assert proc.mode is None, "EOS generated under the lock"
            assert grammar.can_end(before), f"EOS in state {grammar.states[before]}"
            assert i == len(full) - 1
            coverage.eos += 1
        if proc.mode is not None and generated_here and grammar.states[state].mode == grammar.base_mode:
            assert i == len(full) - 1 and token == encoder.tag_ids["</AI>"], full
            coverage.lock_exits += 1
    encoder.decode_segments(full)  # no illegal tag, by the encoder's own reader
    if proc.mode is not None:
        start = grammar.initial_state()
        for i, token in enumerate(prompt):
            if token in id_to_tag:
                start = grammar.next_state(start, id_to_tag[token])
        path = grammar.mode_path(grammar.states[start].mode, proc.mode)
        assert ids[: len(path)] == [encoder.tag_ids[t] for t in path][: len(ids)]
        ended = grammar.states[state].mode == grammar.base_mode
        head = [encoder.eos_id] if ended and len(ids) < budget else []
    else:
        ended = bool(ids) and ids[-1] == encoder.eos_id
        head = []
    assert after[: len(head)] == head and set(after[len(head):]) <= {PAD}, (ids, after)
    assert ended or len(ids) == budget, f"row stopped before its budget without an end: {ids}"


def prompts_for(proc: TagGrammarLogitsProcessor) -> list[list[int]]:
    enc = proc.encoder
    tag = enc.tag_ids
    text = enc.tokenizer.encode_texts(["The capital is"])[0]
    prompts = [proc.prompt_ids("Background:"), proc.prompt_ids("Q: why is the sky blue? Answer briefly.")]
    if proc.mode is None:
        prompts += [[enc.bos_id, tag["<AI>"], *text],  # a prompt already in AI mode
                    [enc.bos_id, *text, tag["<thinking>"], *enc.mantra_ids[:2].tolist()]]  # mid-mantra
    else:
        prompts += [[enc.bos_id, tag["<AI>"], tag["<AI_quoting_human>"], *text]]
    return prompts


@pytest.mark.parametrize("policy", ["every", "first", "none"])
@pytest.mark.parametrize("mode", ["human", "ai"])
def test_sampling_against_adversarial_logits_stays_in_the_grammar(tmp_path, random_llama, policy, mode):
    directory = write_export_files(tmp_path / "export", policy=policy, mantra=SHORT_MANTRA)
    proc = TagGrammarLogitsProcessor.from_pretrained(directory, mode=mode)
    enc = proc.encoder
    adversary = TagBias(sorted(enc.tag_ids.values()) + [enc.eos_id])
    prompts = prompts_for(proc)
    ids, mask = left_padded(prompts)
    coverage = Coverage()
    budget = 48
    for seed in range(6):
        torch.manual_seed(seed)
        proc.reset()
        out = random_llama.generate(
            ids, attention_mask=mask, do_sample=True, top_k=0, max_new_tokens=budget,
            num_return_sequences=3, logits_processor=LogitsProcessorList([adversary, proc]),
            pad_token_id=PAD, eos_token_id=enc.eos_id,
        )
        for row in range(out.shape[0]):
            check_row(enc, proc, prompts[row // 3], out[row, ids.shape[1]:].tolist(), budget, coverage)
    assert coverage.blocks > 0
    if policy != "none":
        assert coverage.mantras > 0
    if mode == "ai":
        assert coverage.lock_exits > 0
    else:
        assert coverage.eos > 0


def _prompt_reaching(enc: Encoder, state: int) -> list[int]:
    grammar = enc.grammar
    target = grammar.states[state]
    tags = list(grammar.mode_path(grammar.base_mode, target.mode))
    if target.thinking:
        tags.append(grammar.registry.thinking_open)
    return [enc.bos_id, *(enc.tag_ids[t] for t in tags)]


def test_mask_is_the_bound_grammar_less_the_controls_in_every_state(tmp_path):
    proc = TagGrammarLogitsProcessor.from_pretrained(write_export_files(tmp_path / "e", policy="none", mantra=None))
    enc = proc.encoder
    allowed = enc.bound_grammar.allowed_tokens.copy()
    allowed[:, [enc.tag_ids[tag] for _, tag in enc.grammar.registry.controls]] = False  # never generated
    for state in range(enc.grammar.num_states):
        proc.reset()
        prompt = _prompt_reaching(enc, state)
        scores = proc(torch.as_tensor([prompt]), torch.zeros((1, enc.vocab_size + 3)))
        assert np.array_equal(np.isfinite(scores[0, : enc.vocab_size].numpy()), allowed[state]), state
        assert torch.isneginf(scores[0, enc.vocab_size:]).all()  # a padded lm_head's extra columns


def test_forcing_mantra_lock_prefix_and_end(tmp_path):
    proc = TagGrammarLogitsProcessor.from_pretrained(write_export_files(tmp_path / "e", mantra=SHORT_MANTRA), "ai")
    enc = proc.encoder
    tag = enc.tag_ids
    mantra = enc.mantra_ids.tolist()
    prompt = [PAD, PAD, *proc.prompt_ids("Hello")]
    assert proc.lock_prefix(prompt) == [tag["<AI>"]]
    assert proc.extra_tokens(prompt) == 1
    sequence = [tag["<AI>"], 100, tag["<thinking>"], *mantra, 200, tag["</thinking>"], tag["</AI>"], enc.eos_id]
    forced = {0, len(sequence) - 1} | set(range(3, 3 + len(mantra)))
    ids = list(prompt)
    for step, token in enumerate(sequence):
        scores = proc(torch.as_tensor([ids]), torch.randn((1, enc.vocab_size)))
        finite = torch.isfinite(scores[0])
        assert bool(finite[token])
        if step in forced:
            assert int(finite.sum()) == 1, step
        ids.append(token)
    # after the end, EOS stays forced (generate writes padding there)
    for ids in (ids, ids + [PAD]):
        scores = proc(torch.as_tensor([ids]), torch.zeros((1, enc.vocab_size)))
        assert torch.isfinite(scores[0]).nonzero().flatten().tolist() == [enc.eos_id]
    assert proc.sample_ids(sequence + [PAD, PAD]) == sequence[:-1]

    thinking = TagGrammarLogitsProcessor(enc, "thinking")
    assert thinking.lock_prefix(proc.prompt_ids("Hi")) == [tag["<thinking>"], *mantra]
    human = TagGrammarLogitsProcessor(enc, "human")
    assert human.mode is None and human.sample_ids([5, 9, enc.eos_id, PAD]) == [5, 9, enc.eos_id]


def test_a_second_generation_starts_from_its_own_prompt(tmp_path):
    proc = TagGrammarLogitsProcessor.from_pretrained(write_export_files(tmp_path / "e", mantra=SHORT_MANTRA), "ai")
    tag = proc.encoder.tag_ids
    prompt = proc.prompt_ids("Hello")
    proc(torch.as_tensor([prompt]), torch.zeros((1, proc.vocab_size)))
    proc(torch.as_tensor([prompt + [tag["<AI>"]]]), torch.zeros((1, proc.vocab_size)))
    # a new, longer prompt that does not continue the last call: read afresh, the lock restarts
    again = proc(torch.as_tensor([prompt + [17, 18, 19]]), torch.zeros((1, proc.vocab_size)))
    assert torch.isfinite(again[0]).nonzero().flatten().tolist() == [tag["<AI>"]]


def test_bad_prompts_and_directories(tmp_path):
    directory = write_export_files(tmp_path / "e")
    proc = TagGrammarLogitsProcessor.from_pretrained(directory, "ai")
    tag = proc.encoder.tag_ids
    with pytest.raises(ValueError, match="illegal"):
        proc(torch.as_tensor([[1, tag["</thinking>"]]]), torch.zeros((1, proc.vocab_size)))
    proc.reset()
    with pytest.raises(ValueError, match="inside a thinking block"):
        proc(torch.as_tensor([[1, tag["<thinking>"], 50]]), torch.zeros((1, proc.vocab_size)))
    with pytest.raises(ValueError, match="cannot lock"):
        TagGrammarLogitsProcessor.from_pretrained(directory, "robot")
    with pytest.raises(ValueError, match="scores 100 tokens"):
        proc(torch.as_tensor([[1]]), torch.zeros((1, 100)))
    with pytest.raises(ValueError, match="metatrain.json"):
        TagGrammarLogitsProcessor.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="eos_id"):
        TagGrammarLogitsProcessor.from_pretrained(write_export_files(tmp_path / "f", eos_id=7))
    with pytest.raises(ValueError, match="mantra_file"):
        TagGrammarLogitsProcessor.from_pretrained(write_export_files(tmp_path / "g", mantra=None))
    assert TagGrammarLogitsProcessor.from_pretrained(write_export_files(tmp_path / "h", pad_id=None)).pad_token_id is None


def test_imports_without_jax():
    code = ("import sys, metatrain.hf as hf; from metatrain.hf.logits_processor import TagGrammarLogitsProcessor as P; "
            "assert getattr(hf, 'TagGrammarLogitsProcessor', P) is P; "
            "bad = sorted(m for m in ('jax', 'flax', 'optax', 'orbax') if m in sys.modules); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT)


# ---------------------------------------------------------------------- parity


def _llama_from_params(params, config, eos_id: int):
    """metatrain's decoder as a `LlamaForCausalLM` (same layout: RMSNorm, rotate-half RoPE,
    SwiGLU, GQA): independent of `metatrain export`, so this checks the processor alone."""
    import jax

    p = jax.tree.map(lambda a: torch.tensor(np.asarray(a, np.float32)), params)
    D, N, K, H = config.d_model, config.n_heads, config.n_kv_heads, config.head_dim
    hf = LlamaConfig(vocab_size=config.vocab_size, hidden_size=D, intermediate_size=config.d_ff,
                     num_hidden_layers=config.n_layers, num_attention_heads=N, num_key_value_heads=K,
                     head_dim=H, max_position_embeddings=config.max_seq_len, rms_norm_eps=config.norm_eps,
                     rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
                     tie_word_embeddings=config.tie_embeddings, bos_token_id=1, eos_token_id=eos_id,
                     pad_token_id=PAD)
    model = LlamaForCausalLM(hf).eval()
    layers = p["layers"]
    state = {"model.embed_tokens.weight": p["embedding"]["table"], "model.norm.weight": p["final_norm"]["scale"]}
    for i in range(config.n_layers):
        a, m = layers["attention"], layers["mlp"]
        pre = f"model.layers.{i}."
        state |= {
            pre + "self_attn.q_proj.weight": a["query"][i].reshape(D, N * H).T,
            pre + "self_attn.k_proj.weight": a["key"][i].reshape(D, K * H).T,
            pre + "self_attn.v_proj.weight": a["value"][i].reshape(D, K * H).T,
            pre + "self_attn.o_proj.weight": a["out"][i].reshape(N * H, D).T,
            pre + "mlp.gate_proj.weight": m["gate"][i].T,
            pre + "mlp.up_proj.weight": m["up"][i].T,
            pre + "mlp.down_proj.weight": m["down"][i].T,
            pre + "input_layernorm.weight": layers["attention_norm"]["scale"][i],
            pre + "post_attention_layernorm.weight": layers["mlp_norm"]["scale"][i],
        }
    state["lm_head.weight"] = p["embedding"]["table"] if config.tie_embeddings else p["output_projection"].T
    model.load_state_dict({k: v.contiguous() for k, v in state.items()}, strict=True)
    return model


def _exported(request, generator, workdir: Path, out: Path, weights: str):
    """(HF model, export directory) for `weights`: "converted" in this test, or "exporter"
    (`metatrain export` of the same run: tests/hf/conftest.py)."""
    if weights == "exporter":
        directory = request.getfixturevalue("exported_tied")
        return transformers.AutoModelForCausalLM.from_pretrained(directory).eval(), directory
    enc = generator.encoder
    write_export_files(out, policy=enc.mantra_policy, mantra=enc.mantra,
                       tokenizer=workdir / "tokenizer.model", tags=workdir / "tags.yaml")
    return _llama_from_params(generator.params, generator.model_config, enc.eos_id), out


@pytest.fixture(scope="module")
def generator(workdir):
    from metatrain.generate.generator import Generator

    return Generator.load(workdir)


@pytest.mark.parametrize("weights", ["converted", "exporter"])
def test_greedy_generate_equals_metatrain_generate(request, tmp_path, workdir, generator, weights):
    import jax.numpy as jnp

    from metatrain.engine.constraints import GrammarChooser
    from metatrain.engine.sampling import SamplingConfig

    @dataclasses.dataclass(frozen=True)
    class BiasedGreedy:  # the same bias in both decoders: tags (and so mantras, the lock's end) happen
        ids: tuple[int, ...]
        bias: float

        def __call__(self, logits, rows, key, constraints):
            logits = logits.at[:, jnp.asarray(self.ids)].add(self.bias)
            return GrammarChooser(SamplingConfig(temperature=0.0))(logits, rows, key, constraints)

    class ConstantBias(LogitsProcessor):
        def __init__(self, ids, bias):
            self.ids, self.bias = list(ids), bias

        def __call__(self, input_ids, scores):
            scores = scores.clone()
            scores[:, self.ids] += self.bias
            return scores

    model, directory = _exported(request, generator, workdir, tmp_path / "export", weights)
    enc = generator.encoder
    every_tag = tuple(sorted(enc.tag_ids.values())) + (enc.eos_id,)
    thinking = (enc.eos_id, enc.tag_ids["<thinking>"], enc.tag_ids["</thinking>"])
    texts = ["Background:", "Q: what is the capital of France?"]
    budget = 64
    checked = {"eos": 0, "end_of_mode": 0, "length": 0}
    # biases found to give: plain text to the budget; text then EOS; a block (mantra) then
    # EOS; the lock's exit right away, and blocks in AI mode to the budget
    for mode, tag_ids, bias in (("human", every_tag, 0.0), ("human", (enc.eos_id,), 3.0),
                                ("human", thinking, 4.0), ("ai", every_tag, 6.0)):
        samples = generator.generate(texts, lock_mode=None if mode == "human" else mode, max_new_tokens=budget,
                                     sampling=SamplingConfig(temperature=0.0),
                                     chooser=BiasedGreedy(tag_ids, bias) if bias else None)
        proc = TagGrammarLogitsProcessor.from_pretrained(directory, mode=mode)
        assert proc.pad_token_id == PAD
        prompts = [proc.prompt_ids(t) for t in texts]
        ids, mask = left_padded(prompts)
        extra = max(proc.extra_tokens(p) for p in prompts)  # the same for both prompts
        out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=budget + extra,
                             logits_processor=LogitsProcessorList([ConstantBias(tag_ids, bias), proc]),
                             pad_token_id=PAD, eos_token_id=enc.eos_id)
        for row, sample in enumerate(samples):
            generated = out[row, ids.shape[1]:].tolist()
            room = budget + proc.extra_tokens(prompts[row])
            expected = list(sample.ids)
            if sample.finish_reason == "end_of_mode" and len(expected) < room:
                expected.append(enc.eos_id)
            assert generated[: len(expected)] == expected, (mode, bias, row, sample.finish_reason)
            assert set(generated[len(expected):]) <= {PAD}
            assert proc.sample_ids(generated[:room]) == list(sample.ids)
            checked[sample.finish_reason] += 1
    assert min(checked.values()) > 0, checked
