"""DICOM WSI frames located and read as the job reads them: frames split over several
fragments without an offset table, the block loader (each frame fetched and decoded once),
and headers that must not fail a series (instances skipped from their first read, pixel
spacing stored per frame). Series are real files written by :mod:`pathray.demo.dicomize`."""

from __future__ import annotations

import uuid
import zlib
from pathlib import Path

import numpy as np
import openslide
import pyarrow as pa
import pydicom
import pytest

from pathray.demo.dicomize import FrameLayout, write_dicom_series
from pathray.errors import MppMissingError
from pathray.tiling.grid import TilingConfig, plan_tiles, read_tiles
from pathray.wsi import dicom as dicom_wsi
from pathray.wsi import dicom_frames
from pathray.wsi.dicom import open_dicom_series
from pathray.wsi.dicom_instance import HEAD_BYTES
from pathray.wsi.slide import open_slide


def _source_rgb(path, level: int) -> np.ndarray:
    with openslide.OpenSlide(str(path)) as osr:
        w, h = osr.level_dimensions[level]
        return np.asarray(osr.read_region((0, 0), level, (w, h)))[..., :3]


@pytest.mark.parametrize("codec", ["jpeg", "jpeg2000"])
@pytest.mark.parametrize("fragments", [1, 2, 3])
def test_frames_over_several_fragments_without_offset_table_read_exactly(synthetic_svs_05, tmp_path, codec, fragments):
    """No table: frame boundaries come from the codestreams (SOI / SOC), continuation
    fragments are joined; pixels equal the source slide, and pydicom splits the same frames."""
    from pydicom.encaps import generate_frames

    written = write_dicom_series(
        synthetic_svs_05, tmp_path / "s", codec, "none", layout=FrameLayout(fragments_per_frame=fragments)
    )
    backend = open_dicom_series(str(written.directory))
    for level, (w, h) in enumerate(backend.level_dimensions):
        np.testing.assert_array_equal(backend.read_level(level, 0, 0, w, h), _source_rgb(synthetic_svs_05, level))
    inst = backend._levels[0]
    ds = pydicom.dcmread(inst.path)
    want = list(generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames)))
    data = Path(inst.path).read_bytes()
    assert [dicom_frames.fragments(data[s:e]) for s, e in inst.frame_ranges] == want


def test_a_frame_split_in_the_middle_of_a_window_is_read_from_its_own_bytes(synthetic_svs_05, tmp_path):
    """A tile far from the start, read alone: the walk stops just past it, the pixels are its own."""
    written = write_dicom_series(
        synthetic_svs_05, tmp_path / "s", "jpeg", "none", layout=FrameLayout(fragments_per_frame=2)
    )
    backend = open_dicom_series(str(written.directory))
    inst = backend._levels[0]
    lx, ly = 2 * inst.tile_w, inst.tile_h  # tile (2, 1)
    got = backend.read_level(0, lx, ly, inst.tile_w, inst.tile_h)
    np.testing.assert_array_equal(got, _source_rgb(synthetic_svs_05, 0)[ly : ly + inst.tile_h, lx : lx + inst.tile_w])
    assert inst.frame_index(2, 1) < inst.located < inst.frame_count


def _all_tissue_chunks(uri: str, options: dict, chunk_tiles: int) -> tuple[pa.Table, TilingConfig]:
    from pathray.job.rows import SLIDE_SCHEMA
    from pathray.job.stages import SlidePlanner

    config = TilingConfig(min_tissue_fraction=0.0)  # every grid tile: an all-tissue series' worth of reads
    slides = pa.Table.from_pylist(
        [{"slide_id": "a", "path": uri, "cohort": "", "mpp_override": None, "models": ["m"]}], schema=SLIDE_SCHEMA
    )
    return SlidePlanner(config, chunk_tiles, options)(slides), config


