"""Cooldown branches in sweeps (`branches:`): the plan (trunks, kept steps, branch points,
compute), refusals, `sweep run` order and waiting, `--emit`, fitting, and the real trainer.

A stand-in trainer (`BranchTrainer`) writes metrics as the trainer does and a checkpoint
directory for every kept step, and refuses a branch whose checkpoint is not there yet, so
the order is checked by what a branch needs, not by a list of names alone.
"""

from __future__ import annotations

import json
import math

import pytest

from metatrain.cli import main
from metatrain.config import load_config
from metatrain.errors import UserError
from metatrain.io.paths import CONFIGS_DIR
from metatrain.io.storage import as_path
from metatrain.run.checkpoint import Checkpointer, split_step_dir
from metatrain.run.optimizer import cooldown_start
from metatrain.sweep.fit import fit_sweep
from metatrain.sweep.manifest import read_manifest, write_manifest
from metatrain.sweep.plan import compute_summary, plan_sweep
from metatrain.sweep.run import launch_commands, run_sweep, training_order

from .conftest import LAW, write_spec

TPS = 8 * 128  # tokens per step of configs/tiny.yaml
WSD = "optimizer.decay: wsd, optimizer.decay_fraction: 0.2, optimizer.warmup_steps: 2, trainer.eval_every: 4"
BRANCHES = f"""\
overrides: {{{WSD}}}
grid:
  sizes: [tiny-1, tiny-2, tiny-3]
branches: [{8 * TPS}, {32 * TPS}, {16 * TPS}]
"""


def plan(tmp_path, body: str = BRANCHES, out: str = "sweep"):
    spec = write_spec(tmp_path, body)
    return {r.record["name"]: r for r in plan_sweep(spec, tmp_path / out)}, tmp_path / out


# -- planning ----------------------------------------------------------------------------


def test_the_longest_budget_is_the_trunk_and_keeps_each_branch_point(tmp_path):
    runs, out = plan(tmp_path)
    records = read_manifest(out)
    assert [r["name"] for r in records[:3]] == ["tiny-1.D32768", "tiny-1.D8192", "tiny-1.D16384"]
    trunk = runs["tiny-1.D32768"]
    assert trunk.config.trainer.steps == 32 and trunk.config.checkpoint.branch_from is None
    starts = {8: 6, 16: 13}  # 8 - round(1.6), 16 - round(3.2)
    assert starts == {n: cooldown_start(trunk.config.optimizer, n) for n in starts}
    assert trunk.config.checkpoint.keep_steps == (6, 13)
    assert trunk.record["branches"] == ["tiny-1.D8192", "tiny-1.D16384"]
    assert "branch_of" not in trunk.record and trunk.record["spent_flops"] == trunk.record["flops"]
    for steps, start in starts.items():
        branch = runs[f"tiny-1.D{steps * TPS}"]
        r = branch.record
        assert branch.config.trainer.steps == r["steps"] == steps
        assert branch.config.checkpoint.branch_from == out / "runs/tiny-1.D32768/checkpoints" / str(start)
        assert branch.config.checkpoint.keep_steps == ()
        assert r["branch_of"] == "tiny-1.D32768" and r["branch_step"] == start
        # A point like the separate run of its length; the compute it adds is its cooldown.
        assert r["tokens"] == steps * TPS and r["flops"] == r["flops_per_token"] * steps * TPS
        assert r["spent_flops"] == r["flops_per_token"] * (steps - start) * TPS
        loaded = load_config(out / r["config"])  # the config file alone trains the branch
        assert loaded.checkpoint.branch_from == branch.config.checkpoint.branch_from
    assert load_config(out / trunk.record["config"]).checkpoint.keep_steps == (6, 13)


def test_compute_is_counted_both_ways(tmp_path):
    runs, out = plan(tmp_path)
    compute = compute_summary(read_manifest(out))
    per_token = sum({r.record["size"]: r.record["flops_per_token"] for r in runs.values()}.values())
    assert compute["separate"] == pytest.approx(per_token * (8 + 16 + 32) * TPS)
    assert compute["branched"] == pytest.approx(per_token * (32 + (8 - 6) + (16 - 13)) * TPS)
    assert compute["saving"] == pytest.approx(1 - 37 / 56)
    assert compute_summary([{"name": "a", "flops": 1.0}]) is None  # no branches: nothing to compare


