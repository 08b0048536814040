"""Aperio SVS and generic tiled TIFF read over fsspec by byte range, without OpenSlide.

:meth:`TiffRangeBackend.open` parses only the TIFF header and IFDs (through a small block
cache over the object), decides whether OpenSlide would call the file ``aperio`` or
``generic-tiff``, and builds the same level list and properties OpenSlide reports
(``openslide.*``, ``aperio.*``, ``tiff.*`` names; ``openslide.quickhash-1`` is not
computed). Reads then fetch exactly the JPEG tiles a window touches with
:func:`pathray.wsi.rangeio.fetch_ranges` and decode them as the local fast path does
(:mod:`pathray.wsi.tifftiles`), so pixels are bit-identical to a local read.

It declines (``open`` returns ``None``) anything it does not cover: other TIFF vendors
(NDPI, Philips, Leica, Ventana, Trestle), levels that are not 8-bit RGB JPEG tiles (e.g.
JPEG 2000 or deflate), non-TIFF files. Those are staged and opened with OpenSlide.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from pathray.errors import SlideUnreadableError
from pathray.wsi.rangeio import RecentRanges, fetch_ranges, storage_error
from pathray.wsi.tifftiles import BlockLoader, TiledLevel, Window, read_window, usable

HEADER_WINDOW_BYTES = 16 * 1024  # least bytes fetched per header read that misses the cached windows
_STRING_TAGS = {
    270: "ImageDescription",
    271: "Make",
    272: "Model",
    305: "Software",
    306: "DateTime",
    315: "Artist",
    316: "HostComputer",
    33432: "Copyright",
    269: "DocumentName",
}
_FLOAT_TAGS = {282: "XResolution", 283: "YResolution", 286: "XPosition", 287: "YPosition"}
_RESOLUTION_UNITS = {1: "none", 2: "inch", 3: "centimeter"}
_OTHER_VENDOR_TAGS = (65420, 700)  # Hamamatsu NDPI marker, XMP (Ventana)


class TiffRangeBackend:
    """A :class:`pathray.wsi.slide.SlideBackend` reading a TIFF-family slide by byte range."""

    def __init__(self, fs: Any, path: str, vendor: str, levels: list[TiledLevel], properties: dict[str, str]):
        self.fs, self.path, self.vendor = fs, path, vendor
        self.levels = levels
        w0, h0 = levels[0].width, levels[0].height
        self.level_dimensions = tuple((lv.width, lv.height) for lv in levels)
        self.level_downsamples = tuple((w0 / lv.width + h0 / lv.height) / 2 for lv in levels)
        self.properties = properties
        self._recent = RecentRanges(fs, path)

    @classmethod
    def open(cls, fs: Any, path: str, size_bytes: int) -> TiffRangeBackend | None:
        """Parse the object's TIFF structure; ``None`` when this reader does not cover it.

        Raises :class:`SlideUnreadableError` when tile data lie past the object's end
        (a truncated upload) and storage errors as :func:`pathray.wsi.rangeio.storage_error`.
        """
        import tifffile

        try:
            with tifffile.TiffFile(HeaderReader(fs, path, size_bytes)) as tif:
                described = _describe(tif)
        except tifffile.TiffFileError:
            return None
        except (OSError, ValueError, KeyError, IndexError, EOFError) as exc:
            if isinstance(exc, (FileNotFoundError, PermissionError)) or "Timeout" in type(exc).__name__:
                raise storage_error(path, exc) from exc
            return None  # not a TIFF we understand: let OpenSlide judge it after staging
        if described is None:
            return None
        vendor, levels, properties = described
        end = max(lv.end_offset for lv in levels)
        if end > size_bytes:
            raise SlideUnreadableError(f"{path}: object is truncated: tiles reach byte {end}, object has {size_bytes}")
        return cls(fs, path, vendor, levels, properties)

    def read_level(
        self, level: int, lx: int, ly: int, width: int, height: int, cache: dict | None = None
    ) -> np.ndarray:
        """RGB uint8 ``(height, width, 3)`` of ``level`` at level px ``(lx, ly)``; outside = white."""
        return read_window(self.levels[level], level, (lx, ly, width, height), cache, self._fetch)

    def caches_tiles(self, level: int) -> bool:
        return True

    def block_loader(self, level: int, groups: Sequence[Sequence[Window]]) -> BlockLoader:
        """Groups read as blocks; each group's missing tiles in one coalesced, concurrent request batch."""
        return BlockLoader(self.levels[level], groups, self._fetch)

    def _fetch(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """Bytes of stored tiles; tiles fetched by a recent read of this handle (the previous
        chunk's boundary) come from memory."""
        return self._recent(ranges)

    def close(self) -> None:
        self.levels = []


class HeaderReader(io.RawIOBase):
    """A seekable read-only file over an object for tifffile's IFD parsing.

    A read that misses the windows already fetched fetches ``max(size, HEADER_WINDOW_BYTES)``
    bytes from the read position (one request through :func:`fetch_ranges`, or through
    ``fetch``: ``[(offset, length)] -> [bytes]``, when given); windows are kept until the
    reader is dropped, so jumping back and forth between IFDs is free.
    """

    def __init__(self, fs: Any, path: str, size_bytes: int, fetch: Any = None):
        super().__init__()
        self.fs, self.path, self.size, self.pos = fs, path, int(size_bytes), 0
        self.fetch = fetch or (lambda ranges: fetch_ranges(self.fs, self.path, ranges))
        self.windows: list[tuple[int, bytes]] = []

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = {0: 0, 1: self.pos, 2: self.size}[whence] + offset
        return self.pos

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), max(0, self.size - self.pos))
        if n == 0:
            return 0
        window = next(((s, d) for s, d in self.windows if s <= self.pos and self.pos + n <= s + len(d)), None)
        if window is None:
            length = min(max(n, HEADER_WINDOW_BYTES), self.size - self.pos)
            window = (self.pos, self.fetch([(self.pos, length)])[0])
            self.windows.append(window)
        start, data = window
        buffer[:n] = data[self.pos - start : self.pos - start + n]
        self.pos += n
        return n


