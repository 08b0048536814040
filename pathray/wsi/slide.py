"""Open a whole-slide image: levels, µm/px, region reads, over a pluggable backend.

Coordinates passed to :meth:`Slide.read_region` are **level-0 pixels** (OpenSlide's
convention); sizes are pixels of the requested level. µm/px is resolved in this order:

1. the manifest override (``mpp`` column), when given: users set it to fix bad metadata;
2. ``openslide.mpp-x`` / ``openslide.mpp-y``;
3. TIFF ``XResolution``/``YResolution`` when ``ResolutionUnit`` is centimeter or inch.

It is never guessed from objective power ("40x"). ``Slide.mpp_source`` records which one
was used. Missing → :class:`MppMissingError`; outside [0.05, 20] µm/px or non-square
pixels → :class:`MppImplausibleError`.

Where the pixels come from is a :class:`SlideBackend`:

* a local file: :class:`OpenSlideBackend` (OpenSlide; levels that are JPEG-tiled TIFF pages
  of an Aperio SVS or generic TIFF are decoded from the file's own tiles with tifffile +
  imagecodecs, several times faster than OpenSlide's RGBA path and the same pixels);
* an ``s3://`` Aperio SVS or generic tiled TIFF: :class:`pathray.wsi.tiffrange.TiffRangeBackend`
  reads the header and then only the JPEG tiles each read needs, by byte range: no local
  copy, the same metadata and bit-identical pixels;
* any other ``s3://`` slide (MRXS, DICOM, JPEG 2000 SVS...): staged once per node into the
  shared :class:`pathray.wsi.scratch.Scratch` cache and opened with :class:`OpenSlideBackend`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import openslide

from pathray.errors import (
    MppImplausibleError,
    MppMissingError,
    SlideError,
    SlideNotFoundError,
    SlideUnreadableError,
    is_unavailable,
)
from pathray.fs import is_remote, split_uri
from pathray.wsi.rangeio import storage_error
from pathray.wsi.scratch import Scratch, StagedSlide
from pathray.wsi.tifftiles import BlockLoader, TiledLevel, Window, read_window, usable

MPP_RANGE = (0.05, 20.0)
THUMBNAIL_STRIP_PIXELS = 16 * 1024**2  # level pixels read at once while making a thumbnail
RANGE_READ_SUFFIXES = (".svs", ".tif", ".tiff")  # s3:// names tried with the range reader before staging
_UNIT_TO_UM = {"centimeter": 1e4, "inch": 25400.0}
_DIRECT_VENDORS = ("aperio", "generic-tiff")


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


class OpenSlideBackend:
    """A local slide file through OpenSlide, with the TIFF JPEG fast path where it applies."""

    def __init__(self, uri: str, local_path: str):
        self._osr = _open_handle(uri, local_path)
        self.uri = uri
        self.properties: dict[str, str] = dict(self._osr.properties)
        self.vendor: str | None = self.properties.get(openslide.PROPERTY_NAME_VENDOR)
        self.level_dimensions = tuple(tuple(d) for d in self._osr.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._osr.level_downsamples)
        self._levels: list[TiledLevel | None] = [None] * len(self.level_dimensions)
        self._fd: int | None = None
        if self.vendor in _DIRECT_VENDORS:
            self._levels = _direct_levels(local_path, self.level_dimensions)
            if any(self._levels):
                self._fd = os.open(local_path, os.O_RDONLY)

    def caches_tiles(self, level: int) -> bool:
        return self._levels[level] is not None

    def read_level(
        self, level: int, lx: int, ly: int, width: int, height: int, cache: dict | None = None
    ) -> np.ndarray:
        """Direct TIFF tile decoding where available, else OpenSlide at level-0 ``round(l * downsample)``."""
        tiled = self._levels[level]
        if tiled is not None:
            return read_window(tiled, level, (lx, ly, width, height), cache, self._pread)
        ds = self.level_downsamples[level]
        return self.read_openslide(round(lx * ds), round(ly * ds), level, width, height)

    def block_loader(self, level: int, groups: Sequence[Sequence[Window]]) -> BlockLoader:
        tiled = self._levels[level]
        if tiled is None:
            raise ValueError(f"level {level} is read through OpenSlide, not by stored tiles")
        return BlockLoader(tiled, groups, self._pread)

    def read_openslide(self, x0: int, y0: int, level: int, width: int, height: int) -> np.ndarray:
        """RGB of OpenSlide's ``read_region`` at level-0 ``(x0, y0)``, composited on white."""
        try:
            rgba = np.asarray(self._osr.read_region((int(x0), int(y0)), level, (int(width), int(height))))
        except openslide.OpenSlideError as exc:
            raise SlideUnreadableError(f"{self.uri}: read failed: {exc}") from exc
        return _on_white(rgba)

    def _pread(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        return [os.pread(self._fd, length, offset) for offset, length in ranges]

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._osr.close()


class Slide:
    """An open slide. Use as a context manager; :meth:`close` also releases a staged copy.

    ``backend`` is what reads it (:class:`SlideBackend`); ``local_path`` is the local file
    OpenSlide opened, or ``None`` when the slide is read remotely by range.
    """

    def __init__(
        self,
        uri: str,
        backend: SlideBackend,
        mpp: float,
        mpp_source: str,
        etag: str | None,
        size_bytes: int | None,
        local_path: str | None = None,
        staged: StagedSlide | None = None,
        own_scratch: Scratch | None = None,
    ):
        self.uri = uri
        self.backend = backend
        self.mpp = mpp
        self.mpp_source = mpp_source
        self.etag = etag
        self.size_bytes = size_bytes
        self.local_path = local_path
        self._staged = staged
        self._own_scratch = own_scratch
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
        if self._staged is not None:
            self._staged.release()
            self._staged = None
        if self._own_scratch is not None:
            self._own_scratch.close()
            self._own_scratch = None

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
    at open), :class:`MppMissingError`, :class:`MppImplausibleError`, or
    :class:`~pathray.errors.StagingError`.
    """
    if _is_series_prefix(uri):
        backend = _open_dicom(uri, storage_options)
        return _finish(
            uri,
            lambda: backend,
            mpp_override,
            backend.properties.get("dicom.SeriesInstanceUID"),
            backend.series_bytes,
            None,
        )
    if not is_remote(uri):
        _, local_path = split_uri(uri)
        if not os.path.exists(local_path):
            raise SlideNotFoundError(f"no such file: {local_path}")
        size = os.path.getsize(local_path) if os.path.isfile(local_path) else None
        return _finish(uri, lambda: OpenSlideBackend(uri, local_path), mpp_override, None, size, local_path)
    remote = _open_range(uri, storage_options)
    if remote is not None:
        backend, etag, size = remote
        return _finish(uri, lambda: backend, mpp_override, etag, size, None)
    own_scratch = Scratch() if scratch is None else None
    try:
        staged = (scratch or own_scratch).stage(uri, storage_options)
    except BaseException:
        if own_scratch is not None:
            own_scratch.close()
        raise
    return _finish(
        uri,
        lambda: OpenSlideBackend(uri, staged.local_path),
        mpp_override,
        staged.etag,
        staged.size_bytes,
        staged.local_path,
        staged,
        own_scratch,
    )


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


def _finish(
    uri: str,
    make_backend: Any,
    mpp_override: float | None,
    etag: str | None,
    size: int | None,
    local_path: str | None,
    staged: StagedSlide | None = None,
    own_scratch: Scratch | None = None,
) -> Slide:
    """Build the backend, resolve µm/px, probe; on any failure release what was taken."""
    backend = None
    try:
        backend = make_backend()
        mpp, source = resolve_mpp(dict(backend.properties), mpp_override)
        slide = Slide(uri, backend, mpp, source, etag, size, local_path, staged, own_scratch)
    except BaseException:
        if backend is not None:
            backend.close()
        if staged is not None:
            staged.release()
        if own_scratch is not None:
            own_scratch.close()
        raise
    try:
        _probe(slide)
    except BaseException:
        slide.close()
        raise
    return slide


def resolve_mpp(properties: dict[str, str], override: float | None = None) -> tuple[float, str]:
    """Return ``(µm/px, source)`` from an override or slide properties (see module doc)."""
    if override is not None:
        mpp, source = float(override), "manifest"
        _check_plausible(mpp, source)
        return mpp, source
    found = _mpp_from_openslide(properties) or _mpp_from_tiff(properties)
    if found is None:
        raise MppMissingError(
            "the slide has no µm/px metadata (openslide.mpp-x or TIFF resolution in cm/inch); "
            "set it in the manifest's 'mpp' column"
        )
    (mpp_x, mpp_y), source = found
    if abs(mpp_x - mpp_y) > 0.01 * max(mpp_x, mpp_y):
        raise MppImplausibleError(
            f"non-square pixels ({mpp_x:g} x {mpp_y:g} µm/px from {source}); set the manifest's 'mpp' column"
        )
    _check_plausible(mpp_x, source)
    return mpp_x, source


def _check_plausible(mpp: float, source: str) -> None:
    lo, hi = MPP_RANGE
    if not (math.isfinite(mpp) and lo <= mpp <= hi):
        raise MppImplausibleError(
            f"µm/px {mpp:g} from {source} is outside the plausible range [{lo:g}, {hi:g}]; "
            "fix it with the manifest's 'mpp' column"
        )


def _mpp_from_openslide(props: dict[str, str]) -> tuple[tuple[float, float], str] | None:
    x = _float(props.get(openslide.PROPERTY_NAME_MPP_X))
    y = _float(props.get(openslide.PROPERTY_NAME_MPP_Y))
    if x is None and y is None:
        return None
    return (x or y, y or x), "openslide"


def _mpp_from_tiff(props: dict[str, str]) -> tuple[tuple[float, float], str] | None:
    scale = _UNIT_TO_UM.get(props.get("tiff.ResolutionUnit", "").lower())
    x, y = _float(props.get("tiff.XResolution")), _float(props.get("tiff.YResolution"))
    if scale is None or not x:
        return None
    return (scale / x, scale / (y or x)), "tiff_resolution"


def _float(value: str | None) -> float | None:
    try:
        out = float(value) if value is not None else None
    except ValueError:
        return None
    return out if out and math.isfinite(out) and out > 0 else None


def _open_handle(uri: str, local_path: str) -> openslide.OpenSlide:
    try:
        return openslide.OpenSlide(local_path)
    except openslide.OpenSlideUnsupportedFormatError as exc:
        raise SlideUnreadableError(f"{uri}: not a format OpenSlide can read") from exc
    except (openslide.OpenSlideError, OSError) as exc:
        raise SlideUnreadableError(f"{uri}: cannot open: {exc}") from exc


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


def _on_white(rgba: np.ndarray) -> np.ndarray:
    """Composite un-premultiplied RGBA over white; returns RGB uint8."""
    alpha = rgba[..., 3:4]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgba[..., :3])
    a = alpha.astype(np.uint16)
    rgb = (rgba[..., :3].astype(np.uint16) * a + 255 * (255 - a) + 127) // 255
    return rgb.astype(np.uint8)


def _direct_levels(path: str, level_dimensions: Sequence[tuple[int, int]]) -> list[TiledLevel | None]:
    """For each OpenSlide level, the JPEG-tiled TIFF page of the same size (``None``: read via OpenSlide)."""
    try:
        import imagecodecs  # noqa: F401  (tifffile's JPEG decoder)
        import tifffile
    except ImportError:
        return [None] * len(level_dimensions)
    try:
        with tifffile.TiffFile(path) as tif:
            pages = [p for p in tif.pages if usable(p)]
            return [
                next((TiledLevel.from_page(p) for p in pages if (p.imagewidth, p.imagelength) == tuple(dims)), None)
                for dims in level_dimensions
            ]
    except Exception:  # noqa: BLE001  (no fast path: OpenSlide reads every level)
        return [None] * len(level_dimensions)
