"""Mixture schedules: per-stage proportions, switch steps, per-source streams, exact resume,
process counts, the unscheduled stream unchanged, and a real training run resumed mid-schedule.

Documents are told apart exactly: a lane's rows, concatenated, are its documents' inputs
end to end (packing neither pads nor reorders the train split), so cutting that stream at
each BOS gives every document whole, and its BOS position // seq_len is its step.
"""

from __future__ import annotations

import json

import grain
import numpy as np
import pytest

from metatrain.config import config_to_dict, load_config
from metatrain.data import make_batch_iterator, merge_lane_states
from metatrain.data.config import DataConfig, ScheduleStage, SourceConfig
from metatrain.data.mixture import source_seed
from metatrain.data.packing import pack_examples, rows_to_batch, shift_document
from metatrain.data.sources import EncoderSpec
from metatrain.documents import parse_document
from metatrain.errors import UserError
from metatrain.io.paths import CONFIGS_DIR, DEFAULT_TAGS, REPO_ROOT, SAMPLE_TOKENIZER
from metatrain.run.resume import config_differences

from ..conftest import assert_batches_equal, data_config, make_docs, take, write_jsonl

B, L = 4, 67  # global batch rows, row length (prime)
N_DOCS = 60  # per source
STAGES = ((0, (3.0, 1.0)), (30, (1.0, 1.0)), (60, (1.0, 3.0)))
STEPS = 90


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two sources whose documents are known by their encoded inputs: {inputs: (source, id)}."""
    root = tmp_path_factory.mktemp("schedule")
    docs = [make_docs(N_DOCS, prefix="a", seed=11), make_docs(N_DOCS, prefix="b", seed=12)]
    paths = [write_jsonl(root / f"{name}.jsonl", d) for name, d in zip("ab", docs)]
    encoder = EncoderSpec(str(SAMPLE_TOKENIZER), str(DEFAULT_TAGS), None, "none").build()
    encoded = [[encoder.encode(parse_document(doc, path="", line=0)) for doc in d] for d in docs]
    index = {tuple(e.ids[:-1].tolist()): (k, doc["id"]) for k in (0, 1) for e, doc in zip(encoded[k], docs[k])}
    return {"paths": paths, "docs": docs, "encoded": encoded, "index": index, "bos": encoder.bos_id}


def config(corpus, schedule=STAGES, **kwargs) -> DataConfig:
    kwargs = {"eval_fraction": 0.0, "mantra_policy": "none", **kwargs}
    return data_config(*corpus["paths"], schedule=schedule, **kwargs)


def lane_documents(corpus, batches, lane: int, workers: int = 1) -> list[tuple[int, int, str]]:
    """`(step, source, id)` of every whole document of `lane`, in order (per worker: worker
    w of W packs its own stream into the rows of steps w, w + W, ...)."""
    out = []
    for w in range(workers):
        stream = np.concatenate([b["inputs"][lane] for b in batches[w::workers]])
        starts = np.flatnonzero(stream == corpus["bos"])
        assert starts[0] == 0
        for s, e in zip(starts, starts[1:]):
            out.append((w + workers * (int(s) // L), *corpus["index"][tuple(stream[s:e].tolist())]))
    return out


def stage_of(step: int, schedule=STAGES) -> int:
    return max(i for i, (start, _) in enumerate(schedule) if start <= step)


@pytest.fixture(scope="module")
def scheduled(corpus):
    """`STEPS` batches of the 3-stage schedule and every lane's documents."""
    batches = take(make_batch_iterator(config(corpus), batch_size=B, seq_len=L), STEPS)
    return batches, [lane_documents(corpus, batches, r) for r in range(B)]