def _describe(tif: Any) -> tuple[str, list[TiledLevel], dict[str, str]] | None:
    """``(vendor, levels, properties)`` as OpenSlide would report them, or ``None``."""
    pages = list(tif.pages)
    if not pages or not pages[0].is_tiled:
        return None
    description = _string(pages[0], 270) or ""
    if description.startswith("Aperio"):
        vendor, level_pages = "aperio", [p for p in pages if p.is_tiled]
    elif _generic(pages[0], description):
        vendor = "generic-tiff"
        level_pages = [p for i, p in enumerate(pages) if p.is_tiled and (i == 0 or int(p.subfiletype) & 1)]
        level_pages.sort(key=lambda p: -int(p.imagewidth))
    else:
        return None
    if not all(usable(p) for p in level_pages):
        return None
    levels = [TiledLevel.from_page(p) for p in level_pages]
    properties = _tiff_properties(level_pages[0])
    if vendor == "aperio":
        properties.update(_aperio_properties(description, pages))
    else:
        properties.update(_generic_properties(level_pages[0]))
    properties.update(_level_properties(levels, vendor))
    return vendor, levels, properties


def _generic(page: Any, description: str) -> bool:
    """True when no vendor-specific OpenSlide driver would claim this TIFF before generic-tiff."""
    if any(code in page.tags for code in _OTHER_VENDOR_TAGS):
        return False
    if description.lstrip().startswith("<"):  # Philips / Leica XML descriptions
        return False
    return not (_string(page, 305) or "").startswith("MedScan")  # Trestle