@pytest.mark.s3
@pytest.mark.parametrize("table", ["basic", "none"])
def test_the_job_reads_each_frame_once_and_pulls_at_most_the_series(
    synthetic_svs_025, tmp_path, s3_server, s3_bucket, monkeypatch, table
):
    """ChunkReader (the job's reader) over chunks of 4 tiles of one series: bytes pulled from
    S3 ≤ the series' bytes, one decode per frame the tiles touch, and tiles equal to those
    read from the source SVS."""
    from pathray.job.stages import ChunkReader

    series_uuid = str(uuid.uuid4())
    written = write_dicom_series(
        synthetic_svs_025, tmp_path / series_uuid, "jpeg", table, layout=FrameLayout(fragments_per_frame=2)
    )
    for path in written.files:
        s3_server.fs.put_file(str(path), f"{s3_bucket}/{series_uuid}/{path.name}")
    uri = f"s3://{s3_bucket}/{series_uuid}/"
    chunks, config = _all_tissue_chunks(uri, s3_server.storage_options, 4)
    decoded: list[int] = []  # stored tile (frame) indices decoded by the current chunk
    real_decode = dicom_frames.DicomLevel.decode_tile
    monkeypatch.setattr(
        dicom_frames.DicomLevel,
        "decode_tile",
        lambda self, data, index, out=None: decoded.append(index) or real_decode(self, data, index, out),
    )
    pulled = dicom_wsi.FetchStats()
    monkeypatch.setattr(dicom_wsi, "FetchStats", lambda: pulled)
    reader = ChunkReader(config, s3_server.storage_options)
    out = []
    try:
        reader._slide(uri, None)  # opened as the first chunk would (its probe read decodes a frame)
        for i in range(chunks.num_rows):
            decoded.clear()
            out.append(reader.read_chunk(chunks.slice(i, 1)))
            assert decoded and len(decoded) == len(set(decoded))  # each frame decoded once per chunk
    finally:
        reader.close()
    assert chunks.num_rows > 10 and all(t.column("status")[0].as_py() == "ok" for t in out)
    assert 0 < pulled.bytes_fetched <= sum(p.stat().st_size for p in written.files)
    source = open_slide(str(synthetic_svs_025))
    for chunk, got in zip((chunks.slice(i, 1) for i in range(chunks.num_rows)), out):
        x, y = (np.frombuffer(chunk.column(c)[0].as_py(), "<i8") for c in "xy")
        want = read_tiles(source, config, x, y)
        np.testing.assert_array_equal(
            np.frombuffer(got.column("pixels")[0].as_py(), np.uint8).reshape(want.shape), want
        )


def test_read_tiles_on_a_series_equals_the_source(synthetic_svs_025, tmp_path):
    written = write_dicom_series(synthetic_svs_025, tmp_path / "s", "jpeg2000", "basic")
    series, source = open_slide(str(written.directory)), open_slide(str(synthetic_svs_025))
    assert series.has_direct_reads(0)
    grid = plan_tiles(source, "a", TilingConfig(min_tissue_fraction=0.0))
    config = TilingConfig(min_tissue_fraction=0.0)
    np.testing.assert_array_equal(
        read_tiles(series, config, grid.x, grid.y), read_tiles(source, config, grid.x, grid.y)
    )


def _big_non_image_instance(written, directory: Path) -> Path:
    """A Microscopy Bulk Simple Annotations-like instance of the series: no Pixel Data, 4x HEAD_BYTES long."""
    ds = pydicom.dcmread(written.files[-1])  # the label, as a template of the series' attributes
    del ds.PixelData
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.91.1"
    ds.SOPInstanceUID = f"2.25.{uuid.uuid4().int}"
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.add_new(0x00771010, "LO", "pathray")
    ds.add_new(0x00771011, "OB", b"\0" * (4 * HEAD_BYTES))
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    path = directory / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _broken_label(written, directory: Path) -> Path:
    """A label instance whose file meta claims the Deflated transfer syntax for a body that is not deflated."""
    import struct

    data = bytearray(written.files[-1].read_bytes())
    old, new = b"1.2.840.10008.1.2.1\x00", b"1.2.840.10008.1.2.1.99"
    at = data.index(old)
    assert struct.unpack_from("<H", data, at - 2)[0] == len(old)
    data[at - 2 : at + len(old)] = struct.pack("<H", len(new)) + new
    group_length = data.index(b"\x02\x00\x00\x00UL\x04\x00") + 8
    struct.pack_into("<I", data, group_length, struct.unpack_from("<I", data, group_length)[0] + len(new) - len(old))
    path = directory / "broken-label.dcm"
    path.write_bytes(bytes(data))
    return path


