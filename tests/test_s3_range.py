"""s3:// slides read by byte range (no staging) and the node-wide staging cache, on a real S3 server."""

from __future__ import annotations

import multiprocessing
import os

import numpy as np
import openslide
import pytest

from pathray.errors import PathrayError, StagingError
from pathray.tiling.grid import TilingConfig, plan_tiles, read_tiles
from pathray.wsi.openslide_backend import OpenSlideBackend
from pathray.wsi.scratch import Scratch
from pathray.wsi.slide import open_slide
from pathray.wsi.tiffrange import HEADER_WINDOW_BYTES, TiffRangeBackend

pytestmark = pytest.mark.s3
NOT_COMPUTED = {"openslide.quickhash-1"}  # the range reader does not hash the file


def _upload(s3_server, bucket: str, local, name: str) -> str:
    uri = f"s3://{bucket}/slides/{name}"
    s3_server.fs.put_file(os.fspath(local), uri)
    return uri


@pytest.mark.parametrize("fixture", ["synthetic_svs_025", "synthetic_svs_05", "generic_tiff", "cmu_slide"])
def test_range_reads_equal_local_reads(request, fixture, s3_server, s3_bucket, tmp_path):
    local = request.getfixturevalue(fixture)
    uri = _upload(s3_server, s3_bucket, local, os.path.basename(os.fspath(local)))
    config = TilingConfig(min_tissue_fraction=0.0 if fixture == "cmu_slide" else 0.25)
    scratch = Scratch(str(tmp_path / "scratch"))
    with (
        open_slide(os.fspath(local)) as ref,
        open_slide(uri, scratch=scratch, storage_options=s3_server.storage_options) as remote,
    ):
        assert isinstance(remote.backend, TiffRangeBackend) and remote.local_path is None
        with openslide.OpenSlide(os.fspath(local)) as reference:
            reference_props = dict(reference.properties)
        assert remote.properties == {k: v for k, v in reference_props.items() if k not in NOT_COMPUTED}
        assert (remote.vendor, remote.mpp, remote.mpp_source) == (ref.vendor, ref.mpp, ref.mpp_source)
        assert (remote.level_dimensions, remote.level_downsamples) == (ref.level_dimensions, ref.level_downsamples)
        assert remote.etag and remote.size_bytes == os.path.getsize(local)
        grid, remote_grid = plan_tiles(ref, "s", config), plan_tiles(remote, "s", config)
        assert len(grid) > 0
        assert np.array_equal(grid.x, remote_grid.x) and np.array_equal(grid.y, remote_grid.y)
        assert np.array_equal(read_tiles(remote, config, grid.x, grid.y), read_tiles(ref, config, grid.x, grid.y))
        for level, (w, h) in enumerate(ref.level_dimensions):  # windows crossing the slide's edges too
            ds = ref.level_downsamples[level]
            window = (round(-40 * ds), round((h // 3) * ds), level, w + 80, h // 2 + 40)
            assert np.array_equal(remote.read_region(*window), ref.read_region(*window))
            assert np.abs(remote.read_region(*window).astype(int) - ref.read_region_openslide(*window)).max() <= 1
    assert scratch.used_bytes == 0 and set(os.listdir(scratch.root)) <= {".lock"}  # nothing staged


def test_planning_fetches_only_the_header_and_the_tissue_level(s3_server, s3_bucket, s3_proxy, synthetic_svs_025):
    uri = _upload(s3_server, s3_bucket, synthetic_svs_025, "big.svs")
    options = s3_proxy.storage_options(s3_server.storage_options)
    import tifffile

    with tifffile.TiffFile(os.fspath(synthetic_svs_025)) as tif:
        level_bytes = [int(sum(p.databytecounts)) for p in tif.pages]
        largest_tile = [max(p.databytecounts) for p in tif.pages]
    header_allowance = len(level_bytes) * HEADER_WINDOW_BYTES  # one window per IFD read
    with open_slide(uri, storage_options=options) as slide:
        grid = plan_tiles(slide, "s", TilingConfig())
        planned = s3_proxy.bytes_for("slides/big.svs")
        read_tiles(slide, TilingConfig(), grid.x[:2], grid.y[:2])  # two tiles of level 0: 448 px each
        after_read = s3_proxy.bytes_for("slides/big.svs") - planned
    # header, the tissue-detection level (2), the probe's level-0 tile and level-2 tile: level 0 not fetched
    assert planned <= header_allowance + level_bytes[2] + largest_tile[0] + largest_tile[2]
    assert planned < level_bytes[0] / 2
    assert 0 < after_read < 0.25 * level_bytes[0]  # reading two tiles fetched a few JPEG tiles, not the level


def test_formats_the_range_reader_does_not_cover_are_staged(s3_server, s3_bucket, generic_tiff_deflate, tmp_path):
    uri = _upload(s3_server, s3_bucket, generic_tiff_deflate, "deflate.tif")
    config = TilingConfig()
    with (
        Scratch(str(tmp_path / "scratch")) as scratch,
        open_slide(os.fspath(generic_tiff_deflate)) as ref,
        open_slide(uri, scratch=scratch, storage_options=s3_server.storage_options) as remote,
    ):
        assert isinstance(remote.backend, OpenSlideBackend) and remote.local_path.startswith(scratch.root)
        assert scratch.used_bytes == remote.size_bytes == os.path.getsize(generic_tiff_deflate)
        assert (remote.vendor, remote.mpp) == ("generic-tiff", 0.5)
        grid = plan_tiles(ref, "s", config)
        assert np.array_equal(read_tiles(remote, config, grid.x, grid.y), read_tiles(ref, config, grid.x, grid.y))


def _read_staged(args: tuple) -> tuple[bool, int]:
    """In a fresh process: open the staged slide through the shared cache, read tiles."""
    uri, options, root, barrier = args
    barrier.wait(timeout=60)
    with open_slide(uri, scratch=Scratch(root, 10 * 2**20), storage_options=options) as slide:
        grid = plan_tiles(slide, "s", TilingConfig())
        tiles = read_tiles(slide, TilingConfig(), grid.x, grid.y)
        return slide.source.staged.downloaded, int(tiles.astype(np.int64).sum())


def test_staged_slide_is_fetched_once_per_node_by_several_processes(
    s3_server, s3_bucket, s3_proxy, generic_tiff_deflate, tmp_path
):
    uri = _upload(s3_server, s3_bucket, generic_tiff_deflate, "shared.tif")
    options = s3_proxy.storage_options(s3_server.storage_options)
    with open_slide(os.fspath(generic_tiff_deflate)) as ref:
        grid = plan_tiles(ref, "s", TilingConfig())
        expected = int(read_tiles(ref, TilingConfig(), grid.x, grid.y).astype(np.int64).sum())
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(3)
        with ctx.Pool(3) as pool:
            results = pool.map(_read_staged, [(uri, options, str(tmp_path / "node"), barrier)] * 3)
    assert sorted(downloaded for downloaded, _ in results) == [False, False, True]
    assert all(total == expected for _, total in results)
    # one whole-object download; every other GET was a header window of the range reader's probe (it declines deflate)
    gets = [n for key, n in s3_proxy.gets if key.endswith("slides/shared.tif")]
    assert [n for n in gets if n > HEADER_WINDOW_BYTES] == [os.path.getsize(generic_tiff_deflate)]


def test_node_cache_budget_evicts_unused_lru_entries_only(s3_server, s3_bucket, tmp_path):
    fs = s3_server.fs
    for name in "abcd":
        fs.pipe(f"{s3_bucket}/m/{name}.mrxs", bytes(1000))

    def stage(name, scratch):
        return scratch.stage(f"s3://{s3_bucket}/m/{name}.mrxs", s3_server.storage_options)

    root = str(tmp_path / "node")
    first, second = Scratch(root, max_bytes=2500), Scratch(root, max_bytes=2500)  # two actors of one node
    a = stage("a", first)
    b = stage("b", second)
    b.release()
    assert first.used_bytes == 2000 and os.path.exists(b.local_path)  # released entries stay cached
    again = stage("b", first)
    assert not again.downloaded  # found in the node cache
    again.release()
    c = stage("c", second)  # needs room: evicts b (unused), never a (in use)
    assert c.downloaded and os.path.exists(a.local_path) and not os.path.exists(b.local_path)
    with pytest.raises(StagingError, match="in use"):  # a and c held: 2000 + 1000 > 2500
        stage("d", first)
    assert first.used_bytes == 2000
    a.release()
    d = stage("d", first)
    assert not os.path.exists(a.local_path) and os.path.exists(c.local_path) and first.used_bytes == 2000
    c.release()
    d.release()


def test_truncated_object_is_slide_unreadable(s3_server, s3_bucket, truncated_svs):
    uri = _upload(s3_server, s3_bucket, truncated_svs, "truncated.svs")
    with pytest.raises(PathrayError) as info:
        open_slide(uri, storage_options=s3_server.storage_options)
    assert info.value.error_type == "slide_unreadable" and "truncated" in str(info.value)


@pytest.mark.parametrize("name", ["denied.svs", "denied.mrxs"])  # range-read and staged paths
def test_access_denied_object_is_a_per_slide_error(s3_server, s3_bucket, synthetic_svs_05, name):
    uri = _upload(s3_server, s3_bucket, synthetic_svs_05, name)
    with pytest.raises(PathrayError) as info:
        open_slide(uri, storage_options=s3_server.limited_storage_options)
    assert info.value.error_type == "slide_access_denied"


def test_range_reads_survive_throttling(s3_server, s3_bucket, s3_proxy, synthetic_svs_05):
    uri = _upload(s3_server, s3_bucket, synthetic_svs_05, "throttled.svs")
    s3_proxy.throttle_every = 3  # every third request answered 503 SlowDown
    config = TilingConfig()
    with open_slide(os.fspath(synthetic_svs_05)) as ref:
        grid = plan_tiles(ref, "s", config)
        expected = read_tiles(ref, config, grid.x, grid.y)
    with open_slide(uri, storage_options=s3_proxy.storage_options(s3_server.storage_options)) as slide:
        remote_grid = plan_tiles(slide, "s", config)
        assert np.array_equal(remote_grid.x, grid.x) and np.array_equal(remote_grid.y, grid.y)
        assert np.array_equal(read_tiles(slide, config, grid.x, grid.y), expected)
    assert s3_proxy.throttled > 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_job_through_a_throttling_proxy_writes_a_complete_correct_store(
    ray_cluster, s3_server, s3_bucket, s3_proxy, synthetic_svs_025
):
    import pyarrow.dataset as pads

    from pathray.job.config import build_job_config
    from pathray.job.raydata import run_job
    from pathray.testing import pixel_statistics, sleep_encoder

    uri = _upload(s3_server, s3_bucket, synthetic_svs_025, "a.svs")
    s3_server.fs.pipe(f"{s3_bucket}/manifest.csv", f"slide_id,path\na,{uri}\n".encode())
    s3_proxy.throttle_every = 4  # a quarter of all requests (reads, listings, writes) get 503 SlowDown
    options = s3_proxy.storage_options(s3_server.storage_options)
    config = build_job_config(
        {
            "manifest": f"s3://{s3_bucket}/manifest.csv",
            "out": f"s3://{s3_bucket}/store",
            "models": ["sleep"],
            "tiling": {"tile_px": 224, "target_mpp": 0.5},
            "chunk_tiles": 4,
            "storage_options": options,
        }
    )
    report = run_job(config, {"sleep": sleep_encoder(tiles_per_s=1e4, embed_dim=6)}, progress_bars=False)
    assert report.per_model["sleep"]["ok"] == 1 and s3_proxy.throttled > 0
    table = pads.dataset(f"{s3_bucket}/store/features", filesystem=s3_server.fs, partitioning="hive").to_table()
    table = table.sort_by("tile_index")
    assert table.num_rows == report.tiles_planned == 10
    with open_slide(os.fspath(synthetic_svs_025)) as slide:
        tiles = read_tiles(slide, config.tiling, table.column("x").to_numpy(), table.column("y").to_numpy())
    np.testing.assert_allclose(
        np.stack(table.column("embedding").to_numpy(zero_copy_only=False)), pixel_statistics(tiles, 6), rtol=1e-5
    )


def test_a_storage_timeout_is_a_per_slide_error_not_a_hang(s3_server, s3_bucket, s3_proxy, synthetic_svs_05):
    uri = _upload(s3_server, s3_bucket, synthetic_svs_05, "stalled.svs")
    s3_proxy.stall_gets = True  # HEAD answers, every GET hangs
    options = s3_proxy.storage_options(s3_server.storage_options)
    options["config_kwargs"] = {"read_timeout": 1, "retries": {"max_attempts": 1}}
    with pytest.raises(PathrayError) as info:
        open_slide(uri, storage_options=options)
    assert info.value.error_type == "storage_timeout"


def test_reader_lets_go_of_its_open_slides_when_the_node_cache_is_full(
    s3_server, s3_bucket, generic_tiff_deflate, tmp_path
):

    import pyarrow as pa

    from pathray.job.rows import SLIDE_SCHEMA
    from pathray.job.stages import ChunkReader, SlidePlanner

    uris = [_upload(s3_server, s3_bucket, generic_tiff_deflate, f"{name}.tif") for name in "ab"]
    budget = int(1.5 * os.path.getsize(generic_tiff_deflate))  # one staged copy fits, two do not
    args = (TilingConfig(), 64, s3_server.storage_options, str(tmp_path / "node"), budget)
    slides = pa.Table.from_pylist(
        [{"slide_id": n, "path": u, "cohort": "", "mpp_override": None, "models": ["m"]} for n, u in zip("ab", uris)],
        schema=SLIDE_SCHEMA,
    )
    chunks = SlidePlanner(*args)(slides)
    assert chunks.column("status").to_pylist() == ["ok", "ok"]
    reader = ChunkReader(args[0], *args[2:])
    try:
        out = pa.concat_tables([reader.read_chunk(chunks.slice(0, 1)), reader.read_chunk(chunks.slice(1, 1))])
    finally:
        reader.close()
    assert out.column("status").to_pylist() == ["ok", "ok"] and out.column("tiles_read").to_pylist() == [6, 6]


def test_a_reader_fetches_the_tiles_neighbouring_chunks_share_once(s3_server, s3_bucket, synthetic_svs_025):
    """Chunks of 4 tiles of one slide, read in sequence by one reader (as the job gives a
    reader all chunks of a slide): bytes pulled stay within the object's size, where readers
    that each see one chunk fetch the stored tiles on every chunk boundary again."""
    import pyarrow as pa

    from pathray.job.rows import SLIDE_SCHEMA
    from pathray.job.stages import ChunkReader, SlidePlanner
    from pathray.wsi.rangeio import STATS

    uri = _upload(s3_server, s3_bucket, synthetic_svs_025, "chunks.svs")
    size = s3_server.fs.size(uri)
    config = TilingConfig(min_tissue_fraction=0.0)  # every grid tile: an all-tissue slide's worth of reads
    slides = pa.Table.from_pylist(
        [{"slide_id": "a", "path": uri, "cohort": "", "mpp_override": None, "models": ["m"]}], schema=SLIDE_SCHEMA
    )
    chunks = SlidePlanner(config, 4, s3_server.storage_options)(slides)
    assert chunks.num_rows > 10

    def pulled(readers_per_chunk: bool) -> int:
        STATS.reset()
        if readers_per_chunk:
            for i in range(chunks.num_rows):
                reader = ChunkReader(config, s3_server.storage_options)
                reader.read_chunk(chunks.slice(i, 1))
                reader.close()
        else:
            reader = ChunkReader(config, s3_server.storage_options)
            assert sum(t.column("tiles_read")[0].as_py() for t in reader(chunks)) == 9 * 6
            reader.close()
        return STATS.bytes_fetched

    one_reader, reader_each = pulled(False), pulled(True)
    assert one_reader <= size < reader_each, (one_reader, size, reader_each)
