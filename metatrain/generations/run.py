"""`generations run`: the generational loop, one resumable command.

For generation n = 0 .. G-1 (each in `DIR/gen-<n>/`):

1. corpus: `corpus.jsonl`. Generation 0 copies the spec's annotated corpus, or has an
   endpoint or a checkpoint annotate the raw corpus; generation n > 0 is annotated by
   generation n-1's model (`metatrain annotate --generator metatrain --workdir
   DIR/gen-<n-1>/work`), with the spec's annotation settings.
2. train: `config.yaml` (the spec's run config with `data.sources` replaced by the
   corpus, then the spec's overrides) trained into `work/` from scratch.
3. eval: `metatrain eval --workdir work --data HELDOUT --out eval` (`eval/report.json`).

Every stage but the copy runs as a child `metatrain` command (`metatrain.generations.child`),
so each resumes itself: a rerun of `generations run` after a kill at any point (of the
loop or of a child) skips the stages the manifest has done and starts the others again,
annotate continuing after its last document, train from its newest checkpoint, eval from
the start. The manifest (`metatrain.generations.manifest`) is rewritten after each stage.

SIGTERM stops the running child the way a preemption does (train saves a checkpoint),
records the stage as pending and exits 75; Ctrl-C does the same and exits 130. A stage
that fails stops the loop with one line naming the stage and the child's own message:
exit 2 for the child's user errors (3: divergence), 74 for anything else; its status is
"failed" and a rerun tries it again.

A resume must use the same spec (a changed one is refused naming each changed key),
except that `generations` may grow: the loop then goes on to the new generations.

`METATRAIN_GENERATIONS_STOP_AT` is a hook for tests: `gen-<n>/<stage>[@SECONDS][:child]`
makes the loop SIGKILL itself (or, with `:child`, the child) SECONDS (default 0) after
starting that stage's child.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from metatrain.errors import (
    EXIT_DIVERGED,
    EXIT_INTERRUPTED,
    EXIT_PREEMPTED,
    EXIT_TERMINATED,
    EXIT_USER_ERROR,
    FaultError,
    Terminated,
    UserError,
)
from metatrain.generations import results
from metatrain.generations.child import Child, ChildResult
from metatrain.generations.manifest import (
    STAGES,
    Manifest,
    check_out_dir,
    generation_dir,
    new_generation,
    new_manifest,
    read_manifest,
    stage_name,
    write_manifest,
)
from metatrain.generations.spec import (
    GenerationsSpec,
    load_spec,
    spec_changes,
    spec_data,
    spec_hash,
)
from metatrain.io.outputs import write_atomically

STOP_AT_VARIABLE = "METATRAIN_GENERATIONS_STOP_AT"
CORPUS_FILE = "corpus.jsonl"
CONFIG_FILE = "config.yaml"
WORK_DIR = "work"
EVAL_DIR = "eval"
LOCK_FILE = ".generations.lock"
#: Child exit statuses that mean "stopped, run again to resume" (preempted, Ctrl-C, SIGTERM).
STOPPED_STATUSES: frozenset[int] = frozenset({EXIT_PREEMPTED, EXIT_INTERRUPTED, EXIT_TERMINATED})


class _Stopped(Exception):
    """A child stopped by a signal it did not get from this loop (exit 75, 130 or 143)."""


def _log(message: str) -> None:
    print(f"metatrain generations: {message}", file=sys.stderr, flush=True)


def run_generations(spec_path: str | os.PathLike, out: str | os.PathLike,
                    log: Callable[[str], None] = _log) -> int:
    """Run (or resume) the loop of `spec_path` in `out`; returns the exit status.

    Returns:
        0 when every generation is done, `EXIT_PREEMPTED` after a SIGTERM,
        `EXIT_INTERRUPTED` after Ctrl-C (the manifest says where it stopped).

    Raises:
        UserError: a bad spec, an `out` holding something else, a changed spec on
            resume, another loop running in `out`, or a stage failing with a user error.
        FaultError: a stage failing otherwise (a fault, a bug, killed by a signal).
    """
    spec = load_spec(spec_path)
    data = spec_data(spec)
    out = Path(out).absolute()
    resuming = check_out_dir(out)
    _check_train_config(spec)
    if resuming:
        manifest = read_manifest(out)
        _check_same_spec(manifest, data, out)
    else:
        out.mkdir(parents=True, exist_ok=True)
        manifest = new_manifest(str(Path(spec_path).absolute()), spec_hash(data), data, spec.generations)
        write_manifest(out, manifest)
    with _locked(out):
        if resuming:
            manifest = read_manifest(out)  # as the loop that held the lock left it
            _extend(manifest, data, spec.generations)
        return _Loop(spec, out, manifest, log).run()


def _check_train_config(spec: GenerationsSpec) -> None:
    """The spec's run config and overrides load (before any stage starts)."""
    from metatrain.config import load_config

    previous = Path("previous").absolute() if spec.train.continue_training else None
    load_config(spec.train.config, _train_overrides(spec, Path("corpus.jsonl").absolute(), previous))


