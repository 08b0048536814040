"""Open a whole-slide image: levels, µm/px, region reads, over a pluggable backend.

Coordinates passed to :meth:`Slide.read_region` are **level-0 pixels** (OpenSlide's
convention); sizes are pixels of the requested level. µm/px comes from the manifest override
or the slide's metadata, never guessed (:func:`pathray.wsi.mpp.resolve_mpp`);
``Slide.mpp_source`` records which one was used.

Where the pixels come from is a :class:`SlideBackend`:

* a local file: :class:`pathray.wsi.openslide_backend.OpenSlideBackend` (OpenSlide, with a
  faster path for JPEG-tiled TIFF levels);
* an ``s3://`` Aperio SVS or generic tiled TIFF: :class:`pathray.wsi.tiffrange.TiffRangeBackend`
  reads the header and then only the JPEG tiles each read needs, by byte range: no local
  copy, the same metadata and bit-identical pixels;
* any other ``s3://`` slide (MRXS, DICOM, JPEG 2000 SVS...): staged once per node into the
  shared :class:`pathray.wsi.scratch.Scratch` cache and opened with ``OpenSlideBackend``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from pathray.errors import SlideError, SlideNotFoundError, SlideUnreadableError, is_unavailable
from pathray.fs import is_remote, split_uri
from pathray.wsi.mpp import resolve_mpp
from pathray.wsi.openslide_backend import OpenSlideBackend
from pathray.wsi.rangeio import storage_error
from pathray.wsi.scratch import Scratch, StagedSlide
from pathray.wsi.tifftiles import BlockLoader, Window

THUMBNAIL_STRIP_PIXELS = 16 * 1024**2  # level pixels read at once while making a thumbnail
RANGE_READ_SUFFIXES = (".svs", ".tif", ".tiff")  # s3:// names tried with the range reader before staging


class SlideBackend(Protocol):
    """Where a :class:`Slide` gets its levels, properties and pixels from."""

    vendor: str | None
    level_dimensions: tuple[tuple[int, int], ...]  # (width, height), level 0 first
    level_downsamples: tuple[float, ...]
    properties: dict[str, str]  # OpenSlide-style names where they exist

    def read_level(
        self, level: int, lx: int, ly: int, width: int, height: int, cache: dict | None = None
    ) -> np.ndarray:
        """RGB uint8 ``(height, width, 3)`` of ``level`` at level px ``(lx, ly)``; outside = white."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class TileCachingBackend(Protocol):
    """Optional: a backend that reads a level by decoding its whole stored tiles.

    :func:`pathray.tiling.grid.read_tiles` then groups nearby tiles and reads the groups through
    :meth:`block_loader` (one fetch per group: for a remote backend one coalesced batch of
    byte ranges), decoding each stored tile once.
    """

    def caches_tiles(self, level: int) -> bool: ...

    def block_loader(self, level: int, groups: Sequence[Sequence[Window]]) -> BlockLoader: ...


@dataclass
class SlideSource:
    """Where an open slide's bytes come from, and what closing it releases."""

    uri: str  # the manifest's URI
    etag: str | None  # of the object read (S3 ETag, DICOM SeriesInstanceUID); None for local files
    size_bytes: int | None  # of the object(s) read
    local_path: str | None = None  # the local file OpenSlide opened; None when read remotely by range
    staged: StagedSlide | None = None  # a staged copy of a remote slide, released on close
    own_scratch: Scratch | None = None  # a private scratch cache, closed on close

    def release(self) -> None:
        """Release the staged copy, then close the private scratch; idempotent."""
        if self.staged is not None:
            self.staged.release()
            self.staged = None
        if self.own_scratch is not None:
            self.own_scratch.close()
            self.own_scratch = None


