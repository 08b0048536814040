"""Windows of a JPEG-tiled TIFF page assembled from its own tiles, wherever the bytes live.

A :class:`TiledLevel` holds what is needed to read one pyramid level without the file
open: tile geometry, the tile offset/byte-count tables, the JPEG tables and the colour
spaces tifffile's own decoder would use for the page (decoding needs no file handle).
:func:`read_window` takes a ``fetch`` callable that turns ``[(offset, length)]`` into
bytes (``os.pread`` locally, :func:`pathray.wsi.rangeio.fetch_ranges` remotely), so local
and remote reads decode the same bytes the same way and give bit-identical pixels.

:class:`BlockLoader` serves many windows at once (tile production): the windows come in
groups, each group's stored tiles are fetched in one batch, and a decoded stored tile is
kept only until the last group that touches it, so each is fetched and decoded once
whatever the grouping; a group is copied into one array (a :class:`Block`, whose windows
are views) or straight into one array per window.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pathray.errors import SlideUnreadableError

DECODE_OFFSET = 16  # bytes past a 32-byte boundary where decoded tiles start (see decode_buffer)
Fetch = Callable[[Sequence[tuple[int, int]]], list[bytes]]
Window = tuple[int, int, int, int]  # (lx, ly, width, height) in level pixels


def usable(page: Any) -> bool:
    """True for a tiled, interleaved 8-bit RGB/YCbCr JPEG page (what :class:`TiledLevel` reads)."""
    return bool(
        page.is_tiled
        and page.compression == 7  # JPEG
        and page.samplesperpixel == 3
        and page.bitspersample == 8
        and page.planarconfig == 1
        and page.photometric in (2, 6)  # RGB, YCbCr
    )


@dataclass(frozen=True)
class TiledLevel:
    """One JPEG-tiled page: sizes in level pixels, per-tile byte offsets and counts."""

    width: int
    height: int
    tile_width: int
    tile_height: int
    offsets: np.ndarray  # int64, one per tile, row-major
    counts: np.ndarray  # int64, 0 = sparse tile (white)
    jpegtables: bytes | None
    colorspaces: tuple[Any, Any]  # (JPEG, output) colour space arguments of imagecodecs.jpeg_decode

    @classmethod
    def from_page(cls, page: Any) -> TiledLevel:
        """The level of a :func:`usable` page, decoded with the colour spaces tifffile's own decoder
        picks (e.g. Aperio's RGB-coded, non-JFIF tiles are not converted from YCbCr)."""
        from tifffile.tifffile import jpeg_decode_colorspace

        spaces = jpeg_decode_colorspace(page.photometric, page.planarconfig, page.extrasamples, page.is_jfif)
        return cls(
            int(page.imagewidth),
            int(page.imagelength),
            int(page.tilewidth),
            int(page.tilelength),
            np.asarray(page.dataoffsets, dtype=np.int64),
            np.asarray(page.databytecounts, dtype=np.int64),
            page.jpegtables,
            spaces,
        )

    @property
    def columns(self) -> int:
        return (self.width + self.tile_width - 1) // self.tile_width

    @property
    def end_offset(self) -> int:
        """One past the last byte of tile data this level needs."""
        return int((self.offsets + self.counts).max()) if self.counts.size else 0

    def clip(self, lx: int, ly: int, width: int, height: int) -> tuple[int, int, int, int]:
        """The window's part inside the level as ``(x0, y0, x1, y1)`` (empty: x1 <= x0 or y1 <= y0)."""
        return max(lx, 0), max(ly, 0), min(lx + width, self.width), min(ly + height, self.height)

    def tile_indices(self, lx: int, ly: int, width: int, height: int) -> list[int]:
        """Row-major indices of the tiles a window touches (sparse ones included)."""
        x0, y0, x1, y1 = self.clip(lx, ly, width, height)
        if x1 <= x0 or y1 <= y0:
            return []
        tw, th = self.tile_width, self.tile_height
        return [
            ty * self.columns + tx
            for ty in range(y0 // th, (y1 - 1) // th + 1)
            for tx in range(x0 // tw, (x1 - 1) // tw + 1)
        ]

    def decode_tile(self, data: bytes, index: int, out: np.ndarray | None = None) -> np.ndarray:
        """``(tile_height, tile_width, 3)`` uint8 of tile ``index`` (imagecodecs' libjpeg-turbo, as
        tifffile decodes it), into ``out`` if given (else a new :func:`decode_buffer`); raises
        SlideUnreadableError."""
        import imagecodecs

        out = decode_buffer((self.tile_height, self.tile_width, 3)) if out is None else out
        try:
            return imagecodecs.jpeg_decode(
                data, tables=self.jpegtables, colorspace=self.colorspaces[0], outcolorspace=self.colorspaces[1], out=out
            )
        except Exception as exc:  # corrupt data, or a tile of another size or colour layout
            raise SlideUnreadableError(f"tile {index} cannot be decoded: {type(exc).__name__}: {exc}") from exc


def decode_buffer(shape: tuple[int, ...]) -> np.ndarray:
    """An uninitialised uint8 array whose data start ``DECODE_OFFSET`` bytes past a 32-byte boundary.

    libjpeg-turbo decodes YCbCr JPEG tiles ~20 % faster into such buffers than into 32-byte
    aligned ones on x86-64 (256-px tiles: ~1060 vs ~880 output tiles/s in
    ``benchmarks/tiling.py``; no difference measured for RGB-coded tiles), and numpy's own
    allocations fall on either side at random.
    """
    size = int(np.prod(shape))
    raw = np.empty(size + 32, np.uint8)
    start = (DECODE_OFFSET - raw.ctypes.data) % 32
    return raw[start : start + size].reshape(shape)


def load_tiles(level: TiledLevel, key: int, indices: Iterable[int], cache: dict, fetch: Fetch) -> None:
    """Decode every tile in ``indices`` not yet in ``cache`` (keyed ``(key, index)``), with one fetch."""
    missing = sorted({i for i in indices if (key, i) not in cache and level.counts[i] > 0})
    if not missing:
        return
    blobs = fetch([(int(level.offsets[i]), int(level.counts[i])) for i in missing])
    for index, data in zip(missing, blobs):
        cache[(key, index)] = level.decode_tile(data, index)


@dataclass(frozen=True)
class Block:
    """Level pixels around a group of windows, at 1/``scale`` resolution: ``pixels[(y - y0) //
    scale, (x - x0) // scale]`` covers level px ``(x, y)``.

    Only pixels inside the group's windows are defined (outside the level or in a sparse
    stored tile: white); the rest of the bounding box is left uninitialised.
    """

    x0: int
    y0: int
    pixels: np.ndarray  # uint8 (height, width, 3)
    scale: int = 1  # 2: each pixel is the exact 2 x 2 area mean of the level (see BlockLoader.load)

    def window(self, lx: int, ly: int, width: int, height: int) -> np.ndarray:
        """A view of the window at level px ``(lx, ly)`` (``width // scale`` pixels wide); it must be
        one of the group's windows."""
        s, x, y = self.scale, (lx - self.x0) // self.scale, (ly - self.y0) // self.scale
        return self.pixels[y : y + height // s, x : x + width // s]


class BlockLoader:
    """Loads groups of windows of one level, fetching and decoding each stored tile once.

    A group is loaded either as one :class:`Block` (:meth:`load`) or straight into one array
    per window (:meth:`load_into`), in order k = 0, 1, ... (one thread at a time, each once);
    a block is valid until the next group is loaded, which reuses its memory (fresh
    block-sized arrays cost ~10 % of the CPU time in page faults). The bytes a group needs
    (its stored tiles that no earlier group touched) can be fetched ahead with
    :meth:`fetch`, from any thread. A decoded stored tile stays in memory from the first
    group that touches it until the last one, so memory is bounded by one block plus the
    stored tiles shared between groups loaded and groups to come.
    """

    def __init__(self, level: TiledLevel, groups: Sequence[Sequence[Window]], fetch: Fetch):
        self.level, self.groups, self._fetch = level, groups, fetch
        self.extents = [_extents(level, g) for g in groups]
        self.users = [_users(level, g) for g in groups]
        self.first: list[list[int]] = [[] for _ in groups]  # stored tiles with data first touched by group k
        self.release: list[set[int]] = [set() for _ in groups]  # ... last touched by group k
        seen: set[int] = set()
        for k, extents in enumerate(self.extents):
            self.first[k] = [i for i in extents if i not in seen and level.counts[i] > 0]
            seen.update(extents)
        last_use = {i: k for k, extents in enumerate(self.extents) for i in extents}
        for index, k in last_use.items():
            self.release[k].add(index)
        self.decoded: dict[int, np.ndarray] = {}  # stored tile index -> decoded, kept for later groups
        self.buffer = np.empty(0, np.uint8)  # block memory, reused
        self.scratch = decode_buffer((level.tile_height, level.tile_width, 3))  # decoded tiles used by one group only

    def fetch(self, k: int) -> dict[int, bytes]:
        """The encoded stored tiles group ``k`` is the first to touch, in one batch (thread-safe)."""
        level, indices = self.level, self.first[k]
        return dict(zip(indices, self._fetch([(int(level.offsets[i]), int(level.counts[i])) for i in indices])))

    def load(
        self, k: int, blobs: dict[int, bytes] | None = None, halve: Callable[[np.ndarray], np.ndarray] | None = None
    ) -> Block:
        """Group ``k`` as one :class:`Block`; ``blobs`` = ``fetch(k)`` if fetched ahead.

        Each stored tile is copied (the part the group's windows use) right after it is decoded.
        With ``halve`` (an exact 2 x 2 area mean of an even-sized array; only where
        :meth:`halvable`) that part is halved instead and the block has ``scale`` 2: as every
        2 x 2 cell of every window then lies in one stored tile, a window of the block is its
        level window halved, bit for bit, without the full-size block ever being made.
        """
        level, windows, extents = self.level, self.groups[k], self.extents[k]
        x0, y0 = min(w[0] for w in windows), min(w[1] for w in windows)
        x1, y1 = max(w[0] + w[2] for w in windows), max(w[1] + w[3] for w in windows)
        inside = level.clip(x0, y0, x1 - x0, y1 - y0) == (x0, y0, x1, y1)
        scale = 1 if halve is None else 2
        pixels = self._pixels(((y1 - y0) // scale, (x1 - x0) // scale, 3), white=not inside)
        for index, tile in self._tiles(k, blobs):
            if halve is None:
                _paste(level, index, tile, pixels, (x0, y0), extents[index])
            else:
                self._paste_halved(index, tile, pixels, (x0, y0), extents[index], halve)
        return Block(x0, y0, pixels, scale)

    def halvable(self, k: int) -> bool:
        """True when group ``k``'s windows all lie inside the level at even positions with even
        sizes and the stored tiles have even sizes (so :meth:`load` may halve tile by tile)."""
        level = self.level
        return (
            level.tile_width % 2 == 0
            and level.tile_height % 2 == 0
            and all(
                (lx | ly | w | h) % 2 == 0 and not _sticks_out(level, lx, ly, w, h) for lx, ly, w, h in self.groups[k]
            )
        )

    def load_into(self, k: int, outs: Sequence[np.ndarray], blobs: dict[int, bytes] | None = None) -> None:
        """Write group ``k``'s windows into ``outs`` (one ``(height, width, 3)`` array per window,
        in group order) straight from the decoded stored tiles: one copy of each window's pixels."""
        windows = self.groups[k]
        for j, (lx, ly, width, height) in enumerate(windows):
            if _sticks_out(self.level, lx, ly, width, height):
                outs[j][...] = 255  # parts outside the level stay white
        for index, tile in self._tiles(k, blobs):
            for j in self.users[k][index]:
                lx, ly, width, height = windows[j]
                _paste(self.level, index, tile, outs[j], (lx, ly), (lx, ly, lx + width, ly + height))

    def _paste_halved(
        self,
        index: int,
        tile: np.ndarray | None,
        target: np.ndarray,
        origin: tuple[int, int],
        area: Sequence[int],
        halve: Callable[[np.ndarray], np.ndarray],
    ) -> None:
        """:func:`_paste` at half resolution: the part of stored tile ``index`` inside ``area`` (even
        level px bounds, inside the level), halved, into ``target`` (pixel (0, 0) = level px ``origin``)."""
        level = self.level
        tw, th = level.tile_width, level.tile_height
        ty, tx = divmod(index, level.columns)
        ax0, ay0 = max(tx * tw, area[0]), max(ty * th, area[1])
        ax1, ay1 = min((tx + 1) * tw, area[2]), min((ty + 1) * th, area[3])
        part = target[(ay0 - origin[1]) // 2 : (ay1 - origin[1]) // 2, (ax0 - origin[0]) // 2 : (ax1 - origin[0]) // 2]
        part[...] = 255 if tile is None else halve(tile[ay0 - ty * th : ay1 - ty * th, ax0 - tx * tw : ax1 - tx * tw])

    def _tiles(self, k: int, blobs: dict[int, bytes] | None) -> Iterator[tuple[int, np.ndarray | None]]:
        """``(index, decoded tile or None if sparse)`` for each stored tile group ``k`` touches;
        decoded from ``blobs`` (fetched now if ``None``) unless an earlier group kept it, kept
        only for later groups."""
        blobs = self.fetch(k) if blobs is None else blobs
        for index in self.extents[k]:
            keep = index not in self.release[k]
            tile = (
                self.decoded.pop(index)
                if index in self.decoded
                # a tile not kept reuses self.scratch
                else (
                    self.level.decode_tile(blobs[index], index, None if keep else self.scratch)
                    if index in blobs
                    else None
                )
            )
            yield index, tile  # used before the next one is decoded
            if tile is not None and keep:
                self.decoded[index] = tile

    def _pixels(self, shape: tuple[int, int, int], white: bool) -> np.ndarray:
        """An uninitialised (or all-white) array of ``shape`` in the reused block buffer, grown as needed."""
        size = shape[0] * shape[1] * shape[2]
        if self.buffer.size < size:
            self.buffer = np.empty(size, np.uint8)
        pixels = self.buffer[:size].reshape(shape)
        if white:
            pixels.fill(255)
        return pixels


def _sticks_out(level: TiledLevel, lx: int, ly: int, width: int, height: int) -> bool:
    """True when part of the window lies outside the level."""
    return level.clip(lx, ly, width, height) != (lx, ly, lx + width, ly + height)


def _paste(
    level: TiledLevel,
    index: int,
    tile: np.ndarray | None,
    target: np.ndarray,
    origin: tuple[int, int],
    area: Sequence[int],
) -> None:
    """Copy stored tile ``index`` (``None``: sparse, white) into ``target`` (whose pixel (0, 0) is level
    px ``origin``) where it overlaps ``area`` = ``(x0, y0, x1, y1)`` level px (within the level)."""
    tw, th = level.tile_width, level.tile_height
    ty, tx = divmod(index, level.columns)
    ax0, ay0, ax1, ay1 = level.clip(tx * tw, ty * th, tw, th)  # the stored tile inside the level
    ax0, ay0, ax1, ay1 = max(ax0, area[0]), max(ay0, area[1]), min(ax1, area[2]), min(ay1, area[3])
    part = target[ay0 - origin[1] : ay1 - origin[1], ax0 - origin[0] : ax1 - origin[0]]
    part[...] = 255 if tile is None else tile[ay0 - ty * th : ay1 - ty * th, ax0 - tx * tw : ax1 - tx * tw, :3]


def _extents(level: TiledLevel, windows: Sequence[Window]) -> dict[int, list[int]]:
    """For each stored tile the windows touch, ``[x0, y0, x1, y1]``: the bounding box of those windows."""
    extents: dict[int, list[int]] = {}
    for lx, ly, width, height in windows:
        for index in level.tile_indices(lx, ly, width, height):
            e = extents.setdefault(index, [lx, ly, lx + width, ly + height])
            e[0], e[1], e[2], e[3] = min(e[0], lx), min(e[1], ly), max(e[2], lx + width), max(e[3], ly + height)
    return extents


def _users(level: TiledLevel, windows: Sequence[Window]) -> dict[int, list[int]]:
    """For each stored tile the windows touch, the positions of those windows."""
    users: dict[int, list[int]] = {}
    for j, window in enumerate(windows):
        for index in level.tile_indices(*window):
            users.setdefault(index, []).append(j)
    return users


def read_window(level: TiledLevel, key: int, window: Window, cache: dict | None, fetch: Fetch) -> np.ndarray:
    """RGB uint8 ``(height, width, 3)`` of the level at ``window``; outside and sparse tiles are white.

    ``cache`` keeps decoded tiles (keyed ``(key, index)``) across calls; ``None`` = this call only.
    """
    lx, ly, width, height = window
    cache = {} if cache is None else cache
    x0, y0, x1, y1 = level.clip(lx, ly, width, height)
    inside = (x0, y0, x1, y1) == (lx, ly, lx + width, ly + height)
    out = np.empty((height, width, 3), np.uint8) if inside else np.full((height, width, 3), 255, np.uint8)
    indices = level.tile_indices(lx, ly, width, height)
    load_tiles(level, key, indices, cache, fetch)
    tw, th = level.tile_width, level.tile_height
    for index in indices:
        ty, tx = divmod(index, level.columns)
        ax0, ay0 = max(x0, tx * tw), max(y0, ty * th)  # this tile's part of the window, level px
        ax1, ay1 = min(x1, (tx + 1) * tw), min(y1, (ty + 1) * th)
        target = out[ay0 - ly : ay1 - ly, ax0 - lx : ax1 - lx]
        tile = cache.get((key, index))
        if tile is None:  # sparse tile: transparent in OpenSlide, white here
            target[...] = 255
        else:
            target[...] = tile[ay0 - ty * th : ay1 - ty * th, ax0 - tx * tw : ax1 - tx * tw, :3]
    return out
