"""Open a whole-slide image with OpenSlide: levels, µm/px, region reads.

Coordinates passed to :meth:`Slide.read_region` are **level-0 pixels** (OpenSlide's
convention); sizes are pixels of the requested level. µm/px is resolved in this order:

1. the manifest override (``mpp`` column), when given: users set it to fix bad metadata;
2. ``openslide.mpp-x`` / ``openslide.mpp-y``;
3. TIFF ``XResolution``/``YResolution`` when ``ResolutionUnit`` is centimeter or inch.

It is never guessed from objective power ("40x"). ``Slide.mpp_source`` records which one
was used. Missing → :class:`MppMissingError`; outside [0.05, 20] µm/px or non-square
pixels → :class:`MppImplausibleError`.

Reads of TIFF-based slides (Aperio SVS, generic tiled TIFF) whose level is a JPEG-tiled
page decode that page's own tiles directly (tifffile + imagecodecs), which is several
times faster than OpenSlide's RGBA path and gives the same pixels (both use
libjpeg-turbo; tested). Everything else goes through OpenSlide.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import openslide

from pathray.errors import (
    MppImplausibleError,
    MppMissingError,
    SlideNotFoundError,
    SlideUnreadableError,
)
from pathray.fs import is_remote, split_uri
from pathray.staging import Scratch, StagedSlide

MPP_RANGE = (0.05, 20.0)
THUMBNAIL_STRIP_PIXELS = 16 * 1024**2  # level pixels read at once while making a thumbnail
_UNIT_TO_UM = {"centimeter": 1e4, "inch": 25400.0}
_DIRECT_VENDORS = ("aperio", "generic-tiff")


class Slide:
    """An open slide. Use as a context manager; :meth:`close` also deletes staged copies."""

    def __init__(
        self,
        uri: str,
        handle: openslide.OpenSlide,
        mpp: float,
        mpp_source: str,
        etag: str | None,
        size_bytes: int | None,
        local_path: str,
        staged: StagedSlide | None = None,
        own_scratch: Scratch | None = None,
    ):
        self.uri = uri
        self.mpp = mpp
        self.mpp_source = mpp_source
        self.etag = etag
        self.size_bytes = size_bytes
        self.local_path = local_path
        self._osr = handle
        self._staged = staged
        self._own_scratch = own_scratch
        self.dimensions: tuple[int, int] = tuple(handle.dimensions)
        self.level_dimensions: tuple[tuple[int, int], ...] = tuple(tuple(d) for d in handle.level_dimensions)
        self.level_downsamples: tuple[float, ...] = tuple(float(d) for d in handle.level_downsamples)
        self.properties: dict[str, str] = dict(handle.properties)
        self.vendor: str | None = self.properties.get(openslide.PROPERTY_NAME_VENDOR)
        self._direct = _DirectTiffReader.open(local_path, self) if self.vendor in _DIRECT_VENDORS else None

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def level_mpp(self, level: int) -> float:
        """µm/px of pyramid ``level``."""
        return self.mpp * self.level_downsamples[level]

    def has_direct_reads(self, level: int) -> bool:
        """True when ``level`` is read by decoding the TIFF's own tiles (fast path)."""
        return self._direct is not None and self._direct.pages[level] is not None

    def read_region(
        self, x0: int, y0: int, level: int, width: int, height: int, *, cache: dict | None = None
    ) -> np.ndarray:
        """RGB uint8 ``(height, width, 3)`` of ``level`` with top-left at level-0 px ``(x0, y0)``.

        Areas outside the slide or transparent are white. Uses the direct TIFF path where
        available (the level position is ``round(x0 / downsample)``), else OpenSlide.
        ``cache``: a dict the caller keeps across nearby reads so each TIFF tile is decoded
        once (direct path only; the caller bounds its lifetime).
        """
        if self.has_direct_reads(level):
            ds = self.level_downsamples[level]
            return self._direct.read(level, round(x0 / ds), round(y0 / ds), width, height, cache)
        return self.read_region_openslide(x0, y0, level, width, height)

    def read_region_openslide(self, x0: int, y0: int, level: int, width: int, height: int) -> np.ndarray:
        """Same as :meth:`read_region` but always through OpenSlide (the reference path)."""
        try:
            rgba = np.asarray(self._osr.read_region((int(x0), int(y0)), level, (int(width), int(height))))
        except openslide.OpenSlideError as exc:
            raise SlideUnreadableError(f"{self.uri}: read failed: {exc}") from exc
        return _on_white(rgba)

    def thumbnail(self, max_mpp: float) -> tuple[np.ndarray, float]:
        """RGB image of the whole slide at about ``max_mpp`` µm/px, and its exact µm/px.

        Reads the coarsest level no coarser than ``max_mpp`` (or the coarsest level) and
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
        if self._direct is not None:
            self._direct.close()
            self._direct = None
        self._osr.close()
        if self._staged is not None:
            self._staged.release()
        if self._own_scratch is not None:
            self._own_scratch.close()

    def __enter__(self) -> "Slide":
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

    ``mpp_override`` (µm/px) wins over the slide's metadata when given. ``s3://`` slides are
    staged into ``scratch`` (a private temporary one if ``None``). Raises
    :class:`SlideNotFoundError`, :class:`SlideUnreadableError` (not a slide, corrupt,
    truncated: a small probe read is done at open), :class:`MppMissingError`,
    :class:`MppImplausibleError`, or :class:`~pathray.errors.StagingError`.
    """
    staged: StagedSlide | None = None
    own_scratch: Scratch | None = None
    if is_remote(uri):
        if scratch is None:
            scratch = own_scratch = Scratch()
        try:
            staged = scratch.stage(uri, storage_options)
        except Exception:
            if own_scratch is not None:
                own_scratch.close()
            raise
        local_path, etag, size = staged.local_path, staged.etag, staged.size_bytes
    else:
        _, local_path = split_uri(uri)
        if not os.path.exists(local_path):
            raise SlideNotFoundError(f"no such file: {local_path}")
        etag, size = None, (os.path.getsize(local_path) if os.path.isfile(local_path) else None)
    try:
        handle = _open_handle(uri, local_path)
        try:
            mpp, source = resolve_mpp(dict(handle.properties), mpp_override)
            slide = Slide(uri, handle, mpp, source, etag, size, local_path, staged, own_scratch)
        except BaseException:
            handle.close()
            raise
        try:
            _probe(slide)
        except BaseException:
            slide.close()
            staged = own_scratch = None
            raise
        return slide
    except BaseException:
        if staged is not None:
            staged.release()
        if own_scratch is not None:
            own_scratch.close()
        raise


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
        raise MppImplausibleError(f"non-square pixels ({mpp_x:g} x {mpp_y:g} µm/px from {source}); set the manifest's 'mpp' column")
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
    """Read the middle of level 0 and the whole coarsest level (capped) to surface corruption now."""
    w, h = slide.dimensions
    slide.read_region_openslide(max(0, w // 2 - 32), max(0, h // 2 - 32), 0, min(64, w), min(64, h))
    last = slide.level_count - 1
    lw, lh = slide.level_dimensions[last]
    try:
        slide.read_region(0, 0, last, min(lw, 2048), min(lh, 2048))
    except SlideUnreadableError:
        raise
    except Exception as exc:
        raise SlideUnreadableError(f"{slide.uri}: read failed: {type(exc).__name__}: {exc}") from exc


def _on_white(rgba: np.ndarray) -> np.ndarray:
    """Composite un-premultiplied RGBA over white; returns RGB uint8."""
    alpha = rgba[..., 3:4]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgba[..., :3])
    a = alpha.astype(np.uint16)
    rgb = (rgba[..., :3].astype(np.uint16) * a + 255 * (255 - a) + 127) // 255
    return rgb.astype(np.uint8)


class _DirectTiffReader:
    """Decodes JPEG tiles of a tiled TIFF page straight from the file (``os.pread``).

    ``pages[level]`` is the tifffile page holding that OpenSlide level, or ``None`` when the
    level cannot be read this way (then OpenSlide is used for it).
    """

    def __init__(self, fd: int, tif: Any, pages: list[Any]):
        self._fd = fd
        self._tif = tif
        self.pages = pages

    @classmethod
    def open(cls, path: str, slide: Slide) -> "_DirectTiffReader | None":
        try:
            import imagecodecs  # noqa: F401  (tifffile's JPEG decoder)
            import tifffile
        except ImportError:
            return None
        try:
            tif = tifffile.TiffFile(path)
        except Exception:
            return None
        pages: list[Any] = []
        for dims in slide.level_dimensions:
            pages.append(next((p for p in tif.pages if _usable(p) and (p.imagewidth, p.imagelength) == dims), None))
        if not any(pages):
            tif.close()
            return None
        return cls(os.open(path, os.O_RDONLY), tif, pages)

    def read(self, level: int, lx: int, ly: int, width: int, height: int, cache: dict | None = None) -> np.ndarray:
        """RGB uint8 ``(height, width, 3)`` at level pixel ``(lx, ly)``; outside = white.

        Decoded tiles are kept in ``cache`` (keyed by ``(level, index)``) when one is given."""
        page = self.pages[level]
        tw, th = page.tilewidth, page.tilelength
        iw, ih = page.imagewidth, page.imagelength
        cols = (iw + tw - 1) // tw
        x0, y0, x1, y1 = max(lx, 0), max(ly, 0), min(lx + width, iw), min(ly + height, ih)
        inside = (x0, y0, x1, y1) == (lx, ly, lx + width, ly + height)
        out = np.empty((height, width, 3), dtype=np.uint8) if inside else np.full((height, width, 3), 255, np.uint8)
        if x1 <= x0 or y1 <= y0:
            return out
        decode = page.decode
        for ty in range(y0 // th, (y1 - 1) // th + 1):
            for tx in range(x0 // tw, (x1 - 1) // tw + 1):
                index = ty * cols + tx
                # intersection of this tile with the requested window, in level pixels
                ax0, ay0 = max(x0, tx * tw), max(y0, ty * th)
                ax1, ay1 = min(x1, (tx + 1) * tw), min(y1, (ty + 1) * th)
                count = page.databytecounts[index]
                if count == 0:  # sparse tile: transparent in OpenSlide, white here
                    out[ay0 - ly : ay1 - ly, ax0 - lx : ax1 - lx] = 255
                    continue
                tile = cache.get((level, index)) if cache is not None else None
                if tile is None:
                    try:
                        data = os.pread(self._fd, count, page.dataoffsets[index])
                        tile = decode(data, index, jpegtables=page.jpegtables)[0]
                    except Exception as exc:
                        raise SlideUnreadableError(f"tile {index} of level {level} cannot be decoded: {exc}") from exc
                    tile = tile.reshape(tile.shape[-3:])
                    if cache is not None:
                        cache[(level, index)] = tile
                out[ay0 - ly : ay1 - ly, ax0 - lx : ax1 - lx] = tile[ay0 - ty * th : ay1 - ty * th, ax0 - tx * tw : ax1 - tx * tw, :3]
        return out

    def close(self) -> None:
        os.close(self._fd)
        self._tif.close()


def _usable(page: Any) -> bool:
    return (
        page.is_tiled
        and page.compression == 7  # JPEG
        and page.samplesperpixel == 3
        and page.bitspersample == 8
        and page.planarconfig == 1
        and page.photometric in (2, 6)  # RGB, YCbCr
    )
