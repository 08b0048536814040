"""A local slide file read through OpenSlide, with a faster path for JPEG-tiled TIFF levels.

Levels that are JPEG-tiled TIFF pages of an Aperio SVS or generic TIFF are decoded from the
file's own tiles with tifffile + imagecodecs (:mod:`pathray.wsi.tifftiles`), several times
faster than OpenSlide's RGBA path and the same pixels; every other level goes through
OpenSlide, composited on white.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import openslide

from pathray.errors import SlideUnreadableError
from pathray.wsi.tifftiles import BlockLoader, TiledLevel, Window, read_window, usable

_DIRECT_VENDORS = ("aperio", "generic-tiff")


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


def _open_handle(uri: str, local_path: str) -> openslide.OpenSlide:
    try:
        return openslide.OpenSlide(local_path)
    except openslide.OpenSlideUnsupportedFormatError as exc:
        raise SlideUnreadableError(f"{uri}: not a format OpenSlide can read") from exc
    except (openslide.OpenSlideError, OSError) as exc:
        raise SlideUnreadableError(f"{uri}: cannot open: {exc}") from exc


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
