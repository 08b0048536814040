"""Fetch many byte ranges of one object: coalesced, concurrent, counted.

:func:`fetch_ranges` is the one way slide readers get bytes out of an object they do not
stage (TIFF tiles today, DICOM frames later). Requested ranges are sorted and merged into
*spans* wherever the hole between two of them is at most ``gap_bytes`` (one request then
costs less than two round trips), spans are fetched with the filesystem's ``cat_ranges``
(concurrent on s3fs, sequential reads locally) and each requested range is cut back out.

Errors are mapped to the per-slide taxonomy: a missing object is
:class:`~pathray.errors.SlideNotFoundError`, a refused one
:class:`~pathray.errors.SlideAccessDeniedError`, fewer bytes than asked (a truncated
object) :class:`~pathray.errors.SlideUnreadableError`, a request that timed out after the
client's retries :class:`~pathray.errors.StorageTimeoutError`.

Every fetch is added to :data:`STATS` (per process) so benchmarks and tests can see how
many bytes and requests a read really cost.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pathray.errors import (
    SlideAccessDeniedError,
    SlideNotFoundError,
    SlideUnreadableError,
    StorageTimeoutError,
    StorageUnavailableError,
    is_unavailable,
)

DEFAULT_GAP_BYTES = 64 * 1024  # merge ranges whose hole is at most this (≈ bytes per round trip)
MAX_SPAN_BYTES = 16 * 1024**2  # never merge into a single request larger than this


@dataclass
class FetchStats:
    """Running totals of range fetches in this process (thread-safe)."""

    requests: int = 0  # spans fetched (HTTP GETs on S3)
    bytes_fetched: int = 0  # bytes of those spans, holes included
    bytes_requested: int = 0  # bytes the callers asked for
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, requests: int, fetched: int, requested: int) -> None:
        with self._lock:
            self.requests += requests
            self.bytes_fetched += fetched
            self.bytes_requested += requested

    def reset(self) -> None:
        with self._lock:
            self.requests = self.bytes_fetched = self.bytes_requested = 0


STATS = FetchStats()


def coalesce(
    ranges: Sequence[tuple[int, int]], gap_bytes: int = DEFAULT_GAP_BYTES, max_span_bytes: int = MAX_SPAN_BYTES
) -> list[tuple[int, int]]:
    """Merge ``(offset, length)`` ranges into sorted ``(start, end)`` spans (end exclusive).

    Two ranges share a span when the hole between them is at most ``gap_bytes`` and the
    span stays within ``max_span_bytes`` (a single range longer than that is its own span).
    """
    spans: list[list[int]] = []
    for offset, length in sorted((int(o), int(n)) for o, n in ranges if n > 0):
        end = offset + length
        if spans and offset - spans[-1][1] <= gap_bytes and max(end, spans[-1][1]) - spans[-1][0] <= max_span_bytes:
            spans[-1][1] = max(spans[-1][1], end)
        else:
            spans.append([offset, end])
    return [(s, e) for s, e in spans]


def fetch_ranges(
    fs: Any,
    path: str,
    ranges: Sequence[tuple[int, int]],
    gap_bytes: int = DEFAULT_GAP_BYTES,
    stats: FetchStats | None = None,
) -> list[bytes]:
    """Bytes of each ``(offset, length)`` range of the object at ``path``, in input order.

    ``fs`` is an fsspec filesystem (s3fs fetches the merged spans concurrently). Zero-length
    ranges give ``b""``. Raises the per-slide errors listed in the module doc. ``stats``
    (default: :data:`STATS`) is credited with the spans fetched.
    """
    spans, blobs = fetch_spans(fs, path, ranges, gap_bytes, stats)
    if not spans:
        return [b"" for _ in ranges]
    return _cut(path, ranges, spans, blobs)


def fetch_spans(
    fs: Any,
    path: str,
    ranges: Sequence[tuple[int, int]],
    gap_bytes: int = DEFAULT_GAP_BYTES,
    stats: FetchStats | None = None,
) -> tuple[list[tuple[int, int]], list[bytes]]:
    """The coalesced ``(start, end)`` spans covering ``ranges`` and their bytes (a span may be
    shorter than asked at the object's end)."""
    spans = coalesce(ranges, gap_bytes)
    if not spans:
        return [], []
    try:
        blobs = fs.cat_ranges([path] * len(spans), [s for s, _ in spans], [e for _, e in spans], on_error="return")
    except Exception as exc:  # noqa: BLE001  (some filesystems raise instead of returning per-range errors)
        blobs = [exc] * len(spans)
    for blob in blobs:
        if isinstance(blob, BaseException):
            raise storage_error(path, blob) from blob
    (stats or STATS).add(len(spans), sum(len(b) for b in blobs), sum(int(n) for _, n in ranges if n > 0))
    return spans, blobs


def _cut(path: str, ranges: Sequence[tuple[int, int]], spans: list[tuple[int, int]], blobs: list[bytes]) -> list[bytes]:
    """Slice each requested range out of the span holding it; short spans mean truncation."""
    import bisect

    starts = [s for s, _ in spans]
    out = []
    for offset, length in ranges:
        if length <= 0:
            out.append(b"")
            continue
        i = bisect.bisect_right(starts, offset) - 1
        lo = offset - spans[i][0]
        piece = bytes(blobs[i][lo : lo + length])
        if len(piece) != length:
            raise SlideUnreadableError(
                f"{path}: object is truncated: bytes {offset}..{offset + length} lie past its end"
            )
        out.append(piece)
    return out


def storage_error(path: str, exc: BaseException) -> Exception:
    """The per-slide error for a storage exception (already a pathray error: itself)."""
    from pathray.errors import PathrayError

    if isinstance(exc, PathrayError):
        return exc
    detail = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, FileNotFoundError):
        return SlideNotFoundError(f"no object at {path}")
    if isinstance(exc, PermissionError) or "AccessDenied" in detail or "Forbidden" in detail:
        return SlideAccessDeniedError(f"access to {path} denied: {detail}")
    if "timeout" in detail.lower() or "timed out" in detail.lower():
        return StorageTimeoutError(f"{path}: storage request timed out after retries: {detail}")
    if is_unavailable(exc):
        return StorageUnavailableError(
            f"{path}: storage unavailable (throttled, server error or unreachable) after retries: {detail}"
        )
    return SlideUnreadableError(f"{path}: read failed: {detail}")


