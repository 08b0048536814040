"""Tile grids at an exact physical resolution, and efficient tile reads.

Units: ``x``, ``y`` are the top-left of a tile in **level-0 pixels** (int); ``size_level0``
is its side in level-0 pixels (float, ``tile_px * target_mpp / slide.mpp``); ``target_mpp``
is µm/px; ``tile_px`` is the side of the produced tile in pixels.

Reading (:func:`read_tiles`): the pyramid level is the one with the largest downsample
whose µm/px is still ≤ ``target_mpp`` (1 % tolerance, so a level at 0.5004 µm/px serves a
0.5 µm/px target). From that level ``read_px = round(tile_px * target_mpp / level_mpp)``
pixels are read at level position ``round(x / downsample)`` and resized to ``tile_px`` by
:func:`resize_tile`: area averaging when shrinking (each output pixel is the mean of the
area it covers, as a scanner at the target µm/px would integrate; PIL ``reduce(k)`` for an
integer factor k, PIL ``BOX`` otherwise), bilinear when enlarging (slide coarser than the
target). Never rounded to magnification buckets.

Where the level is read by decoding the TIFF's own JPEG tiles (:meth:`Slide.has_direct_reads`),
nearby tiles are grouped into blocks of ``BLOCK_PX`` level pixels per side and read through
one :meth:`Slide.block_loader` per call: each JPEG tile is fetched (with the first block
that needs it, one batch per block: for a remote slide one coalesced, concurrent batch of
byte-range requests, fetched while the previous block is decoded, which hides latency) and
decoded once per call however the tiles overlap it or the blocks split it; a decoded JPEG
tile is kept until the last block that needs it. Tiles read at their own size are copied
straight from the decoded JPEG tiles into the output. Tiles to resize are cut (as views)
from one array per block into which the block's JPEG tiles are copied once; when halving
tiles at even level positions, each JPEG tile is halved as it is decoded into a half-size
block instead (each 2 x 2 cell lies in one JPEG tile, so the pixels are the same). No
pixel outside a touched JPEG tile is decoded and memory stays bounded: one block array
(≈ 20 MB) plus the decoded JPEG tiles shared with blocks still to come (in row-major block
order about one row of JPEG tiles across the chunk's width). Through OpenSlide, tiles are
read one by one: OpenSlide block reads measured 0.8-1.0x the speed of per-tile reads here
(its RGBA conversion, not decoding, is the cost; see ``docs/bench/tiling.md``). Either way
a tile's pixels do not depend on which other tiles are read with it.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import asdict, dataclass, field

import cv2
import numpy as np
import pyarrow as pa
from PIL import Image

from pathray.tiling.tissue import TissueConfig, TissueMask, detect_tissue
from pathray.wsi.slide import Slide
from pathray.wsi.tifftiles import BlockLoader

# a reader is one core's worth of work in the resource plan (pathray.job.resources); OpenCV's own
# thread pool would oversubscribe it, and the encoder sharing a process with the in-process runner
cv2.setNumThreads(1)

BLOCK_PX = 2048  # side of a block grouping cell, level pixels
LEVEL_TOLERANCE = 0.01  # relative: a level up to 1 % coarser than the target still qualifies

TILE_SCHEMA = pa.schema(
    [
        ("slide_id", pa.string()),
        ("tile_index", pa.int64()),
        ("x", pa.int64()),
        ("y", pa.int64()),
        ("size_level0", pa.float64()),
        ("target_mpp", pa.float64()),
        ("tile_px", pa.int32()),
        ("tissue_fraction", pa.float32()),
    ]
)


@dataclass(frozen=True)
class TilingConfig:
    """How tiles are cut. ``stride_px`` is in target-resolution pixels (``None`` = ``tile_px``,
    no overlap); ``min_tissue_fraction`` in [0, 1] (0 keeps every tile of the grid)."""

    tile_px: int = 224
    target_mpp: float = 0.5
    stride_px: int | None = None
    min_tissue_fraction: float = 0.25
    tissue: TissueConfig = field(default_factory=TissueConfig)

    def __post_init__(self) -> None:
        if self.tile_px <= 0 or (self.stride_px is not None and self.stride_px <= 0):
            raise ValueError("tile_px and stride_px must be positive")
        if not (self.target_mpp > 0 and math.isfinite(self.target_mpp)):
            raise ValueError("target_mpp must be a positive number of µm/px")
        if not 0.0 <= self.min_tissue_fraction <= 1.0:
            raise ValueError("min_tissue_fraction must be in [0, 1]")

    @property
    def stride(self) -> int:
        return self.tile_px if self.stride_px is None else self.stride_px

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def fingerprint(self) -> str:
        """Stable 16-hex-digit hash of every field (same config → same string, any process)."""
        payload = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class TilingGroup:
    """One tiling of a run and the models embedded at it (``None``: every model of the run).
    A run whose models were trained on different tiles has one group per (tile px, µm/px)."""

    tiling: TilingConfig
    models: tuple[str, ...] | None = None

    def takes(self, model: str) -> bool:
        return self.models is None or model in self.models


def as_groups(tiling: TilingConfig | tuple[TilingGroup, ...] | list[TilingGroup]) -> tuple[TilingGroup, ...]:
    """``tiling`` as tiling groups: a single :class:`TilingConfig` is one group for every model."""
    return (TilingGroup(tiling),) if isinstance(tiling, TilingConfig) else tuple(tiling)


@dataclass
class TileGrid:
    """One slide's kept tiles, in row-major grid order; ``tile_index`` is 0..N-1."""

    slide_id: str
    tile_index: np.ndarray  # int64
    x: np.ndarray  # int64, level-0 px
    y: np.ndarray  # int64, level-0 px
    size_level0: float  # level-0 px
    tissue_fraction: np.ndarray  # float32 in [0, 1]
    target_mpp: float  # µm/px
    tile_px: int
    level: int  # pyramid level read_tiles uses
    read_px: int  # level pixels read per tile before resizing to tile_px
    grid_shape: tuple[int, int]  # (columns, rows) of the full grid before tissue filtering
    tissue: TissueMask

    def __len__(self) -> int:
        return int(self.tile_index.size)

    @property
    def no_tissue(self) -> bool:
        return len(self) == 0

    def to_table(self) -> pa.Table:
        """The tile records as a table with :data:`TILE_SCHEMA`."""
        n = len(self)
        return pa.table(
            {
                "slide_id": pa.array([self.slide_id] * n, pa.string()),
                "tile_index": pa.array(self.tile_index, pa.int64()),
                "x": pa.array(self.x, pa.int64()),
                "y": pa.array(self.y, pa.int64()),
                "size_level0": pa.array(np.full(n, self.size_level0), pa.float64()),
                "target_mpp": pa.array(np.full(n, self.target_mpp), pa.float64()),
                "tile_px": pa.array(np.full(n, self.tile_px, dtype=np.int32), pa.int32()),
                "tissue_fraction": pa.array(self.tissue_fraction, pa.float32()),
            },
            schema=TILE_SCHEMA,
        )


