"""One driver per store at a time: a lease object with a heartbeat, safe on S3 and local disk.

Two drivers writing one store would both run the whole job and delete each other's staged
chunks, so a run takes the store's lease (``ROOT/_lease.json``) before it changes anything and
gives it back at the end. A second driver is refused with :class:`StoreBusyError` naming the
holder. A holder that died (SIGKILL, lost node) stops heart-beating; once its heartbeat is
older than ``timeout_s`` the next run takes the lease over, or at once when the holder ran on
the same host and its process no longer exists.

Taking and renewing the lease are conditional writes where the store has them
(:mod:`pathray.store.leaseio`): ``O_EXCL`` and a compare-and-write under ``flock`` on local disk,
``If-None-Match: *`` / ``If-Match: <etag>`` on S3 (AWS, SeaweedFS), so of several drivers
exactly one wins however slow their requests are. A server that ignores those headers gets
write, wait ``settle_s``, read back, with writes slower than half that window withdrawn.

The heartbeat survives storage errors: a failed renewal is retried with a growing pause (at
most ``heartbeat_s``). The lease is *lost* when a renewal finds another driver's token, or
when no renewal has succeeded for ``timeout_s`` less one heartbeat (others may take it
over at ``timeout_s``). A lost lease is never renewed or deleted by this run, and
:meth:`StoreLease.ensure_held`, which the driver calls before every commit, raises
:class:`~pathray.errors.LeaseLostError` from then on.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, replace

from pathray.errors import LeaseLostError, StoreBusyError
from pathray.store.layout import LEASE
from pathray.store.leaseio import LeaseIO, lease_io

log = logging.getLogger("pathray")

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
    thread renews the heartbeat every ``heartbeat_s``; check :meth:`ensure_held` before
    changing the store."""

    def __init__(
        self,
        store,
        run_id: str,
        timeout_s: float | None = None,
        heartbeat_s: float | None = None,
        settle_s: float | None = None,
    ):
        self.store, self.run_id = store, run_id  # timings default to the module's constants, read now
        self.timeout_s = TIMEOUT_S if timeout_s is None else timeout_s
        self.heartbeat_s = HEARTBEAT_S if heartbeat_s is None else heartbeat_s
        self.settle_s = SETTLE_S if settle_s is None else settle_s
        self.token = uuid.uuid4().hex
        self.took_over: LeaseRecord | None = None  # the stale lease this run replaced, if any
        self.lost: str | None = None  # why this run no longer holds the lease (None while it does)
        self._version: str | None = None  # the lease object's version as this run last wrote it
        self._renewed_at = 0.0  # time.monotonic() of the last successful write
        self._io: LeaseIO | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def io(self) -> LeaseIO:
        if self._io is None:
            self._io = lease_io(self.store.fs, self.store.lease_path(), self.settle_s)
        return self._io

    def read(self) -> LeaseRecord | None:
        return _parse(self.io.read()[0])

    def acquire(self) -> StoreLease:
        """Take the lease or raise :class:`StoreBusyError` naming the live holder."""
        data, version = self.io.read()
        current = _parse(data)
        if current is not None and self._live(current):
            raise self._busy(current)
        now = time.time()
        mine = _dump(LeaseRecord(self.token, self.run_id, socket.gethostname(), os.getpid(), now, now))
        started = time.monotonic()
        self._version = self.io.create(mine) if data is None else self.io.replace(mine, version)
        if self._version is None:
            raise self._busy(self.read() or current)
        self._renewed_at = started
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

    def ensure_held(self) -> None:
        """Raise :class:`LeaseLostError` unless this run still holds the lease: not taken over,
        and renewed recently enough that no other driver may have taken it over yet."""
        silent_s = time.monotonic() - self._renewed_at
        if self.lost is None and silent_s >= self.timeout_s - min(self.heartbeat_s, self.timeout_s / 2):
            self._lose(f"its heartbeat could not be renewed for {silent_s:.0f} s")
        if self.lost is not None:
            raise LeaseLostError(
                f"run {self.run_id} lost the lease of {self.store.root}: {self.lost}. Another driver may be writing "
                "the store, so this run stops without committing more; re-run to finish (committed slides are kept)."
            )

    def release(self) -> None:
        """Stop heart-beating and delete the lease if this run still holds it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.heartbeat_s + 5)
            self._thread = None
        if self.lost is None and self._version is not None:
            try:
                self.io.delete(self._version)
            except Exception as exc:  # noqa: BLE001 - never mask the run's own outcome: the lease then expires
                log.warning(
                    "could not delete the lease of %s (it expires %.0f s after its last heartbeat): %s",
                    self.store.root,
                    self.timeout_s,
                    exc,
                )

    def _beat(self) -> None:
        """Renew every ``heartbeat_s``; after a failure retry sooner, backing off up to it."""
        failures = 0
        while not self._stop.wait(self._pause(failures)) and self.lost is None:
            try:
                self._renew()
                failures = 0
            except Exception as exc:  # noqa: BLE001 - storage trouble: keep trying until the lease expires
                failures += 1
                log.warning("lease heartbeat failed (%d in a row): %s: %s", failures, type(exc).__name__, exc)
                try:
                    self.ensure_held()
                except LeaseLostError as lost:
                    log.error("%s", lost)

    def _pause(self, failures: int) -> float:
        return self.heartbeat_s if not failures else min(self.heartbeat_s, self.heartbeat_s / 8 * 2**failures)

    def _renew(self) -> None:
        """One heartbeat: a conditional replace of this run's own record."""
        started = time.monotonic()
        data, version = self.io.read()
        held = _parse(data)
        if held is None or held.token != self.token:
            self._lose(f"the lease is now {'gone' if held is None else 'held by ' + held.describe()}")
            return
        new = self.io.renew(_dump(replace(held, heartbeat_at=time.time())), version)
        if new is None:  # written meanwhile: by this run's own retried request, or a rival
            data, new = self.io.read()
            current = _parse(data)
            if current is None or current.token != self.token:
                self._lose("another driver wrote the lease")
                return
        self._version, self._renewed_at = new, started

    def _lose(self, why: str) -> None:
        if self.lost is None:
            self.lost = why
            log.error("run %s lost the lease of %s: %s", self.run_id, self.store.root, why)

    def _write(self, record: LeaseRecord) -> None:
        """Write ``record`` unconditionally (tests: a lease left by another process)."""
        self.store.write_json(LEASE, asdict(record))

    def _busy(self, holder: LeaseRecord | None) -> StoreBusyError:
        who = holder.describe() if holder else "another run"
        return StoreBusyError(
            f"{self.store.root} is being written by {who}. Two drivers on one store would redo each other's "
            f"work; wait for it to finish (a dead holder's lease expires {self.timeout_s:.0f} s after its last "
            "heartbeat), or write to another --out."
        )

    def __enter__(self) -> StoreLease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _parse(data: bytes | None) -> LeaseRecord | None:
    if data is None:
        return None
    try:
        return LeaseRecord(**json.loads(data))
    except (ValueError, TypeError):  # unreadable lease: treat as stale
        return LeaseRecord("", "?", "?", 0, 0.0, 0.0)


def _dump(record: LeaseRecord) -> bytes:
    return json.dumps(asdict(record), indent=2, sort_keys=True).encode()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
