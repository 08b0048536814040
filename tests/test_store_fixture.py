"""A store written by earlier pathray code (tests/data/store_v1/, made by
tests/reference/store_fixture.py) still reads, exports, reports its status and takes new
slides: the on-disk format is a contract that code moves must not break."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from fixtures.slides import write_manifest

from pathray.demo.synthetic import write_synthetic_svs

FIXTURE = Path(__file__).parent / "data" / "store_v1"


@pytest.fixture
def old_store(tmp_path) -> Path:
    root = tmp_path / "store"
    shutil.copytree(FIXTURE, root)
    return root


def _open(root: Path):
    from pathray.store import FeatureStore

    return FeatureStore(str(root))


def test_old_store_reads_tiles_slides_errors_and_slide_features(old_store):
    store = _open(old_store)
    assert sorted(store.models()) == ["sleep16", "sleep8"]
    for model, dim in (("sleep8", 8), ("sleep16", 16)):
        table = store.dataset(model).to_table()
        records = store.commit_records(model)
        assert sorted(records) == ["slide0", "slide1"]
        counts = {s: table["slide_id"].to_pylist().count(s) for s in records}
        assert counts == {s: r.n_tiles for s, r in records.items()}
        assert len(table["embedding"][0]) == dim and set(table["case_id"].to_pylist()) == {"case0", "case1"}
    status = {r["slide_id"]: r["status"] for r in store.slides().to_pylist() if r["model"] == "sleep8"}
    assert status == {"slide0": "ok", "slide1": "ok", "broken": "error"}
    assert "broken" in store.errors()["slide_id"].to_pylist()
    pooled = store.slide_features("sleep8", "mean").to_table().to_pylist()
    tiles = store.dataset("sleep8").to_table()
    for row in pooled:
        mask = np.array(tiles["slide_id"].to_pylist()) == row["slide_id"]
        want = np.stack(tiles["embedding"].to_numpy(zero_copy_only=False)[mask]).mean(axis=0)
        np.testing.assert_allclose(row["embedding"], want, rtol=1e-6)
    assert store.tiling_of("sleep16")["tile_px"] == 224


def test_old_store_exports_and_reports_status(old_store, tmp_path):
    import h5py

    from pathray.exchange.export import export_store
    from pathray.store.status import store_status

    report = export_store(_open(old_store), "sleep16", "trident-h5", str(tmp_path / "h5"))
    assert sorted(report.written) == ["slide0", "slide1"] and not report.errors
    with h5py.File(tmp_path / "h5" / "h5_files" / "slide0.h5") as f:
        assert f["features"].shape[1] == 16
    status = store_status(_open(old_store))
    assert {m: (s["committed"], s["errors"]) for m, s in status["models"].items()} == {
        "sleep8": (2, {"slide_unreadable": 1}),
        "sleep16": (2, {"slide_unreadable": 1}),
    }
    assert status["aggregations"] == [{"model": "sleep8", "aggregator": "mean", "slides": 2}]


def test_old_store_takes_new_slides_and_refuses_a_different_slide_under_a_committed_id(old_store, tmp_path):
    from pathray.job.config import build_job_config
    from pathray.job.raydata import run_job
    from pathray.testing import sleep_encoder

    paths = [
        write_synthetic_svs(
            tmp_path / f"new{i}.svs",
            (2016, 1344),
            mpp=0.5,
            tissue_rects=((0, 0, 672, 448),),
            seed=7 + i,
            downsamples=(1, 4),
        )
        for i in range(2)
    ]
    manifest = write_manifest(
        tmp_path / "manifest.csv",
        [
            {"slide_id": "slide0", "path": str(paths[0]), "cohort": "brca", "case_id": "case0"},
            {"slide_id": "slide2", "path": str(paths[1]), "cohort": "luad", "case_id": "case2"},
        ],
    )
    config = build_job_config(
        dict(
            manifest=str(manifest),
            out=str(old_store),
            models=["sleep8", "sleep16"],
            tiling={"tile_px": 224, "target_mpp": 0.5},
            chunk_tiles=4,
            keep_columns=["case_id"],
            runner="local",
        )
    )
    run_job(
        config,
        {"sleep8": sleep_encoder(1e6, embed_dim=8), "sleep16": sleep_encoder(1e6, embed_dim=16)},
        progress_bars=False,
    )
    store = _open(old_store)
    assert sorted(store.commit_records("sleep8")) == ["slide0", "slide1", "slide2"]
    errors = [(r["slide_id"], r["error_type"]) for r in store.errors().to_pylist() if r["model"] == "sleep8"]
    assert ("slide0", "slide_id_conflict") in errors and store.commit_record("sleep8", "slide0").n_tiles == 6
    assert sorted(set(store.dataset("sleep8").to_table()["slide_id"].to_pylist())) == ["slide0", "slide1", "slide2"]