# -- config ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "schedule, message",
    [
        ([(5, [1, 1])], "must start at step 0, but its first stage starts at step 5"),
        ([(0, [1, 1]), (10, [1, 1]), (10, [1, 2])], "steps must increase: a stage at step 10 follows"),
        ([(0, [1, 1]), (10, [1])], "stage at step 10 has 1 weights for 2 sources"),
        ([(0, [1, -0.5])], r"weights must be finite numbers >= 0, got -0.5"),
        ([(0, [1, float("nan")])], "weights must be finite numbers >= 0, got nan"),
        ([(0, [1, True])], "weights must be finite numbers >= 0, got True"),
        ([(0, [0, 0])], "stage at step 0: every weight is 0"),
        ([(0, [1, 0]), (7, [2, 0])], "b.jsonl has weight 0 in every stage .* drop it from `sources`"),
        ([(-1, [1, 1])], "`step` must be an integer >= 0"),
        ([(2.5, [1, 1])], "`step` must be an integer >= 0"),
        ([(0, 1.0)], "`weights` must be a list of numbers"),
        ([5], r"each stage is \{step: STEP, weights"),
        ("0: [1, 1]", "`schedule` must be a list of stages"),
    ],
)
def test_bad_schedules_are_refused_saying_what_to_fix(schedule, message):
    sources = (SourceConfig("a.jsonl"), SourceConfig("b.jsonl"))
    with pytest.raises(ValueError, match=message):
        DataConfig(sources=sources, schedule=schedule)


def test_a_schedule_in_yaml_is_typed_round_trips_and_errors_name_the_key(tmp_path):
    sources = f"[{{path: {REPO_ROOT}/data/sample/factbook.jsonl}}, {{path: {REPO_ROOT}/data/sample/synthetic.jsonl}}]"
    overrides = [f"data.sources={sources}", "data.schedule=[{step: 0, weights: [4, 1]}, {step: 9, weights: [1, 0.5]}]"]
    loaded = load_config(CONFIGS_DIR / "tiny.yaml", overrides)
    assert loaded.data.schedule == (ScheduleStage(0, (4.0, 1.0)), ScheduleStage(9, (1.0, 0.5)))
    from metatrain.config import save_config

    save_config(loaded, tmp_path / "run.yaml")
    assert load_config(tmp_path / "run.yaml") == loaded
    with pytest.raises(UserError, match=r"unknown config key 'data.schedule\[0\].weight'; did you mean 'data.schedule\[0\].weights'"):
        load_config(CONFIGS_DIR / "tiny.yaml", ["data.schedule=[{step: 0, weight: [1]}]"])
    with pytest.raises(UserError, match="data: `schedule` must start at step 0"):
        load_config(CONFIGS_DIR / "tiny.yaml", ["data.schedule=[{step: 3, weights: [1]}]"])


def test_a_schedule_may_not_change_on_resume_and_old_checkpoints_have_none():
    plain = config_to_dict(load_config(CONFIGS_DIR / "tiny.yaml"))
    old = json.loads(json.dumps(plain))
    del old["data"]["schedule"]  # a checkpoint written before schedules existed
    assert config_differences(old, plain) == []
    scheduled = config_to_dict(load_config(CONFIGS_DIR / "tiny.yaml", ["data.schedule=[{step: 0, weights: [1]}]"]))
    assert [key for key, _, _ in config_differences(old, scheduled)] == ["data.schedule"]


# -- what the stream holds --------------------------------------------------------------------


def test_within_each_stage_every_window_of_a_lane_holds_the_stage_proportions(scheduled):
    _, lanes = scheduled
    for r, documents in enumerate(lanes):
        for stage, (_, weights) in enumerate(STAGES):
            share = weights[0] / sum(weights)
            is_a = np.array([source == 0 for step, source, _ in documents if stage_of(step) == stage], float)
            assert len(is_a) >= 8, f"lane {r} stage {stage}: too few documents to test"
            counts = np.concatenate([[0.0], np.cumsum(is_a)])
            # every prefix within one document of exact, so every window within two
            n = np.arange(len(counts))
            assert np.all(np.abs(counts - n * share) < 1), (r, stage, is_a)
            windows = counts[None, :] - counts[:, None]
            lengths = n[None, :] - n[:, None]
            assert np.all(np.abs(windows - lengths * share)[lengths > 0] < 2), (r, stage)


def test_the_mixture_switches_exactly_at_the_stage_steps(corpus):
    schedule = ((0, (1.0, 0.0)), (7, (0.0, 1.0)), (15, (1.0, 0.0)))
    batches = take(make_batch_iterator(config(corpus, schedule), batch_size=B, seq_len=L), 24)
    starting_at_7 = 0
    for r in range(B):
        for step, source, _ in lane_documents(corpus, batches, r):
            assert source == (1 if 7 <= step < 15 else 0), f"lane {r}: a document of source {source} starts at step {step}"
            starting_at_7 += step == 7
    assert starting_at_7 > 0  # the new stage's first documents are at its first step, not later