def test_plan_prints_the_compute_against_separate_runs(tmp_path, capsys):
    spec = write_spec(tmp_path, BRANCHES)
    assert main(["sweep", "plan", "--spec", str(spec), "--out", str(tmp_path / "sweep")]) == 0
    text = capsys.readouterr().out
    assert "from" in text and "spent" in text
    assert "FLOPs with cooldown branches" in text and "as separate runs: 33.9% saved" in text


def test_a_relative_out_gives_absolute_branch_points_and_replanning_changes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = write_spec(tmp_path, BRANCHES)
    first = plan_sweep(spec, "sweep")
    assert first[1].config.checkpoint.branch_from.is_absolute()
    assert first[1].config.checkpoint.branch_from == tmp_path.resolve() / "sweep/runs/tiny-1.D32768/checkpoints/6"
    assert [r.record for r in plan_sweep(spec, tmp_path / "sweep")] == [r.record for r in first]


def test_variants_and_text_tokens_each_get_their_trunks(tmp_path):
    runs, _ = plan(tmp_path, BRANCHES.replace("tiny-2, tiny-3", "tiny-2")
                   + "variants: {a: {}, b: {loss.weights.thinking: 0.0}}\ncount_tokens: text\n")
    trunks = sorted(n for n, r in runs.items() if "branches" in r.record)
    assert trunks == ["a.tiny-1.D32768", "a.tiny-2.D32768", "b.tiny-1.D32768", "b.tiny-2.D32768"]
    branch = runs["b.tiny-2.D8192"]
    assert branch.record["branch_of"] == "b.tiny-2.D32768"
    assert branch.config.checkpoint.branch_from.parts[-3] == "b.tiny-2.D32768"
    # Budgets count text tokens: more steps than 8, and the branch point is that length's cooldown start.
    steps = branch.config.trainer.steps
    assert steps > 8 and branch.record["text_tokens"] == round(branch.record["text_fraction"] * steps * TPS)
    assert branch.record["branch_step"] == cooldown_start(branch.config.optimizer, steps)


def test_branch_points_that_coincide_are_kept_once(tmp_path):
    runs, _ = plan(tmp_path, f"overrides: {{{WSD}}}\ngrid: {{sizes: [tiny-1]}}\n"
                   f"branches: [{12 * TPS}, {13 * TPS}, {20 * TPS}]\n")
    assert runs["tiny-1.D12288"].record["branch_step"] == runs["tiny-1.D13312"].record["branch_step"] == 10
    assert runs["tiny-1.D20480"].config.checkpoint.keep_steps == (10,)


@pytest.mark.parametrize("body, says", [
    (f"overrides: {{{WSD}}}\ngrid: {{sizes: [tiny-1], tokens: [2048]}}\nbranches: [4096]\n",
     "grid.tokens and branches: both give the token budgets; keep one"),
    (f"overrides: {{{WSD}}}\ngrid: {{sizes: [tiny-1]}}\n",
     "grid.tokens is empty; list the training-token budgets, e.g. [4096, 8192] (or give them as branches"),
    ("isoflop: {budgets: [1.0e10]}\nbranches: [4096]\n",
     "branches: gives the token budgets of a `grid:` sweep"),
    ("grid: {sizes: [tiny-1]}\nbranches: [4096, 8192]\n",
     "the spec's overrides: branches need optimizer.decay: wsd (this config has 'cosine', whose learning rate "
     "depends on the run's length from the start); add `optimizer.decay: wsd` to the spec's overrides"),
    (f"overrides: {{{WSD}}}\ngrid: {{sizes: [tiny-1]}}\nbranches: [4096, 4096]\n", "branches lists a budget twice"),
    (f"overrides: {{{WSD}}}\ngrid: {{sizes: [tiny-1]}}\nbranches: [-1]\n", "branches: -1.0 is not a positive number of tokens"),
    (f"overrides: {{{WSD}}}\ngrid: {{sizes: [tiny-1]}}\nbranches: [8192, 8200, 16384]\n",
     "branches: 8192 and 8200 tokens are both 8 steps of 1024 tokens (tiny-1.D8192, tiny-1.D8200); drop one"),
    (f"overrides: {{{WSD}}}\ngrid: {{sizes: [tiny-1]}}\nbranches: [2048, 16384]\n",
     "branches: 2048 tokens (tiny-1.D2048) is 2 steps of 1024 tokens, not past optimizer.warmup_steps=2: "
     "its warmup would be shorter than the stable run's; give more than 2048 tokens"),
    ("overrides: {optimizer.decay: wsd, optimizer.decay_fraction: 0, optimizer.warmup_steps: 0}\n"
     "grid: {sizes: [tiny-1]}\nbranches: [2048, 16384]\n",
     "branches: 2048 tokens (tiny-1.D2048) is 2 steps of 1024 tokens, with no cooldown (optimizer.decay_fraction "
     "0), so a branch would train nothing"),
    ("overrides: {optimizer.decay: wsd, optimizer.decay_fraction: 1.0, optimizer.warmup_steps: 0}\n"
     "grid: {sizes: [tiny-1]}\nbranches: [4096, 16384]\n",
     "whose cooldown (optimizer.decay_fraction 1) is the whole run: it shares nothing with the stable run"),
])
def test_bad_branches_are_refused_in_one_line(tmp_path, body, says):
    with pytest.raises(UserError) as e:
        plan(tmp_path, body)
    assert says in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "sweep").exists()