def read_geometry(slide: Slide, config: TilingConfig) -> tuple[int, int]:
    """``(level, read_px)``: the pyramid level to read and the level pixels per tile side."""
    limit = config.target_mpp * (1 + LEVEL_TOLERANCE)
    candidates = [i for i in range(slide.level_count) if slide.level_mpp(i) <= limit]
    level = max(candidates, key=lambda i: slide.level_downsamples[i]) if candidates else 0
    read_px = max(1, round(config.tile_px * config.target_mpp / slide.level_mpp(level)))
    return level, read_px


def grid_shape(width: int, height: int, size_level0: float, step_level0: float) -> tuple[int, int]:
    """``(columns, rows)`` of the grid of tiles of side ``size_level0`` placed every
    ``step_level0`` level-0 px from (0, 0) that lie entirely inside ``width`` x ``height``."""
    cols = int(math.floor((width - size_level0) / step_level0 + 1e-9)) + 1 if width >= size_level0 else 0
    rows = int(math.floor((height - size_level0) / step_level0 + 1e-9)) + 1 if height >= size_level0 else 0
    return cols, rows


def plan_tiles(slide: Slide, slide_id: str, config: TilingConfig, tissue: TissueMask | None = None) -> TileGrid:
    """Grid the whole slide at ``config.target_mpp`` and keep tiles with enough tissue.

    The grid holds every tile that fits entirely inside level 0, starting at (0, 0), with
    stride ``stride * target_mpp / slide.mpp`` level-0 px (positions rounded to int).
    ``tissue``: the slide's mask for ``config.tissue`` when already detected (several tilings
    of one slide share it), else detected here.
    """
    size = config.tile_px * config.target_mpp / slide.mpp
    step = config.stride * config.target_mpp / slide.mpp
    cols, rows = grid_shape(*slide.dimensions, size, step)
    gx = np.round(np.arange(cols) * step).astype(np.int64)
    gy = np.round(np.arange(rows) * step).astype(np.int64)
    yy, xx = np.meshgrid(gy, gx, indexing="ij")
    xx, yy = xx.ravel(), yy.ravel()
    tissue = tissue if tissue is not None else detect_tissue(slide, config.tissue)
    fraction = tissue.fraction(xx, yy, size)
    keep = fraction >= config.min_tissue_fraction if config.min_tissue_fraction > 0 else np.ones(xx.size, bool)
    if tissue.is_empty and config.min_tissue_fraction > 0:
        keep[:] = False
    level, read_px = read_geometry(slide, config)
    n = int(keep.sum())
    return TileGrid(
        slide_id=slide_id,
        tile_index=np.arange(n, dtype=np.int64),
        x=xx[keep],
        y=yy[keep],
        size_level0=float(size),
        tissue_fraction=fraction[keep].astype(np.float32),
        target_mpp=config.target_mpp,
        tile_px=config.tile_px,
        level=level,
        read_px=read_px,
        grid_shape=(cols, rows),
        tissue=tissue,
    )


