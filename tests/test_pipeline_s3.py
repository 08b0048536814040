"""The job against a real S3-compatible server: manifest, slides and store all on s3://."""

from __future__ import annotations

import os
import time

import numpy as np
import pyarrow.dataset as pads
import pytest

from pathray.job.config import build_job_config
from pathray.job.raydata import run_job
from pathray.store import FeatureStore
from pathray.testing import pixel_statistics, sleep_encoder

pytestmark = [pytest.mark.s3, pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.mark.parametrize("runner", ["ray", "local"])
def test_job_reads_and_writes_s3(
    runner, ray_cluster, s3_server, s3_bucket, synthetic_svs_025, synthetic_svs_05, tmp_path
):
    fs = s3_server.fs
    for name, src in (("a.svs", synthetic_svs_025), ("b.svs", synthetic_svs_05)):
        fs.put(os.fspath(src), f"{s3_bucket}/slides/{name}")
    manifest = (
        f"slide_id,path,cohort\na,s3://{s3_bucket}/slides/a.svs,x\nb,s3://{s3_bucket}/slides/b.svs,y\n"
        f"gone,s3://{s3_bucket}/slides/gone.svs,y\n"
    )
    fs.pipe(f"{s3_bucket}/manifest.csv", manifest.encode())
    config = build_job_config(
        dict(
            manifest=f"s3://{s3_bucket}/manifest.csv",
            out=f"s3://{s3_bucket}/store",
            models=["sleep"],
            tiling={"tile_px": 224, "target_mpp": 0.5},
            chunk_tiles=4,
            storage_options=s3_server.storage_options,
            scratch_dir=str(tmp_path / "scratch"),
            runner=runner,
        )
    )
    report = run_job(config, {"sleep": sleep_encoder(tiles_per_s=1e4, embed_dim=6)}, progress_bars=False)
    assert report.runner == runner
    assert report.per_model["sleep"]["ok"] == 2 and report.per_model["sleep"]["error"] == 1

    # plain pyarrow over s3fs, no pathray code: only whole, committed slides are there
    table = pads.dataset(f"{s3_bucket}/store/features", filesystem=fs, partitioning="hive").to_table()
    assert sorted(set(table.column("slide_id").to_pylist())) == ["a", "b"]
    assert set(table.column("model").to_pylist()) == {"sleep"}
    assert table.num_rows == report.tiles_planned > 0

    # embeddings belong to their own tiles: recompute from a local read of slide a
    from pathray.tiling.grid import read_tiles
    from pathray.wsi.slide import open_slide

    a = table.filter(pads.field("slide_id") == "a").sort_by("tile_index")
    with open_slide(os.fspath(synthetic_svs_025)) as slide:
        tiles = read_tiles(slide, config.tiling, a.column("x").to_numpy(), a.column("y").to_numpy())
    np.testing.assert_allclose(
        np.stack(a.column("embedding").to_numpy(zero_copy_only=False)), pixel_statistics(tiles, 6), rtol=1e-5
    )

    store = FeatureStore(config.out, s3_server.storage_options)
    slides = {r["slide_id"]: r for r in store.slides().to_pylist()}
    assert slides["gone"]["error_type"] in ("staging_failed", "slide_not_found")
    assert slides["a"]["status"] == "ok" and slides["a"]["mpp"] == pytest.approx(0.25)
    # credentials never reach the store
    for path in fs.find(f"{s3_bucket}/store"):
        if path.endswith(".json"):
            assert s3_server.secret_key not in fs.cat_file(path).decode()
    # SVS slides are read by byte range: nothing is ever staged for them
    deadline = time.time() + 30
    while time.time() < deadline and list((tmp_path / "scratch").rglob("*.svs")):
        time.sleep(0.5)
    assert not list((tmp_path / "scratch").rglob("*.svs"))
