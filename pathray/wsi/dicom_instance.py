"""Where a DICOM WSI level's frames lie in its file, read by byte range.

Per instance (see :mod:`pathray.wsi.dicom` for the whole reader):

* skip or keep, from the first read alone (``HEAD_BYTES``): only a VOLUME instance of the
  WSI SOP class is a level (:func:`read_instance` returns ``None`` for the rest);
* header: the first read extended until the Pixel Data element and its Basic Offset Table
  are inside, parsed with pydicom up to Pixel Data;
* frame positions: the Extended Offset Table, else the Basic Offset Table, else a
  dual-personality DICOM-TIFF file's tile offsets, else the fragment items, walked in
  ``WALK_WINDOW_BYTES`` windows only as far as the highest frame a read needs
  (:meth:`Instance.walk`);
* layout: ``TILED_FULL`` or ``TILED_SPARSE``, one focal plane and optical path.
"""

from __future__ import annotations

import io
import itertools
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pathray.wsi import rangeio
from pathray.wsi.dicom_frames import (
    ITEM_TAG,
    JPEG2000,
    JPEG_BASELINE,
    SEQ_DELIMITER,
    UNCOMPRESSED,
    DicomLevel,
    DicomWsiError,
)
from pathray.wsi.rangeio import FetchStats, RecentRanges
from pathray.wsi.tifftiles import Window

WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
HEAD_BYTES = 16 * 1024  # first read of each instance; extended while the header + BOT need more
WALK_WINDOW_BYTES = 1024**2  # no offset table: fragment item headers are read in windows this long
TIFF_HEADERS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # a dual-personality DICOM-TIFF preamble
FRAME_STARTS = (b"\xff\xd8", b"\xff\x4f")  # a fragment starting a frame: JPEG SOI, JPEG 2000 SOC
PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"
COALESCE_GAP_BYTES = 64  # ranges of one file at most this many bytes apart are fetched as one request (frames
# located by DICOM-TIFF offsets are bare codestreams, 8 bytes of item tag apart)