class Slide:
    """An open slide. Use as a context manager; :meth:`close` also releases a staged copy.

    ``backend`` is what reads it (:class:`SlideBackend`); ``local_path`` is the local file
    OpenSlide opened, or ``None`` when the slide is read remotely by range.
    """

    def __init__(self, source: SlideSource, backend: SlideBackend, mpp: float, mpp_source: str):
        self.uri = source.uri
        self.backend = backend
        self.mpp = mpp  # level-0 µm/px
        self.mpp_source = mpp_source
        self.etag = source.etag
        self.size_bytes = source.size_bytes
        self.local_path = source.local_path
        self.source = source  # where the bytes come from; what close releases
        self.level_dimensions: tuple[tuple[int, int], ...] = tuple(tuple(d) for d in backend.level_dimensions)
        self.dimensions: tuple[int, int] = self.level_dimensions[0]
        self.level_downsamples: tuple[float, ...] = tuple(float(d) for d in backend.level_downsamples)
        self.properties: dict[str, str] = dict(backend.properties)
        self.vendor: str | None = backend.vendor

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def level_mpp(self, level: int) -> float:
        """µm/px of pyramid ``level``."""
        return self.mpp * self.level_downsamples[level]

    def has_direct_reads(self, level: int) -> bool:
        """True when ``level`` is read by decoding the file's own stored tiles (:meth:`block_loader`, fast path)."""
        return isinstance(self.backend, TileCachingBackend) and self.backend.caches_tiles(level)

    def read_region(self, x0: int, y0: int, level: int, width: int, height: int) -> np.ndarray:
        """RGB uint8 ``(height, width, 3)`` of ``level`` with top-left at level-0 px ``(x0, y0)``.

        Areas outside the slide or transparent are white. The level position read is
        ``round(x0 / downsample)``. Many nearby reads: :meth:`block_loader` (fast path) decodes
        each stored tile once.
        """
        ds = self.level_downsamples[level]
        return self.backend.read_level(level, round(x0 / ds), round(y0 / ds), int(width), int(height))

    def block_loader(self, level: int, groups: Sequence[Sequence[Window]]) -> BlockLoader:
        """Reads groups of level-px windows as blocks, each stored tile decoded once
        (:class:`pathray.wsi.tifftiles.BlockLoader`); only where :meth:`has_direct_reads`."""
        if not self.has_direct_reads(level):
            raise ValueError(f"{self.uri}: level {level} has no direct tile reads")
        return self.backend.block_loader(level, groups)

    def read_region_openslide(self, x0: int, y0: int, level: int, width: int, height: int) -> np.ndarray:
        """Same as :meth:`read_region` but always through OpenSlide (the reference path; local/staged only)."""
        if not isinstance(self.backend, OpenSlideBackend):
            raise TypeError(f"{self.uri} is read by {type(self.backend).__name__}, not OpenSlide")
        return self.backend.read_openslide(x0, y0, level, width, height)

    def thumbnail(self, max_mpp: float) -> tuple[np.ndarray, float]:
        """RGB image of the whole slide at about ``max_mpp`` µm/px, and its exact µm/px.

        Reads only the coarsest level no coarser than ``max_mpp`` (or the coarsest level) and
        area-averages it down to ``max_mpp`` in horizontal strips, so a slide without a
        pyramid never needs its whole level 0 in memory. Returns ``(image, image_mpp)``.
        """
        from PIL import Image

        level = max(
            (i for i in range(self.level_count) if self.level_mpp(i) <= max_mpp * 1.01),
            key=lambda i: self.level_downsamples[i],
            default=int(np.argmin(self.level_downsamples)),
        )
        w, h = self.level_dimensions[level]
        ds = self.level_downsamples[level]
        factor = max_mpp / self.level_mpp(level)
        if factor <= 1.01:
            return self.read_region(0, 0, level, w, h), self.level_mpp(level)
        tw, th = max(1, round(w / factor)), max(1, round(h / factor))
        rows_per_strip = max(1, int(THUMBNAIL_STRIP_PIXELS // (w * factor)))
        out = np.empty((th, tw, 3), dtype=np.uint8)
        for r0 in range(0, th, rows_per_strip):
            r1 = min(th, r0 + rows_per_strip)
            y0, y1 = round(r0 * h / th), round(r1 * h / th)
            strip = self.read_region(0, round(y0 * ds), level, w, y1 - y0)
            out[r0:r1] = np.asarray(Image.fromarray(strip).resize((tw, r1 - r0), Image.Resampling.BOX))
        return out, self.mpp * self.dimensions[0] / tw

    def close(self) -> None:
        self.backend.close()
        self.source.release()

    def __enter__(self) -> Slide:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Slide({self.uri!r}, {self.dimensions[0]}x{self.dimensions[1]}, mpp={self.mpp:g} [{self.mpp_source}], vendor={self.vendor})"


def open_slide(
    uri: str,
    mpp_override: float | None = None,
    scratch: Scratch | None = None,
    storage_options: dict[str, Any] | None = None,
) -> Slide:
    """Open the slide at ``uri`` (local path, ``file://`` or ``s3://``).

    ``mpp_override`` (µm/px) wins over the slide's metadata when given. ``s3://`` Aperio SVS
    and generic tiled TIFF are read by byte range, and so is a DICOM WSI series (a URI ending
    in ``/``, or a local directory of ``.dcm`` files); other ``s3://`` slides are staged into
    ``scratch`` (a private temporary one if ``None``). Raises :class:`SlideNotFoundError`,
    :class:`~pathray.errors.SlideAccessDeniedError`, :class:`~pathray.errors.StorageTimeoutError`,
    :class:`SlideUnreadableError` (not a slide, corrupt, truncated: a small probe read is done
    at open), :class:`~pathray.errors.MppMissingError`, :class:`~pathray.errors.MppImplausibleError`, or
    :class:`~pathray.errors.StagingError`.
    """
    if _is_series_prefix(uri):
        backend = _open_dicom(uri, storage_options)
        source = SlideSource(uri, backend.properties.get("dicom.SeriesInstanceUID"), backend.series_bytes)
        return _finish(source, lambda: backend, mpp_override)
    if not is_remote(uri):
        return _open_local(uri, mpp_override)
    remote = _open_range(uri, storage_options)
    if remote is not None:
        backend, etag, size = remote
        return _finish(SlideSource(uri, etag, size), lambda: backend, mpp_override)
    return _open_staged(uri, mpp_override, scratch, storage_options)


def _open_local(uri: str, mpp_override: float | None) -> Slide:
    """A local file (or a directory OpenSlide reads) through OpenSlide."""
    _, local_path = split_uri(uri)
    if not os.path.exists(local_path):
        raise SlideNotFoundError(f"no such file: {local_path}")
    size = os.path.getsize(local_path) if os.path.isfile(local_path) else None
    return _finish(SlideSource(uri, None, size, local_path), lambda: OpenSlideBackend(uri, local_path), mpp_override)


def _open_staged(
    uri: str, mpp_override: float | None, scratch: Scratch | None, storage_options: dict[str, Any] | None
) -> Slide:
    """A remote slide staged into ``scratch`` (a private one when ``None``), then read through OpenSlide."""
    own_scratch = Scratch() if scratch is None else None
    try:
        staged = (scratch or own_scratch).stage(uri, storage_options)
    except BaseException:
        if own_scratch is not None:
            own_scratch.close()
        raise
    source = SlideSource(uri, staged.etag, staged.size_bytes, staged.local_path, staged, own_scratch)
    return _finish(source, lambda: OpenSlideBackend(uri, staged.local_path), mpp_override)


def _is_series_prefix(uri: str) -> bool:
    """A DICOM WSI series: an ``s3://`` prefix (URI ending in ``/``, IDC's ``<series uuid>/``)
    or a local directory of ``.dcm`` instances."""
    if uri.endswith("/"):
        return True
    if is_remote(uri):
        return False
    _, local_path = split_uri(uri)
    return os.path.isdir(local_path) and any(n.lower().endswith(".dcm") for n in os.listdir(local_path))


def _open_dicom(uri: str, storage_options: dict[str, Any] | None) -> SlideBackend:
    """The series read in place (:mod:`pathray.wsi.dicom`); storage failures as per-slide errors."""
    from pathray.wsi.dicom import open_dicom_series

    try:
        return open_dicom_series(uri, storage_options)
    except Exception as exc:
        raise storage_error(uri, exc) from exc


def _open_range(uri: str, storage_options: dict[str, Any] | None) -> tuple[SlideBackend, str | None, int] | None:
    """``(backend, etag, size)`` when the range reader covers ``uri``, else ``None`` (stage it)."""
    from pathray.wsi.tiffrange import TiffRangeBackend

    if not uri.lower().endswith(RANGE_READ_SUFFIXES):
        return None
    fs, path = split_uri(uri, storage_options)
    try:
        info = fs.info(path)
    except Exception as exc:
        raise storage_error(uri, exc) from exc
    if info.get("type") == "directory":
        raise SlideNotFoundError(f"no object at {uri}")
    etag = info.get("ETag") or info.get("etag")
    size = int(info["size"])
    backend = TiffRangeBackend.open(fs, path, size)
    return None if backend is None else (backend, etag.strip('"') if isinstance(etag, str) else None, size)


def _finish(source: SlideSource, make_backend: Callable[[], SlideBackend], mpp_override: float | None) -> Slide:
    """Build the backend, resolve µm/px, probe; on any failure release what was taken."""
    backend = None
    try:
        backend = make_backend()
        mpp, mpp_source = resolve_mpp(dict(backend.properties), mpp_override)
        slide = Slide(source, backend, mpp, mpp_source)
    except BaseException:
        if backend is not None:
            backend.close()
        source.release()
        raise
    try:
        _probe(slide)
    except BaseException:
        slide.close()
        raise
    return slide


def _probe(slide: Slide) -> None:
    """Surface corruption now: through OpenSlide the middle of level 0 and the coarsest level
    (capped at 2048 px); by range one stored tile in the middle of level 0 and one of the
    coarsest level (structural truncation was checked when the backend opened)."""
    w, h = slide.dimensions
    last = slide.level_count - 1
    lw, lh = slide.level_dimensions[last]
    try:
        if isinstance(slide.backend, OpenSlideBackend):
            slide.read_region_openslide(max(0, w // 2 - 32), max(0, h // 2 - 32), 0, min(64, w), min(64, h))
            slide.read_region(0, 0, last, min(lw, 2048), min(lh, 2048))
        else:
            slide.read_region(w // 2, h // 2, 0, 1, 1)
            slide.backend.read_level(last, 0, 0, 1, 1)
    except SlideError:  # already classified (corrupt, or storage unavailable: retried later)
        raise
    except Exception as exc:
        if is_unavailable(exc):
            raise storage_error(slide.uri, exc) from exc
        raise SlideUnreadableError(f"{slide.uri}: read failed: {type(exc).__name__}: {exc}") from exc
