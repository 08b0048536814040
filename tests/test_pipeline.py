"""End-to-end tests of the Ray Data job on a local 2-CPU Ray cluster, on real slide files."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from fixtures.slides import write_manifest

from pathray.encoders import EncoderConfig, load_encoder
from pathray.errors import StoreConfigMismatchError
from pathray.job.config import build_job_config
from pathray.job.raydata import run_job
from pathray.store import FeatureStore
from pathray.testing import sleep_encoder
from pathray.tiling.grid import plan_tiles, read_tiles
from pathray.wsi.slide import open_slide

pytestmark = pytest.mark.timeout(420)


def direct_embeddings(slide_path, slide_id, tiling, encoder, mpp=None):
    """Tiler + encoder run directly on one slide, no Ray: the reference for the store."""
    with open_slide(os.fspath(slide_path), mpp_override=mpp) as slide:
        grid = plan_tiles(slide, slide_id, tiling)
        tiles = read_tiles(slide, tiling, grid.x, grid.y)
    return grid, encoder(tiles)


@pytest.fixture(scope="module", params=["ray", "local"])
def mixed_run(request, ray_cluster, mixed_manifest, cmu_slide, kaiko_vits16_weights, tmp_path_factory):
    """One run over good, blank and broken slides plus the real CMU H&E slide, with one
    valid model, one model whose weights are missing and one unknown model name; once with
    the Ray Data plan and once with the in-process runner (the same stages, no Ray)."""
    tmp = tmp_path_factory.mktemp(f"mixed_run_{request.param}")
    with open(mixed_manifest.path) as f:
        rows = list(csv.DictReader(f))
    rows.append({"slide_id": "cmu", "path": os.fspath(cmu_slide), "mpp": "", "cohort": "real", "case_id": "cmu-1"})
    manifest = write_manifest(tmp / "manifest.csv", rows)
    config = build_job_config(
        dict(
            manifest=str(manifest),
            out=str(tmp / "store"),
            models=["kaiko-vits16", "uni", "no-such-model"],
            encoders={"kaiko-vits16": {"weights": str(kaiko_vits16_weights)}, "uni": {"weights": str(tmp / "absent")}},
            tiling={"tile_px": 224, "target_mpp": 0.5},
            chunk_tiles=8,
            keep_columns=["case_id"],
            runner=request.param,
        )
    )
    report = run_job(config, progress_bars=False)
    assert report.runner == request.param
    expected = dict(mixed_manifest.expected, cmu="ok")
    return config, report, FeatureStore(config.out), expected, {r["slide_id"]: r for r in rows}


def test_store_equals_tiler_plus_encoder_slide_by_slide(mixed_run, kaiko_vits16_weights):
    config, report, store, expected, rows = mixed_run
    encoder = load_encoder(EncoderConfig("kaiko-vits16", weights=str(kaiko_vits16_weights)))
    table = store.dataset("kaiko-vits16").to_table()
    ok = sorted(s for s, status in expected.items() if status == "ok")
    assert sorted(set(table.column("slide_id").to_pylist())) == ok
    for slide_id in ok:
        mpp = float(rows[slide_id]["mpp"]) if rows[slide_id]["mpp"] else None
        grid, embeddings = direct_embeddings(rows[slide_id]["path"], slide_id, config.tiling, encoder, mpp)
        got = table.filter(pc.equal(table.column("slide_id"), slide_id)).sort_by("tile_index")
        assert got.num_rows == len(grid) > 0
        np.testing.assert_array_equal(got.column("tile_index").to_numpy(), grid.tile_index)
        np.testing.assert_array_equal(got.column("x").to_numpy(), grid.x)
        np.testing.assert_array_equal(got.column("y").to_numpy(), grid.y)
        np.testing.assert_allclose(got.column("tissue_fraction").to_numpy(), grid.tissue_fraction, atol=1e-6)
        stored = np.stack(got.column("embedding").to_numpy(zero_copy_only=False))
        np.testing.assert_allclose(stored, embeddings, atol=1e-4, rtol=0)
        assert set(got.column("case_id").to_pylist()) == {rows[slide_id]["case_id"]}
        assert set(got.column("cohort").to_pylist()) == {rows[slide_id]["cohort"] or "unassigned"}
    assert report.tiles_read == report.tiles_planned == table.num_rows


def test_every_bad_input_is_a_recorded_error_and_the_rest_completes(mixed_run):
    config, report, store, expected, _ = mixed_run
    slides = store.slides().to_pylist()
    kaiko = {r["slide_id"]: r for r in slides if r["model"] == "kaiko-vits16"}
    for slide_id, want in expected.items():
        row = kaiko[slide_id]
        if want in ("ok", "no_tissue"):
            assert row["status"] == want, row
        else:
            assert (row["status"], row["error_type"]) == ("error", want), row
            assert row["error_message"]
    # a model whose weights are missing fails per slide, without stopping the other model
    uni = {r["slide_id"]: r for r in slides if r["model"] == "uni"}
    for slide_id, want in expected.items():
        if want == "ok":
            assert (uni[slide_id]["status"], uni[slide_id]["error_type"], uni[slide_id]["stage"]) == (
                "error",
                "weights_unavailable",
                "encode",
            )
    unknown = [r for r in slides if r["model"] == "no-such-model"]
    assert len(unknown) == len(expected) and {r["error_type"] for r in unknown} == {"unknown_model"}
    assert "kaiko-vits16" in unknown[0]["error_message"]  # the message lists the known models
    errors = store.errors()
    assert errors.num_rows == report.errors
    assert report.exit_code == 1


def test_provenance_and_run_record(mixed_run):
    config, report, store, _, _ = mixed_run
    import json

    dataset = store.dataset("kaiko-vits16")
    first = dataset.files[0]
    with store.fs.open(first, "rb") as f:
        meta = pq.read_schema(f).metadata
    provenance = json.loads(meta[b"pathray.provenance"])
    assert provenance["tiling"]["tile_px"] == 224 and provenance["tiling"]["target_mpp"] == 0.5
    assert provenance["model"]["weights_fingerprint"]
    assert provenance["run_id"] == report.run_id
    with open(os.path.join(config.out, "_runs", report.run_id, "report.json")) as f:
        saved = json.load(f)
    assert saved["tiles_read"] == report.tiles_read and saved["exit_code"] == 1
    assert "storage_options" not in saved["config"]


def test_rerun_skips_committed_and_refuses_other_config(mixed_run, ray_cluster):
    config, report, store, expected, _ = mixed_run
    files = sorted((Path(config.out) / "features" / "model=kaiko-vits16").rglob("*.parquet"))
    mtimes = [f.stat().st_mtime_ns for f in files]
    again = run_job(config, progress_bars=False)
    n_done = sum(1 for s in expected.values() if s in ("ok", "no_tissue"))
    # 'uni' (weights missing) committed only the tissue-free slide, which needs no encoder,
    # so that is the one slide skipped; the others are redone for 'uni' alone
    assert again.slides_skipped == sum(1 for s in expected.values() if s == "no_tissue") == 1
    # broken slides are retried (and fail again); committed ones are not re-embedded
    n_broken = sum(1 for s in expected.values() if s not in ("ok", "no_tissue"))
    assert again.per_model["kaiko-vits16"] == {"ok": 0, "no_tissue": 0, "error": n_broken, "tiles": 0}
    assert [f.stat().st_mtime_ns for f in files] == mtimes  # committed kaiko files untouched
    assert len(store.committed("kaiko-vits16")) == n_done
    # the summary counts (slide, model) pairs: kaiko's committed slides are not "0 already committed"
    assert again.committed_before["kaiko-vits16"] == n_done
    assert f"kaiko-vits16: ok 0, no_tissue 0, error {n_broken}, tiles 0, already committed {n_done}" in again.summary()
    other = build_job_config(
        dict(
            manifest=config.manifest,
            out=config.out,
            models=["kaiko-vits16"],
            encoders={"kaiko-vits16": {"weights": config.encoders["kaiko-vits16"].weights}},
            tiling={"tile_px": 256, "target_mpp": 0.5},
        )
    )
    with pytest.raises(StoreConfigMismatchError, match="tiling"):
        run_job(other, progress_bars=False)


def test_two_models_read_pixels_once(ray_cluster, synthetic_svs_025, synthetic_svs_05, random_weights, tmp_path):
    manifest = write_manifest(
        tmp_path / "m.csv",
        [
            {"slide_id": "a", "path": os.fspath(synthetic_svs_025), "cohort": "x"},
            {"slide_id": "b", "path": os.fspath(synthetic_svs_05), "cohort": "y"},
        ],
    )
    vits = random_weights("kaiko-vits16", depth=1)
    vitb = random_weights("kaiko-vitb16", depth=1)
    config = build_job_config(
        dict(
            manifest=str(manifest),
            out=str(tmp_path / "store"),
            models=["kaiko-vits16", "kaiko-vitb16"],
            chunk_tiles=4,
            encoders={
                "kaiko-vits16": {"weights": str(vits)},
                "kaiko-vitb16": {"weights": str(vitb), "output_dtype": "float16"},
            },
        )
    )
    report = run_job(config, progress_bars=False)
    store = FeatureStore(config.out)
    s = store.dataset("kaiko-vits16").to_table()
    b = store.dataset("kaiko-vitb16").to_table()
    assert s.num_rows == b.num_rows == report.tiles_planned > 0
    assert report.tiles_read == report.tiles_planned  # not 2x: both pools encoded the same read
    assert s.schema.field("embedding").type.list_size == 384
    assert b.schema.field("embedding").type.list_size == 768
    assert str(b.schema.field("embedding").type.value_type) == "halffloat"
    assert report.exit_code == 0


def test_new_version_writes_a_complete_separate_store(ray_cluster, synthetic_svs_05, random_weights, tmp_path):
    """--new-version on a tiling mismatch: every slide committed under versions/<hash>/, the
    original store untouched (no orphan staged chunks), and the dry run names that version."""
    from pathray.job.estimate import dry_run_plan

    manifest = write_manifest(tmp_path / "m.csv", [{"slide_id": "a", "path": os.fspath(synthetic_svs_05)}])
    weights = str(random_weights("kaiko-vits16", depth=1))
    base = dict(
        manifest=str(manifest),
        out=str(tmp_path / "store"),
        models=["kaiko-vits16"],
        chunk_tiles=4,
        encoders={"kaiko-vits16": {"weights": weights}},
    )
    first = run_job(build_job_config(dict(base, tiling={"tile_px": 224, "target_mpp": 0.5})), progress_bars=False)
    other = build_job_config(dict(base, tiling={"tile_px": 112, "target_mpp": 1.0}, new_version=True))
    planned = dry_run_plan(other)
    report = run_job(other, progress_bars=False)
    assert first.exit_code == report.exit_code == 0
    assert report.store.startswith(str(tmp_path / "store" / "versions")) and planned["store"] == report.store
    version = FeatureStore(report.store)
    assert version.committed("kaiko-vits16") == {"a"}
    tiles = version.dataset("kaiko-vits16").to_table()
    assert len(tiles) == report.tiles_planned > 0 and set(tiles.column("tile_px").to_pylist()) == {112}
    staged = [
        p for root in (tmp_path / "store", Path(report.store)) for p in (root / "_staging").rglob("*") if p.is_file()
    ]
    assert staged == []  # no orphan chunks: writers staged where the committer looked
    assert FeatureStore(str(tmp_path / "store")).dataset("kaiko-vits16").to_table().num_rows == first.tiles_planned


DRIVER = textwrap.dedent("""
    import sys
    from pathray.job.config import build_job_config
    from pathray.testing import sleep_encoder
    from pathray.job.raydata import run_job
    if sys.argv[5] == "ray":
        import ray
        ray.init(address=sys.argv[1], log_to_driver=False)
    config = build_job_config(dict(manifest=sys.argv[2], out=sys.argv[3], models=["sleep"], runner=sys.argv[5],
                                   tiling={"tile_px": 224, "target_mpp": 0.5}, chunk_tiles=2))
    run_job(config, {"sleep": sleep_encoder(tiles_per_s=float(sys.argv[4]))}, progress_bars=False)