def _train_overrides(spec: GenerationsSpec, corpus: Path, previous: Path | None) -> list[str]:
    """The spec's overrides, the generation's corpus and, when it continues, the previous
    generation's work directory to start from."""
    sources = json.dumps([{"path": str(corpus), "weight": 1.0}])
    start = [f"checkpoint.init_from={json.dumps(str(previous))}"] if previous is not None else []
    return [f"data.sources={sources}", *start, *spec.train.set]


def _check_same_spec(manifest: Manifest, data: dict[str, Any], out: Path) -> None:
    """Refuse a resume whose spec differs from the loop's, except for more generations."""
    old = manifest["spec"]["data"]
    changes = spec_changes({**old, "generations": None}, {**data, "generations": None})
    if changes:
        raise UserError(f"the spec changed since {out} was started ({'; '.join(changes)}); run it with the "
                        f"spec it was started with ({manifest['spec']['path']}), or give another --out")
    if data["generations"] < old["generations"]:
        raise UserError(f"the spec has generations={data['generations']} but {out} was started with "
                        f"{old['generations']}; a loop's generations may grow, never shrink: give another --out")


def _extend(manifest: Manifest, data: dict[str, Any], generations: int) -> None:
    """More generations than the manifest has: add them, pending."""
    have = len(manifest["generations"])
    manifest["generations"] += [new_generation(n) for n in range(have, generations)]
    manifest["spec"].update(sha256=spec_hash(data), data=data)


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    """Hold `out`'s lock: one loop at a time runs in a directory."""
    with open(out / LOCK_FILE, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another `metatrain generations run` is running in {out}; wait for it to end "
                            "or stop it first") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class _Loop:
    """One invocation of the loop over a manifest."""

    def __init__(self, spec: GenerationsSpec, out: Path, manifest: Manifest, log: Callable[[str], None]):
        self.spec, self.out, self.manifest, self.log = spec, out, manifest, log
        self.current: tuple[int, str] | None = None
        self.running: Child | None = None

    def write(self) -> None:
        write_manifest(self.out, self.manifest)

    def run(self) -> int:
        self.manifest.update(status="running", error=None)
        self.write()
        try:
            for n, generation in enumerate(self.manifest["generations"]):
                for stage in STAGES:
                    if generation["stages"][stage]["status"] == "done":
                        continue
                    self.run_stage(n, stage)
        except (KeyboardInterrupt, _Stopped) as e:
            how = "SIGTERM" if isinstance(e, (Terminated, _Stopped)) else "Ctrl-C"
            if self.running is not None and self.running.popen.poll() is None:  # the signal came between waits
                self.running.signal(signal.SIGTERM if how == "SIGTERM" else signal.SIGINT)
                self.running.stop()
            where = stage_name(*self.current) if self.current else "between stages"
            if self.current:
                n, stage = self.current
                self.manifest["generations"][n]["stages"][stage].update(status="pending", error=None)
            message = f"stopped by {how} at {where}: run the same command again to resume"
            self.manifest.update(status="stopped", error=message, current=None)
            self.write()
            self.log(message)
            return EXIT_INTERRUPTED if how == "Ctrl-C" else EXIT_PREEMPTED
        self.manifest.update(status="done", error=None, current=None)
        self.write()
        from metatrain.generations.report import format_table, write_plot

        print(format_table(self.manifest))
        self.log(f"done: {len(self.manifest['generations'])} generations in {self.out}; "
                 f"plot {write_plot(self.manifest, self.out)}")
        return 0

    # -- one stage ----------------------------------------------------------------------------

    def run_stage(self, n: int, stage: str) -> None:
        name = stage_name(n, stage)
        entry = self.manifest["generations"][n]
        state = entry["stages"][stage]
        timing = self.manifest["timings"].setdefault(name, {"seconds": 0.0, "attempts": 0})
        self.current = (n, stage)
        state.update(status="running", error=None)
        timing["attempts"] += 1
        self.write()
        self.log(f"{name}: starting")
        start = time.perf_counter()
        try:
            result = getattr(self, f"_{stage}")(n)
        except Exception as e:  # a bug too: the manifest says which stage, never "running" for ever
            error = str(e) if isinstance(e, (UserError, FaultError)) else f"{type(e).__name__}: {e}"
            state.update(status="failed", error=error)
            self.manifest.update(status="failed", error=error, current=None)
            timing["seconds"] = round(timing["seconds"] + time.perf_counter() - start, 3)
            self.write()
            raise
        timing["seconds"] = round(timing["seconds"] + time.perf_counter() - start, 3)
        state.update(status="done", error=None)
        entry["results"][stage] = result
        self.manifest["current"] = None
        self.current = None
        self.write()
        self.log(f"{name}: done in {time.perf_counter() - start:.1f} s")

    def gen_dir(self, n: int) -> Path:
        return self.out / generation_dir(n)

    def _corpus(self, n: int) -> dict[str, Any]:
        corpus = self.gen_dir(n) / CORPUS_FILE
        g0 = self.spec.generation0
        if n == 0 and g0.corpus is not None:
            source = g0.corpus
            self.gen_dir(n).mkdir(parents=True, exist_ok=True)
            write_atomically(corpus, lambda tmp: shutil.copyfile(source, tmp), option="--out")
            made_by = {"copied": source}
        else:
            env = dict(os.environ)
            if n == 0 and g0.endpoint is not None:
                generator = ["--generator", "openai", "--base-url", g0.endpoint.base_url,
                             "--model", g0.endpoint.model]
                if g0.scorer is not None:
                    generator += ["--scorer", g0.scorer]
                if g0.endpoint.api_key_env is not None:
                    key = os.environ.get(g0.endpoint.api_key_env)
                    if not key:
                        raise UserError(f"generation0.endpoint.api_key_env: {g0.endpoint.api_key_env} is not set "
                                        "in the environment; export it, or remove api_key_env")
                    env["OPENAI_API_KEY"] = key
                made_by = {"endpoint": g0.endpoint.model}
            else:
                workdir = g0.checkpoint if n == 0 else str(self.gen_dir(n - 1) / WORK_DIR)
                generator = ["--generator", "metatrain", "--workdir", workdir]
                made_by = {"checkpoint": g0.checkpoint} if n == 0 else {"generation": n - 1}
            argv = ["annotate", *(a for p in self.spec.corpus for a in ("--input", p)), "--out", str(corpus),
                    *generator, *self._annotate_options(), "--no-progress"]
            self.child(n, "corpus", argv, env)
        return {"path": os.path.relpath(corpus, self.out), "made_by": made_by, **results.corpus_results(corpus)}

    def _annotate_options(self) -> list[str]:
        a = self.spec.annotate
        flags = {"--where": a.where, "--split": a.split, "--max-blocks": a.max_blocks, "--samples": a.samples,
                 "--select": a.select, "--gain-tokens": a.gain_tokens, "--min-gain": a.min_gain,
                 "--temperature": a.temperature,
                 "--top-p": a.top_p, "--top-k": a.top_k, "--max-tokens": a.max_tokens, "--seed": a.seed,
                 "--concurrency": a.concurrency, "--max-batch": a.max_batch}
        return [*(x for flag, v in flags.items() if v is not None for x in (flag, str(v))), *a.args]

    def _train(self, n: int) -> dict[str, Any]:
        from metatrain.config import load_config, save_config

        config_path = self.gen_dir(n) / CONFIG_FILE
        workdir = self.gen_dir(n) / WORK_DIR
        previous = self.gen_dir(n - 1) / WORK_DIR if self.spec.train.continue_training and n > 0 else None
        config = load_config(self.spec.train.config,
                             _train_overrides(self.spec, self.gen_dir(n) / CORPUS_FILE, previous))
        save_config(config, config_path)
        self.child(n, "train", ["train", "--config", str(config_path), "--workdir", str(workdir)])
        return {"workdir": os.path.relpath(workdir, self.out), **results.train_results(workdir)}

    def _eval(self, n: int) -> dict[str, Any]:
        e = self.spec.eval
        out = self.gen_dir(n) / EVAL_DIR
        argv = ["eval", "--workdir", str(self.gen_dir(n) / WORK_DIR),
                *(a for p in self.spec.heldout for a in ("--data", p)), "--out", str(out)]
        if e.self_think:
            argv.append("--self-think")
        flags = {"--samples": e.samples, "--self-think-tokens": e.self_think_tokens,
                 "--max-new-tokens": e.max_new_tokens, "--max-documents": e.max_documents}
        argv += [x for flag, v in flags.items() if v is not None for x in (flag, str(v))]
        self.child(n, "eval", [*argv, *e.args])
        return {"path": os.path.relpath(out, self.out), **results.eval_results(out)}

    # -- the child ----------------------------------------------------------------------------

    def child(self, n: int, stage: str, command: list[str], env: dict[str, str] | None = None) -> None:
        """Run `metatrain COMMAND` as the stage's child; return when it succeeded.

        Raises:
            UserError: the child failed with a user error (2) or diverged (3).
            FaultError: the child failed otherwise or was killed.
            _Stopped: the child was stopped by a signal from elsewhere (75, 130, 143).
        """
        name = stage_name(n, stage)
        env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1")
        env.pop(STOP_AT_VARIABLE, None)
        child = Child([sys.executable, "-m", "metatrain.cli", *command], label=name,
                      log=self.gen_dir(n) / f"{stage}.log", env=env)
        self.running = child
        self.manifest["current"] = {"stage": name, "pid": child.pid}
        self.write()
        result = self._test_stop(name, child) or child.wait()
        self.running = None
        self.manifest["current"] = None
        if result.returncode == 0:
            return
        if result.returncode in STOPPED_STATUSES:
            raise _Stopped(name)
        message = f"{name} failed: `metatrain {command[0]}` {result.how}: {result.message}"
        if result.returncode in (EXIT_USER_ERROR, EXIT_DIVERGED):
            raise UserError(message)
        raise FaultError(f"{message}; run the same command again to retry the stage")

    def _test_stop(self, name: str, child: Child) -> ChildResult | None:
        """The test hook `METATRAIN_GENERATIONS_STOP_AT` (see the module docstring)."""
        hook = os.environ.get(STOP_AT_VARIABLE, "")
        where, _, whom = hook.partition(":")
        stage, _, seconds = where.partition("@")
        if stage != name:
            return None
        result = child.wait(float(seconds or 0))
        if whom == "child":
            if result is None:
                child.kill()
                return child.wait()
            return result
        os.kill(os.getpid(), signal.SIGKILL)
        return None  # not reached
