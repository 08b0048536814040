"""DICOM WSI series read in place from S3 (SeaweedFS) by byte range, against OpenSlide 4.

Series are written in IDC's layout (``<uuid>/<SOPInstanceUID>.dcm``, one instance per level
plus a label) from the synthetic SVS and the real CMU slide by :mod:`pathray.demo.dicomize`:
JPEG tiles copied losslessly (YBR_FULL_422 and Aperio's RGB-coded JPEG), lossless JPEG 2000 (RGB)
lossy JPEG 2000 with the irreversible colour transform (YBR_ICT) and uncompressed RGB, with
Basic, Extended or no offset table, TILED_FULL and TILED_SPARSE.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openslide
import pytest

from pathray.demo.dicomize import FrameLayout, write_dicom_series
from pathray.wsi.dicom import open_dicom_series
from pathray.wsi.dicom_frames import DicomWsiError
from pathray.wsi.dicom_instance import WALK_WINDOW_BYTES

pytestmark = pytest.mark.s3

#: case -> (slide fixture, codec, offset table, expected PhotometricInterpretation, lossless)
CASES = {
    "synthetic-jpeg-ybr-bot": ("synthetic_svs_025", "jpeg", "basic", "YBR_FULL_422", True),
    "cmu-jpeg-rgb-no-table": ("cmu_slide", "jpeg", "none", "RGB", True),
    "synthetic-j2k-eot": ("synthetic_svs_05", "jpeg2000", "extended", "RGB", True),
    "cmu-j2k-bot": ("cmu_slide", "jpeg2000", "basic", "RGB", True),
    "synthetic-j2k-ict-no-table": ("synthetic_svs_05", "jpeg2000-ict", "none", "YBR_ICT", False),
    "synthetic-jpeg-sparse": ("synthetic_svs_025", "jpeg-sparse", "basic", "YBR_FULL_422", True),
    "synthetic-uncompressed": ("synthetic_svs_05", "raw", "basic", "RGB", True),
}


@dataclass(frozen=True)
class UploadedSeries:
    local_dir: Path  # the same files on local disk (read by OpenSlide)
    uri: str  # s3://bucket/<uuid>/
    source: Path  # the SVS it was made from
    photometric: str
    lossless: bool  # pixels equal the source's


@pytest.fixture(scope="module")
def dicom_bucket(s3_server) -> str:
    """A bucket readable without credentials (bucket policy), like IDC's idc-open-data."""
    name = f"pathray-idc-{uuid.uuid4().hex[:12]}"
    s3_server.fs.mkdir(name)
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": "*",
                "Action": ["s3:GetObject", "s3:ListBucket"],
                "Resource": [f"arn:aws:s3:::{name}", f"arn:aws:s3:::{name}/*"],
            }
        ],
    }
    s3_server.fs.call_s3("put_bucket_policy", Bucket=name, Policy=json.dumps(policy))
    return name


def anonymous(s3_server) -> dict:
    """s3fs options with no credentials at all: unsigned requests, as for the public IDC bucket."""
    return {
        "anon": True,
        "client_kwargs": {"endpoint_url": s3_server.endpoint_url, "region_name": s3_server.region},
        "use_listings_cache": False,
    }


@pytest.fixture(scope="module", params=list(CASES))
def series(request, tmp_path_factory, s3_server, dicom_bucket) -> UploadedSeries:
    slide_fixture, codec, table, photometric, lossless = CASES[request.param]
    source = Path(os.fspath(request.getfixturevalue(slide_fixture)))
    series_uuid = str(uuid.uuid4())
    sparse = codec.endswith("-sparse")
    written = write_dicom_series(
        source,
        tmp_path_factory.mktemp(request.param) / series_uuid,
        codec.removesuffix("-sparse"),
        table,
        layout=FrameLayout(sparse=sparse),
    )
    for path in written.files:
        s3_server.fs.put_file(str(path), f"{dicom_bucket}/{series_uuid}/{path.name}")
    return UploadedSeries(written.directory, f"s3://{dicom_bucket}/{series_uuid}/", source, photometric, lossless)


def _openslide_rgb(osr: openslide.OpenSlide, level: int, lx: int, ly: int, w: int, h: int) -> np.ndarray:
    """OpenSlide's read of level pixels, composited on white (outside the image → white)."""
    ds = osr.level_downsamples[level]
    rgba = np.asarray(osr.read_region((round(lx * ds), round(ly * ds)), level, (w, h))).astype(np.float32)
    alpha = rgba[..., 3:] / 255.0
    return np.round(rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)


def _dicom_file(series: UploadedSeries) -> str:
    return str(next(series.local_dir.glob("*.dcm")))