def read_tiles(slide: Slide, config: TilingConfig, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Tiles at level-0 ``(x, y)`` as uint8 ``(N, tile_px, tile_px, 3)``, in input order.

    A pure function of (slide, config, coordinates): the same coordinates give the same
    pixels whatever other tiles are requested with them.
    """
    x = np.asarray(x, dtype=np.int64).ravel()
    y = np.asarray(y, dtype=np.int64).ravel()
    out = np.empty((x.size, config.tile_px, config.tile_px, 3), dtype=np.uint8)
    if x.size == 0:
        return out
    level, n = read_geometry(slide, config)
    ds = slide.level_downsamples[level]
    lx, ly = np.round(x / ds).astype(np.int64), np.round(y / ds).astype(np.int64)

    if not slide.has_direct_reads(level):  # OpenSlide: per-tile reads are the fastest
        for i in range(x.size):
            out[i] = resize_tile(slide.read_region(round(lx[i] * ds), round(ly[i] * ds), level, n, n), config.tile_px)
        return out
    blocks = _blocks(lx, ly, n)
    loader = slide.block_loader(level, [[(int(lx[i]), int(ly[i]), n, n) for i in members] for members in blocks])
    with closing(_fetched(loader, len(blocks), ahead=slide.local_path is None)) as fetched:  # helper ends on errors too
        for (k, members), blobs in zip(enumerate(blocks), fetched):
            if n == config.tile_px:  # no resize: each tile is copied once, straight from the decoded JPEG tiles
                loader.load_into(k, [out[i] for i in members], blobs)
                continue
            block = loader.load(k, blobs, _halve if n == 2 * config.tile_px and loader.halvable(k) else None)
            for i in members:  # halved at even positions already (block.scale 2), else resized here
                out[i] = resize_tile(block.window(int(lx[i]), int(ly[i]), n, n), config.tile_px)
    return out


def _fetched(loader: BlockLoader, count: int, ahead: bool) -> Iterator[dict[int, bytes]]:
    """The encoded stored tiles of blocks ``0 .. count-1`` (:meth:`BlockLoader.fetch`), in order.

    ``ahead`` (a remote slide): block k+1's bytes are fetched on a helper thread while block
    k is decoded and cut, which hides the storage latency. A local file is read in line: a
    helper thread would only add hand-offs (measured 2-3 % more CPU per tile).
    """
    if not ahead:
        yield from (loader.fetch(k) for k in range(count))
        return
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(loader.fetch, 0)
        for k in range(count):
            blobs = pending.result()
            if k + 1 < count:
                pending = pool.submit(loader.fetch, k + 1)
            yield blobs


def _halve(region: np.ndarray) -> np.ndarray:
    """Exact 2 x 2 area mean of an even-sized RGB uint8 array (``(a + b + c + d + 2) >> 2``)."""
    return cv2.resize(region, (region.shape[1] // 2, region.shape[0] // 2), interpolation=cv2.INTER_AREA)


def _blocks(lx: np.ndarray, ly: np.ndarray, n: int) -> list[np.ndarray]:
    """Group tile indices by the ``BLOCK_PX`` cell holding their top-left (row-major)."""
    cell = max(BLOCK_PX, n)
    keys = (ly // cell) * (int(lx.max()) // cell + 1) + lx // cell
    order = np.argsort(keys, kind="stable")
    splits = np.flatnonzero(np.diff(keys[order])) + 1
    return np.split(order, splits)


def resize_tile(region: np.ndarray, tile_px: int) -> np.ndarray:
    """Resize a square RGB uint8 region to ``tile_px`` (area average down, bilinear up).

    Halving (the common 0.25 -> 0.5 µm/px case) is OpenCV's integer area resize, which
    computes ``(a + b + c + d + 2) >> 2`` per 2x2 block and channel, exactly what PIL's
    ``reduce(2)`` computes (tests compare them), several times faster and without
    copying ``region`` (any view with contiguous rows).
    """
    n = region.shape[0]
    if n == tile_px:
        return region
    if n == 2 * tile_px:
        return _halve(region)
    image = Image.fromarray(np.ascontiguousarray(region))
    if n > tile_px and n % tile_px == 0:
        return np.asarray(image.reduce(n // tile_px))
    resample = Image.Resampling.BOX if n > tile_px else Image.Resampling.BILINEAR
    return np.asarray(image.resize((tile_px, tile_px), resample))
