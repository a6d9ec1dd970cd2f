"""One writer per output folder (a training run dir, a sampler's OUT.parts): a lock file made with O_CREAT|O_EXCL
(atomic on local disks and on NFSv3+), holding the holder's host, PID, process start time and job id.

The holder refreshes the file's mtime every `HEARTBEAT_S` seconds from a daemon thread. A lock is taken over
- on the same host when its process is gone (PID not running, or running but started at another time: reused PID),
- from any host when it was not refreshed for `stale_after` seconds (the holder's machine died),
- with `force=True` (`--force-unlock`) whatever its state: for a holder known to be dead on another host.
Otherwise `acquire` raises `LockHeld` (a UsageError: one line naming the holder, exit 2).
"""
from __future__ import annotations

import atexit
import json
import os
import socket
import sys
import threading
import time
from typing import Any

from data.cli import UsageError

HEARTBEAT_S = 30.0  # mtime refresh interval of a held lock
STALE_AFTER_S = 600.0  # a lock not refreshed for this long is taken over from any host


class LockHeld(UsageError):
    """The folder is in use by another live process (or one that may be alive on another host)."""


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22); None when there is no such
    process or it is a zombie (dead, not yet reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if len(fields) < 20 or fields[0] in ("Z", "X") else fields[19]


def process_alive(pid: int, start: str | None) -> bool:
    """Whether process `pid` on this host runs and, when `start` is given, is the one started then."""
    now = _start_time(pid)
    return now is not None and (start is None or now == start)


def identity() -> dict[str, Any]:
    """This process as a lock holder: host, pid, start time, job id (SLURM_JOB_ID), time taken."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start": _start_time(pid),
            "job": os.environ.get("SLURM_JOB_ID", ""), "since": round(time.time(), 3)}


def describe(holder: dict[str, Any]) -> str:
    job = f", SLURM job {holder['job']}" if holder.get("job") else ""
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["since"])) if "since" in holder else "?"
    return f"PID {holder.get('pid', '?')} on {holder.get('host', '?')}{job} (since {since})"


def _gone_here(holder: dict[str, Any]) -> bool:
    """The holder ran on this host and its process no longer exists (a reused PID counts as gone)."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    return not process_alive(holder["pid"], holder.get("start"))


class RunLock:
    """`with RunLock(path): ...` or acquire()/release(). `notes` collects takeover messages for the caller."""

    def __init__(self, path: str, *, what: str, force: bool = False, stale_after: float = STALE_AFTER_S) -> None:
        self.path, self.what, self.force, self.stale_after = path, what, force, stale_after
        self.me, self.notes, self.held, self.lost = identity(), [], False, ""
        self._stop = threading.Event()

    def _read(self) -> tuple[dict[str, Any], float]:
        """The holder (empty when the file is being written or unreadable) and seconds since its last refresh."""
        age = time.time() - os.stat(self.path).st_mtime
        try:
            with open(self.path) as f:
                holder = json.load(f)
            return (holder if isinstance(holder, dict) else {}), age
        except (OSError, ValueError):
            return {}, age

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self.me, f)
            f.flush()
            os.fsync(f.fileno())
        return True

    def acquire(self) -> "RunLock":
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        for _ in range(5):
            if self._create():
                self.held = True
                threading.Thread(target=self._heartbeat, daemon=True, name="runlock").start()
                atexit.register(self.release)
                return self
            try:
                holder, age = self._read()
            except FileNotFoundError:
                continue  # released meanwhile: try again
            reason = ("--force-unlock" if self.force else "its process is gone" if _gone_here(holder)
                      else f"not refreshed for {age:.0f} s" if age > self.stale_after else None)
            if reason is None:
                raise LockHeld(f"{self.what} is in use by {describe(holder)} (lock file {self.path}, refreshed "
                               f"{age:.0f} s ago); wait for it to end, or pass --force-unlock if that process is dead")
            self._take_over(holder, reason)
        raise LockHeld(f"could not take the lock {self.path} (other processes keep taking it); try again")

    def _take_over(self, holder: dict[str, Any], reason: str) -> None:
        """Move the stale lock aside (only one taker's rename succeeds) and check it was the one judged stale."""
        aside = f"{self.path}.stale.{self.me['host']}.{self.me['pid']}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        try:
            with open(aside) as f:
                moved = json.load(f)
        except (OSError, ValueError):
            moved = {}
        if moved and holder and moved != holder:  # someone took it over first and we moved their fresh lock
            os.rename(aside, self.path)
            return
        os.unlink(aside)
        self.notes.append(f"took over the lock of {describe(holder)} on {self.what}: {reason}")

    def _heartbeat(self) -> None:
        """Refresh the mtime; when another process took the lock (--force-unlock), say so once on stderr."""
        while not self._stop.wait(HEARTBEAT_S):
            try:
                holder, _ = self._read()
                if holder.get("pid") != self.me["pid"] or holder.get("host") != self.me["host"]:
                    self.lost = f"the lock {self.path} now belongs to {describe(holder)}"
                else:
                    os.utime(self.path)
            except OSError as e:
                self.lost = f"the lock {self.path} is gone ({e.strerror})"
            if self.lost:
                print(f"warning: {self.what}: {self.lost}; two writers may now share it", file=sys.stderr, flush=True)
                return

    def release(self) -> None:
        """Remove the lock file if this process still holds it (idempotent)."""
        if not self.held:
            return
        self.held = False
        self._stop.set()
        try:
            holder, _ = self._read()
            if holder.get("pid") == self.me["pid"] and holder.get("host") == self.me["host"]:
                os.unlink(self.path)
        except OSError:
            pass

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
