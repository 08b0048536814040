"""DICOM whole-slide images (e.g. IDC's ``s3://idc-open-data/<series uuid>/``) read in place.

A series is a prefix (local directory or ``s3://bucket/<uuid>/``) holding one ``.dcm`` per
instance: one per pyramid level (ImageType ``VOLUME``) plus label/overview/thumbnail images,
which are ignored. Nothing is staged: :func:`open_dicom_series` reads each instance's header
and frame offsets by byte range, and :meth:`DicomWsiBackend.read_level` fetches only the
frames (tiles) a region needs, all through :func:`fetch_ranges` (the one place bytes are
pulled, coalescing adjacent ranges and counting bytes/requests).

Per instance:

* header: the first ``HEAD_BYTES`` (extended until the Pixel Data element and its Basic
  Offset Table are inside), parsed with pydicom up to Pixel Data;
* frame positions: the Extended Offset Table when present, else the Basic Offset Table
  (a frame's bytes run to the next offset and are parsed as items, so several fragments per
  frame are joined), else (empty BOT) the fragment item headers, walked by 8-byte range
  reads only as far as the highest frame a read needs (one request per frame walked, the
  cost of a file written without any table; one fragment per frame assumed);
* layout: ``TILED_FULL`` (frames row-major over the total pixel matrix) or ``TILED_SPARSE``
  (each frame's position from PerFrameFunctionalGroupsSequence; tiles without a frame are
  white); one focal plane and optical path. Concatenated instances (one level split over
  several files) and other layouts are refused with a clear error.

Decoding (imagecodecs): JPEG Baseline frames are decoded with the JPEG colour space forced
from PhotometricInterpretation (``YBR_FULL_422`` → YCbCr→RGB, ``RGB`` → none), as OpenSlide 4
does; JPEG 2000 (``RGB`` photometric, or ``YBR_ICT`` whose transform is in the codestream)
and uncompressed RGB frames are taken as decoded. µm/px: ``openslide.mpp-x`` =
PixelSpacing[1] x 1000 (column spacing, mm → µm), ``openslide.mpp-y`` = PixelSpacing[0] x 1000.
"""

from __future__ import annotations

import io
import itertools
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pathray import rangeio
from pathray.errors import SlideUnreadableError
from pathray.fs import split_uri
from pathray.rangeio import FetchStats

WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
HEAD_BYTES = 16 * 1024  # first read of each instance; extended while the header + BOT need more
PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"
ITEM_TAG = 0xE000FFFE  # (FFFE,E000) read as little-endian uint32
SEQ_DELIMITER = 0xE0DDFFFE
COALESCE_GAP_BYTES = 0  # ranges of one file at most this many bytes apart are fetched as one request
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG2000 = ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91")
UNCOMPRESSED = ("1.2.840.10008.1.2.1",)  # Explicit VR Little Endian
_PROPERTY_TAGS = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SeriesDescription", "Manufacturer",
                  "ManufacturerModelName", "ContainerIdentifier")


class DicomWsiError(SlideUnreadableError):
    """The series is not a DICOM WSI this reader handles (message says why); recorded per
    slide as ``slide_unreadable``."""


def fetch_ranges(fs: Any, ranges: list[tuple[str, int, int]], stats: FetchStats) -> list[bytes]:
    """Bytes ``[start, end)`` of each ``(path, start, end)``, in order: per file, one batch of
    concurrent range requests through :func:`pathray.rangeio.fetch_ranges` (ranges that touch
    or overlap, gap ≤ :data:`COALESCE_GAP_BYTES`, merged first), credited to ``stats``."""
    out: list[bytes] = [b""] * len(ranges)
    by_path: dict[str, list[int]] = {}
    for i, (path, _, _) in enumerate(ranges):
        by_path.setdefault(path, []).append(i)
    for path, indices in by_path.items():
        spans = [(ranges[i][1], ranges[i][2] - ranges[i][1]) for i in indices]
        for i, blob in zip(indices, rangeio.fetch_ranges(fs, path, spans, gap_bytes=COALESCE_GAP_BYTES, stats=stats)):
            out[i] = blob
    return out