def test_instances_that_are_not_levels_are_skipped_from_their_first_read(synthetic_svs_05, tmp_path):
    written = write_dicom_series(synthetic_svs_05, tmp_path / "s", "jpeg", "basic")
    annotation, broken = _big_non_image_instance(written, written.directory), _broken_label(written, written.directory)
    assert "PixelData" not in pydicom.dcmread(annotation)
    with pytest.raises(zlib.error):  # not a truncation: no further read helps
        pydicom.dcmread(broken, stop_before_pixels=True)
    backend = open_dicom_series(str(written.directory))
    assert backend.level_dimensions == written.level_dimensions
    # the skipped instances cost their first read only (the annotation is 4 x HEAD_BYTES long)
    assert backend.stats.bytes_fetched <= sum(p.stat().st_size for p in written.files) + 2 * HEAD_BYTES


def _per_frame_spacing(path: Path, keep: bool) -> None:
    """Move PixelMeasuresSequence from the shared functional groups to every frame (``keep``), or drop it."""
    from pydicom.dataset import Dataset

    ds = pydicom.dcmread(path)
    measures = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence
    del ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence
    if keep:
        groups = []
        for _ in range(int(ds.NumberOfFrames)):
            group = Dataset()
            group.PixelMeasuresSequence = measures
            groups.append(group)
        ds.PerFrameFunctionalGroupsSequence = groups
    ds.save_as(path)


def test_pixel_spacing_per_frame_then_from_the_manifest(synthetic_svs_05, tmp_path):
    for keep in (True, False):
        written = write_dicom_series(synthetic_svs_05, tmp_path / str(keep), "jpeg", "basic")
        for path in written.files[:-1]:
            _per_frame_spacing(path, keep)
        if keep:
            assert open_slide(str(written.directory)).mpp == pytest.approx(0.5)
            continue
        with pytest.raises(MppMissingError):
            open_slide(str(written.directory))
        assert open_slide(str(written.directory), mpp_override=0.5).mpp == 0.5


@pytest.mark.parametrize("codec", ["jpeg", "jpeg2000"])
def test_dual_personality_tiff_offsets_are_the_frame_index(synthetic_svs_05, tmp_path, codec):
    """IDC's converted series are DICOM-TIFF files: without an offset table, the TIFF page's tile
    offsets locate the frames (no item is walked); one tile costs its own bytes only."""
    import tifffile

    written = write_dicom_series(
        synthetic_svs_05, tmp_path / "s", codec, "none", layout=FrameLayout(tiff_personality=True)
    )
    with tifffile.TiffFile(written.files[0]) as tif:  # the TIFF side, read by a TIFF reader
        np.testing.assert_array_equal(tif.pages[0].asarray(), _source_rgb(synthetic_svs_05, 0))
    backend = open_dicom_series(str(written.directory))
    inst = backend._levels[0]
    assert inst.walk_from is None and len(inst.frame_ranges) == inst.frame_count
    before = backend.stats.bytes_fetched
    w, h = backend.level_dimensions[0]
    last = backend.read_level(0, w - inst.tile_w, h - inst.tile_h, inst.tile_w, inst.tile_h)
    start, end = inst.frame_ranges[-1]
    assert backend.stats.bytes_fetched - before == end - start
    np.testing.assert_array_equal(last, _source_rgb(synthetic_svs_05, 0)[h - inst.tile_h :, w - inst.tile_w :])
    for level, (w, h) in enumerate(backend.level_dimensions):
        np.testing.assert_array_equal(backend.read_level(level, 0, 0, w, h), _source_rgb(synthetic_svs_05, level))
