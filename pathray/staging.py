"""Stage remote (``s3://``) slides to a bounded local scratch directory.

OpenSlide needs a local file, so a remote slide is copied whole before it is opened.
Multi-file formats are copied as a unit: ``x.mrxs`` together with its sibling data
directory ``x/``; a DICOM ``.dcm`` file together with every object under its prefix; a
URI ending in ``/`` as its whole prefix. A :class:`Scratch` holds at most ``max_bytes``
at a time; each staged slide gets its own subdirectory, removed by
:meth:`StagedSlide.release` (``Slide.close`` calls it).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

from pathray.errors import SlideNotFoundError, StagingError
from pathray.fs import split_uri

DEFAULT_MAX_BYTES = 20 * 1024**3


@dataclass
class StagedSlide:
    """A slide copied into scratch. ``local_path`` is what OpenSlide opens."""

    local_path: str
    etag: str | None
    size_bytes: int  # of the slide object(s) copied
    directory: str
    scratch: "Scratch" = field(repr=False)
    released: bool = False

    def release(self) -> None:
        """Delete the staged copy and return its bytes to the scratch budget."""
        self.scratch._release(self)


class Scratch:
    """A local scratch directory holding at most ``max_bytes`` of staged slides at once.

    ``root=None`` makes a private temporary directory that :meth:`close` removes.
    Thread-safe; usable as a context manager.
    """

    def __init__(self, root: str | None = None, max_bytes: int = DEFAULT_MAX_BYTES):
        self._own_root = root is None
        self.root = tempfile.mkdtemp(prefix="pathray-scratch-") if root is None else root
        os.makedirs(self.root, exist_ok=True)
        self.max_bytes = int(max_bytes)
        self._used = 0
        self._lock = threading.Lock()

    @property
    def used_bytes(self) -> int:
        return self._used

    def stage(self, uri: str, storage_options: dict[str, Any] | None = None) -> StagedSlide:
        """Copy the slide at ``uri`` (and its companion files) into scratch.

        Raises :class:`SlideNotFoundError` when the object does not exist and
        :class:`StagingError` when it would exceed ``max_bytes`` or the copy fails.
        """
        fs, path = split_uri(uri, storage_options)
        try:
            files, main_rel, etag = _plan(fs, path, uri)
        except FileNotFoundError as exc:
            raise SlideNotFoundError(f"no object at {uri}") from exc
        except Exception as exc:
            raise StagingError(f"cannot list {uri}: {type(exc).__name__}: {exc}") from exc
        total = sum(size for _, _, size in files)
        with self._lock:
            if self._used + total > self.max_bytes:
                raise StagingError(
                    f"staging {uri} needs {total} bytes; scratch {self.root} has "
                    f"{self.max_bytes - self._used} of {self.max_bytes} bytes free"
                )
            self._used += total
        directory = os.path.join(self.root, uuid.uuid4().hex)
        staged = StagedSlide(os.path.join(directory, main_rel), etag, total, directory, self)
        try:
            for remote, rel, _ in files:
                target = os.path.join(directory, rel)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                fs.get_file(remote, target)
        except Exception as exc:
            staged.release()
            raise StagingError(f"cannot copy {uri} to scratch: {type(exc).__name__}: {exc}") from exc
        return staged

    def _release(self, staged: StagedSlide) -> None:
        with self._lock:
            if staged.released:
                return
            staged.released = True
            self._used = max(0, self._used - staged.size_bytes)
        shutil.rmtree(staged.directory, ignore_errors=True)

    def close(self) -> None:
        """Remove the scratch directory if this object created it."""
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "Scratch":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
        files += [(p, os.path.join(name[: -len(".mrxs")], os.path.relpath(p, data_dir)), s) for p, s in _list_prefix(fs, data_dir)]
    elif lower.endswith(".dcm"):
        files += [(p, os.path.relpath(p, parent), s) for p, s in _list_prefix(fs, parent) if p != path and "/" not in os.path.relpath(p, parent)]
    return files, name, etag


def _list_prefix(fs: Any, prefix: str) -> list[tuple[str, int]]:
    try:
        found = fs.find(prefix, detail=True)
    except FileNotFoundError:
        return []
    return [(p, int(d.get("size", 0))) for p, d in sorted(found.items()) if d.get("type") != "directory"]
