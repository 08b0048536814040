"""`pathray import`: TRIDENT / CLAM feature files into a store as committed slides of a model.

The round trip starts from a store written by the real embedding job (in-process runner,
synthetic Aperio slides, a stand-in 768-d encoder named ``conch-v1.5``); the demo test writes
TRIDENT-layout h5 files with h5py for the demo slides and aggregates the imported store."""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from fixtures.slides import write_manifest

from pathray.cli import main
from pathray.cli.demo import SYNTHETIC
from pathray.job.config import build_job_config
from pathray.job.raydata import run_job
from pathray.store import PROVENANCE_KEY, FeatureStore
from pathray.store.status import store_status
from pathray.testing import sleep_encoder
from pathray.tiling.grid import TILE_SCHEMA

pytestmark = pytest.mark.timeout(300)

MODEL = "conch-v1.5"  # registered: 768-d, 512-px tiles at 0.5 um/px
DIM = 768


@pytest.fixture(scope="module")
def job_store(synthetic_svs_025, synthetic_svs_05, tmp_path_factory) -> tuple[Path, Path]:
    """``(store, manifest)``: the real job (in-process runner) on slides a (0.25 um/px) and b
    (0.5) in two cohorts, ``case_id`` kept, with a 768-d stand-in encoder named conch-v1.5."""
    tmp = tmp_path_factory.mktemp("import_job")
    manifest = write_manifest(
        tmp / "m.csv",
        [
            {"slide_id": "a", "path": os.fspath(synthetic_svs_025), "cohort": "x", "case_id": "ca"},
            {"slide_id": "b", "path": os.fspath(synthetic_svs_05), "cohort": "y", "case_id": "cb"},
        ],
    )
    config = build_job_config(
        {
            "manifest": str(manifest),
            "out": str(tmp / "store"),
            "models": [MODEL],
            "tiling": {"tile_px": 512, "target_mpp": 0.5},
            "chunk_tiles": 4,
            "keep_columns": ["case_id"],
            "runner": "local",
        }
    )
    report = run_job(config, {MODEL: sleep_encoder(tiles_per_s=1e5, embed_dim=DIM)}, progress_bars=False)
    assert report.per_model[MODEL]["ok"] == 2 and report.exit_code == 0
    return tmp / "store", manifest


def tiles_of(store: FeatureStore, slide_id: str):
    return store.dataset(MODEL).to_table(filter=pc.field("slide_id") == slide_id).sort_by("tile_index")


def provenance_of(store: FeatureStore, slide_id: str) -> dict:
    with open(store.path(store.commit_record(MODEL, slide_id).features_path), "rb") as f:
        return json.loads(pq.read_schema(f).metadata[PROVENANCE_KEY])


def import_args(store: Path | str, fmt: str, features_dir: Path, *extra: str) -> list[str]:
    return [
        "import",
        "--store",
        str(store),
        "--model",
        MODEL,
        "--format",
        fmt,
        "--features-dir",
        str(features_dir),
        *extra,
    ]