""")


@pytest.mark.slow
@pytest.mark.parametrize("runner", ["ray", "local"])
def test_killed_driver_then_rerun_leaves_every_slide_exactly_once(runner, ray_cluster, slide_dir, tmp_path):
    from pathray.demo.synthetic import write_synthetic_svs

    rows = []
    for i in range(6):
        path = write_synthetic_svs(
            tmp_path / f"s{i}.svs", (1792, 1344), mpp=0.5, tissue_rects=[(0, 0, 1120, 672)], seed=i
        )
        rows.append({"slide_id": f"s{i}", "path": str(path), "cohort": "c"})
    manifest = write_manifest(tmp_path / "m.csv", rows)
    out = tmp_path / "store"
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    proc = subprocess.Popen(
        [sys.executable, str(script), ray_cluster, str(manifest), str(out), "20", runner],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    commits = out / "_commits" / "model=sleep"

    def records() -> set[str]:  # commit records, not a record's temporary file (.<name>.tmp-<hex>)
        return {p.stem for p in commits.glob("*.json") if not p.name.startswith(".")} if commits.exists() else set()

    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and not records():
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = records()
    assert 0 < len(before) < len(rows), f"kill landed after {len(before)} commits"

    config = build_job_config(
        dict(
            manifest=str(manifest),
            out=str(out),
            models=["sleep"],
            runner=runner,
            tiling={"tile_px": 224, "target_mpp": 0.5},
            chunk_tiles=2,
        )
    )
    report = run_job(config, {"sleep": sleep_encoder(tiles_per_s=1000)}, progress_bars=False)
    assert report.slides_skipped == len(before) and report.runner == runner
    store = FeatureStore(str(out))
    table = store.dataset("sleep").to_table()
    files = list((out / "features").rglob("*.parquet"))
    assert sorted(p.stem for p in files) == sorted(r["slide_id"] for r in rows)  # one file per slide
    for r in rows:
        got = table.filter(pc.equal(table.column("slide_id"), r["slide_id"]))
        index = got.column("tile_index").to_numpy()
        assert len(index) == len(set(index)) == 15  # 5 x 3 tissue tiles of 224 px at 0.5 µm/px
    slides = store.slides().to_pylist()
    assert sorted(s["slide_id"] for s in slides) == sorted(r["slide_id"] for r in rows)
    assert {s["status"] for s in slides} == {"ok"}
    assert not list((out / "_staging").rglob("*.parquet"))  # committed slides leave no staging behind


def test_aborted_run_keeps_its_record_and_a_rerun_finishes(ray_cluster, synthetic_svs_05, tmp_path):
    import json

    from ray.data import DataContext

    manifest = write_manifest(
        tmp_path / "m.csv", [{"slide_id": "b", "path": os.fspath(synthetic_svs_05), "cohort": "c"}]
    )
    config = build_job_config(
        dict(
            manifest=str(manifest),
            out=str(tmp_path / "store"),
            models=["sleep"],
            tiling={"tile_px": 224, "target_mpp": 0.5},
            chunk_tiles=2,
            run_id="stalled",
        )
    )
    ctx = DataContext.get_current()
    saved, ctx.execution_no_progress_timeout_s = ctx.execution_no_progress_timeout_s, 5
    try:
        with pytest.raises(Exception, match="(?i)progress|timeout"):  # an encoder that never finishes a chunk
            run_job(config, {"sleep": sleep_encoder(tiles_per_s=0.001)}, progress_bars=False)
    finally:
        ctx.execution_no_progress_timeout_s = saved
    record = json.loads((tmp_path / "store" / "_runs" / "stalled" / "report.json").read_text())
    assert record["aborted"] and record["per_model"]["sleep"]["ok"] == 0
    assert (tmp_path / "store" / "slides.parquet").exists()

    import dataclasses

    # the stalled encoder actor was killed with the aborted run (Ray Data only releases it): the
    # re-run in this same Ray session gets the CPUs it plans for
    done = run_job(
        dataclasses.replace(config, run_id="again"), {"sleep": sleep_encoder(tiles_per_s=1e4)}, progress_bars=False
    )
    assert done.aborted is None and done.per_model["sleep"]["ok"] == 1 and done.exit_code == 0