def test_each_source_continues_its_own_shuffled_stream_across_stages(corpus, scheduled):
    _, lanes = scheduled
    for r, documents in enumerate(lanes):
        for k in (0, 1):
            read = [doc_id for _, source, doc_id in documents if source == k]
            order = grain.MapDataset.range(N_DOCS).shuffle(seed=source_seed(0, k)).repeat()[r::B]
            expected = [corpus["docs"][k][order[i]]["id"] for i in range(len(read))]
            assert read == expected, f"lane {r} source {k}: a document was repeated or skipped"
            epoch = read[: N_DOCS // B]
            assert len(set(epoch)) == len(epoch)


def test_the_eval_split_ignores_the_schedule(corpus):
    kw = dict(batch_size=B, seq_len=L, split="eval")
    with_schedule = list(make_batch_iterator(config(corpus, eval_fraction=0.3), **kw))
    without = list(make_batch_iterator(config(corpus, (), eval_fraction=0.3), **kw))
    assert len(without) > 2
    assert_batches_equal(with_schedule, without)


# -- resume and processes -------------------------------------------------------------------

SHORT = ((0, (3.0, 1.0)), (5, (0.0, 1.0)), (9, (1.0, 2.0)))


@pytest.mark.parametrize("n", [0, 2, 4, 5, 6, 9, 14])  # in a stage, either side of and at each boundary, after the last
def test_resume_from_any_step_gives_the_uninterrupted_batches(corpus, n):
    cfg = config(corpus, SHORT)
    it = make_batch_iterator(cfg, batch_size=B, seq_len=L)
    take(it, n)
    state = json.loads(json.dumps(it.get_state()))  # what the checkpoint stores
    expected = take(it, 6)
    fresh = make_batch_iterator(cfg, batch_size=B, seq_len=L)
    take(fresh, 3)  # wherever it was, set_state moves it
    fresh.set_state(state)
    assert_batches_equal(take(fresh, 6), expected)


def test_a_state_of_another_schedule_or_none_is_refused(corpus):
    state = make_batch_iterator(config(corpus, SHORT), batch_size=B, seq_len=L).get_state()
    other = make_batch_iterator(config(corpus, SHORT[:2]), batch_size=B, seq_len=L)
    with pytest.raises(UserError, match="the run changed \\(schedule: saved .*'step': 9.*, now "):
        other.set_state(state)
    plain = make_batch_iterator(config(corpus, ()), batch_size=B, seq_len=L)
    with pytest.raises(UserError, match="schedule: saved None, now"):
        make_batch_iterator(config(corpus, SHORT), batch_size=B, seq_len=L).set_state(plain.get_state())


def test_one_and_two_processes_make_the_same_global_batches_and_share_checkpoints(corpus):
    cfg = config(corpus, SHORT)
    kw = dict(batch_size=B, seq_len=L)
    one = make_batch_iterator(cfg, process_index=0, process_count=1, **kw)
    hosts = [make_batch_iterator(cfg, process_index=p, process_count=2, **kw) for p in (0, 1)]

    def joined(n):
        return [{k: np.concatenate([b[k] for b in parts]) for k in parts[0]} for parts in zip(*(take(h, n) for h in hosts))]

    assert_batches_equal(joined(7), take(one, 7))
    state_2 = merge_lane_states([h.get_state() for h in hosts])  # saved on 2 processes at step 7
    expected = joined(4)
    single = make_batch_iterator(cfg, **kw)
    single.set_state(state_2)  # resumed on 1
    assert_batches_equal(take(single, 4), expected)


def test_worker_processes_switch_at_the_global_steps_and_restore_exactly(corpus):
    schedule = ((0, (1.0, 0.0)), (5, (0.0, 1.0)), (11, (1.0, 1.0)))
    cfg = config(corpus, schedule, num_workers=2)
    with make_batch_iterator(cfg, batch_size=2, seq_len=L) as it:
        batches = take(it, 8)
        state = json.loads(json.dumps(it.get_state()))
        expected = take(it, 4)
    for r in range(2):
        for step, source, _ in lane_documents(corpus, batches + expected, r, workers=2):
            assert source == (1 if 5 <= step < 11 else 0), f"lane {r}: source {source} at step {step}"
    with make_batch_iterator(cfg, batch_size=2, seq_len=L) as again:
        again.set_state(state)
        assert_batches_equal(take(again, 4), expected)


# -- without a schedule nothing changed -----------------------------------------------------


def test_without_a_schedule_the_batches_are_grains_weighted_mix(corpus):
    """The stream before schedules existed, rebuilt from grain and the encoder alone."""
    weights = (2.0, 1.0)
    cfg = data_config(*corpus["paths"], weights=weights, eval_fraction=0.0, mantra_policy="none")
    got = take(make_batch_iterator(cfg, batch_size=B, seq_len=L), 12)
    examples = [[shift_document(e.ids, e.roles) for e in encoded] for encoded in corpus["encoded"]]
    lanes = []
    for r in range(B):
        parts = [grain.MapDataset.source(ex).shuffle(seed=source_seed(0, k)).repeat()[r::B] for k, ex in enumerate(examples)]
        lanes.append(iter(pack_examples(grain.MapDataset.mix(parts, weights=weights).to_iter_dataset(), L)))
    assert_batches_equal(got, [rows_to_batch([next(lane) for lane in lanes]) for _ in range(12)])


# A state saved by the pipeline before schedules existed (two sources a/b with weights 2:1,
# batch 2, seq_len 67, after 3 batches); only the source paths are this run's.
OLD_STATE = {
    "format": "metatrain-data-state", "version": 1, "split": "train", "batch_size": 2, "seq_len": 67, "seed": 0,
    "num_workers": 0, "sources": [{"path": "A", "weight": 2.0}, {"path": "B", "weight": 1.0}], "eval_fraction": 0.0,
    "grain": {"lanes": {
        "0": {"packing": {"parent_state": {"next_index": 1}, "remainder_slices": {"example": [3, 80]},
                          "elements_from_buffer_after_checkpoint": 1}, "done": False},
        "1": {"packing": {"parent_state": {"next_index": 1}, "remainder_slices": {"example": [78, 142]},
                          "elements_from_buffer_after_checkpoint": 1}, "done": False},
    }},
}


def test_a_data_state_saved_before_schedules_restores_and_keeps_its_format(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", make_docs(20, prefix="a", first_word="alpha", seed=5))
    b = write_jsonl(tmp_path / "b.jsonl", make_docs(20, prefix="b", first_word="beta", seed=6))
    cfg = data_config(a, b, weights=(2.0, 1.0), eval_fraction=0.0, mantra_policy="none")
    it = make_batch_iterator(cfg, batch_size=2, seq_len=67)
    take(it, 3)
    old = json.loads(json.dumps(OLD_STATE))
    old["sources"][0]["path"], old["sources"][1]["path"] = str(a), str(b)
    assert json.loads(json.dumps(it.get_state())) == old  # the same state as before schedules
    expected = take(it, 4)
    fresh = make_batch_iterator(cfg, batch_size=2, seq_len=67)
    fresh.set_state(old)
    assert_batches_equal(take(fresh, 4), expected)


# -- a real run -------------------------------------------------------------------------------


def test_a_scheduled_training_run_resumes_with_the_uninterrupted_losses(tmp_path):
    from metatrain.train.hooks import FunctionHook
    from metatrain.train.loop import train

    sources = f"[{{path: {REPO_ROOT}/data/sample/factbook.jsonl}}, {{path: {REPO_ROOT}/data/sample/synthetic.jsonl}}]"
    overrides = [
        "trainer.steps=6", "trainer.log_every=1", "trainer.eval_every=0", "trainer.progress=false",
        "checkpoint.every=3", f"data.sources={sources}",
        "data.schedule=[{step: 0, weights: [3, 1]}, {step: 3, weights: [0, 1]}, {step: 5, weights: [1, 1]}]",
    ]
    cfg = load_config(CONFIGS_DIR / "tiny.yaml", overrides)
    train(cfg, tmp_path / "reference")

    class Crash(Exception):
        pass

    def crash_after_step_4(info):
        if info.step == 4:  # the checkpoint of step 3 (a stage's first step) exists; step 4 is lost
            raise Crash()

    with pytest.raises(Crash):
        train(cfg, tmp_path / "run", hooks=(FunctionHook(every=1, fn=crash_after_step_4),))
    summary = train(cfg, tmp_path / "run")
    assert summary.start_step == 3 and summary.final_step == 6

    def losses(workdir):
        lines = (workdir / "metrics.jsonl").read_text().splitlines()
        return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}

    resumed, reference = losses(tmp_path / "run"), losses(tmp_path / "reference")
    assert [resumed[s] for s in range(1, 7)] == [reference[s] for s in range(1, 7)]
