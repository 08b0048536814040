"""One driver per store at a time: a lease object with a heartbeat, safe on S3 and local disk.

Two drivers writing one store would both run the whole job and delete each other's staged
chunks, so a run takes the store's lease (``ROOT/_lease.json``) before it changes anything and
gives it back at the end. A second driver is refused with :class:`StoreBusyError` naming the
holder. A holder that died (SIGKILL, lost node) stops heart-beating; once its heartbeat is
older than ``timeout_s`` the next run takes the lease over, or at once when the holder ran on
the same host and its process no longer exists.

The protocol needs no compare-and-swap, so it holds on any S3-compatible store: a driver
reads the lease, and if it is absent or stale, writes its own token, waits ``settle_s`` and
reads it back. S3 (like a local file) is read-after-write consistent and a write is whole,
so of several drivers that write within the same window, every one reads back the last
token and only its writer goes on. ``settle_s`` must exceed the time between one driver's
check and its write (milliseconds); the default leaves a wide margin.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass

from pathray.errors import StoreBusyError
from pathray.store import LEASE

TIMEOUT_S = 120.0
HEARTBEAT_S = 15.0
SETTLE_S = 0.5


@dataclass(frozen=True)
class LeaseRecord:
    """What the lease object says: who holds it and when they last said so (unix seconds)."""

    token: str
    run_id: str
    host: str
    pid: int
    acquired_at: float
    heartbeat_at: float

    def describe(self) -> str:
        return f"run {self.run_id} (pid {self.pid} on {self.host}, last heartbeat {time.time() - self.heartbeat_at:.0f} s ago)"


class StoreLease:
    """The run lease of one store. ``store`` is a :class:`pathray.store.FeatureStore`.

    Use as a context manager or call :meth:`acquire` / :meth:`release`. While held, a daemon
    thread rewrites the heartbeat every ``heartbeat_s``."""

    def __init__(self, store, run_id: str, timeout_s: float = TIMEOUT_S, heartbeat_s: float = HEARTBEAT_S,
                 settle_s: float = SETTLE_S):
        self.store, self.run_id = store, run_id
        self.timeout_s, self.heartbeat_s, self.settle_s = timeout_s, heartbeat_s, settle_s
        self.token = uuid.uuid4().hex
        self.took_over: LeaseRecord | None = None  # the stale lease this run replaced, if any
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def read(self) -> LeaseRecord | None:
        try:
            with self.store.fs.open(self.store.lease_path(), "rb") as f:
                return LeaseRecord(**json.loads(f.read()))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError):  # unreadable lease: treat as stale
            return LeaseRecord("", "?", "?", 0, 0.0, 0.0)

    def acquire(self) -> StoreLease:
        """Take the lease or raise :class:`StoreBusyError` naming the live holder."""
        current = self.read()
        if current is not None and self._live(current):
            raise self._busy(current)
        now = time.time()
        self._write(LeaseRecord(self.token, self.run_id, socket.gethostname(), os.getpid(), now, now))
        time.sleep(self.settle_s)
        winner = self.read()
        if winner is None or winner.token != self.token:
            raise self._busy(winner or current)
        self.took_over = current
        self._thread = threading.Thread(target=self._beat, name="pathray-lease", daemon=True)
        self._thread.start()
        return self

    def _live(self, holder: LeaseRecord) -> bool:
        """A holder is live while its heartbeat is fresh, unless it ran on this host and its
        process is gone (a crashed or killed local driver: no need to wait for the timeout)."""
        if time.time() - holder.heartbeat_at >= self.timeout_s:
            return False
        return holder.host != socket.gethostname() or _pid_alive(holder.pid)

    def release(self) -> None:
        """Stop heart-beating and delete the lease if this run still holds it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.heartbeat_s + 5)
            self._thread = None
        held = self.read()
        if held is not None and held.token == self.token:
            self.store.fs.rm(self.store.lease_path())

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            held = self.read()
            if held is None or held.token != self.token:
                return  # taken over after a stall longer than timeout_s: the new holder owns the store
            self._write(LeaseRecord(**{**asdict(held), "heartbeat_at": time.time()}))

    def _write(self, record: LeaseRecord) -> None:
        self.store.write_json(LEASE, asdict(record))

    def _busy(self, holder: LeaseRecord | None) -> StoreBusyError:
        who = holder.describe() if holder else "another run"
        return StoreBusyError(
            f"{self.store.root} is being written by {who}. Two drivers on one store would redo each other's "
            f"work; wait for it to finish (a dead holder's lease expires {self.timeout_s:.0f} s after its last "
            "heartbeat), or write to another --out.")

    def __enter__(self) -> StoreLease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
