"""The work directory's lock: one trainer writes a run at a time.

The lock is an exclusive `flock` on `train.lock`, taken before anything else is written.
The kernel drops it when its process dies, however it dies, so a lock file left behind
by a dead process on this host is taken over (with a warning). The holder also rewrites
its lock file every `HEARTBEAT_S` seconds: on a shared filesystem where `flock` does not
reach across hosts, a lock written on another host is honoured while its heartbeat is
younger than `STALE_AFTER_S`, and taken over (with a warning) once it is older, so a run
rescheduled onto a new VM after a preemption is not stranded. In a multi-process run
process 0 holds the lock for all; see docs/train.md ("One owner") for the shared-filesystem caveats.

A work directory in a bucket (`gs://`) is locked by `ObjectLock` instead: `train.lock`
is created only if it does not exist (a GCS generation precondition, atomic on the
server), its holder rewrites it every `HEARTBEAT_S` seconds on the condition that it is
still the object it wrote, and a lock whose last write is older than `STALE_AFTER_S`
is taken over by a conditional replace, so two trainers that both find it stale cannot
both win. A holder whose rewrite finds another trainer's lock says so once: its next
checkpoint save is refused (`lost`), so two runs never write one directory.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from metatrain.errors import FaultError, UserError, describe_cause
from metatrain.io.storage import as_path, gcs_blob, is_remote
from metatrain.run.layout import (
    LOCK_FILE,
)

#: Seconds between the holder's rewrites of its lock file.
HEARTBEAT_S: float = 15.0
#: A lock file from another host whose heartbeat is older than this is stale.
STALE_AFTER_S: float = 120.0


class WorkdirLocked(UserError):
    """Another trainer holds the work directory."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(holder: dict[str, Any]) -> str:
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} (started {when})"