def test_in_place_pixels_equal_openslide_and_source(series, s3_server):
    backend = open_dicom_series(series.uri, anonymous(s3_server))
    local = openslide.OpenSlide(_dicom_file(series))
    source = openslide.OpenSlide(str(series.source))
    assert backend.level_dimensions == tuple(local.level_dimensions) == tuple(source.level_dimensions)
    assert backend.level_downsamples == pytest.approx(local.level_downsamples)
    assert backend.properties["dicom.PhotometricInterpretation"] == series.photometric
    for level, (w, h) in enumerate(backend.level_dimensions):
        whole = backend.read_level(level, 0, 0, w, h)
        np.testing.assert_array_equal(whole, _openslide_rgb(local, level, 0, 0, w, h))
        if series.lossless:
            np.testing.assert_array_equal(whole, _openslide_rgb(source, level, 0, 0, w, h))
        for lx, ly in ((-37, -11), (w - 150, h - 90), (w // 3, h // 2)):  # unaligned windows, over the edges
            window = backend.read_level(level, lx, ly, 300, 200)
            np.testing.assert_array_equal(window, _openslide_rgb(local, level, lx, ly, 300, 200))
    backend.close()


def test_mpp_from_pixel_spacing_equals_openslide(series, s3_server):
    backend = open_dicom_series(series.uri, s3_server.storage_options)
    local = openslide.OpenSlide(_dicom_file(series))
    source = openslide.OpenSlide(str(series.source))
    for key in ("openslide.mpp-x", "openslide.mpp-y"):
        assert float(backend.properties[key]) == pytest.approx(float(local.properties[key]), rel=1e-9)
        assert float(backend.properties[key]) == pytest.approx(float(source.properties[key]), rel=1e-9)
    assert backend.vendor == "dicom" and backend.properties["openslide.vendor"] == "dicom"


def test_one_tile_fetches_only_its_frames_and_cache_refetches_nothing(series, s3_server):
    backend = open_dicom_series(series.uri, s3_server.storage_options)
    inst = backend._levels[0]
    after_open, walked_before = backend.stats.bytes_fetched, len(inst.frame_ranges)
    cache: dict = {}
    # a 224-px region straddling 4 frames
    lx, ly = inst.tile_w - 100, inst.tile_h - 100
    backend.read_level(0, lx, ly, 224, 224, cache)
    indices = [i for r in (0, 1) for c in (0, 1) if (i := inst.frame_index(c, r)) is not None]  # sparse: none (white)
    pulled = backend.stats.bytes_fetched - after_open
    if not indices:
        assert pulled == 0
    else:
        ranges = [inst.frame_ranges[i] for i in indices]
        first, last = min(s for s, _ in ranges), max(e for _, e in ranges)
        # the frames not already inside the header read (kept), and the holes between them coalesced
        if inst.walk_from is not None:  # no offset table: items walked in windows, only past the last frame needed
            assert walked_before == 0 and max(indices) < inst.located <= len(inst.frame_ranges) < inst.frame_count
            assert pulled <= last + WALK_WINDOW_BYTES
        else:
            assert len(inst.frame_ranges) == walked_before and pulled <= last - first
    before = backend.stats.bytes_fetched
    backend.read_level(0, lx + 10, ly + 10, 100, 100, cache)
    assert backend.stats.bytes_fetched == before


def test_tissue_read_pulls_at_most_the_series_size(synthetic_svs_025, tmp_path, s3_server, dicom_bucket):
    """Open + lowest level (tissue detection) + every level-0 frame under tissue ≤ series bytes."""
    series_uuid = str(uuid.uuid4())
    written = write_dicom_series(synthetic_svs_025, tmp_path / series_uuid, "jpeg", "basic")
    for path in written.files:
        s3_server.fs.put_file(str(path), f"{dicom_bucket}/{series_uuid}/{path.name}")
    backend = open_dicom_series(f"s3://{dicom_bucket}/{series_uuid}/", s3_server.storage_options)
    low = len(backend.level_dimensions) - 1
    backend.read_level(low, 0, 0, *backend.level_dimensions[low])
    for x, y, w, h in synthetic_svs_025.tissue_rects:
        backend.read_level(0, x, y, w, h)
    ratio = backend.stats.bytes_fetched / backend.series_bytes
    assert 0 < ratio <= 1.0
    # and it is well below a full read: tissue covers under half of level 0
    assert ratio < 0.7


def test_sparse_level_has_frames_only_where_the_slide_is_not_white(synthetic_svs_025, tmp_path):
    written = write_dicom_series(
        synthetic_svs_025, tmp_path / "sparse", "jpeg", "basic", layout=FrameLayout(sparse=True)
    )
    level0 = open_dicom_series(str(written.directory))._levels[0]
    assert level0.sparse_frames is not None
    assert 0 < len(level0.frame_ranges) < level0.tiles_across * -(-level0.height // level0.tile_h)


def test_unsupported_layout_is_refused_clearly(synthetic_svs_05, tmp_path):
    import pydicom

    written = write_dicom_series(synthetic_svs_05, tmp_path / "3d", "jpeg", "basic")
    ds = pydicom.dcmread(written.files[0])
    ds.DimensionOrganizationType = "3D"
    ds.save_as(written.files[0])
    with pytest.raises(DicomWsiError, match="DimensionOrganizationType 3D"):
        open_dicom_series(str(written.directory))


def test_anonymous_access_is_unsigned(synthetic_svs_05, tmp_path, s3_server, s3_bucket):
    """The same anonymous options are refused on a bucket without a public policy."""
    for path in write_dicom_series(synthetic_svs_05, tmp_path / "s", "jpeg").files:
        s3_server.fs.put_file(str(path), f"{s3_bucket}/private/{path.name}")
    with pytest.raises(PermissionError):
        open_dicom_series(f"s3://{s3_bucket}/private/", anonymous(s3_server))
    assert open_dicom_series(f"s3://{s3_bucket}/private/", s3_server.storage_options).level_dimensions


def test_prefix_without_instances_is_an_error(tmp_path):
    with pytest.raises(DicomWsiError, match="no DICOM instances"):
        open_dicom_series(str(tmp_path))


@pytest.mark.slow
def test_the_job_embeds_dicom_series_read_in_place_equal_to_the_source_svs(
    synthetic_svs_025, synthetic_svs_05, tmp_path, s3_server, dicom_bucket, s3_bucket, ray_cluster, random_weights
):
    """IDC's layout end to end: series prefixes in a public-read bucket, read anonymously and in
    place by the job (no staging: the node cache stays empty) while the store goes to a private
    bucket with credentials; tiles and embeddings equal those of the source SVS read locally
    (the JPEG tiles were transferred losslessly), and a missing series is a recorded
    slide_not_found."""
    from pathray.job.config import build_job_config
    from pathray.job.raydata import run_job
    from pathray.store import FeatureStore

    uris = {}
    for name, source in (("a", synthetic_svs_025), ("b", synthetic_svs_05)):
        series_uuid = str(uuid.uuid4())
        written = write_dicom_series(Path(os.fspath(source)), tmp_path / series_uuid, "jpeg", "basic")
        for path in written.files:
            s3_server.fs.put_file(str(path), f"{dicom_bucket}/{series_uuid}/{path.name}")
        uris[name] = f"s3://{dicom_bucket}/{series_uuid}/"
    uris["gone"] = f"s3://{dicom_bucket}/{uuid.uuid4()}/"
    weights = str(random_weights("kaiko-vits16", depth=1))
    stores = {}
    for kind, paths in (("dicom", uris), ("svs", {"a": synthetic_svs_025, "b": synthetic_svs_05})):
        manifest = tmp_path / f"{kind}.csv"
        manifest.write_text("slide_id,path\n" + "".join(f"{k},{v}\n" for k, v in paths.items()))
        remote = kind == "dicom"
        config = build_job_config(
            dict(
                manifest=str(manifest),
                out=f"s3://{s3_bucket}/store" if remote else str(tmp_path / kind),
                models=["kaiko-vits16"],
                encoders={"kaiko-vits16": {"weights": weights}},
                chunk_tiles=8,
                scratch_dir=str(tmp_path / "scratch"),
                storage_options=s3_server.storage_options if remote else None,
                slide_storage_options=anonymous(s3_server) if remote else None,
            )
        )
        stores[kind] = (run_job(config, progress_bars=False), FeatureStore(config.out, config.storage_options))
    (report, dicom), (_, svs) = stores["dicom"], stores["svs"]
    assert dicom.committed("kaiko-vits16") == {"a", "b"}
    assert dicom.errors().column("error_type").to_pylist() == ["slide_not_found"] and report.exit_code == 1
    got = dicom.dataset("kaiko-vits16").to_table().sort_by([("slide_id", "ascending"), ("tile_index", "ascending")])
    want = svs.dataset("kaiko-vits16").to_table().sort_by([("slide_id", "ascending"), ("tile_index", "ascending")])
    assert got.num_rows == want.num_rows > 0
    for column in ("x", "y", "embedding"):
        assert got.column(column).to_pylist() == want.column(column).to_pylist(), column
    assert not any((tmp_path / "scratch").rglob("*.dcm"))  # nothing was staged
