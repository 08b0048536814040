"""`pathray aggregate` and `pathray export` end to end on a store written by the real embedding job
(local 2-CPU Ray, synthetic Aperio slides, the stand-in pixel-statistics encoder)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import duckdb
import h5py
import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch
from fixtures.slides import write_manifest

from pathray.cli import main
from pathray.errors import StoreConfigMismatchError, describe
from pathray.job.config import build_job_config
from pathray.job.raydata import run_job
from pathray.slide_level.aggregators import AGGREGATORS, build_aggregator, get_aggregator
from pathray.slide_level.job import AggregateConfig, pin_aggregator, plan_aggregate_resources, run_aggregate
from pathray.store import FeatureStore
from pathray.testing import sleep_encoder

pytestmark = pytest.mark.timeout(300)

README = Path(__file__).resolve().parents[1] / "README.md"
MODEL = "sleep"
DIM = 8
GIGA = "prov-gigapath"  # a stand-in with Prov-GigaPath's 1536-d tile embeddings


@pytest.fixture(scope="module")
def tile_store(ray_cluster, synthetic_svs_025, synthetic_svs_05, synthetic_svs_no_mpp, blank_svs, tmp_path_factory):
    """A store written by the embedding job: slides a (0.25 µm/px), b (0.5), c (mpp from the
    manifest), and blank (no tissue), with ``case_id`` kept, for two stand-in models (8-d and
    1536-d float16 as ``prov-gigapath``). Tests copy it before changing it."""
    tmp = tmp_path_factory.mktemp("agg_store")
    manifest = write_manifest(
        tmp / "m.csv",
        [
            {"slide_id": "a", "path": os.fspath(synthetic_svs_025), "cohort": "x", "case_id": "ca", "mpp": ""},
            {"slide_id": "b", "path": os.fspath(synthetic_svs_05), "cohort": "y", "case_id": "cb", "mpp": ""},
            {"slide_id": "c", "path": os.fspath(synthetic_svs_no_mpp), "cohort": "y", "case_id": "cc", "mpp": "0.5"},
            {"slide_id": "blank", "path": os.fspath(blank_svs), "cohort": "y", "case_id": "cz", "mpp": ""},
        ],
    )
    config = build_job_config(
        {
            "manifest": str(manifest),
            "out": str(tmp / "store"),
            "models": [MODEL, GIGA],
            "tiling": {"tile_px": 224, "target_mpp": 0.5},
            "chunk_tiles": 4,
            "keep_columns": ["case_id"],
        }
    )
    encoders = {
        MODEL: sleep_encoder(tiles_per_s=1e4, embed_dim=DIM),
        GIGA: sleep_encoder(tiles_per_s=1e4, embed_dim=1536, output_dtype="float16"),
    }
    report = run_job(config, encoders, progress_bars=False)
    assert report.per_model[MODEL]["ok"] == report.per_model[GIGA]["ok"] == 3
    assert report.per_model[MODEL]["no_tissue"] == 1
    return tmp / "store"


@pytest.fixture
def store_copy(tile_store, tmp_path) -> Path:
    return Path(shutil.copytree(tile_store, tmp_path / "store"))


def stored_tiles(store: FeatureStore, slide_id: str) -> np.ndarray:
    table = store.dataset(MODEL).to_table(filter=pc.field("slide_id") == slide_id).sort_by("tile_index")
    return np.stack(table.column("embedding").to_numpy(zero_copy_only=False))


def slide_rows(store: FeatureStore, aggregator: str) -> dict[str, dict]:
    return {r["slide_id"]: r for r in store.slide_features(MODEL, aggregator).to_table().to_pylist()}


@pytest.mark.slow  # three Ray Data runs, ~20 s on 2 CPUs
def test_mean_and_max_equal_numpy_over_the_stored_tiles_and_a_rerun_does_nothing(store_copy):
    store = FeatureStore(str(store_copy))
    report = run_aggregate(AggregateConfig(str(store_copy), MODEL, "mean"), progress_bars=False)
    assert report.counts == {"ok": 3, "no_tissue": 1, "error": 0} and report.exit_code == 0
    # max through the CLI (what `ray job submit ... jobs/aggregate.py` runs)
    assert (
        main(["aggregate", "--store", str(store_copy), "--model", MODEL, "--aggregator", "max", "--no-progress"]) == 0
    )
    for name, reduce in (("mean", np.mean), ("max", np.max)):
        rows = slide_rows(store, name)
        assert sorted(rows) == ["a", "b", "c"]  # the tissue-free slide is committed without a row
        for slide_id, row in rows.items():
            tiles = stored_tiles(store, slide_id)
            np.testing.assert_allclose(row["embedding"], reduce(tiles, axis=0), rtol=1e-6)
            assert row["n_tiles"] == len(tiles) > 0
            assert (row["model"], row["aggregator"], row["case_id"]) == (MODEL, name, "c" + slide_id)
        assert store.aggregated(MODEL, name) == {"a", "b", "c", "blank"}
    assert {r["slide_id"]: r["cohort"] for r in slide_rows(store, "mean").values()} == {"a": "x", "b": "y", "c": "y"}
    assert not np.allclose(slide_rows(store, "mean")["a"]["embedding"], slide_rows(store, "max")["a"]["embedding"])

    files = sorted((store_copy / "slide_features").rglob("*.parquet"))
    provenance = json.loads(pq.read_schema(files[0]).metadata[b"pathray.provenance"])
    assert provenance["aggregator"]["aggregator"] in ("mean", "max") and provenance["tile_model"] == MODEL
    assert provenance["tile_provenance"]["model"]["model"] == "sleep"  # the features file's own provenance
    mtimes = [f.stat().st_mtime_ns for f in files]
    again = run_aggregate(AggregateConfig(str(store_copy), MODEL, "mean"), progress_bars=False)
    assert again.slides_skipped == 4 and again.counts == {"ok": 0, "no_tissue": 0, "error": 0}
    assert [f.stat().st_mtime_ns for f in files] == mtimes

    # plain readers: DuckDB over the partitioned folder, one row per slide and aggregator
    got = duckdb.sql(
        f"SELECT aggregator, count(*) FROM read_parquet('{store_copy}/slide_features/**/*.parquet', "
        "hive_partitioning=true) GROUP BY 1 ORDER BY 1"
    ).fetchall()
    assert got == [("max", 3), ("mean", 3)]


def test_a_corrupt_features_file_is_a_recorded_error_while_the_others_aggregate(store_copy, tmp_path):
    store = FeatureStore(str(store_copy))
    path = store_copy / store.commit_record(MODEL, "c").features_path
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])  # truncated: the Parquet footer is gone
    report = run_aggregate(AggregateConfig(str(store_copy), MODEL, "mean", run_id="broken"), progress_bars=False)
    assert report.counts == {"ok": 2, "no_tissue": 1, "error": 1} and report.exit_code == 1
    assert sorted(slide_rows(store, "mean")) == ["a", "b"] and "c" not in store.aggregated(MODEL, "mean")
    errors = store.errors().filter(pc.field("run_id") == "broken").to_pylist()
    assert [(e["slide_id"], e["model"], e["stage"], e["error_type"]) for e in errors] == [
        ("c", MODEL, "aggregate:mean/load", "features_unreadable")
    ]
    assert "Parquet" in errors[0]["message"]
    assert json.loads((store_copy / "_runs" / "broken" / "report.json").read_text())["exit_code"] == 1

    path.write_bytes(good)  # repaired: the re-run aggregates exactly the missing slide
    again = run_aggregate(AggregateConfig(str(store_copy), MODEL, "mean"), progress_bars=False)
    assert again.slides_skipped == 3 and again.counts == {"ok": 1, "no_tissue": 0, "error": 0}
    np.testing.assert_allclose(
        slide_rows(store, "mean")["c"]["embedding"], stored_tiles(store, "c").mean(axis=0), rtol=1e-6
    )
    # the README's slide-level query runs on this store as written
    block = README.read_text().split("### Querying slide-level rows")[1].split("```python\n")[1].split("```")[0]
    line = 'root, model, aggregator = "demo-out/store", "kaiko-vits16", "mean"'
    assert line in block
    scope: dict = {}
    exec(block.replace(line, f'root, model, aggregator = "{store_copy}", "{MODEL}", "mean"'), scope)  # noqa: S102 - the README's own code
    assert sorted(scope["slides"].column("slide_id").to_pylist()) == ["a", "b", "c"]
    assert [(r[0], r[3], r[4]) for r in scope["per_slide"]] == [("a", DIM, 0.25), ("b", DIM, 0.5), ("c", DIM, 0.5)]


def test_export_round_trips_as_trident_h5_and_clam_pt(store_copy, tmp_path):
    store = FeatureStore(str(store_copy))
    out = tmp_path / "export"
    assert (
        main(["export", "--store", str(store_copy), "--model", MODEL, "--format", "trident-h5", "--out", str(out)]) == 0
    )
    assert main(["export", "--store", str(store_copy), "--model", MODEL, "--format", "pt", "--out", str(out)]) == 0
    assert sorted(p.name for p in (out / "h5_files").glob("*.h5")) == ["a.h5", "b.h5", "c.h5"]
    for slide_id in ("a", "b", "c"):
        tiles = store.dataset(MODEL).to_table(filter=pc.field("slide_id") == slide_id).sort_by("tile_index")
        # CLAM dataset_modules/dataset_generic.py (use_h5) and TRIDENT IO.read_coords read exactly this
        with h5py.File(out / "h5_files" / f"{slide_id}.h5", "r") as f:
            features, coords, attrs = f["features"][:], f["coords"][:], dict(f["coords"].attrs)
            assert f["features"].attrs["encoder"] == MODEL and f["features"].attrs["name"] == slide_id
        np.testing.assert_array_equal(features, np.stack(tiles.column("embedding").to_numpy(zero_copy_only=False)))
        assert coords.dtype == np.int64 and coords.shape == (tiles.num_rows, 2)
        np.testing.assert_array_equal(coords[:, 0], tiles.column("x").to_numpy())
        np.testing.assert_array_equal(coords[:, 1], tiles.column("y").to_numpy())
        size_level0 = tiles.column("size_level0")[0].as_py()
        assert attrs["patch_size"] == 224 and attrs["patch_size_level0"] == round(size_level0)
        assert attrs["target_magnification"] == pytest.approx(20.0)  # 0.5 µm/px
        # TRIDENT's patcher: level-0 patch side = patch_size * level0_magnification / target_magnification
        assert attrs["patch_size"] * attrs["level0_magnification"] / attrs["target_magnification"] == pytest.approx(
            size_level0
        )
        assert attrs["overlap"] == 0 and attrs["name"] == slide_id and attrs["level0_width"] > 0
        # CLAM pt_files/<slide_id>.pt: a float32 tensor, loadable with weights_only
        pt = torch.load(out / "pt_files" / f"{slide_id}.pt", weights_only=True)
        assert pt.dtype == torch.float32
        np.testing.assert_array_equal(pt.numpy(), features)
    with h5py.File(out / "h5_files" / "a.h5", "r") as f:
        assert f["coords"].attrs["level0_magnification"] == pytest.approx(40.0)  # 0.25 µm/px
    # a re-run writes nothing new; a corrupt slide is reported while the others export
    shutil.rmtree(out / "h5_files")
    path = store_copy / store.commit_record(MODEL, "b").features_path
    path.write_bytes(path.read_bytes()[:100])
    assert (
        main(["export", "--store", str(store_copy), "--model", MODEL, "--format", "trident-h5", "--out", str(out)]) == 1
    )
    assert sorted(p.name for p in (out / "h5_files").iterdir()) == ["_last_export.json", "a.h5", "c.h5"]
    report = json.loads((out / "h5_files" / "_last_export.json").read_text())
    assert report["errors"]["b"].startswith("features_unreadable") and report["skipped"] == ["blank"]


def test_aggregator_specs_and_resource_plan():
    mean, giga = get_aggregator("mean"), get_aggregator("gigapath-slide")
    assert set(AGGREGATORS) >= {"mean", "max", "gigapath-slide"}
    assert (giga.input_dim, giga.output_dim, giga.accelerated, mean.accelerated) == (1536, 768, True, False)
    with pytest.raises(ValueError, match=r"known: (.*, )?gigapath-slide, (.*, )?max, mean"):
        get_aggregator("median")
    on_gpus = plan_aggregate_resources(giga, {"CPU": 16, "GPU": 4}, AggregateConfig("s", "prov-gigapath", giga.name))
    assert (on_gpus.actors, on_gpus.actor_num_gpus) == (4, 1.0)
    # pooling never asks for a GPU; without GPUs the slide encoder runs on CPU actors
    assert plan_aggregate_resources(mean, {"CPU": 16, "GPU": 4}, AggregateConfig("s", "m", "mean")).actor_num_gpus == 0
    on_cpu = plan_aggregate_resources(giga, {"CPU": 2}, AggregateConfig("s", "prov-gigapath", giga.name))
    assert on_cpu.actor_num_gpus == 0 and on_cpu.actor_num_cpus + on_cpu.loader_num_cpus <= 2


def test_refusals_before_any_work(tile_store, tmp_path):
    with pytest.raises(ValueError, match="takes embeddings of prov-gigapath"):
        run_aggregate(AggregateConfig(str(tile_store), MODEL, "gigapath-slide"))
    with pytest.raises(ValueError, match="not in the store"):
        run_aggregate(AggregateConfig(str(tile_store), "uni", "mean"))
    store = FeatureStore(str(tmp_path))
    giga = get_aggregator("gigapath-slide")
    pin_aggregator(store, "prov-gigapath", giga, "/w/a.pth", done=set())
    pin_aggregator(store, "prov-gigapath", giga, "/w/b.pth", done=set())  # nothing committed yet: b replaces a
    pin_aggregator(store, "prov-gigapath", giga, "/w/b.pth", done={"s1"})  # same weights: fine
    with pytest.raises(StoreConfigMismatchError, match="b.pth"):
        pin_aggregator(store, "prov-gigapath", giga, "/w/c.pth", done={"s1"})


def test_float16_tiles_are_pooled_in_float32(store_copy):
    report = run_aggregate(AggregateConfig(str(store_copy), GIGA, "mean"), progress_bars=False)
    store = FeatureStore(str(store_copy))
    assert report.counts == {"ok": 3, "no_tissue": 1, "error": 0}, store.errors().column("message").to_pylist()
    assert str(store.dataset(GIGA).schema.field("embedding").type.value_type) == "halffloat"
    table = store.slide_features(GIGA, "mean").to_table()
    embedding_type = table.schema.field("embedding").type
    assert (embedding_type.list_size, str(embedding_type.value_type)) == (1536, "float")
    for row in table.to_pylist():
        tiles = store.dataset(GIGA).to_table(filter=pc.field("slide_id") == row["slide_id"])
        want = np.stack(tiles.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32).mean(axis=0)
        np.testing.assert_allclose(row["embedding"], want, rtol=1e-6)


def test_an_aggregator_that_cannot_be_built_fails_every_slide_and_commits_nothing(store_copy, tmp_path):
    spec, weights = get_aggregator("gigapath-slide"), str(tmp_path / "absent" / "slide_encoder.pth")
    with pytest.raises(Exception) as raised:  # what building it raises here (module or weights missing)
        build_aggregator(spec, weights)
    want_type, want_message = describe(raised.value)
    report = run_aggregate(
        AggregateConfig(str(store_copy), GIGA, spec.name, weights=weights, run_id="nobuild"), progress_bars=False
    )
    assert report.counts == {"ok": 0, "no_tissue": 0, "error": 4} and report.exit_code == 1
    store = FeatureStore(str(store_copy))
    assert store.aggregated(GIGA, spec.name) == set() and not (store_copy / "slide_features").exists()
    errors = store.errors().filter(pc.field("run_id") == "nobuild").to_pylist()
    assert sorted(e["slide_id"] for e in errors) == ["a", "b", "blank", "c"]
    assert {(e["model"], e["stage"], e["error_type"]) for e in errors} == {
        (GIGA, "aggregate:gigapath-slide/aggregate", want_type)
    }
    assert errors[0]["message"] == f"gigapath-slide could not be built: {want_message}"[:2000]


def test_gigapath_slide_aggregator_matches_the_encoder_called_directly(store_copy, request):
    gigapath = pytest.importorskip("pathray.slide_level.encoders.gigapath")
    weights = request.getfixturevalue("gigapath_slide_weights")  # random slide_encoder.pth, from that branch
    report = run_aggregate(
        AggregateConfig(str(store_copy), GIGA, "gigapath-slide", weights=str(weights)), progress_bars=False
    )
    store = FeatureStore(str(store_copy))
    assert report.counts == {"ok": 3, "no_tissue": 1, "error": 0}, store.errors().column("message").to_pylist()
    encoder = gigapath.GigaPathSlideEncoder.from_weights(str(weights))
    rows = {r["slide_id"]: r for r in store.slide_features(GIGA, "gigapath-slide").to_table().to_pylist()}
    for slide_id, slide_mpp in (("a", 0.25), ("b", 0.5), ("c", 0.5)):
        tiles = store.dataset(GIGA).to_table(filter=pc.field("slide_id") == slide_id).sort_by("tile_index")
        want = encoder(
            np.stack(tiles.column("embedding").to_numpy(zero_copy_only=False)),
            tiles.column("x").to_numpy(),
            tiles.column("y").to_numpy(),
            slide_mpp,
        )
        assert len(rows[slide_id]["embedding"]) == 768
        np.testing.assert_allclose(rows[slide_id]["embedding"], want, atol=1e-5)


def test_temp_files_of_an_interrupted_write_are_invisible_to_readers(tmp_path, monkeypatch):
    """A process killed between writing a file's bytes and renaming it into place leaves a
    temporary file; pyarrow and DuckDB must not read it as a slide."""
    import pyarrow as pa

    class Killed(RuntimeError):
        pass

    def killed(src, dst):
        raise Killed(f"killed before {src} -> {dst}")

    store = FeatureStore(str(tmp_path))
    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(Killed):
        store.write_table(store.slide_features_relpath(MODEL, "mean", "s1"), pa.table({"slide_id": ["s1"]}))
    monkeypatch.undo()
    folder = tmp_path / store.slide_features_relpath(MODEL, "mean")
    assert [p.name[:4] for p in folder.iterdir()] == [".s1."]  # the leftover is there ...
    assert pads.dataset(str(tmp_path / "slide_features"), partitioning="hive").to_table().num_rows == 0  # ... unread
    assert duckdb.sql(f"SELECT count(*) FROM glob('{tmp_path}/slide_features/**/*.parquet')").fetchall() == [(0,)]
    assert store.slide_features(MODEL, "mean").count_rows() == 0


@pytest.mark.s3
@pytest.mark.slow  # starts the S3 server if no other test did
def test_aggregate_on_s3(tile_store, s3_server, s3_bucket):
    fs = s3_server.fs
    fs.put(str(tile_store), f"{s3_bucket}/store", recursive=True)
    root = f"s3://{s3_bucket}/store"
    store = FeatureStore(root, s3_server.storage_options)
    assert store.aggregated(MODEL, "mean") == set()  # listed before the run: must not be served stale after it
    report = run_aggregate(
        AggregateConfig(root, MODEL, "mean", storage_options=s3_server.storage_options), progress_bars=False
    )
    assert report.counts == {"ok": 3, "no_tissue": 1, "error": 0}
    assert store.aggregated(MODEL, "mean") == {"a", "b", "c", "blank"}
    rows = {r["slide_id"]: r for r in store.slide_features(MODEL, "mean").to_table().to_pylist()}
    for slide_id in ("a", "b", "c"):
        np.testing.assert_allclose(rows[slide_id]["embedding"], stored_tiles(store, slide_id).mean(axis=0), rtol=1e-6)
    # plain pyarrow over s3fs: the partitioned folder holds exactly the committed rows
    plain = pads.dataset(f"{s3_bucket}/store/slide_features", filesystem=fs, partitioning="hive").to_table()
    assert sorted(plain.column("slide_id").to_pylist()) == ["a", "b", "c"]
    again = run_aggregate(
        AggregateConfig(root, MODEL, "mean", storage_options=s3_server.storage_options), progress_bars=False
    )
    assert again.slides_skipped == 4


def test_local_runner_aggregates_in_process_as_the_ray_plan_does(store_copy):
    store = FeatureStore(str(store_copy))
    report = run_aggregate(AggregateConfig(str(store_copy), MODEL, "mean", runner="local"), progress_bars=False)
    assert report.runner == "local"
    assert report.counts == {"ok": 3, "no_tissue": 1, "error": 0} and report.exit_code == 0
    rows = slide_rows(store, "mean")
    assert sorted(rows) == ["a", "b", "c"] and store.aggregated(MODEL, "mean") == {"a", "b", "c", "blank"}
    for slide_id, row in rows.items():
        np.testing.assert_allclose(row["embedding"], stored_tiles(store, slide_id).mean(axis=0), rtol=1e-6)
        assert row["case_id"] == "c" + slide_id


def test_status_reports_models_errors_runs_and_aggregations_without_writing(store_copy, tmp_path, capsys):
    run_aggregate(AggregateConfig(str(store_copy), MODEL, "mean", runner="local"), progress_bars=False)
    manifest = write_manifest(
        tmp_path / "more.csv",
        [
            {"slide_id": "gone", "path": str(tmp_path / "gone.svs"), "cohort": "y", "case_id": "cg", "mpp": ""},
        ],
    )
    config = build_job_config(
        {
            "manifest": str(manifest),
            "out": str(store_copy),
            "models": [MODEL, GIGA],
            "tiling": {"tile_px": 224, "target_mpp": 0.5},
            "chunk_tiles": 4,
            "keep_columns": ["case_id"],
            "runner": "local",
        }
    )
    encoders = {
        MODEL: sleep_encoder(tiles_per_s=1e4, embed_dim=DIM),
        GIGA: sleep_encoder(tiles_per_s=1e4, embed_dim=1536, output_dtype="float16"),
    }
    assert run_job(config, encoders, progress_bars=False).errors == 2  # "gone" fails for both models
    everything = sorted((p.relative_to(store_copy), p.stat().st_mtime_ns) for p in store_copy.rglob("*"))
    never = write_manifest(
        tmp_path / "never.csv", [{"slide_id": s, "path": "x"} for s in ("a", "gone", "new1", "new2")]
    )
    assert main(["status", str(store_copy), "--json", "--manifest", str(never)]) == 0
    status = json.loads(capsys.readouterr().out)
    assert sorted((p.relative_to(store_copy), p.stat().st_mtime_ns) for p in store_copy.rglob("*")) == everything
    sleep = status["models"][MODEL]
    assert (sleep["committed"], sleep["no_tissue"], sleep["errors"], sleep["never_tried"]) == (
        4,
        1,
        {"slide_not_found": 1},
        2,
    )
    assert sleep["tiling"] == {"tile_px": 224, "target_mpp": 0.5} and sleep["embed_dim"] == DIM
    assert [(r["kind"], r["errors"]) for r in status["runs"]] == [("embed", 0), ("aggregate", 0), ("embed", 2)]
    assert all(r["wall_s"] is not None and r["wall_s"] >= 0 for r in status["runs"])
    assert status["aggregations"] == [{"model": MODEL, "aggregator": "mean", "slides": 4}]
    assert main(["status", str(store_copy)]) == 0
    text = capsys.readouterr().out
    assert f"{MODEL}: 4 slides committed (1 without tissue), errors: slide_not_found 1" in text
    assert f"{MODEL} -> mean: 4 slides" in text
    assert main(["status", str(tmp_path / "nothing-here")]) == 2