def fetch_file_ranges(fs: Any, ranges: list[tuple[str, int, int]], stats: FetchStats) -> list[bytes]:
    """Bytes ``[start, end)`` of each ``(path, start, end)``, in order: per file, one batch of
    concurrent range requests through :func:`pathray.wsi.rangeio.fetch_ranges` (ranges that touch
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
    spacing_mm: tuple[float, float] | None  # PixelSpacing (row, column); None: not in the header
    frame_ranges: list[tuple[int, int]] = field(default_factory=list)  # file byte [start, end) of each frame's items
    dataset: Any = None
    sparse_frames: dict[tuple[int, int], int] | None = None  # TILED_SPARSE: (column, row) -> frame; absent = white
    walk_from: int | None = None  # no offset table: file offset of the next fragment item not yet walked
    frame_count: int = 0
    size: int = 0  # file bytes
    recent: Any = None  # RecentRanges over the file: every frame and walk window fetch
    walk_done: bool = False  # the walk reached the sequence delimiter
    items: bool = True  # frame ranges hold fragment items; False: bare codestreams (dual-personality TIFF offsets)
    _window: tuple[int, bytes] = (0, b"")  # the walk's current window of file bytes
    _level: DicomLevel | None = None  # built for the frames located so far

    @property
    def tiles_across(self) -> int:
        return -(-self.width // self.tile_w)

    def frame_index(self, column: int, row: int) -> int | None:
        """Frame number of tile ``(column, row)``, or ``None`` where a sparse level has none."""
        if self.sparse_frames is None:
            return row * self.tiles_across + column
        return self.sparse_frames.get((column, row))

    def level(self, windows: Iterable[Window] = ()) -> DicomLevel:
        """The level with every frame the ``windows`` touch located (walking items if needed)."""
        level = self._level or self._build()
        if self.walk_from is not None and not self.walk_done:
            frames = [
                f
                for w in windows
                for t in level.tile_indices(*w)
                if (f := self.frame_index(t % self.tiles_across, t // self.tiles_across)) is not None
            ]
            if frames and max(frames) >= self.located:
                self.walk(max(frames))
                level = self._build()
        return level

    @property
    def located(self) -> int:
        """Frames whose byte range is final (a walked frame's last fragment is known only once
        the next frame's first fragment, or the sequence delimiter, is seen)."""
        return len(self.frame_ranges) if self.walk_from is None or self.walk_done else len(self.frame_ranges) - 1

    def _build(self) -> DicomLevel:
        rows = -(-self.height // self.tile_h)
        offsets, counts = np.zeros(rows * self.tiles_across, np.int64), np.zeros(rows * self.tiles_across, np.int64)
        for t in range(offsets.size):
            frame = self.frame_index(t % self.tiles_across, t // self.tiles_across)
            if frame is not None and frame < self.located:
                start, end = self.frame_ranges[frame]
                offsets[t], counts[t] = start, end - start
        self._level = DicomLevel(
            self.width,
            self.height,
            self.tile_w,
            self.tile_h,
            offsets,
            counts,
            None,
            (None, None),
            self.syntax,
            self.photometric,
            self.items and self.syntax not in UNCOMPRESSED,
        )
        return self._level

    def walk(self, upto: int) -> None:
        """Locate frames ``0 .. upto`` from the fragment items (no offset table): item headers are
        read in windows of ``WALK_WINDOW_BYTES`` (through ``recent``, so the frames they hold are
        not fetched again); a fragment whose value starts a JPEG (``FFD8``) or JPEG 2000 (``FF4F``)
        codestream starts a frame, any other continues the previous one (several fragments per
        frame are allowed), as ``pydicom.encaps`` splits frames."""
        while self.located <= upto and not self.walk_done:
            at = self.walk_from
            tag, length, marker = self._item(at)
            if tag == SEQ_DELIMITER:
                self.walk_done = True
            elif tag != ITEM_TAG:
                raise DicomWsiError(f"{self.path}: expected a fragment item at byte {at}")
            elif marker in FRAME_STARTS or not self.frame_ranges:
                self.frame_ranges.append((at, at + 8 + length))
            else:
                self.frame_ranges[-1] = (self.frame_ranges[-1][0], at + 8 + length)
            self.walk_from = at + 8 + length
            if self.walk_from >= self.size:
                self.walk_done = True
        if self.walk_done and len(self.frame_ranges) != self.frame_count:
            raise DicomWsiError(
                f"{self.path}: {len(self.frame_ranges)} frames found in the fragments, "
                f"NumberOfFrames is {self.frame_count}"
            )

    def _item(self, at: int) -> tuple[int, int, bytes]:
        """``(tag, length, first 2 bytes of the value)`` of the item at file byte ``at``."""
        start, data = self._window
        if not (start <= at and min(at + 10, self.size) <= start + len(data)):
            n = min(WALK_WINDOW_BYTES, self.size - at)
            if n < 8:
                raise DicomWsiError(f"{self.path}: pixel data end inside a fragment item at byte {at}")
            self._window = start, data = at, self.recent([(at, n)])[0]
        tag, length = struct.unpack_from("<II", data, at - start)
        return tag, length, data[at - start + 8 : at - start + 10]


def _identify(head: bytes) -> str | None:
    """Why the instance whose first bytes are ``head`` is skipped (not a VOLUME instance of a
    whole-slide image, or unparseable where SOP class and image type lie), ``None`` for a level.
    Decided from the first read alone: no further byte of a skipped instance is fetched."""
    from pydicom.filereader import read_partial

    try:
        ds = read_partial(io.BytesIO(head), stop_when=lambda tag, vr, length: tag > 0x00080016)
    except Exception as exc:  # noqa: BLE001 - any parse failure: the instance cannot be identified
        return f"unparseable ({type(exc).__name__}: {exc})"
    image_type = [str(v).upper() for v in ds.get("ImageType", [])]
    if str(ds.get("SOPClassUID", "")) != WSI_SOP_CLASS or len(image_type) < 3 or image_type[2] != "VOLUME":
        return "not a VOLUME instance of a whole-slide image"
    return None


def _parse_head(path: str, head: bytes, complete: bool) -> tuple[Any, int] | None:
    """``(dataset up to Pixel Data, its offset)``, or ``None`` when ``head`` may just be too short.
    pydicom parses a truncated buffer silently or fails unpacking a short value; other failures,
    or any failure of the ``complete`` file, raise :class:`DicomWsiError` at once."""
    import pydicom
    from pydicom.errors import BytesLengthException

    buf = io.BytesIO(head)
    try:
        ds = pydicom.dcmread(buf, stop_before_pixels=True)
    except (struct.error, EOFError, BytesLengthException) as exc:
        if complete:
            raise DicomWsiError(f"{path}: header cannot be parsed: {type(exc).__name__}: {exc}") from exc
        return None
    except Exception as exc:  # noqa: BLE001 - not truncation: no further read can help
        raise DicomWsiError(f"{path}: header cannot be parsed: {type(exc).__name__}: {exc}") from exc
    return ds, buf.tell()


def _read_header(fs: Any, path: str, size: int, head: bytes, stats: FetchStats) -> tuple[Any, bytes, int]:
    """``(dataset, head bytes, offset of the Pixel Data element)`` of a level instance: ``head``
    (the file's first bytes) is extended (doubled, or to the end of the Basic Offset Table once
    its length is known) until the element header, and for encapsulated pixel data its BOT, are inside."""
    while True:
        parsed = _parse_head(path, head, len(head) >= size)
        ds, pos = parsed if parsed is not None else (None, len(head))
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
        head += fetch_file_ranges(fs, [(path, len(head), min(want, size))], stats)[0]


def _frame_ranges(inst: Instance, head: bytes, pos: int) -> list[tuple[int, int]]:
    """File byte ranges ``[start, end)`` of each frame's fragment items (tags included); with
    no offset table, none yet: :meth:`Instance.walk` finds them when frames are needed."""
    ds = inst.dataset
    bot_len = struct.unpack_from("<I", head, pos + 16)[0]
    first = pos + 20 + bot_len  # first fragment's item tag
    if "ExtendedOffsetTable" in ds:
        offsets = np.frombuffer(ds.ExtendedOffsetTable, "<u8")
        lengths = np.frombuffer(ds.ExtendedOffsetTableLengths, "<u8")
        return [(first + int(o), first + int(o) + 8 + int(ln)) for o, ln in zip(offsets, lengths)]
    if bot_len:
        offsets = list(struct.unpack_from(f"<{bot_len // 4}I", head, pos + 20)) + [None]
        return [(first + a, first + b if b is not None else inst.size) for a, b in itertools.pairwise(offsets)]
    tiff = _tiff_frame_ranges(inst, head, first + 8) if head[:4] in TIFF_HEADERS else None
    if tiff is not None:
        inst.items = False  # the ranges are the codestreams inside the fragments
        return tiff
    inst.walk_from = first  # no table: items are walked when frames are needed
    return []


def _tiff_frame_ranges(inst: Instance, head: bytes, first_value: int) -> list[tuple[int, int]] | None:
    """A dual-personality DICOM-TIFF file (TIFF header in the preamble, as PixelMed writes IDC's
    converted series): each frame's codestream from the TIFF page of this level (tile offsets
    and byte counts, read by tifffile through ``inst.recent``). ``None`` (walk the items
    instead) unless a tiled page has this level's geometry, one tile per frame, the first tile
    at the first fragment's value (``first_value``) and all tiles inside the file."""
    import tifffile

    from pathray.wsi.tiffrange import HeaderReader

    try:
        with tifffile.TiffFile(HeaderReader(None, inst.path, inst.size, inst.recent)) as tif:
            pages = [
                (np.asarray(p.dataoffsets, np.int64), np.asarray(p.databytecounts, np.int64))
                for p in tif.pages
                if p.is_tiled
                and (p.imagewidth, p.imagelength, p.tilewidth, p.tilelength)
                == (inst.width, inst.height, inst.tile_w, inst.tile_h)
            ]
    except Exception:  # noqa: BLE001 - not a TIFF tifffile reads: the fragments are walked instead
        return None
    for offsets, counts in pages:
        if (
            len(offsets) == inst.frame_count
            and inst.sparse_frames is None
            and offsets[0] == first_value
            and int((offsets + counts).max()) <= inst.size
        ):
            return list(zip(offsets.tolist(), (offsets + counts).tolist()))
    return None


def read_instance(fs: Any, path: str, size: int, head: bytes, stats: FetchStats) -> Instance | None:
    """The VOLUME instance at ``path`` (``head``: its first bytes), or ``None`` for any other
    image type or SOP class (label, overview, thumbnail...), decided from ``head`` alone."""
    if _identify(head) is not None:
        return None
    ds, head, pos = _read_header(fs, path, size, head, stats)
    _check_layout(path, ds)
    inst = Instance(
        path,
        int(ds.TotalPixelMatrixColumns),
        int(ds.TotalPixelMatrixRows),
        int(ds.Columns),
        int(ds.Rows),
        str(ds.file_meta.TransferSyntaxUID),
        str(ds.PhotometricInterpretation),
        _spacing_mm(ds),
        dataset=ds,
        size=size,
        frame_count=int(ds.get("NumberOfFrames", 1)),
        recent=RecentRanges(fs, path, stats=stats, gap_bytes=COALESCE_GAP_BYTES),
    )
    inst.recent.add(0, head)  # the first frames may lie inside the header read
    if str(ds.get("DimensionOrganizationType", "TILED_FULL")) == "TILED_SPARSE":
        inst.sparse_frames = _sparse_positions(ds)
    if inst.syntax in UNCOMPRESSED:
        frame_bytes = inst.tile_w * inst.tile_h * 3
        inst.frame_ranges = [
            (pos + 12 + i * frame_bytes, pos + 12 + (i + 1) * frame_bytes) for i in range(inst.frame_count)
        ]
    else:
        inst.frame_ranges = _frame_ranges(inst, head, pos)
    return inst


def _spacing_mm(ds: Any) -> tuple[float, float] | None:
    """PixelSpacing (row, column) in mm from the shared functional groups, else from the first
    frame's own (spacing stored per frame), else ``None`` (µm/px must come from the manifest)."""
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        try:
            spacing = getattr(ds, groups)[0].PixelMeasuresSequence[0].PixelSpacing
            return float(spacing[0]), float(spacing[1])
        except (AttributeError, IndexError, KeyError, TypeError, ValueError):
            continue
    return None


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