def _tiff_properties(page: Any) -> dict[str, str]:
    """OpenSlide's ``tiff.*`` properties (and ``openslide.comment``) of a directory."""
    props: dict[str, str] = {}
    for code, name in _STRING_TAGS.items():
        value = _string(page, code)
        if value is not None:
            props[f"tiff.{name}"] = value
    if "tiff.ImageDescription" in props:
        props["openslide.comment"] = props["tiff.ImageDescription"]
    for code, name in _FLOAT_TAGS.items():
        value = _rational(page, code)
        if value is not None:
            props[f"tiff.{name}"] = format_double(value)
    unit = int(page.tags[296].value) if 296 in page.tags else 2  # libtiff's default: inch
    props["tiff.ResolutionUnit"] = _RESOLUTION_UNITS.get(unit, "unknown")
    return props


def _aperio_properties(description: str, pages: list[Any]) -> dict[str, str]:
    """``aperio.*`` key/values of the description, µm/px, objective power, associated images."""
    props: dict[str, str] = {}
    for field in description.split("|")[1:]:
        name, sep, value = field.partition("=")
        if sep:
            props[f"aperio.{name.strip()}"] = value.strip()
    mpp = _parse_double(props.get("aperio.MPP"))
    if mpp is not None:
        props["openslide.mpp-x"] = props["openslide.mpp-y"] = format_double(mpp)
    power = _parse_double(props.get("aperio.AppMag"))
    if power is not None:
        props["openslide.objective-power"] = format_double(power)
    for index, page in enumerate(pages):
        if page.is_tiled:
            continue
        name = "thumbnail" if index == 1 else _associated_name(_string(page, 270) or "")
        if name:
            props[f"openslide.associated.{name}.width"] = str(int(page.imagewidth))
            props[f"openslide.associated.{name}.height"] = str(int(page.imagelength))
    return props


def _associated_name(description: str) -> str | None:
    """First word of the description's second line ("label 387x463" -> "label")."""
    lines = [line for line in description.replace("\r", "\n").split("\n")]
    words = lines[1].split(" ") if len(lines) > 1 else []
    return words[0] or None if words else None


def _generic_properties(page: Any) -> dict[str, str]:
    """µm/px from the TIFF resolution, as OpenSlide's generic-tiff driver does (centimeter only)."""
    unit = int(page.tags[296].value) if 296 in page.tags else 2
    props: dict[str, str] = {}
    for code, name in ((282, "openslide.mpp-x"), (283, "openslide.mpp-y")):
        value = _rational(page, code)
        if unit == 3 and value:
            props[name] = format_double(10000.0 / value)
    return props


def _level_properties(levels: list[TiledLevel], vendor: str) -> dict[str, str]:
    w0, h0 = levels[0].width, levels[0].height
    props = {"openslide.vendor": vendor, "openslide.level-count": str(len(levels))}
    for i, lv in enumerate(levels):
        props[f"openslide.level[{i}].width"] = str(lv.width)
        props[f"openslide.level[{i}].height"] = str(lv.height)
        props[f"openslide.level[{i}].tile-width"] = str(lv.tile_width)
        props[f"openslide.level[{i}].tile-height"] = str(lv.tile_height)
        props[f"openslide.level[{i}].downsample"] = format_double((w0 / lv.width + h0 / lv.height) / 2)
    return props


def _string(page: Any, code: int) -> str | None:
    tag = page.tags.get(code)
    if tag is None:
        return None
    value = tag.value
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _rational(page: Any, code: int) -> float | None:
    """A RATIONAL tag as libtiff hands it to OpenSlide: a C float."""
    tag = page.tags.get(code)
    if tag is None:
        return None
    value = tag.value
    num, den = (value if isinstance(value, tuple) else (value, 1))[:2]
    return float(np.float32(num / den)) if den else None


def _parse_double(text: str | None) -> float | None:
    try:
        value = float(text) if text is not None else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def format_double(value: float) -> str:
    """A double the way OpenSlide prints properties: shortest round-trip form, no trailing ``.0``."""
    text = repr(float(value))
    return text.removesuffix(".0")