# -- running -----------------------------------------------------------------------------


class BranchTrainer:
    """Trains the way the trainer does, as far as a sweep sees: a branch starts at its branch
    step (refused, like the trainer, when the trunk has not saved it), evaluations follow
    `LAW`, and a `checkpoints/<step>` directory for each kept step and the last."""

    def __init__(self, fail: tuple[str, ...] = ()):
        self.trained: list[str] = []
        self.fail = fail

    def __call__(self, config, workdir) -> None:
        workdir = as_path(workdir)
        self.trained.append(workdir.name)
        if workdir.name in self.fail:
            raise UserError(f"loss is nan at step 1; stopping ({workdir.name})")
        start = 0
        if config.checkpoint.branch_from is not None:
            if not config.checkpoint.branch_from.is_dir():
                raise UserError(f"checkpoint.branch_from {config.checkpoint.branch_from} is not a checkpoint step")
            start = int(config.checkpoint.branch_from.name)
        tc, n = config.trainer, config.model.num_non_embedding_params
        lines = []
        for step in range(start + 1, tc.steps + 1):
            if step % tc.eval_every == 0 or step == tc.steps:
                loss = LAW(n, step * config.tokens_per_step)
                lines.append({"step": step, "eval/loss": loss + 0.1, "eval/loss/text": loss,
                              "eval/loss/thinking": loss + 0.4, "eval/bpb/text": loss / 4})
            if step in config.checkpoint.keep_steps or step == tc.steps:
                (workdir / "checkpoints" / str(step)).mkdir(parents=True, exist_ok=True)
        with open(workdir / "metrics.jsonl", "a") as f:
            f.writelines(json.dumps(x) + "\n" for x in lines)


def test_run_trains_each_trunk_before_its_branches_and_fit_reads_them(tmp_path):
    _, out = plan(tmp_path)
    records = read_manifest(out)
    write_manifest(out, records[::-1])  # branches first in the file: still trained after their trunk
    trainer = BranchTrainer()
    done = run_sweep(out, runner=trainer, log=lambda _: None)
    assert all(r["status"] == "done" for r in done)
    for r in done:
        if "branch_of" in r:
            assert trainer.trained.index(r["branch_of"]) < trainer.trained.index(r["name"])
            assert r["final_step"] == r["steps"]
    report = fit_sweep(out, resamples=5, plots=True)
    text = next(f for f in report["fits"] if f["role"] == "text")
    assert text["points"] == 9
    assert text["alpha"] == pytest.approx(LAW.alpha, abs=1e-2) and text["beta"] == pytest.approx(LAW.beta, abs=1e-2)
    assert (out / "plots" / "loss_vs_tokens.png").stat().st_size > 10_000


def test_training_order_puts_branches_after_their_trunk():
    records = [{"name": "b1", "branch_of": "t"}, {"name": "x"}, {"name": "t"}, {"name": "b2", "branch_of": "t"}]
    assert training_order(records) == [1, 2, 0, 3]
    with pytest.raises(UserError, match="branch_of 'gone' names no run in the manifest"):
        training_order([{"name": "b", "branch_of": "gone"}])
    with pytest.raises(UserError, match="names a branch; a branch starts from a stable run"):
        training_order([{"name": "t"}, {"name": "b", "branch_of": "t"}, {"name": "c", "branch_of": "b"}])


