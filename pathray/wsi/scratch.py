"""A node-wide cache of remote (``s3://``) slides copied whole for OpenSlide.

Slides the range reader (:mod:`pathray.wsi.tiffrange`) does not cover need a local file, so
they are copied whole. Multi-file formats are copied as a unit: ``x.mrxs`` together with
its sibling data directory ``x/``; a DICOM ``.dcm`` file together with every object under
its prefix; a URI ending in ``/`` as its whole prefix.

Every :class:`Scratch` opened on the same ``root`` directory (one per actor process, any
number of processes on a node) shares one cache there:

* an entry is keyed by URI + ETag + size, downloaded by exactly one process (the others
  wait on its download lock) into a temporary directory and renamed into place, so a
  reader never sees a partial copy and a slide is fetched once per node;
* each user holds a shared ``flock`` on the entry's ``.use`` file while the slide is
  open: the reference count lives in the kernel and vanishes with a crashed process;
* ``max_bytes`` bounds the whole directory (per node, not per actor): an entry is
  reserved before it is downloaded, and least recently used entries that nobody holds
  are evicted to make room; an entry in use is never evicted. If the budget cannot be
  met the slide fails with :class:`StagingError`.

Released entries stay cached (for other actors and later chunks) until evicted;
``Scratch(root=None)`` is a private temporary cache that :meth:`Scratch.close` deletes.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from pathray.errors import SlideNotFoundError, StagingError, is_unavailable
from pathray.fs import split_uri
from pathray.wsi.rangeio import storage_error

#: the per-node bound on staged slides unless a job or command sets one
DEFAULT_MAX_BYTES = 64 * 2**30


def node_scratch_dir() -> str:
    """The default node-wide cache directory: ``<system temp>/pathray-scratch-<uid>``."""
    return os.path.join(tempfile.gettempdir(), f"pathray-scratch-{os.getuid()}")


@dataclass
class StagedSlide:
    """A slide copied into the cache. ``local_path`` is what OpenSlide opens."""

    local_path: str
    etag: str | None
    size_bytes: int  # of the slide object(s) copied
    directory: str
    scratch: Scratch = field(repr=False)
    use_fd: int | None = field(default=None, repr=False)  # holds the shared "in use" lock
    downloaded: bool = False  # this call fetched it (False: it was already on the node)

    @property
    def released(self) -> bool:
        return self.use_fd is None

    def release(self) -> None:
        """Drop this reference: the copy stays cached but may be evicted once nobody holds it."""
        if self.use_fd is None:
            return
        try:
            os.utime(self.directory)  # LRU order: last release
        except OSError:
            pass
        os.close(self.use_fd)
        self.use_fd = None


class Scratch:
    """The slide cache in ``root`` holding at most ``max_bytes`` (shared by every process using ``root``).

    ``root=None`` makes a private temporary directory that :meth:`close` removes. Usable
    as a context manager; safe across threads and processes.
    """

    def __init__(self, root: str | None = None, max_bytes: int = DEFAULT_MAX_BYTES):
        self._own_root = root is None
        self.root = tempfile.mkdtemp(prefix="pathray-scratch-") if root is None else root
        os.makedirs(self.root, exist_ok=True)
        self.max_bytes = int(max_bytes)

    @property
    def used_bytes(self) -> int:
        """Bytes of cached and reserved entries in ``root`` (all processes)."""
        with self._locked():
            return sum(size for _, size in self._entries())

    def stage(self, uri: str, storage_options: dict[str, Any] | None = None) -> StagedSlide:
        """A local copy of the slide at ``uri`` (and its companion files), fetched at most once per node.

        Raises :class:`SlideNotFoundError` when the object does not exist, the storage errors
        of :func:`pathray.wsi.rangeio.storage_error`, and :class:`StagingError` when the node's
        budget cannot hold it or the copy fails.
        """
        fs, path = split_uri(uri, storage_options)
        try:
            files, main_rel, etag = _plan(fs, path, uri)
        except FileNotFoundError as exc:
            raise SlideNotFoundError(f"no object at {uri}") from exc
        except Exception as exc:
            raise storage_error(uri, exc) from exc
        total = sum(size for _, _, size in files)
        key = hashlib.sha256(f"{uri}\0{etag}\0{total}".encode()).hexdigest()[:32]
        directory = os.path.join(self.root, key)
        staged = StagedSlide(os.path.join(directory, main_rel), etag, total, directory, self)
        while True:
            with self._locked():
                if staged.use_fd is None:
                    staged.use_fd = _lock_file(self._path(key, ".use"), fcntl.LOCK_SH)
                if os.path.isdir(directory):
                    return staged
                download_fd = _try_lock(self._path(key, ".dl"))
                if download_fd is not None:
                    try:
                        self._reserve(key, uri, total)
                    except BaseException:
                        os.close(download_fd)
                        staged.release()
                        raise
                    break
            os.close(_lock_file(self._path(key, ".dl"), fcntl.LOCK_EX))  # wait for the other download
        try:
            self._download(fs, files, key, uri)
            staged.downloaded = True
        except BaseException:
            with self._locked():
                _remove(self._path(key, ".json"))
            staged.release()
            raise
        finally:
            os.close(download_fd)
        return staged

    def _reserve(self, key: str, uri: str, size: int) -> None:
        """Record ``size`` bytes for ``key``, evicting unused LRU entries if needed (global lock held)."""
        if os.path.exists(self._path(key, ".json")):
            return
        entries = self._entries()
        free = self.max_bytes - sum(s for _, s in entries)
        for other, other_size in sorted(entries, key=lambda e: self._last_used(e[0])):
            if free >= size:
                break
            if os.path.isdir(os.path.join(self.root, other)) and self._evict(other):
                free += other_size
        if free < size:
            raise StagingError(
                f"staging {uri} needs {size} bytes; the node cache {self.root} has {max(free, 0)} "
                f"of {self.max_bytes} bytes free (the rest is held by slides in use)"
            )
        with open(self._path(key, ".json"), "w") as fh:
            json.dump({"uri": uri, "size": size}, fh)

    def _evict(self, key: str) -> bool:
        """Delete an entry nobody holds (global lock held); False when it is in use."""
        fd = _try_lock(self._path(key, ".use"))
        if fd is None:
            return False
        try:
            shutil.rmtree(os.path.join(self.root, key), ignore_errors=True)
            for suffix in (".json", ".use", ".dl"):
                _remove(self._path(key, suffix))
        finally:
            os.close(fd)
        return True

    def _entries(self) -> list[tuple[str, int]]:
        """``(key, size)`` of every cached or live-reserved entry; drops stale reservations (global lock held)."""
        out = []
        for name in os.listdir(self.root):
            if not name.endswith(".json"):
                continue
            key = name[: -len(".json")]
            if not os.path.isdir(os.path.join(self.root, key)):
                fd = _try_lock(self._path(key, ".dl"))
                if fd is not None:  # reserved by a process that died mid-download
                    os.close(fd)
                    _remove(self._path(key, ".json"))
                    continue
            try:
                with open(os.path.join(self.root, name)) as fh:
                    out.append((key, int(json.load(fh)["size"])))
            except (OSError, ValueError, KeyError):
                continue
        return out

    def _download(self, fs: Any, files: list[tuple[str, str, int]], key: str, uri: str) -> None:
        """Copy ``files`` into a temporary directory, then rename it to the entry (atomic)."""
        partial = os.path.join(self.root, f"{key}.partial-{uuid.uuid4().hex}")
        try:
            for remote, rel, _ in files:
                target = os.path.join(partial, rel)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                fs.get_file(remote, target)
            os.rename(partial, os.path.join(self.root, key))
        except Exception as exc:
            shutil.rmtree(partial, ignore_errors=True)
            if is_unavailable(exc):
                raise storage_error(uri, exc) from exc
            raise StagingError(f"cannot copy {uri} to scratch: {type(exc).__name__}: {exc}") from exc

    def _last_used(self, key: str) -> float:
        try:
            return os.path.getmtime(os.path.join(self.root, key))
        except OSError:
            return float("inf")  # reserved, not downloaded yet: never a candidate

    def _path(self, key: str, suffix: str) -> str:
        return os.path.join(self.root, key + suffix)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        fd = _lock_file(os.path.join(self.root, ".lock"), fcntl.LOCK_EX)
        try:
            yield
        finally:
            os.close(fd)

    def close(self) -> None:
        """Remove the cache directory if this object created it (``root=None``)."""
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Scratch:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _lock_file(path: str, operation: int) -> int:
    """Open (creating) ``path`` and take ``flock(operation)`` on it; returns the fd that holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, operation)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _try_lock(path: str) -> int | None:
    """An exclusive lock on ``path`` if nobody holds any, else ``None``."""
    try:
        return _lock_file(path, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return None


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _plan(fs: Any, path: str, uri: str) -> tuple[list[tuple[str, str, int]], str, str | None]:
    """Return ``([(remote_path, relative_local_path, size)], main_relative_path, etag)``."""
    path = path.rstrip("/") if uri.endswith("/") else path
    if uri.endswith("/"):  # a whole prefix, e.g. a DICOM series
        members = _list_prefix(fs, path)
        if not members:
            raise FileNotFoundError(path)
        name = path.rsplit("/", 1)[-1]
        files = [(p, os.path.join(name, os.path.relpath(p, path)), s) for p, s in members]
        return files, name, None
    info = fs.info(path)
    if info.get("type") == "directory":
        raise FileNotFoundError(path)
    etag = info.get("ETag") or info.get("etag")
    etag = etag.strip('"') if isinstance(etag, str) else None
    parent, name = path.rsplit("/", 1)
    files = [(path, name, int(info["size"]))]
    lower = name.lower()
    if lower.endswith(".mrxs"):
        data_dir = f"{parent}/{name[: -len('.mrxs')]}"
        files += [
            (p, os.path.join(name[: -len(".mrxs")], os.path.relpath(p, data_dir)), s)
            for p, s in _list_prefix(fs, data_dir)
        ]
    elif lower.endswith(".dcm"):
        files += [
            (p, os.path.relpath(p, parent), s)
            for p, s in _list_prefix(fs, parent)
            if p != path and "/" not in os.path.relpath(p, parent)
        ]
    return files, name, etag


def _list_prefix(fs: Any, prefix: str) -> list[tuple[str, int]]:
    try:
        found = fs.find(prefix, detail=True)
    except FileNotFoundError:
        return []
    return [(p, int(d.get("size", 0))) for p, d in sorted(found.items()) if d.get("type") != "directory"]
