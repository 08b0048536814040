"""s3:// slides against a real S3-compatible server (SeaweedFS, see tests/fixtures/s3.py)."""

import os

import numpy as np
import pytest

from pathray.errors import PathrayError, SlideNotFoundError, StagingError
from pathray.manifest import SlideEntry, read_manifest
from pathray.tiling.grid import TilingConfig, plan_tiles, read_tiles
from pathray.tiling.tile_job import TileOutput, tile_slide
from pathray.wsi.scratch import Scratch
from pathray.wsi.slide import open_slide

pytestmark = pytest.mark.s3


@pytest.fixture
def s3_slide(s3_server, s3_bucket, synthetic_svs_025) -> str:
    uri = f"s3://{s3_bucket}/slides/synthetic_025.svs"
    s3_server.fs.put_file(str(synthetic_svs_025), uri)
    return uri


@pytest.fixture
def s3_staged_slide(s3_server, s3_bucket, generic_tiff_deflate) -> str:
    """A slide the range reader declines (deflate tiles): it is staged."""
    uri = f"s3://{s3_bucket}/slides/deflate.tif"
    s3_server.fs.put_file(str(generic_tiff_deflate), uri)
    return uri


def test_s3_svs_is_read_by_range_without_staging(s3_server, s3_slide, synthetic_svs_025, tmp_path):
    config = TilingConfig()
    with open_slide(str(synthetic_svs_025)) as local:
        grid = plan_tiles(local, "s", config)
        expected = read_tiles(local, config, grid.x, grid.y)
    scratch = Scratch(str(tmp_path / "scratch"), max_bytes=50 * 1024**2)
    with open_slide(s3_slide, scratch=scratch, storage_options=s3_server.storage_options) as remote:
        assert remote.etag and remote.size_bytes == os.path.getsize(synthetic_svs_025)
        assert remote.local_path is None and scratch.used_bytes == 0
        remote_grid = plan_tiles(remote, "s", config)
        assert np.array_equal(remote_grid.x, grid.x) and np.array_equal(remote_grid.y, grid.y)
        assert np.array_equal(read_tiles(remote, config, grid.x, grid.y), expected)
    assert scratch.used_bytes == 0 and set(os.listdir(scratch.root)) <= {".lock"}


def test_staged_copy_stays_cached_until_evicted(s3_server, s3_staged_slide, generic_tiff_deflate, tmp_path):
    scratch = Scratch(str(tmp_path / "scratch"), max_bytes=50 * 1024**2)
    with open_slide(s3_staged_slide, scratch=scratch, storage_options=s3_server.storage_options) as remote:
        assert scratch.used_bytes == remote.size_bytes == os.path.getsize(generic_tiff_deflate)
        assert remote.source.staged.downloaded
    with open_slide(s3_staged_slide, scratch=scratch, storage_options=s3_server.storage_options) as again:
        assert not again.source.staged.downloaded and scratch.used_bytes == again.size_bytes


def test_private_scratch_is_removed(s3_server, s3_staged_slide):
    slide = open_slide(s3_staged_slide, storage_options=s3_server.storage_options)
    root = slide.source.own_scratch.root
    assert os.path.isfile(slide.local_path) and slide.local_path.startswith(root)
    slide.close()
    assert not os.path.exists(root)


def test_size_bound_is_enforced(s3_server, s3_staged_slide, tmp_path):
    scratch = Scratch(str(tmp_path / "scratch"), max_bytes=1000)
    with pytest.raises(StagingError) as info:
        open_slide(s3_staged_slide, scratch=scratch, storage_options=s3_server.storage_options)
    assert info.value.error_type == "staging_failed" and scratch.used_bytes == 0


def test_missing_object_is_a_per_slide_error(s3_server, s3_bucket, s3_slide, tmp_path):
    config = TilingConfig()
    with pytest.raises(SlideNotFoundError):
        open_slide(f"s3://{s3_bucket}/nope.svs", storage_options=s3_server.storage_options)
    with Scratch(str(tmp_path / "scratch")) as scratch:
        results = [
            tile_slide(
                SlideEntry(sid, uri, None, None, {}, i),
                config,
                TileOutput(str(tmp_path / "out")),
                scratch,
                storage_options=s3_server.storage_options,
            )
            for i, (sid, uri) in enumerate([("gone", f"s3://{s3_bucket}/gone.svs"), ("here", s3_slide)], start=1)
        ]
    (gone_tiles, gone), (here_tiles, here) = results
    assert (gone["status"], gone["error_type"], gone_tiles.num_rows) == ("error", "slide_not_found", 0)
    assert here["status"] == "ok" and here_tiles.num_rows == 10 and here["etag"]


def test_multi_file_formats_are_staged_whole(s3_server, s3_bucket, tmp_path):
    fs = s3_server.fs
    files = {
        "m/case.mrxs": b"index",
        "m/case/Slidedat.ini": b"ini",
        "m/case/Data0000.dat": b"data",
        "m/other.txt": b"not part of it",
        "dicom/series/1.dcm": b"a",
        "dicom/series/2.dcm": b"bb",
    }
    for key, data in files.items():
        fs.pipe(f"{s3_bucket}/{key}", data)
    with Scratch(str(tmp_path / "scratch")) as scratch:
        mrxs = scratch.stage(f"s3://{s3_bucket}/m/case.mrxs", s3_server.storage_options)
        base = os.path.dirname(mrxs.local_path)
        assert sorted(os.path.relpath(os.path.join(d, f), base) for d, _, fs_ in os.walk(base) for f in fs_) == [
            "case.mrxs",
            "case/Data0000.dat",
            "case/Slidedat.ini",
        ]
        assert mrxs.size_bytes == len(b"index") + len(b"ini") + len(b"data")
        dcm = scratch.stage(f"s3://{s3_bucket}/dicom/series/1.dcm", s3_server.storage_options)
        assert sorted(os.listdir(os.path.dirname(dcm.local_path))) == ["1.dcm", "2.dcm"]
        prefix = scratch.stage(f"s3://{s3_bucket}/dicom/series/", s3_server.storage_options)
        assert sorted(os.listdir(prefix.local_path)) == ["1.dcm", "2.dcm"]
        for staged in (mrxs, dcm, prefix):
            staged.release()
        assert scratch.used_bytes == mrxs.size_bytes + dcm.size_bytes + prefix.size_bytes  # cached until evicted
        with pytest.raises(PathrayError):  # staged fine, but not a slide
            open_slide(f"s3://{s3_bucket}/m/case.mrxs", scratch=scratch, storage_options=s3_server.storage_options)


def test_manifest_on_s3_with_relative_slide_paths(s3_server, s3_bucket, s3_slide):
    s3_server.fs.pipe(f"{s3_bucket}/m2.jsonl", b'{"path": "slides/synthetic_025.svs"}\n')
    (entry,) = read_manifest(f"s3://{s3_bucket}/m2.jsonl", s3_server.storage_options)
    assert (entry.slide_id, entry.path) == ("synthetic_025", s3_slide)
    with open_slide(entry.path, storage_options=s3_server.storage_options) as slide:
        assert slide.dimensions == (4096, 3072)