def test_a_branch_waits_for_a_trunk_that_failed_and_runs_after_it_succeeds(tmp_path):
    _, out = plan(tmp_path, BRANCHES.replace("tiny-2, tiny-3", "tiny-2"))
    lines: list[str] = []
    records = {r["name"]: r for r in run_sweep(out, runner=BranchTrainer(fail=("tiny-1.D32768",)), log=lines.append)}
    assert records["tiny-1.D32768"]["status"] == "failed"
    assert records["tiny-1.D8192"]["status"] == "planned" and records["tiny-2.D8192"]["status"] == "done"
    assert any("tiny-1.D8192: waits for its stable trunk tiny-1.D32768 (failed); train it first" in line
               for line in lines)
    trainer = BranchTrainer()
    assert all(r["status"] == "done" for r in run_sweep(out, runner=trainer, log=lambda _: None))
    assert trainer.trained == ["tiny-1.D32768", "tiny-1.D8192", "tiny-1.D16384"]


def test_only_a_branch_waits_and_the_command_exits_1(tmp_path, capsys, monkeypatch):
    _, out = plan(tmp_path)
    trainer = BranchTrainer()
    monkeypatch.setattr("metatrain.sweep.run._train", trainer)
    assert main(["sweep", "run", str(out), "--only", "tiny-2.D8192"]) == 1
    text = capsys.readouterr().out
    assert trainer.trained == [] and "0/1 runs done; waiting for their trunk: tiny-2.D8192" in text
    assert main(["sweep", "run", str(out), "--only", "tiny-2.D32768", "--only", "tiny-2.D8192"]) == 0
    assert trainer.trained == ["tiny-2.D32768", "tiny-2.D8192"]


def test_a_trunk_trained_elsewhere_is_collected_when_its_branch_comes(tmp_path):
    runs, out = plan(tmp_path)
    trunk = runs["tiny-3.D32768"]
    BranchTrainer()(trunk.config, out / trunk.record["workdir"])  # trained from an emitted command
    trainer = BranchTrainer()
    records = {r["name"]: r for r in run_sweep(out, runner=trainer, only=["tiny-3.D8192"], log=lambda _: None)}
    assert trainer.trained == ["tiny-3.D8192"]
    assert records["tiny-3.D32768"]["status"] == records["tiny-3.D8192"]["status"] == "done"


def test_emitted_commands_put_trunks_first_and_say_what_branches_wait_for(tmp_path):
    _, out = plan(tmp_path)
    commands = launch_commands(out, "local")
    assert [c.split("--workdir ")[1].rsplit("/", 1)[1] for c in commands[:3]] == [
        "tiny-1.D32768", "tiny-2.D32768", "tiny-3.D32768"]
    assert commands[3] == "# after tiny-1.D32768 has finished: its cooldown branches start from its checkpoints"
    assert commands[4].endswith("runs/tiny-1.D8192") and commands[5].endswith("runs/tiny-1.D16384")
    assert len(commands) == 9 + 3
    records = read_manifest(out)
    for r in records:
        if r["name"] == "tiny-1.D32768":
            r["status"] = "done"
    write_manifest(out, records)
    commands = launch_commands(out, "slurm", launch_args=["--nodes=2"])
    assert not any("tiny-1.D32768" in c for c in commands)  # done: its branches may start now
    assert commands[2].startswith("metatrain launch slurm --nodes=2 -- train") and "tiny-1.D8192" in commands[2]


def test_branch_points_in_a_bucket_are_step_directories_there(bucket_store, tmp_path):
    spec = write_spec(tmp_path, BRANCHES)
    out = f"{bucket_store}/sweep"
    runs = {r.record["name"]: r for r in plan_sweep(spec, out)}
    branch_from = runs["tiny-2.D16384"].config.checkpoint.branch_from
    assert str(branch_from) == f"{out}/runs/tiny-2.D32768/checkpoints/13"
    assert str(load_config(f"{out}/runs/tiny-2.D16384/config.yaml").checkpoint.branch_from) == str(branch_from)
    (branch_from / "_CHECKPOINT_METADATA").write_text("{}")  # a step directory is a prefix with objects
    workdir, step = split_step_dir(branch_from)
    assert str(workdir) == f"{out}/runs/tiny-2.D32768" and step == 13


