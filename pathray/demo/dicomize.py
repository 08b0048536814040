"""Write a tiled TIFF/SVS slide as a DICOM WSI series in IDC's layout (one ``.dcm`` per level).

Used to make test fixtures and demo data shaped like the Imaging Data Commons buckets
(``<series uuid>/<instance>.dcm``). Written with pydicom directly: ``wsidicomizer`` needs
Python ≥ 3.12 in its current releases and drags in PyTurboJPEG/czifile/zarr, so it is not
used. What is written:

* one VL Whole Slide Microscopy Image instance per tiled TIFF page (each pyramid level),
  ImageType ``ORIGINAL\\PRIMARY\\VOLUME\\NONE`` for level 0, ``DERIVED\\PRIMARY\\VOLUME\\RESAMPLED``
  above; ``DimensionOrganizationType = TILED_FULL``; frames = the TIFF's tiles in row-major
  order (edge frames keep the TIFF's padding, as DICOM requires whole frames); or, with
  ``FrameLayout(sparse=True)``, ``TILED_SPARSE``: all-white frames left out and each kept frame's position
  in PerFrameFunctionalGroupsSequence/PlanePositionSlideSequence;
* ``codec="jpeg"``: the TIFF's JPEG tiles copied byte for byte (JPEGTables merged in), i.e.
  lossless transfer; PhotometricInterpretation ``YBR_FULL_422`` for TIFF YCbCr tiles,
  ``RGB`` for Aperio's RGB-coded tiles; transfer syntax JPEG Baseline;
* ``codec="jpeg2000"``: each tile decoded and re-encoded as reversible (lossless) JPEG 2000
  without colour transform, PhotometricInterpretation ``RGB``, transfer syntax JPEG 2000
  Lossless Only; pixels equal the decoded source tiles;
* ``codec="jpeg2000-ict"``: lossy JPEG 2000 with the irreversible colour transform in the
  codestream, PhotometricInterpretation ``YBR_ICT``, transfer syntax JPEG 2000 (as many IDC
  TCGA series);
* ``codec="raw"``: the decoded tiles uncompressed (Explicit VR Little Endian, ``RGB``);
* ``offset_table``: ``"basic"`` (Basic Offset Table), ``"extended"`` (empty BOT + Extended
  Offset Table) or ``"none"`` (empty BOT: readers must walk the fragment items);
* ``FrameLayout.fragments_per_frame``: each encapsulated frame split over this many fragment items
  (pydicom's ``encapsulate``), as the standard allows; frame boundaries are then only in the
  offset table or, without one, in the codestreams (each frame starts with its SOI/SOC marker);
* ``FrameLayout.tiff_personality``: each level written as a dual-personality DICOM-TIFF file, as PixelMed's
  converter wrote IDC's series (Clunie, J Pathol Inform 2019;10:12): the 128-byte preamble
  starts with a little-endian TIFF header whose IFD (one tiled page: the level's geometry,
  TileOffsets/TileByteCounts pointing at each frame's codestream inside its fragment) lies in
  a Data Set Trailing Padding element (FFFC,FFFC) after the Pixel Data; one fragment per frame;
* a small uncompressed LABEL instance (Explicit VR Little Endian), which readers skip.

PixelSpacing is ``mpp / 1000`` mm per level (row spacing first; pixels are square here).
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pathray.wsi.dicom_frames import JPEG2000, JPEG_BASELINE, UNCOMPRESSED
from pathray.wsi.dicom_instance import WSI_SOP_CLASS

EXPLICIT_LE = UNCOMPRESSED[0]
SYNTAX = {"jpeg": JPEG_BASELINE, "jpeg2000": JPEG2000[0], "jpeg2000-ict": JPEG2000[1], "raw": EXPLICIT_LE}
PHOTOMETRIC = {"jpeg2000": "RGB", "jpeg2000-ict": "YBR_ICT", "raw": "RGB"}
OFFSET_TABLES = ("basic", "extended", "none")
_PHOTOMETRIC_FROM_TIFF = {6: "YBR_FULL_422", 2: "RGB"}


@dataclass(frozen=True)
class FrameLayout:
    """How each level instance lays out its frames (see the module doc)."""

    sparse: bool = False  # TILED_SPARSE: all-white frames left out
    fragments_per_frame: int = 1  # fragment items per encapsulated frame
    tiff_personality: bool = False  # dual-personality DICOM-TIFF levels


@dataclass(frozen=True)
class _SeriesOut:
    """Where and how :func:`write_dicom_series` writes each level instance."""

    directory: Path
    codec: str
    offset_table: str
    mpp: float  # level-0 µm/px
    layout: FrameLayout


@dataclass(frozen=True)
class DicomSeries:
    """A written series: its directory (one ``.dcm`` per instance), UIDs and geometry."""

    directory: Path
    series_uid: str
    files: tuple[Path, ...]
    mpp: float  # level-0 µm/px
    level_dimensions: tuple[tuple[int, int], ...]  # (width, height) level px


def _uid() -> str:
    return f"2.25.{uuid.uuid4().int}"


def _frames(page, codec: str) -> list[bytes]:
    """The page's tiles as DICOM frames (see the module doc)."""
    import imagecodecs

    fh = page.parent.filehandle
    raw = []
    for offset, count in zip(page.dataoffsets, page.databytecounts):
        fh.seek(offset)
        raw.append(fh.read(count))
    tables = page.jpegtables
    if codec == "jpeg":
        return [tables[:-2] + tile[2:] if tables else tile for tile in raw]
    colorspace = "RGB" if page.photometric == 2 else "YCbCr"
    decoded = [
        imagecodecs.jpeg8_decode(tile, tables=tables, colorspace=colorspace, outcolorspace="RGB") for tile in raw
    ]
    if codec == "raw":
        return [tile.tobytes() for tile in decoded]
    if codec == "jpeg2000":
        return [
            imagecodecs.jpeg2k_encode(tile, level=0, codecformat="J2K", reversible=True, mct=False) for tile in decoded
        ]
    return [
        imagecodecs.jpeg2k_encode(tile, level=45, codecformat="J2K", reversible=False, mct=True) for tile in decoded
    ]