@dataclass
class Instance:
    """One VOLUME instance = one pyramid level, with where each frame's bytes lie."""

    path: str
    width: int  # TotalPixelMatrixColumns, level px
    height: int
    tile_w: int  # Columns
    tile_h: int  # Rows
    syntax: str
    photometric: str
    spacing_mm: tuple[float, float]  # PixelSpacing (row, column)
    frame_ranges: list[tuple[int, int]] = field(default_factory=list)  # file byte [start, end) of each frame's items
    dataset: Any = None
    sparse_frames: dict[tuple[int, int], int] | None = None  # TILED_SPARSE: (column, row) -> frame; absent = white
    walk_from: int | None = None  # no offset table: file offset of the next fragment item not yet walked
    frame_count: int = 0

    @property
    def tiles_across(self) -> int:
        return -(-self.width // self.tile_w)

    def frame_index(self, column: int, row: int) -> int | None:
        """Frame number of tile ``(column, row)``, or ``None`` where a sparse level has none."""
        if self.sparse_frames is None:
            return row * self.tiles_across + column
        return self.sparse_frames.get((column, row))


def _read_header(fs: Any, path: str, size: int, head: bytes, stats: FetchStats) -> tuple[Any, bytes, int]:
    """``(dataset, head bytes, offset of the Pixel Data element)``: ``head`` (the file's first
    bytes) is extended (doubled, or to the end of the Basic Offset Table once its length is
    known) until the element header, and for encapsulated pixel data its BOT, are inside."""
    import pydicom

    while True:
        buf = io.BytesIO(head)
        try:
            ds = pydicom.dcmread(buf, stop_before_pixels=True)
            pos = buf.tell()
        except Exception:  # noqa: BLE001 - a truncated head: read more
            ds, pos = None, len(head)
        if ds is not None and head[pos : pos + 4] == PIXEL_DATA_TAG and pos + 12 <= len(head):
            if struct.unpack_from("<I", head, pos + 8)[0] != 0xFFFFFFFF:
                return ds, head, pos  # native (uncompressed) pixel data
            if pos + 20 <= len(head) and pos + 20 + struct.unpack_from("<I", head, pos + 16)[0] <= len(head):
                return ds, head, pos
        if len(head) >= size:
            raise DicomWsiError(f"{path}: no Pixel Data element found")
        want = 2 * len(head)
        if ds is not None and head[pos : pos + 4] == PIXEL_DATA_TAG and pos + 20 <= len(head):
            want = pos + 20 + struct.unpack_from("<I", head, pos + 16)[0]  # exactly the rest of the BOT
        head += fetch_ranges(fs, [(path, len(head), min(want, size))], stats)[0]


def _frame_ranges(fs: Any, inst: Instance, head: bytes, pos: int, size: int, stats: FetchStats) -> list[tuple[int, int]]:
    """File byte ranges ``[start, end)`` of each frame's fragment items (tags included)."""
    ds = inst.dataset
    n = int(ds.get("NumberOfFrames", 1))
    bot_len = struct.unpack_from("<I", head, pos + 16)[0]
    first = pos + 20 + bot_len  # first fragment's item tag
    if "ExtendedOffsetTable" in ds:
        offsets = np.frombuffer(ds.ExtendedOffsetTable, "<u8")
        lengths = np.frombuffer(ds.ExtendedOffsetTableLengths, "<u8")
        return [(first + int(o), first + int(o) + 8 + int(ln)) for o, ln in zip(offsets, lengths)]
    if bot_len:
        offsets = list(struct.unpack_from(f"<{bot_len // 4}I", head, pos + 20)) + [None]
        return [(first + a, first + b if b is not None else size) for a, b in itertools.pairwise(offsets)]
    inst.walk_from, inst.frame_count = first, n  # no table: items are walked when frames are needed
    return []


def _walk_items(fs: Any, inst: Instance, upto: int, stats: FetchStats) -> None:
    """Extend ``inst.frame_ranges`` past frame ``upto`` by reading fragment item headers (8 bytes,
    one request each) from where the last walk stopped; one fragment per frame is assumed."""
    while len(inst.frame_ranges) <= upto < inst.frame_count:
        at = inst.walk_from
        tag, length = struct.unpack("<II", fetch_ranges(fs, [(inst.path, at, at + 8)], stats)[0])
        if tag != ITEM_TAG:
            raise DicomWsiError(f"{inst.path}: expected a fragment item at byte {at}")
        inst.frame_ranges.append((at, at + 8 + length))
        inst.walk_from = at + 8 + length


def _fragments(blob: bytes) -> bytes:
    """The concatenated values of the items in ``blob`` (stops at a sequence delimiter)."""
    parts, at = [], 0
    while at + 8 <= len(blob):
        tag, length = struct.unpack_from("<II", blob, at)
        if tag == SEQ_DELIMITER:
            break
        if tag != ITEM_TAG:
            raise DicomWsiError(f"bad fragment item tag {tag:#010x}")
        parts.append(blob[at + 8 : at + 8 + length])
        at += 8 + length
    return b"".join(parts)


def _instance(fs: Any, path: str, size: int, head: bytes, stats: FetchStats) -> Instance | None:
    """The VOLUME instance at ``path`` (``head``: its first bytes), or ``None`` for any other
    image type or SOP class (label, overview, thumbnail...)."""
    ds, head, pos = _read_header(fs, path, size, head, stats)
    image_type = [str(v).upper() for v in ds.get("ImageType", [])]
    if str(ds.get("SOPClassUID", "")) != WSI_SOP_CLASS or len(image_type) < 3 or image_type[2] != "VOLUME":
        return None
    _check_layout(path, ds)
    spacing = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    inst = Instance(path, int(ds.TotalPixelMatrixColumns), int(ds.TotalPixelMatrixRows), int(ds.Columns), int(ds.Rows),
                    str(ds.file_meta.TransferSyntaxUID), str(ds.PhotometricInterpretation),
                    (float(spacing[0]), float(spacing[1])), dataset=ds)
    if str(ds.get("DimensionOrganizationType", "TILED_FULL")) == "TILED_SPARSE":
        inst.sparse_frames = _sparse_positions(ds)
    if inst.syntax in UNCOMPRESSED:
        frame_bytes = inst.tile_w * inst.tile_h * 3
        inst.frame_ranges = [(pos + 12 + i * frame_bytes, pos + 12 + (i + 1) * frame_bytes)
                             for i in range(int(ds.get("NumberOfFrames", 1)))]
    else:
        inst.frame_ranges = _frame_ranges(fs, inst, head, pos, size, stats)
    return inst


def _sparse_positions(ds: Any) -> dict[tuple[int, int], int]:
    """``(column, row) -> frame`` from each frame's PlanePositionSlideSequence (1-based pixel positions)."""
    positions = {}
    for index, group in enumerate(ds.PerFrameFunctionalGroupsSequence):
        plane = group.PlanePositionSlideSequence[0]
        column = (int(plane.ColumnPositionInTotalImagePixelMatrix) - 1) // int(ds.Columns)
        row = (int(plane.RowPositionInTotalImagePixelMatrix) - 1) // int(ds.Rows)
        positions[(column, row)] = index
    return positions


def _check_layout(path: str, ds: Any) -> None:
    organisation = str(ds.get("DimensionOrganizationType", "TILED_FULL"))
    if organisation not in ("TILED_FULL", "TILED_SPARSE"):
        raise DicomWsiError(f"{path}: DimensionOrganizationType {organisation} is not supported")
    if int(ds.get("TotalPixelMatrixFocalPlanes", 1)) != 1 or int(ds.get("NumberOfOpticalPaths", 1)) != 1:
        raise DicomWsiError(f"{path}: several focal planes or optical paths are not supported")
    if int(ds.SamplesPerPixel) != 3 or int(ds.BitsAllocated) != 8:
        raise DicomWsiError(f"{path}: only 8-bit RGB/YBR images are supported")
    syntax = str(ds.file_meta.TransferSyntaxUID)
    if syntax not in (JPEG_BASELINE, *JPEG2000, *UNCOMPRESSED):
        raise DicomWsiError(f"{path}: transfer syntax {syntax} is not supported")


def decode_frame(data: bytes, inst: Instance) -> np.ndarray:
    """One frame as RGB uint8 ``(tile_h, tile_w, 3)`` (see the module doc for colour)."""
    import imagecodecs

    if inst.syntax == JPEG_BASELINE:
        colorspace = "RGB" if inst.photometric == "RGB" else "YCbCr"
        return imagecodecs.jpeg8_decode(data, colorspace=colorspace, outcolorspace="RGB")
    if inst.syntax in JPEG2000:
        return imagecodecs.jpeg2k_decode(data)
    return np.frombuffer(data, np.uint8).reshape(inst.tile_h, inst.tile_w, 3)


class DicomWsiBackend:
    """A DICOM WSI series as a slide backend (``vendor``, ``level_dimensions``,
    ``level_downsamples``, ``properties``, ``read_level``, ``close``). Levels are the VOLUME
    instances, largest first; downsamples are OpenSlide's (mean of the width and height ratios)."""

    vendor = "dicom"

    def __init__(self, uri: str, fs: Any, levels: list[Instance], stats: FetchStats, series_bytes: int):
        self.uri = uri
        self._fs = fs
        self._levels = levels
        self.stats = stats
        self.series_bytes = series_bytes  # all instances of the prefix, bytes
        base = levels[0]
        self.level_dimensions = tuple((i.width, i.height) for i in levels)
        self.level_downsamples = tuple((base.width / i.width + base.height / i.height) / 2 for i in levels)
        self.properties = _properties(base)

    def read_level(self, level: int, lx: int, ly: int, width: int, height: int, cache: dict | None = None) -> np.ndarray:
        """RGB uint8 ``(height, width, 3)`` of ``level`` pixels from ``(lx, ly)``; pixels outside the
        level are white. Frames are fetched in one batch of ranges; ``cache`` (any dict, shared
        across calls) keeps decoded frames keyed ``(level, column, row)``."""
        inst = self._levels[level]
        out = np.full((height, width, 3), 255, np.uint8)
        x0, y0 = max(lx, 0), max(ly, 0)
        x1, y1 = min(lx + width, inst.width), min(ly + height, inst.height)
        if x0 >= x1 or y0 >= y1:
            return out
        cells = [(c, r) for r in range(y0 // inst.tile_h, (y1 - 1) // inst.tile_h + 1)
                 for c in range(x0 // inst.tile_w, (x1 - 1) // inst.tile_w + 1)]
        frames = self._frames(level, inst, cells, {} if cache is None else cache)
        for (c, r), tile in zip(cells, frames):
            tx, ty = c * inst.tile_w, r * inst.tile_h
            sx0, sy0 = max(x0, tx), max(y0, ty)
            sx1, sy1 = min(x1, tx + inst.tile_w), min(y1, ty + inst.tile_h)
            out[sy0 - ly : sy1 - ly, sx0 - lx : sx1 - lx] = tile[sy0 - ty : sy1 - ty, sx0 - tx : sx1 - tx]
        return out

    def _frames(self, level: int, inst: Instance, cells: list[tuple[int, int]], cache: dict) -> list[np.ndarray]:
        missing = [cell for cell in cells if (level, *cell) not in cache]
        for cell in [cell for cell in missing if inst.frame_index(*cell) is None]:  # sparse: no frame, white
            cache[(level, *cell)] = np.full((inst.tile_h, inst.tile_w, 3), 255, np.uint8)
            missing.remove(cell)
        indices = [inst.frame_index(c, r) for c, r in missing]
        if inst.walk_from is not None and indices:
            _walk_items(self._fs, inst, max(indices), self.stats)
        ranges = [(inst.path, *inst.frame_ranges[i]) for i in indices]
        encapsulated = inst.syntax not in UNCOMPRESSED
        for cell, blob in zip(missing, fetch_ranges(self._fs, ranges, self.stats) if ranges else []):
            cache[(level, *cell)] = decode_frame(_fragments(blob) if encapsulated else blob, inst)
        return [cache[(level, *cell)] for cell in cells]

    def close(self) -> None:
        self._levels = []


def _properties(base: Instance) -> dict[str, str]:
    """OpenSlide-style properties of a series from its level-0 instance."""
    ds = base.dataset
    props = {
        "openslide.vendor": "dicom",
        "openslide.mpp-x": repr(base.spacing_mm[1] * 1000.0),
        "openslide.mpp-y": repr(base.spacing_mm[0] * 1000.0),
        "dicom.TransferSyntaxUID": base.syntax,
        "dicom.PhotometricInterpretation": base.photometric,
    }
    for tag in _PROPERTY_TAGS:
        if tag in ds:
            props[f"dicom.{tag}"] = str(ds.get(tag))
    return props


def open_dicom_series(uri: str, storage_options: dict | None = None) -> DicomWsiBackend:
    """Open the DICOM WSI series under ``uri`` (local directory or ``s3://bucket/<uuid>/``) in place.

    Lists the prefix, fetches every instance's head in one batch of range requests, keeps the
    VOLUME instances of one SeriesInstanceUID as levels. ``storage_options`` go to s3fs
    (``{"anon": True}`` for public buckets such as ``idc-open-data``). Raises
    :class:`DicomWsiError` when no level is found or the layout is unsupported."""
    fs, root = split_uri(uri.rstrip("/") + "/", storage_options)
    entries = [e for e in fs.ls(root.rstrip("/"), detail=True) if e.get("type") == "file" and e["size"] > 132]
    if not entries:
        raise DicomWsiError(f"{uri}: no DICOM instances under this prefix")
    stats = FetchStats()
    heads = fetch_ranges(fs, [(e["name"], 0, min(HEAD_BYTES, e["size"])) for e in entries], stats)
    levels = [inst for e, head in zip(entries, heads)
              if head[128:132] == b"DICM" and (inst := _instance(fs, e["name"], e["size"], head, stats)) is not None]
    if not levels:
        raise DicomWsiError(f"{uri}: no VOLUME (pyramid level) instance of a whole-slide image")
    series = {str(i.dataset.SeriesInstanceUID) for i in levels}
    sizes = [(i.width, i.height) for i in levels]
    if len(series) > 1 or len(set(sizes)) != len(sizes):
        raise DicomWsiError(f"{uri}: several series or concatenated levels under one prefix are not supported")
    levels.sort(key=lambda i: -i.width)
    return DicomWsiBackend(uri, fs, levels, stats, sum(e["size"] for e in entries))