# -- the real trainer --------------------------------------------------------------------

REAL = f"""\
base: {CONFIGS_DIR / 'tiny.yaml'}
overrides:
  optimizer.decay: wsd
  optimizer.warmup_steps: 1
  trainer.eval_batches: 1
  trainer.eval_every: 1000
  trainer.log_every: 1
  trainer.progress: false
  checkpoint.every: 1000
  checkpoint.async_save: false
grid: {{sizes: [tiny-1]}}
branches: [{4 * TPS}, {8 * TPS}]
"""


def test_the_real_trainer_trains_a_branch_from_its_trunk(tmp_path):
    """A trunk of 8 steps keeps step 3; the 4-step point continues it for its one cooldown step."""
    spec = tmp_path / "sweep.yaml"
    spec.write_text(REAL)
    out = tmp_path / "sweep"
    plan_sweep(spec, out)
    records = {r["name"]: r for r in run_sweep(out, log=lambda _: None)}
    trunk, branch = records["tiny-1.D8192"], records["tiny-1.D4096"]
    assert trunk["status"] == branch["status"] == "done" and branch["branch_step"] == 3
    assert Checkpointer(out / trunk["workdir"], read_only=True).all_steps() == [3, 8]
    metrics = [json.loads(x) for x in (out / branch["workdir"] / "metrics.jsonl").read_text().splitlines()]
    assert min(m["step"] for m in metrics if "loss" in m) == 4  # it trained step 4 only
    assert branch["final_step"] == 4 and math.isfinite(branch["loss"]) and branch["loss"] > trunk["loss"]


#: The tolerance of the slow check: a branch continues the trunk's exact state and "wsd"'s
#: learning rate before a cooldown does not depend on the run's length, so a branch is the
#: separate run of its length up to float rounding (the trainer's own test: parameters to 1e-5).
GAP_TOLERANCE = 1e-4

SAME = """\
base: {base}
overrides:
  optimizer.decay: wsd
  optimizer.decay_fraction: 0.25
  optimizer.warmup_steps: 1
  trainer.eval_batches: 1
  trainer.eval_every: 1000
  trainer.log_every: 2
  trainer.progress: false
  checkpoint.every: 1000
  checkpoint.async_save: false
grid:
  sizes: [tiny-1, tiny-2]
{budgets}
"""


@pytest.mark.slow
def test_a_branch_ends_at_the_loss_of_the_separate_run_of_its_length(tmp_path, capsys):
    """The same spec with `branches:` and with `grid.tokens:` (the branch points only: each
    trunk is the separate run of the longest budget): every branch's final evaluation losses
    are within GAP_TOLERANCE of the separate run's, and `sweep run --fit` fits the branches.

    10 trainer start-ups of 4 to 16 steps: about 2 minutes on the 2-core CPU."""
    steps = (6, 10, 16)
    branched, separate = tmp_path / "branched.yaml", tmp_path / "separate.yaml"
    base = CONFIGS_DIR / "tiny.yaml"
    branched.write_text(SAME.format(base=base, budgets=f"branches: {[n * TPS for n in steps]}"))
    separate.write_text(SAME.format(base=base, budgets=f"  tokens: {[n * TPS for n in steps[:-1]]}"))
    assert main(["sweep", "run", str(tmp_path / "b"), "--spec", str(branched), "--fit", "--bootstrap", "5"]) == 0
    text = capsys.readouterr().out
    assert main(["sweep", "run", str(tmp_path / "s"), "--spec", str(separate)]) == 0
    ours = {r["name"]: r for r in read_manifest(tmp_path / "b")}
    theirs = {r["name"]: r for r in read_manifest(tmp_path / "s")}
    assert [r["branch_step"] for r in ours.values() if "branch_of" in r] == [4, 7, 4, 7]
    for name, separate_run in theirs.items():
        branch = ours[name]
        assert branch["tokens"] == separate_run["tokens"] and branch["flops"] == separate_run["flops"]
        for key in ("loss", "loss/text", "loss/thinking"):
            assert branch[key] == pytest.approx(separate_run[key], abs=GAP_TOLERANCE), (name, key)
    fitted = json.loads((tmp_path / "b" / "fit.json").read_text())
    assert {f["role"]: f["points"] for f in fitted["fits"]} == {"text": 6, "thinking": 6, "joint": 6}
    assert "text loss (loss/text): 6 runs" in text
