"""A run whose models were trained on different tiles embeds each at its own native tile.

kaiko ViT-S/16 (224 px at 0.5 µm/px) and Prov-GigaPath (256 px at 0.5 µm/px: its card's
Resize(256) -> CenterCrop(224)) in one run, on real slide files: each slide is planned once,
each model's rows equal its own tiler + encoder, both are queryable, the store records each
model's tiling, and runs of either model alone afterwards find nothing to do.
"""

from __future__ import annotations

import csv
import os

import numpy as np
import pyarrow.compute as pc
import pytest
from fixtures.slides import write_manifest

from pathray.encoders import EncoderConfig, load_encoder
from pathray.job.config import build_job_config
from pathray.job.raydata import run_job
from pathray.job.stages import SlidePlanner
from pathray.store import FeatureStore
from pathray.tiling.grid import plan_tiles, read_tiles
from pathray.wsi.slide import open_slide

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]  # a two-model pipeline run per module

MODELS = ("kaiko-vits16", "prov-gigapath")


@pytest.fixture(scope="module")
def two_tiling_run(tmp_path_factory, synthetic_svs_05, synthetic_svs_025, cmu_slide, random_weights):
    tmp = tmp_path_factory.mktemp("native_tiles")
    manifest = write_manifest(
        tmp / "m.csv",
        [
            {"slide_id": "s05", "path": str(synthetic_svs_05.path)},
            {"slide_id": "s025", "path": str(synthetic_svs_025.path)},
            {"slide_id": "cmu", "path": os.fspath(cmu_slide)},
        ],
    )
    weights = {
        "kaiko-vits16": random_weights("kaiko-vits16", depth=1),
        "prov-gigapath": random_weights("prov-gigapath", depth=1),
    }
    raw = dict(
        manifest=str(manifest),
        out=str(tmp / "store"),
        models=list(MODELS),
        chunk_tiles=16,
        runner="local",
        weights={m: str(w) for m, w in weights.items()},
    )
    planned: list[str] = []
    original = SlidePlanner.plan_one

    def counting(self, slide):  # the real planner, counted
        planned.append(slide["slide_id"])
        return original(self, slide)

    SlidePlanner.plan_one = counting
    try:
        report = run_job(build_job_config(raw), progress_bars=False)
    finally:
        SlidePlanner.plan_one = original
    return raw, report, FeatureStore(raw["out"]), weights, planned


def test_each_model_gets_its_native_tile_and_each_slide_is_planned_once(two_tiling_run):
    raw, report, store, weights, planned = two_tiling_run
    assert report.exit_code == 0 and report.errors == 0
    assert sorted(planned) == ["cmu", "s025", "s05"]
    config = build_job_config(raw)
    for model in MODELS:
        tiling = config.tiling_of(model)
        encoder = load_encoder(EncoderConfig(model, weights=str(weights[model]), device="cpu"))
        table = store.dataset(model).to_table()
        assert set(pc.unique(table.column("tile_px")).to_pylist()) == {tiling.tile_px}
        for row in _manifest(raw["manifest"]):
            got = table.filter(pc.equal(table.column("slide_id"), row["slide_id"])).sort_by("tile_index")
            with open_slide(row["path"]) as slide:
                grid = plan_tiles(slide, row["slide_id"], tiling)
                tiles = read_tiles(slide, tiling, grid.x, grid.y)
            assert got.num_rows == len(grid) > 0
            np.testing.assert_array_equal(got.column("x").to_numpy(), grid.x)
            stored = np.stack(got.column("embedding").to_numpy(zero_copy_only=False))
            np.testing.assert_allclose(stored, encoder(tiles), atol=1e-4, rtol=0)
    assert config.tiling_of("prov-gigapath").tile_px == 256 and config.tiling_of("kaiko-vits16").tile_px == 224


def _manifest(path: str) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_store_records_each_models_tiling_and_both_are_queryable(two_tiling_run):
    import duckdb

    raw, _, store, _, _ = two_tiling_run
    assert store.tiling_of("kaiko-vits16")["tile_px"] == 224 and store.tiling_of("prov-gigapath")["tile_px"] == 256
    rows = duckdb.sql(
        f"SELECT model, min(tile_px), max(tile_px), count(DISTINCT slide_id) FROM read_parquet("
        f"'{raw['out']}/features/*/*/*.parquet', hive_partitioning=true) GROUP BY model ORDER BY model"
    ).fetchall()
    assert rows == [("kaiko-vits16", 224, 224, 3), ("prov-gigapath", 256, 256, 3)]
    status = store.slides().to_pylist()
    assert sorted((r["model"], r["status"]) for r in status) == sorted((m, "ok") for m in MODELS for _ in range(3))


@pytest.mark.parametrize("models", [MODELS, ("prov-gigapath",), ("kaiko-vits16",)])
def test_reruns_of_any_subset_find_nothing_to_do(two_tiling_run, models):
    raw, _, _, _, _ = two_tiling_run
    report = run_job(
        build_job_config(dict(raw, models=list(models), weights={m: raw["weights"][m] for m in models})),
        progress_bars=False,
    )
    assert report.exit_code == 0 and report.slides_skipped == 3 and report.pairs_to_do == 0