#: bytes of recently fetched ranges a slide reader keeps per open slide (:class:`RecentRanges`)
RECENT_RANGE_BYTES = 32 * 1024**2


class RecentRanges:
    """``fetch(ranges) -> bytes`` over one object that remembers the spans it fetched most
    recently, up to ``max_bytes``, and serves any range lying inside one from memory.

    Neighbouring chunks of a slide share the stored (JPEG) tiles on their boundary, and a
    coalesced span also carries the tiles between the ones asked for; a reader that reads a
    slide's chunks in order with one open handle then pulls each byte of the object about once,
    whatever the chunk size. Thread-safe (a block's bytes may be fetched ahead on another
    thread); the network fetch runs outside the lock. Missing ranges are coalesced with
    ``gap_bytes`` and credited to ``stats`` (default :data:`STATS`)."""

    def __init__(
        self,
        fs: Any,
        path: str,
        max_bytes: int = RECENT_RANGE_BYTES,
        stats: FetchStats | None = None,
        gap_bytes: int = DEFAULT_GAP_BYTES,
    ):
        from collections import OrderedDict

        self.fs, self.path, self.max_bytes, self.stats, self.gap_bytes = fs, path, max_bytes, stats, gap_bytes
        self._spans: OrderedDict[tuple[int, int], bytes] = OrderedDict()  # (start, end) -> bytes, LRU order
        self._size = 0
        self._lock = threading.Lock()

    def __call__(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        keys = [(int(o), int(n)) for o, n in ranges]
        with self._lock:
            known = {k: piece for k in keys if (piece := self._lookup(k)) is not None}
        missing = list(dict.fromkeys(k for k in keys if k not in known and k[1] > 0))
        if missing:
            spans, blobs = fetch_spans(self.fs, self.path, missing, self.gap_bytes, self.stats)
            known.update(zip(missing, _cut(self.path, missing, spans, blobs)))
            with self._lock:
                for span, blob in zip(spans, blobs):
                    self._remember(span, blob)
        return [known.get(k, b"") for k in keys]

    def add(self, offset: int, data: bytes) -> None:
        """Keep ``data`` (the object's bytes from ``offset``, fetched elsewhere: a header read) for later ranges."""
        with self._lock:
            self._remember((offset, offset + len(data)), data)

    def _lookup(self, key: tuple[int, int]) -> bytes | None:
        offset, length = key
        for (start, end), blob in self._spans.items():
            if start <= offset and offset + length <= start + len(blob):
                self._spans.move_to_end((start, end))
                return bytes(blob[offset - start : offset - start + length])
        return None

    def _remember(self, span: tuple[int, int], blob: bytes) -> None:
        if span in self._spans or len(blob) > self.max_bytes:
            return
        self._spans[span] = blob
        self._size += len(blob)
        while self._size > self.max_bytes:
            _, old = self._spans.popitem(last=False)
            self._size -= len(old)