def _level_dataset(common, page, frames: list[bytes], level: int, mpp: float, ratio: float):
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.update(common)
    ds.ImageType = (
        ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"] if level == 0 else ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"]
    )
    ds.InstanceNumber = level + 1
    height, width = page.shape[:2]
    ds.TotalPixelMatrixRows, ds.TotalPixelMatrixColumns = height, width
    ds.Rows, ds.Columns = page.tilelength, page.tilewidth
    ds.NumberOfFrames = len(frames)
    ds.DimensionOrganizationType = "TILED_FULL"
    spacing = mpp * ratio / 1000.0
    measures = Dataset()
    measures.PixelSpacing = [f"{spacing:.10g}", f"{spacing:.10g}"]
    measures.SliceThickness = "0.001"
    groups = Dataset()
    groups.PixelMeasuresSequence = [measures]
    ds.SharedFunctionalGroupsSequence = [groups]
    ds.ImagedVolumeWidth, ds.ImagedVolumeHeight, ds.ImagedVolumeDepth = width * spacing, height * spacing, 0.001
    return ds


def _common(series_uid: str, study_uid: str, frame_uid: str, description: str):
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.SOPClassUID = WSI_SOP_CLASS
    ds.Modality = "SM"
    ds.PatientID, ds.PatientName, ds.StudyID = "PATHRAY-TEST-0001", "pathray^fixture", "1"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
    ds.SeriesNumber, ds.SeriesDescription = 1, description
    ds.Manufacturer, ds.ContainerIdentifier = "pathray", "SLIDE-1"
    ds.SamplesPerPixel, ds.PlanarConfiguration = 3, 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.TotalPixelMatrixFocalPlanes, ds.NumberOfOpticalPaths = 1, 1
    ds.ImageOrientationSlide = [0, -1, 0, -1, 0, 0]
    origin = Dataset()
    origin.XOffsetInSlideCoordinateSystem, origin.YOffsetInSlideCoordinateSystem = 20.0, 40.0
    ds.TotalPixelMatrixOriginSequence = [origin]
    path = Dataset()
    path.OpticalPathIdentifier = "1"
    ds.OpticalPathSequence = [path]
    return ds


