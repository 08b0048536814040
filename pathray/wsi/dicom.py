"""DICOM whole-slide images (e.g. IDC's ``s3://idc-open-data/<series uuid>/``) read in place.

A series is a prefix (local directory or ``s3://bucket/<uuid>/``) holding one ``.dcm`` per
instance: one per pyramid level (ImageType ``VOLUME``) plus label/overview/thumbnail images,
which are ignored. Nothing is staged: :func:`open_dicom_series` reads each instance's header
and frame offsets by byte range, and reads fetch only the frames (tiles) a region needs,
coalescing adjacent ranges and counting bytes/requests in the backend's ``stats``.

Per instance:

* skip or keep, from the first read alone (``HEAD_BYTES``): only a VOLUME instance of the
  WSI SOP class is a level; anything else (label, overview, an instance without Pixel Data,
  one unparseable where SOP class and image type lie) costs that one read and is skipped;
* header: the first read extended until the Pixel Data element and its Basic Offset Table
  are inside, parsed with pydicom up to Pixel Data (a parse failure other than a short
  buffer is an error at once, never a reason to read more);
* frame positions: the Extended Offset Table when present, else the Basic Offset Table
  (a frame's bytes run to the next offset and are parsed as items, so several fragments per
  frame are joined), else (empty BOT) in a dual-personality DICOM-TIFF file (TIFF header in
  the preamble, as IDC's converted series) the TIFF page's tile offsets and byte counts,
  else the fragment items, walked in ``WALK_WINDOW_BYTES``
  windows only as far as the highest frame a read needs: a fragment whose value starts a
  codestream (JPEG SOI ``FFD8``, JPEG 2000 SOC ``FF4F``) starts a frame, others continue it,
  as ``pydicom.encaps`` splits frames;
* layout: ``TILED_FULL`` (frames row-major over the total pixel matrix) or ``TILED_SPARSE``
  (each frame's position from PerFrameFunctionalGroupsSequence; tiles without a frame are
  white); one focal plane and optical path. Concatenated instances (one level split over
  several files) and other layouts are refused with a clear error.

Reads: a level is a :class:`DicomLevel` (frames as the stored tiles of
:mod:`pathray.wsi.tifftiles`), so :func:`pathray.tiling.grid.read_tiles` reads it through a
:class:`~pathray.wsi.tifftiles.BlockLoader` (each frame fetched and decoded once per call) and
single windows through ``read_window``; all bytes of an instance (header read, walk windows,
frames) go through one :class:`pathray.wsi.rangeio.RecentRanges`, so the frames neighbouring
chunks share, or a walk window already holds, are not fetched again.

Decoding (imagecodecs): JPEG Baseline frames are decoded with the JPEG colour space forced
from PhotometricInterpretation (``YBR_FULL_422`` → YCbCr→RGB, ``RGB`` → none), as OpenSlide 4
does; JPEG 2000 (``RGB`` photometric, or ``YBR_ICT`` whose transform is in the codestream)
and uncompressed RGB frames are taken as decoded. µm/px: ``openslide.mpp-x`` =
PixelSpacing[1] x 1000 (column spacing, mm → µm), ``openslide.mpp-y`` = PixelSpacing[0] x 1000,
from the shared functional groups, else the first frame's (spacing stored per frame), else
absent (the manifest's ``mpp`` must give it: ``mpp_missing`` otherwise).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pathray.fs import split_uri
from pathray.wsi.dicom_frames import DicomWsiError
from pathray.wsi.dicom_instance import HEAD_BYTES, Instance, fetch_file_ranges, read_instance
from pathray.wsi.rangeio import FetchStats
from pathray.wsi.tifftiles import BlockLoader, Window, read_window

_PROPERTY_TAGS = (
    "PatientID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SeriesDescription",
    "Manufacturer",
    "ManufacturerModelName",
    "ContainerIdentifier",
)


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

    def read_level(
        self, level: int, lx: int, ly: int, width: int, height: int, cache: dict | None = None
    ) -> np.ndarray:
        """RGB uint8 ``(height, width, 3)`` of ``level`` pixels from ``(lx, ly)``; pixels outside the
        level are white. The frames are fetched in one batch of ranges; ``cache`` (any dict, shared
        across calls) keeps decoded frames."""
        window = (lx, ly, width, height)
        inst = self._levels[level]
        return read_window(inst.level([window]), level, window, cache, inst.recent)

    def caches_tiles(self, level: int) -> bool:
        return True

    def block_loader(self, level: int, groups: Sequence[Sequence[Window]]) -> BlockLoader:
        """Groups of windows read as blocks (:func:`pathray.tiling.grid.read_tiles`): each frame fetched
        (one coalesced batch per group) and decoded once; frames a recent read of this handle
        fetched (the previous chunk's boundary, a walk window) come from memory."""
        inst = self._levels[level]
        return BlockLoader(inst.level(w for g in groups for w in g), groups, inst.recent)

    def close(self) -> None:
        self._levels = []


def _properties(base: Instance) -> dict[str, str]:
    """OpenSlide-style properties of a series from its level-0 instance."""
    ds = base.dataset
    props = {
        "openslide.vendor": "dicom",
        "dicom.TransferSyntaxUID": base.syntax,
        "dicom.PhotometricInterpretation": base.photometric,
    }
    if base.spacing_mm is not None:  # else µm/px only from the manifest (mpp_missing without it)
        props["openslide.mpp-x"] = repr(base.spacing_mm[1] * 1000.0)
        props["openslide.mpp-y"] = repr(base.spacing_mm[0] * 1000.0)
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
    heads = fetch_file_ranges(fs, [(e["name"], 0, min(HEAD_BYTES, e["size"])) for e in entries], stats)
    levels = [
        inst
        for e, head in zip(entries, heads)
        if head[128:132] == b"DICM" and (inst := read_instance(fs, e["name"], e["size"], head, stats)) is not None
    ]
    if not levels:
        raise DicomWsiError(f"{uri}: no VOLUME (pyramid level) instance of a whole-slide image")
    series = {str(i.dataset.SeriesInstanceUID) for i in levels}
    sizes = [(i.width, i.height) for i in levels]
    if len(series) > 1 or len(set(sizes)) != len(sizes):
        raise DicomWsiError(f"{uri}: several series or concatenated levels under one prefix are not supported")
    levels.sort(key=lambda i: -i.width)
    return DicomWsiBackend(uri, fs, levels, stats, sum(e["size"] for e in entries))
