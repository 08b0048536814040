"""Coalesced range fetches and the range-read TIFF backend on local files (the same code as for s3://)."""

from __future__ import annotations

import os

import fsspec
import numpy as np
import openslide
import pytest

from pathray.errors import SlideUnreadableError
from pathray.wsi.rangeio import FetchStats, coalesce, fetch_ranges
from pathray.wsi.slide import open_slide
from pathray.wsi.tiffrange import TiffRangeBackend


def test_coalesce_merges_small_holes_only():
    ranges = [(1000, 10), (0, 100), (150, 50), (100_000, 5), (120, 10), (0, 0)]
    assert coalesce(ranges, gap_bytes=64) == [(0, 200), (1000, 1010), (100_000, 100_005)]
    assert coalesce(ranges, gap_bytes=0) == [(0, 100), (120, 130), (150, 200), (1000, 1010), (100_000, 100_005)]
    assert coalesce([(0, 10), (10, 10), (20, 10)], gap_bytes=0, max_span_bytes=20) == [(0, 20), (20, 30)]


def test_fetch_ranges_returns_each_range_in_input_order(tmp_path):
    data = os.urandom(300_000)
    path = tmp_path / "blob"
    path.write_bytes(data)
    ranges = [(250_000, 1000), (5, 10), (20, 30), (0, 0), (100_000, 70_000), (7, 3)]
    stats = FetchStats()
    out = fetch_ranges(fsspec.filesystem("file"), str(path), ranges, gap_bytes=64, stats=stats)
    assert out == [data[o : o + n] for o, n in ranges]
    assert stats.requests == 3 and stats.bytes_fetched == 45 + 70_000 + 1000  # (5..50), one big range, the tail
    with pytest.raises(SlideUnreadableError, match="truncated"):
        fetch_ranges(fsspec.filesystem("file"), str(path), [(299_990, 100)])


@pytest.mark.parametrize("fixture", ["synthetic_svs_025", "generic_tiff", "cmu_slide"])
def test_range_backend_on_a_local_file_matches_openslide(request, fixture):
    path = os.fspath(request.getfixturevalue(fixture))
    backend = TiffRangeBackend.open(fsspec.filesystem("file"), path, os.path.getsize(path))
    with openslide.OpenSlide(path) as reference:
        assert backend.properties == {k: v for k, v in reference.properties.items() if k != "openslide.quickhash-1"}
        assert backend.level_dimensions == reference.level_dimensions
    with open_slide(path) as slide:
        for level, (w, h) in enumerate(backend.level_dimensions):
            ds = slide.level_downsamples[level]
            expected = slide.read_region_openslide(round(-8 * ds), round(h // 2 * ds), level, w + 16, h // 2 + 8)
            assert np.abs(backend.read_level(level, -8, h // 2, w + 16, h // 2 + 8).astype(int) - expected).max() <= 1


def test_range_backend_declines_what_it_does_not_cover(generic_tiff_deflate, png_as_svs):
    fs = fsspec.filesystem("file")
    for path in (os.fspath(generic_tiff_deflate), os.fspath(png_as_svs)):
        assert TiffRangeBackend.open(fs, path, os.path.getsize(path)) is None


def test_range_backend_detects_truncation_from_the_tile_tables(truncated_svs):
    path = os.fspath(truncated_svs)
    with pytest.raises(SlideUnreadableError, match="truncated"):
        TiffRangeBackend.open(fsspec.filesystem("file"), path, os.path.getsize(path))
