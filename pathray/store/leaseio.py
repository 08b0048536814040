"""Conditional writes of the lease object, per kind of store (used by :mod:`pathray.store.lease`).

Every backend reads the lease as ``(record bytes, version)`` and offers *create if absent*,
*replace if unchanged since version* and *delete if unchanged*, each answering ``None``
when the condition did not hold (another driver wrote first):

``renew`` is the heartbeat's replace.

* :class:`LocalLeaseIO`: ``O_CREAT | O_EXCL`` creates; every write (and delete) holds an
  exclusive ``flock`` of a side file (``_lease.json.lock``), replace and delete comparing
  first; the version is a hash of the file's bytes.
* :class:`S3LeaseIO`: S3 conditional requests, the version being the object's ETag:
  ``PUT If-None-Match: *`` creates, ``PUT If-Match: <etag>`` replaces, ``DELETE If-Match``
  deletes. AWS S3 and SeaweedFS enforce them (a refused condition is HTTP 412).
* :class:`SettledLeaseIO`: for an S3-compatible server that ignores those headers
  (:func:`lease_io` finds out with a probe object): write, wait ``settle_s``, read back; of
  several writers within one window every one reads the last token, so only its writer goes
  on. A write that itself took longer than half the window may have landed after a rival's
  read-back: it is withdrawn and the acquisition refused (both drivers then stop: safe).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import time
import uuid
from typing import Any, Protocol

log = logging.getLogger("pathray")


class LeaseIO(Protocol):
    def read(self) -> tuple[bytes | None, str | None]: ...

    def create(self, data: bytes) -> str | None: ...

    def replace(self, data: bytes, version: str | None) -> str | None: ...

    def renew(self, data: bytes, version: str | None) -> str | None: ...

    def delete(self, version: str | None) -> None: ...


def lease_io(fs: Any, path: str, settle_s: float) -> LeaseIO:
    """The backend for the lease at ``path`` on ``fs`` (local, or s3fs with or without
    conditional writes: probed once with a throw-away object next to the lease)."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple | list) else (fs.protocol,)
    if "s3" not in protocols:
        return LocalLeaseIO(path)
    io = S3LeaseIO(fs, path)
    return io if io.conditional_writes_enforced() else SettledLeaseIO(fs, path, settle_s)


def precondition_failed(exc: BaseException) -> bool:
    """True when an S3 error (or its cause) is a refused condition (412, or 409 on a race)."""
    seen: BaseException | None = exc
    for _ in range(6):
        if seen is None:
            return False
        text = f"{type(seen).__name__}: {seen}"
        if any(m in text for m in ("PreconditionFailed", "pre-condition", "412", "ConditionalRequestConflict")):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class LocalLeaseIO:
    def __init__(self, path: str):
        self.path = path

    def read(self) -> tuple[bytes | None, str | None]:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None, None
        return data, _digest(data)

    def create(self, data: bytes) -> str | None:
        with self._locked():  # no replace sees the new file before its bytes are in
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return None
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        return _digest(data)

    def replace(self, data: bytes, version: str | None) -> str | None:
        with self._locked():
            if self.read()[1] != version:
                return None
            partial = f"{self.path}.{uuid.uuid4().hex}.partial"
            with open(partial, "wb") as f:
                f.write(data)
            os.replace(partial, self.path)
        return _digest(data)

    renew = replace

    def delete(self, version: str | None) -> None:
        with self._locked():
            if self.read()[1] == version:
                os.unlink(self.path)

    def _locked(self):
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        return _Flock(self.path + ".lock")


class _Flock:
    def __init__(self, path: str):
        self.path = path

    def __enter__(self) -> None:
        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


class S3LeaseIO:
    def __init__(self, fs: Any, path: str):
        self.fs, self.path = fs, path
        self.bucket, _, self.key = path.partition("/")

    def read(self) -> tuple[bytes | None, str | None]:
        from fsspec.asyn import sync

        async def get() -> tuple[bytes, str]:
            answer = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            async with answer["Body"] as body:
                return await body.read(), answer["ETag"]

        try:
            return sync(self.fs.loop, get)
        except FileNotFoundError:
            return None, None

    def create(self, data: bytes) -> str | None:
        return self._put(data, IfNoneMatch="*")

    def replace(self, data: bytes, version: str | None) -> str | None:
        return self._put(data, IfMatch=version) if version else None

    renew = replace

    def delete(self, version: str | None) -> None:
        try:
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=version)
        except Exception as exc:
            if not (precondition_failed(exc) or isinstance(exc, FileNotFoundError)):
                if self.read()[1] != version:  # a server without conditional deletes: compare, then delete
                    return
                self.fs.rm(self.path)
        self.fs.invalidate_cache(self.path)

    def _put(self, data: bytes, **condition: str) -> str | None:
        try:
            answer = self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=data, **condition)
        except Exception as exc:
            if precondition_failed(exc):
                return None
            raise
        finally:
            self.fs.invalidate_cache(self.path)
        return answer["ETag"]

    def conditional_writes_enforced(self) -> bool:
        """Write a probe object, then try to create it again with ``If-None-Match: *``: a
        server that enforces the condition refuses the second write."""
        probe = S3LeaseIO(self.fs, f"{self.path}.probe-{uuid.uuid4().hex}")
        try:
            probe.fs.call_s3("put_object", Bucket=probe.bucket, Key=probe.key, Body=b"probe")
            enforced = probe.create(b"again") is None
        except Exception as exc:  # noqa: BLE001 - e.g. 501 NotImplemented for the header: not enforced
            if "NotImplemented" not in f"{type(exc).__name__}: {exc}":
                raise
            enforced = False
        finally:
            probe.fs.call_s3("delete_object", Bucket=probe.bucket, Key=probe.key)
        if not enforced:
            log.warning(
                "%s ignores conditional writes: the lease falls back to write, settle, read back",
                self.path.split("/")[0],
            )
        return enforced


class SettledLeaseIO(S3LeaseIO):
    def __init__(self, fs: Any, path: str, settle_s: float):
        super().__init__(fs, path)
        self.settle_s = settle_s

    def create(self, data: bytes) -> str | None:
        return self._settled(data)

    def replace(self, data: bytes, version: str | None) -> str | None:
        return self._settled(data)

    def renew(self, data: bytes, version: str | None) -> str | None:
        """A plain write: the holder's own record, whose token it checked just before."""
        self.fs.pipe_file(self.path, data)
        return self.read()[1]

    def delete(self, version: str | None) -> None:
        if self.read()[1] == version:
            self.fs.rm(self.path)

    def _settled(self, data: bytes) -> str | None:
        started = time.monotonic()
        self.fs.pipe_file(self.path, data)
        took_s = time.monotonic() - started
        if took_s > self.settle_s / 2:  # may have landed after a rival's read-back: withdraw it
            log.warning("the lease write took %.1f s (settle window %.1f s): withdrawn", took_s, self.settle_s)
            if self.read()[0] == data:
                self.fs.rm(self.path)
            return None
        time.sleep(self.settle_s)
        current, version = self.read()
        return version if current == data else None


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