def test_export_then_import_is_lossless_and_a_rerun_does_nothing(job_store, tmp_path, capsys):
    src_root, manifest = job_store
    src, out, dst = FeatureStore(str(src_root)), tmp_path / "export", tmp_path / "imported"
    assert (
        main(["export", "--store", str(src_root), "--model", MODEL, "--format", "trident-h5", "--out", str(out)]) == 0
    )
    args = import_args(dst, "trident-h5", out / "h5_files", "--manifest", str(manifest), "--keep-columns", "case_id")
    assert main(args) == 0
    store = FeatureStore(str(dst))
    assert store.committed(MODEL) == {"a", "b"}
    for slide_id in ("a", "b"):
        before, after = tiles_of(src, slide_id), tiles_of(store, slide_id)
        assert after.num_rows == before.num_rows > 0
        for column in [*TILE_SCHEMA.names, "cohort", "case_id"]:
            assert after.column(column).to_pylist() == before.column(column).to_pylist(), column
        emb_before = before.column("embedding").combine_chunks().values.to_numpy()
        emb_after = after.column("embedding").combine_chunks().values.to_numpy()
        assert emb_after.dtype == np.float32 and emb_after.tobytes() == emb_before.tobytes()
        original, imported = provenance_of(src, slide_id), provenance_of(store, slide_id)
        assert imported["imported"]["source_provenance"] == original
        assert imported["imported"]["format"] == "trident-h5" and imported["model"]["embed_dim"] == DIM
        old, new = src.commit_record(MODEL, slide_id), store.commit_record(MODEL, slide_id)
        assert (new.slide["width"], new.slide["height"]) == (old.slide["width"], old.slide["height"])
        assert new.slide["mpp"] == pytest.approx(old.slide["mpp"]) and new.slide["path"] == old.slide["path"]
    config = store.read_config()
    assert config.models[MODEL]["imported"]["format"] == "trident-h5"
    assert {k: store.tiling_of(MODEL)[k] for k in ("tile_px", "target_mpp", "stride_px")} == {
        "tile_px": 512,
        "target_mpp": 0.5,
        "stride_px": 512,
    }
    assert store.tiling_of(MODEL)["imported"]["target_mpp_from"] == "target_mpp attribute"
    statuses = {r["slide_id"]: r["status"] for r in store.slides().to_pylist()}
    assert statuses == {"a": "ok", "b": "ok"} and not os.path.exists(store.lease_path())
    summary = store_status(store)
    assert summary["models"][MODEL]["committed"] == 2 and summary["models"][MODEL]["embed_dim"] == DIM
    assert [r["kind"] for r in summary["runs"]] == ["import"]
    # a re-run commits nothing again
    first_run = store.commit_record(MODEL, "a").run_id
    assert main(args) == 0
    assert "2 with every model already committed" in capsys.readouterr().out
    assert store.commit_record(MODEL, "a").run_id == first_run


def test_a_store_holding_the_model_with_another_config_refuses(job_store, tmp_path, capsys):
    src_root, _ = job_store
    out = tmp_path / "export"
    assert (
        main(["export", "--store", str(src_root), "--model", MODEL, "--format", "trident-h5", "--out", str(out)]) == 0
    )
    committed = FeatureStore(str(src_root)).committed(MODEL)
    # the job's own conch-v1.5 (embedded) is another config than an import
    assert main(import_args(src_root, "trident-h5", out / "h5_files")) == 2
    assert "another config" in capsys.readouterr().err
    assert FeatureStore(str(src_root)).committed(MODEL) == committed
    # an import at another tiling into a store already holding an import of the model
    other = tmp_path / "other"
    write_trident_h5(
        other / "s.h5",
        np.zeros((2, 2), np.int64),
        np.ones((2, DIM), np.float32),
        mpp=0.25,
        tile_px=256,
        target_magnification=20.0,
    )
    assert main(import_args(tmp_path / "store", "trident-h5", out / "h5_files")) == 0
    assert main(import_args(tmp_path / "store", "trident-h5", other)) == 2
    err = capsys.readouterr().err
    assert "at another tiling" in err and "tile_px: store has 512, this run asks for 256" in err
    # the same tiling from another folder is another source of the model
    assert main(import_args(tmp_path / "store", "trident-h5", out / "h5_files", "--coords-dir", str(other))) == 2
    assert "imported.coords_dir" in capsys.readouterr().err


def test_pt_files_take_coords_from_matching_h5_and_refuse_without(job_store, tmp_path, capsys):
    src_root, _ = job_store
    out = tmp_path / "export"
    for fmt in ("trident-h5", "pt"):
        assert main(["export", "--store", str(src_root), "--model", MODEL, "--format", fmt, "--out", str(out)]) == 0
    assert main(import_args(tmp_path / "s", "pt", out / "pt_files")) == 2
    assert "--coords-dir" in capsys.readouterr().err
    assert main(import_args(tmp_path / "s", "pt", out / "pt_files", "--coords-dir", str(out / "h5_files"))) == 0
    src, store = FeatureStore(str(src_root)), FeatureStore(str(tmp_path / "s"))
    for slide_id in ("a", "b"):
        before, after = tiles_of(src, slide_id), tiles_of(store, slide_id)
        for column in ("x", "y", "size_level0", "tissue_fraction"):
            assert after.column(column).to_pylist() == before.column(column).to_pylist()
        assert after.column("embedding").to_pylist() == before.column("embedding").to_pylist()