def _set_meta(ds, syntax: str) -> None:
    from pydicom.dataset import FileMetaDataset

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = syntax
    ds.file_meta = meta


def _save(ds, path: Path, syntax: str) -> None:
    _set_meta(ds, syntax)
    ds.save_as(path, enforce_file_format=True)


def _set_pixels(ds, frames: list[bytes], offset_table: str, fragments_per_frame: int = 1) -> None:
    from pydicom.encaps import encapsulate, encapsulate_extended

    if str(ds.file_meta.TransferSyntaxUID) == EXPLICIT_LE:
        ds.PixelData = b"".join(frames)  # native: frames back to back, no offset table
        ds["PixelData"].VR = "OB"
        return
    if offset_table == "extended":
        ds.PixelData, ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths = encapsulate_extended(frames)
    else:
        ds.PixelData = encapsulate(frames, fragments_per_frame=fragments_per_frame, has_bot=offset_table == "basic")
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True


def _fragment_values(data: bytes, pixel_data_at: int) -> list[tuple[int, int]]:
    """``(file offset, length)`` of each fragment value of encapsulated Pixel Data at ``pixel_data_at``."""
    bot_length = struct.unpack_from("<I", data, pixel_data_at + 16)[0]
    at, values = pixel_data_at + 20 + bot_length, []
    while struct.unpack_from("<I", data, at)[0] == 0xE000FFFE:
        length = struct.unpack_from("<I", data, at + 4)[0]
        values.append((at + 8, length))
        at += 8 + length
    return values


def _add_tiff_personality(path: Path, compression: int, photometric: int) -> None:
    """Make the level instance at ``path`` a dual-personality DICOM-TIFF file (module doc)."""
    import io

    import pydicom

    data = bytearray(path.read_bytes())
    buf = io.BytesIO(bytes(data))
    ds = pydicom.dcmread(buf, stop_before_pixels=True)
    values = _fragment_values(bytes(data), buf.tell())
    ifd_at = len(data) + 12  # after the padding element's tag, VR, reserved bytes and length
    entries = [
        (256, 4, (int(ds.TotalPixelMatrixColumns),)),
        (257, 4, (int(ds.TotalPixelMatrixRows),)),
        (258, 3, (8, 8, 8)),
        (259, 3, (compression,)),
        (262, 3, (photometric,)),
        (277, 3, (3,)),
        (284, 3, (1,)),
        (322, 4, (int(ds.Columns),)),
        (323, 4, (int(ds.Rows),)),
        (324, 4, tuple(o for o, _ in values)),
        (325, 4, tuple(ln for _, ln in values)),
    ]
    extra_at = ifd_at + 2 + 12 * len(entries) + 4  # values over 4 bytes follow the IFD
    ifd, tail = struct.pack("<H", len(entries)), b""
    for tag, kind, items in entries:  # kind 3: SHORT, 4: LONG
        raw = struct.pack(f"<{len(items)}{'H' if kind == 3 else 'I'}", *items)
        if len(raw) <= 4:
            ifd += struct.pack("<HHI", tag, kind, len(items)) + raw.ljust(4, b"\0")
        else:
            ifd += struct.pack("<HHII", tag, kind, len(items), extra_at + len(tail))
            tail += raw
    body = ifd + struct.pack("<I", 0) + tail
    body += b"\0" * (len(body) % 2)
    data += struct.pack("<HH2sHI", 0xFFFC, 0xFFFC, b"OB", 0, len(body)) + body
    data[0:8] = b"II*\x00" + struct.pack("<I", ifd_at)
    path.write_bytes(bytes(data))


def _label(common, directory: Path, number: int) -> Path:
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.update(common)
    ds.SOPInstanceUID, ds.InstanceNumber = _uid(), number
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LABEL", "NONE"]
    ds.PhotometricInterpretation, ds.Rows, ds.Columns = "RGB", 32, 64
    ds.TotalPixelMatrixRows, ds.TotalPixelMatrixColumns, ds.NumberOfFrames = 32, 64, 1
    ds.PixelData = np.full((32, 64, 3), 90, np.uint8).tobytes()
    path = directory / f"{ds.SOPInstanceUID}.dcm"
    _save(ds, path, EXPLICIT_LE)
    return path