class WorkdirLock:
    """An exclusive lock on a work directory; a context manager.

    Raises (on enter):
        WorkdirLocked: another live trainer holds it (the message names it).
        FaultError: the work directory cannot be created or written.
    """

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self.path = self.workdir / LOCK_FILE
        self._fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._record: dict[str, Any] = {}

    def __enter__(self) -> "WorkdirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise FaultError(f"cannot create the work directory {self.workdir}: {describe_cause(e)}") from None
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise FaultError(
                    f"cannot write to the work directory {self.workdir} (creating {LOCK_FILE}): {describe_cause(e)}; "
                    "give a writable --workdir"
                ) from None
            try:
                locked = self._flock(fd)
                if not locked:
                    holder = self._read(fd)
                    raise WorkdirLocked(
                        f"work directory {self.workdir} is in use by another trainer: {_describe(holder)}; "
                        "wait for it to finish or stop it, or train in another --workdir"
                    )
                # The file may have been removed (released) between open and flock: retry.
                if os.fstat(fd).st_ino != os.stat(self.path).st_ino:
                    os.close(fd)
                    continue
            except FileNotFoundError:
                os.close(fd)
                continue
            except BaseException:
                os.close(fd)
                raise
            break
        try:
            self._check_previous_holder(fd)
            self._record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
            self._write(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._thread = threading.Thread(target=self._heartbeat, name="metatrain-lock-heartbeat", daemon=True)
        self._thread.start()

    def _flock(self, fd: int) -> bool:
        """Take the flock; False when another process holds it."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        except OSError as e:
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                return True  # no flock on this filesystem: the lock file's contents decide
            raise FaultError(f"cannot lock {self.path}: {describe_cause(e)}") from None

    def _check_previous_holder(self, fd: int) -> None:
        """A lock file left by an earlier holder: refuse it while it may live, else take over."""
        holder = self._read(fd)
        if not holder:
            return
        here = socket.gethostname()
        pid = holder.get("pid")
        if holder.get("host") == here:
            # We hold the flock, so on a local filesystem its holder is gone. Where flock is
            # not supported the pid decides.
            if isinstance(pid, int) and pid != os.getpid() and _pid_alive(pid) and not self._flock_works():
                raise WorkdirLocked(
                    f"work directory {self.workdir} is in use by another trainer: {_describe(holder)}; "
                    "wait for it to finish or stop it, or train in another --workdir"
                )
            print(
                f"metatrain: taking over the stale lock {self.path} of {_describe(holder)} (that process is gone)",
                file=sys.stderr,
                flush=True,
            )
            return
        age = time.time() - os.fstat(fd).st_mtime
        if age < STALE_AFTER_S:
            raise WorkdirLocked(
                f"work directory {self.workdir} is in use by another trainer: {_describe(holder)}, "
                f"last heartbeat {age:.0f} s ago; if that run is gone, wait {STALE_AFTER_S - age:.0f} s "
                f"(a lock not refreshed for {STALE_AFTER_S:.0f} s is stale) or delete {self.path}"
            )
        print(
            f"metatrain: taking over the stale lock {self.path} of {_describe(holder)} "
            f"(no heartbeat for {age:.0f} s)",
            file=sys.stderr,
            flush=True,
        )

    def _flock_works(self) -> bool:
        probe = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(probe, fcntl.LOCK_UN)
            return False  # a second descriptor got it although we hold LOCK_EX: flock is a no-op here
        except BlockingIOError:
            return True
        except OSError:
            return False
        finally:
            os.close(probe)

    @staticmethod
    def _read(fd: int) -> dict[str, Any]:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            data = os.read(fd, 65536)
            holder = json.loads(data.decode("utf-8")) if data.strip() else {}
            return holder if isinstance(holder, dict) else {}
        except (OSError, ValueError):
            return {}

    def _write(self, fd: int) -> None:
        data = (json.dumps({**self._record, "heartbeat": time.time()}) + "\n").encode()
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            os.ftruncate(fd, 0)
            os.write(fd, data)
            os.fsync(fd)
        except OSError as e:
            raise FaultError(f"cannot write the lock file {self.path}: {describe_cause(e)}") from None

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            fd = self._fd
            if fd is None:
                return
            try:
                self._write(fd)
            except FaultError:
                pass  # a full disk must not kill the run through its lock; the save will say so

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(fd)


class ObjectLock:
    """The lock of a work directory in object storage (`gs://`); a context manager.

    Raises (on enter):
        WorkdirLocked: another trainer holds it and its heartbeat is fresh.
        FaultError: the bucket cannot be written.
    """

    def __init__(self, workdir: Any):
        self.workdir = as_path(workdir)
        self.path = self.workdir / LOCK_FILE
        self.lost = False
        self._generation: int | None = None
        self._stop = threading.Event()
        self._writing = threading.Lock()  # a heartbeat's write and the release's delete never overlap
        self._thread: threading.Thread | None = None
        self._record: dict[str, Any] = {}

    def __enter__(self) -> "ObjectLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _data(self) -> bytes:
        return (json.dumps({**self._record, "heartbeat": time.time()}) + "\n").encode()

    def acquire(self) -> None:
        from google.api_core import exceptions as gexc

        # The token tells our own write from another trainer's: a conditional write whose
        # reply was lost is retried by the client, and its retry fails the precondition.
        self._record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                        "token": os.urandom(8).hex()}
        blob = gcs_blob(self.path)
        try:
            blob.upload_from_string(self._data(), if_generation_match=0)
        except gexc.PreconditionFailed:
            if not self._ours():
                self._take_over_if_stale()
        except gexc.GoogleAPICallError as e:
            raise FaultError(f"cannot write the lock {self.path}: {e.message}; give a writable --workdir") from None
        else:
            self._generation = blob.generation
        self._thread = threading.Thread(target=self._heartbeat, name="metatrain-lock-heartbeat", daemon=True)
        self._thread.start()

    def _ours(self) -> bool:
        """Whether the lock object is the one this holder wrote (then its generation is kept)."""
        blob = gcs_blob(self.path)
        try:
            blob.reload()
            holder = json.loads(blob.download_as_bytes(if_generation_match=blob.generation).decode("utf-8"))
        except Exception:  # noqa: BLE001 - gone, replaced meanwhile or unreadable: not ours
            return False
        if not isinstance(holder, dict) or holder.get("token") != self._record.get("token"):
            return False
        self._generation = blob.generation
        return True

    def _take_over_if_stale(self) -> None:
        from google.api_core import exceptions as gexc

        blob = gcs_blob(self.path)
        try:
            blob.reload()
            data = blob.download_as_bytes(if_generation_match=blob.generation)
        except gexc.NotFound:
            self.acquire_again()
            return
        except gexc.PreconditionFailed:
            raise self._locked({}, 0.0) from None
        try:
            holder = json.loads(data.decode("utf-8"))
            holder = holder if isinstance(holder, dict) else {}
        except ValueError:
            holder = {}
        age = max(0.0, time.time() - blob.updated.timestamp())
        same_host_gone = (holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int)
                          and holder["pid"] != os.getpid() and not _pid_alive(holder["pid"]))
        if age < STALE_AFTER_S and not same_host_gone:
            raise self._locked(holder, age)
        why = "that process is gone" if same_host_gone else f"no heartbeat for {age:.0f} s"
        try:
            blob.upload_from_string(self._data(), if_generation_match=blob.generation)
        except gexc.PreconditionFailed:
            raise self._locked(holder, 0.0) from None  # another trainer took it over first
        self._generation = blob.generation
        print(f"metatrain: taking over the stale lock {self.path} of {_describe(holder)} ({why})",
              file=sys.stderr, flush=True)

    def acquire_again(self) -> None:
        """The lock was released between our create and our read: create it again."""
        from google.api_core import exceptions as gexc

        blob = gcs_blob(self.path)
        try:
            blob.upload_from_string(self._data(), if_generation_match=0)
        except gexc.PreconditionFailed:
            raise self._locked({}, 0.0) from None
        self._generation = blob.generation

    def _locked(self, holder: dict[str, Any], age: float) -> WorkdirLocked:
        return WorkdirLocked(
            f"work directory {self.workdir} is in use by another trainer: {_describe(holder)}, "
            f"last heartbeat {age:.0f} s ago; if that run is gone, wait {max(0.0, STALE_AFTER_S - age):.0f} s "
            f"(a lock not refreshed for {STALE_AFTER_S:.0f} s is stale) or delete {self.path}"
        )

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S) and self._heartbeat_once():
            pass

    def _heartbeat_once(self) -> bool:
        """Rewrite the lock if it is still ours; False (and `lost`) once another trainer replaced it."""
        from google.api_core import exceptions as gexc

        with self._writing:
            if self._stop.is_set():
                return False
            blob = gcs_blob(self.path)
            try:
                blob.upload_from_string(self._data(), if_generation_match=self._generation)
                self._generation = blob.generation
                return True
            except gexc.PreconditionFailed:
                if self._ours():  # our own write, retried after its reply was lost
                    return True
            except Exception:  # noqa: BLE001 - a network blip must not kill the run through its lock
                return True
            self.lost = True
            print(f"metatrain: lost the lock {self.path}: another trainer replaced it (this run's "
                  "heartbeat was late); this run saves no more checkpoints", file=sys.stderr, flush=True)
            return False

    def release(self) -> None:
        self._stop.set()
        with self._writing:  # after any heartbeat in flight: its generation is the one to delete
            generation, self._generation = self._generation, None
            if generation is not None and not self.lost:
                try:
                    gcs_blob(self.path).delete(if_generation_match=generation)
                except Exception:  # noqa: BLE001 - a lock left behind goes stale and is taken over
                    pass
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


def workdir_lock(workdir: Any) -> "WorkdirLock | ObjectLock":
    """The lock that fits where the work directory is: `flock` locally, `ObjectLock` in a bucket."""
    return ObjectLock(workdir) if is_remote(str(workdir)) else WorkdirLock(workdir)


class NoLock:
    """What processes other than 0 hold: nothing (process 0 holds the lock for the run)."""

    def __enter__(self) -> "NoLock":
        return self

    def __exit__(self, *exc) -> None:
        pass


# -- what may be trained in -----------------------------------------------------------------