def write_trident_h5(
    path: Path,
    coords: np.ndarray,
    features: np.ndarray,
    mpp: float,
    tile_px: int = 512,
    target_magnification: float = 20.0,
) -> None:
    """``path`` as TRIDENT's ``extract_features`` writes it (trident/IO.py ``coords_to_h5``
    attributes; TRIDENT rounds magnifications to integers and the level-0 side down)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    level0_mag = round(10 / mpp)
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=features).attrs.update(
            {"name": path.stem, "savetodir": str(path.parent), "encoder": "conch_v15"}
        )
        f.create_dataset("coords", data=coords).attrs.update(
            {
                "patch_size": tile_px,
                "patch_size_level0": tile_px * level0_mag // int(target_magnification),
                "level0_magnification": level0_mag,
                "target_magnification": target_magnification,
                "overlap": 0,
                "name": path.stem,
                "savetodir": str(path.parent),
                "level0_width": 4096,
                "level0_height": 3072,
            }
        )


def test_per_slide_problems_are_error_rows_and_a_rerun_imports_the_fixed_slide(tmp_path):
    rng = np.random.default_rng(0)
    coords = np.array([[0, 0], [1024, 0], [0, 1024]], np.int64)
    feats = rng.normal(size=(3, DIM)).astype(np.float32)
    write_trident_h5(tmp_path / "h5" / "good.h5", coords, feats, mpp=0.25)
    write_trident_h5(tmp_path / "h5" / "narrow.h5", coords, feats[:, :512], mpp=0.25)
    write_trident_h5(tmp_path / "h5" / "other_tile.h5", coords, feats, mpp=0.25, tile_px=256)
    write_trident_h5(tmp_path / "h5" / "empty.h5", np.zeros((0, 2), np.int64), np.zeros((0,), np.float32), mpp=0.5)
    with h5py.File(tmp_path / "h5" / "no_coords.h5", "w") as f:
        f.create_dataset("features", data=feats)
    (tmp_path / "h5" / "corrupt.h5").write_bytes(b"not an hdf5 file")
    manifest = write_manifest(
        tmp_path / "m.csv",
        [
            {"slide_id": s, "path": f"/slides/{s}.svs", "cohort": "c1"}
            for s in ("good", "narrow", "other_tile", "empty", "no_coords", "corrupt", "missing")
        ],
    )
    args = import_args(tmp_path / "store", "trident-h5", tmp_path / "h5", "--manifest", str(manifest))
    assert main(args) == 1
    store = FeatureStore(str(tmp_path / "store"))
    assert store.committed(MODEL) == {"good", "empty"}
    errors = {r["slide_id"]: r["error_type"] for r in store.errors().to_pylist()}
    assert errors == {
        "narrow": "import_mismatch",
        "other_tile": "import_mismatch",
        "no_coords": "coords_missing",
        "corrupt": "features_unreadable",
        "missing": "features_unreadable",
    }
    status = {r["slide_id"]: r for r in store.slides().to_pylist()}
    assert {s: r["status"] for s, r in status.items()} == {
        **{s: "error" for s in errors},
        "good": "ok",
        "empty": "no_tissue",
    }
    assert status["good"]["cohort"] == "c1" and status["good"]["path"] == "/slides/good.svs"
    good = tiles_of(store, "good")
    # 40x -> 20x TRIDENT attributes: 0.5 um/px by 10 / magnification, level-0 side 1024 px
    assert good.column("size_level0").to_pylist() == [1024.0] * 3 and good.column("target_mpp")[0].as_py() == 0.5
    assert good.column("tissue_fraction").to_pylist() == [1.0] * 3
    np.testing.assert_array_equal(np.stack(good.column("embedding").to_numpy(zero_copy_only=False)), feats)
    assert "10 / target_magnification" in store.tiling_of(MODEL)["imported"]["target_mpp_from"]
    # fix one slide: the re-run imports it and leaves the committed ones alone
    good_run = store.commit_record(MODEL, "good").run_id
    write_trident_h5(tmp_path / "h5" / "narrow.h5", coords, feats, mpp=0.25)
    assert main(args) == 1
    assert store.committed(MODEL) == {"good", "empty", "narrow"}
    assert store.commit_record(MODEL, "good").run_id == good_run
    assert {r["slide_id"]: r["status"] for r in store.slides().to_pylist()}["narrow"] == "ok"
    # the same slide id from another cohort is a conflict, never skipped as done nor overwritten
    moved = write_manifest(tmp_path / "moved.csv", [{"slide_id": "good", "path": "/slides/good.svs", "cohort": "c2"}])
    assert main(import_args(tmp_path / "store", "trident-h5", tmp_path / "h5", "--manifest", str(moved))) == 1
    assert [r["error_type"] for r in store.errors().to_pylist() if r["slide_id"] == "good"] == ["slide_id_conflict"]
    assert store.commit_record(MODEL, "good").run_id == good_run and store.committed(MODEL) >= {"good"}


def test_clam_h5_reads_its_patch_file_attributes_and_the_manifest_mpp(tmp_path):
    """CLAM: features h5 (features + coords, no attributes) and create_patches_fp's patch h5
    (coords attributes patch_size, patch_level, downsample, level_dim)."""
    coords = np.array([[0, 0], [1024, 0]], np.int64)
    feats = np.arange(2 * DIM, dtype=np.float32).reshape(2, DIM)
    (tmp_path / "h5_files").mkdir()
    (tmp_path / "patches").mkdir()
    with h5py.File(tmp_path / "h5_files" / "s.h5", "w") as f:
        f.create_dataset("features", data=feats)
        f.create_dataset("coords", data=coords.astype(np.int32))
    with h5py.File(tmp_path / "patches" / "s.h5", "w") as f:
        f.create_dataset("coords", data=coords).attrs.update(
            {
                "patch_size": 512,
                "patch_level": 1,
                "downsample": [2.0, 2.0],
                "downsampled_level_dim": [2048, 1536],
                "level_dim": [2048, 1536],
                "name": "s",
                "save_path": str(tmp_path / "patches"),
            }
        )
    manifest = write_manifest(tmp_path / "m.csv", [{"slide_id": "s", "path": "/s.svs", "mpp": "0.25"}])
    base = import_args(tmp_path / "store", "clam-h5", tmp_path / "h5_files", "--coords-dir", str(tmp_path / "patches"))
    assert main(base) == 2  # no mpp anywhere: no slide can be read
    assert main([*base, "--manifest", str(manifest)]) == 0
    tiles = tiles_of(FeatureStore(str(tmp_path / "store")), "s")
    assert tiles.column("size_level0").to_pylist() == [1024.0, 1024.0]
    assert tiles.column("target_mpp").to_pylist() == [0.5, 0.5] and tiles.column("cohort")[0].as_py() == "unassigned"
    assert tiles.column("x").to_pylist() == [0, 1024]


@pytest.mark.parametrize("aggregator", ["mean", pytest.param("titan", marks=pytest.mark.slow)])
def test_trident_h5_of_the_demo_slides_import_and_aggregate(aggregator, tmp_path, capsys):
    """TRIDENT h5 files for the demo slides (coords on the 512-px grid at 0.5 um/px inside their
    tissue rectangles, random 768-d features) imported as conch-v1.5, then ``pathray aggregate``
    on the local runner."""
    rng = np.random.default_rng(1)
    features = {}
    for name, _, (width, height), mpp, rects in SYNTHETIC:
        side = round(512 * 0.5 / mpp)
        coords = np.array(
            [
                (x, y)
                for x in range(0, width - side + 1, side)
                for y in range(0, height - side + 1, side)
                if any(rx <= x + side / 2 < rx + rw and ry <= y + side / 2 < ry + rh for rx, ry, rw, rh in rects)
            ],
            np.int64,
        )
        features[name] = rng.normal(size=(len(coords), DIM)).astype(np.float32)
        write_trident_h5(tmp_path / "h5" / f"{name}.h5", coords, features[name], mpp=mpp)
    manifest = write_manifest(
        tmp_path / "m.csv", [{"slide_id": n, "path": f"/demo/{n}.svs", "cohort": c} for n, c, *_ in SYNTHETIC]
    )
    root = tmp_path / "store"
    assert main(import_args(root, "trident-h5", tmp_path / "h5", "--manifest", str(manifest))) == 0
    weights = []
    if aggregator == "titan":  # TITAN's exact architecture, random weights in the release's layout
        from pathray.slide_level.encoders.titan import write_random_weights

        weights = ["--weights", str(write_random_weights(tmp_path / "titan"))]
    assert (
        main(
            [
                "aggregate",
                "--store",
                str(root),
                "--model",
                MODEL,
                "--aggregator",
                aggregator,
                "--runner",
                "local",
                *weights,
            ]
        )
        == 0
    )
    rows = {r["slide_id"]: r for r in FeatureStore(str(root)).slide_features(MODEL, aggregator).to_table().to_pylist()}
    assert sorted(rows) == sorted(features) and all(len(f) > 0 for f in features.values())
    for name, feats in features.items():
        assert rows[name]["n_tiles"] == len(feats)
        if aggregator == "mean":
            np.testing.assert_allclose(rows[name]["embedding"], feats.mean(axis=0), rtol=1e-5, atol=1e-6)
    if aggregator == "titan":  # the store's rows equal TITAN called on the TRIDENT files' own features and coords
        from pathray.slide_level.encoders.titan import TitanSlideEncoder

        encoder = TitanSlideEncoder.from_weights(weights[1])
        for name, _, _, mpp, _ in SYNTHETIC:
            with h5py.File(tmp_path / "h5" / f"{name}.h5") as f:
                coords = f["coords"][:]
            direct = encoder(features[name], coords[:, 0], coords[:, 1], mpp)
            assert len(rows[name]["embedding"]) == 768
            np.testing.assert_allclose(rows[name]["embedding"], direct, rtol=1e-5, atol=1e-6)


def test_a_pt_file_that_is_not_a_tensor_is_an_error_row(tmp_path):
    (tmp_path / "pt").mkdir()
    torch.save({"not": "a tensor"}, tmp_path / "pt" / "s.pt")
    write_trident_h5(tmp_path / "h5" / "s.h5", np.zeros((1, 2), np.int64), np.ones((1, DIM), np.float32), mpp=0.5)
    assert main(import_args(tmp_path / "store", "pt", tmp_path / "pt", "--coords-dir", str(tmp_path / "h5"))) == 1
    store = FeatureStore(str(tmp_path / "store"))
    assert [r["error_type"] for r in store.errors().to_pylist()] == ["features_unreadable"] and not store.committed(
        MODEL
    )


def test_mil_trains_on_imported_features(tmp_path, capsys):
    """`pathray mil train` on a store that holds only imported TRIDENT features."""
    rng = np.random.default_rng(2)
    coords = np.array([[x * 1024, 0] for x in range(6)], np.int64)
    slides = [f"s{i}" for i in range(8)]
    for i, slide_id in enumerate(slides):
        feats = rng.normal(size=(6, DIM)).astype(np.float32) + (i % 2)  # label shifts every tile
        write_trident_h5(tmp_path / "h5" / f"{slide_id}.h5", coords, feats, mpp=0.25)
    (tmp_path / "labels.csv").write_text("slide_id,label\n" + "".join(f"{s},{i % 2}\n" for i, s in enumerate(slides)))
    assert main(import_args(tmp_path / "store", "trident-h5", tmp_path / "h5")) == 0
    assert (
        main(
            [
                "mil",
                "train",
                "--store",
                str(tmp_path / "store"),
                "--labels",
                str(tmp_path / "labels.csv"),
                "--out",
                str(tmp_path / "run"),
                "--folds",
                "2",
                "--epochs",
                "2",
                "--hidden-dim",
                "8",
                "--attention-dim",
                "4",
                "--cpu-threads",
                "1",
            ]
        )
        == 0
    )
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert len(record["folds"]) == 2 and record["tiling"]["imported"]["format"] == "trident-h5"


@pytest.mark.s3
@pytest.mark.slow  # starts the S3 server if no other test did
def test_import_into_a_store_on_s3(tmp_path, s3_server, s3_bucket, monkeypatch):
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    rng = np.random.default_rng(3)
    coords = np.array([[0, 0], [1024, 0], [0, 1024]], np.int64)
    feats = {s: rng.normal(size=(3, DIM)).astype(np.float32) for s in ("s1", "s2")}
    for slide_id, f in feats.items():
        write_trident_h5(tmp_path / "h5" / f"{slide_id}.h5", coords, f, mpp=0.25)
    root = f"s3://{s3_bucket}/imported"
    args = import_args(root, "trident-h5", tmp_path / "h5", "--s3-endpoint-url", s3_server.endpoint_url)
    assert main(args) == 0
    store = FeatureStore(root, s3_server.storage_options)
    assert store.committed(MODEL) == {"s1", "s2"} and not store.fs.exists(store.lease_path())
    for slide_id, f in feats.items():
        np.testing.assert_array_equal(
            np.stack(tiles_of(store, slide_id).column("embedding").to_numpy(zero_copy_only=False)), f
        )
    assert main(args) == 0 and store.commit_record(MODEL, "s1").run_id == store.commit_record(MODEL, "s2").run_id
    assert {r["status"] for r in store.slides().to_pylist()} == {"ok"}