def _sparsify(ds, frames: list[bytes]) -> list[bytes]:
    """Drop all-white frames and record each kept frame's position (TILED_SPARSE layout)."""
    import imagecodecs
    from pydicom.dataset import Dataset

    across = -(-int(ds.TotalPixelMatrixColumns) // int(ds.Columns))
    kept, groups = [], []
    for index, frame in enumerate(frames):
        if imagecodecs.imread(frame).min() == 255:
            continue
        position = Dataset()
        position.ColumnPositionInTotalImagePixelMatrix = (index % across) * int(ds.Columns) + 1
        position.RowPositionInTotalImagePixelMatrix = (index // across) * int(ds.Rows) + 1
        position.XOffsetInSlideCoordinateSystem, position.YOffsetInSlideCoordinateSystem = 0.0, 0.0
        position.ZOffsetInSlideCoordinateSystem = 0.0
        group = Dataset()
        group.PlanePositionSlideSequence = [position]
        groups.append(group)
        kept.append(frame)
    ds.DimensionOrganizationType = "TILED_SPARSE"
    ds.PerFrameFunctionalGroupsSequence = groups
    ds.NumberOfFrames = len(kept)
    return kept


def write_dicom_series(
    slide_path: str | Path,
    directory: str | Path,
    codec: str = "jpeg",
    offset_table: str = "basic",
    mpp: float | None = None,
    layout: FrameLayout = FrameLayout(),
) -> DicomSeries:
    """Write ``slide_path`` (tiled JPEG TIFF/SVS) as a DICOM WSI series into ``directory``
    (created; files named ``<SOPInstanceUID>.dcm`` as in IDC). ``mpp`` (µm/px) defaults to
    the slide's ``openslide.mpp-x``. ``layout``: sparse levels, fragments per frame,
    dual-personality DICOM-TIFF levels (:class:`FrameLayout`, module doc)."""
    import openslide
    import tifffile

    if codec not in SYNTAX or offset_table not in OFFSET_TABLES:
        raise ValueError(f"codec must be one of {tuple(SYNTAX)}, offset_table one of {OFFSET_TABLES}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if mpp is None:
        with openslide.OpenSlide(str(slide_path)) as osr:
            mpp = float(osr.properties[openslide.PROPERTY_NAME_MPP_X])
    out = _SeriesOut(directory, codec, offset_table, mpp, layout)
    series_uid = _uid()
    common = _common(series_uid, _uid(), _uid(), f"pathray {codec} {offset_table}")
    with tifffile.TiffFile(slide_path) as tif:
        levels = [p for p in tif.pages if p.is_tiled and p.compression == 7]
        files = [
            _write_level(common, page, level, levels[0].shape[1] / page.shape[1], out)
            for level, page in enumerate(levels)
        ]
        dims = tuple((page.shape[1], page.shape[0]) for page in levels)
    files.append(_label(common, directory, len(files) + 1))
    return DicomSeries(directory, series_uid, tuple(files), mpp, dims)


def _write_level(common, page, level: int, downsample: float, out: _SeriesOut) -> Path:
    """Write TIFF ``page`` (pyramid ``level``, ``downsample`` from level 0) as one instance; its path."""
    codec = out.codec
    frames = _frames(page, codec)
    ds = _level_dataset(common, page, frames, level, out.mpp, downsample)
    ds.SOPInstanceUID = _uid()
    frames = _sparsify(ds, frames) if out.layout.sparse else frames
    jpeg = codec == "jpeg"
    ds.PhotometricInterpretation = _PHOTOMETRIC_FROM_TIFF[page.photometric] if jpeg else PHOTOMETRIC[codec]
    ds.LossyImageCompression = "00" if codec in ("jpeg2000", "raw") else "01"
    _set_meta(ds, SYNTAX[codec])
    _set_pixels(ds, frames, out.offset_table, out.layout.fragments_per_frame)
    path = out.directory / f"{ds.SOPInstanceUID}.dcm"
    _save(ds, path, SYNTAX[codec])
    if out.layout.tiff_personality:
        _add_tiff_personality(path, 7 if jpeg else 34712, 2 if ds.PhotometricInterpretation == "RGB" else 6)
    return path
