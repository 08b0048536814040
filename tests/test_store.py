"""Feature store: commit protocol, visibility, config guard, slide table, aggregation (no Ray)."""

from __future__ import annotations

import json
import os

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from pathray.errors import CommitMismatchError, StoreConfigMismatchError
from pathray.slide_level.aggregators import slide_embeddings
from pathray.store import (
    SLIDE_STATUS_SCHEMA,
    CommitRequest,
    FeatureStore,
    consolidate_slide_table,
    finalize_slide,
    status_row,
)
from pathray.testing import FakeTiles, random_embeddings

DIM = 4


def chunk_table(slide_id: str, indices: list[int], seed: int = 0) -> pa.Table:
    return FakeTiles(slide_id, random_embeddings(len(indices), DIM, seed), np.asarray(indices)).table()


def stage_and_commit(store: FeatureStore, slide_id: str, cohort: str, sizes=(3, 2), **kw):
    ids, start = [], 0
    for k, size in enumerate(sizes):
        chunk = f"{slide_id}.c{k}"
        store.write_chunk("m", slide_id, chunk, chunk_table(slide_id, list(range(start, start + size)), seed=k))
        ids.append(chunk)
        start += size
    return finalize_slide(
        store,
        CommitRequest(
            "m",
            slide_id,
            cohort,
            ids,
            kw.pop("n_tiles", start),
            {"path": f"/{slide_id}.svs"},
            {"model": {"name": "m"}},
            "hash",
            "run1",
            **kw,
        ),
    )


def test_commit_merges_chunks_in_tile_order_and_cleans_staging(tmp_path):
    store = FeatureStore(str(tmp_path))
    # chunks staged out of order must come out sorted by tile_index
    store.write_chunk("m", "s1", "b", chunk_table("s1", [3, 4], seed=1))
    store.write_chunk("m", "s1", "a", chunk_table("s1", [0, 1, 2], seed=0))
    record = finalize_slide(
        store,
        CommitRequest(
            "m",
            "s1",
            "C",
            ["b", "a"],
            5,
            {"path": "/s1.svs"},
            {"x": 1},
            "hash",
            "run1",
            {"label": 7},
            pa.schema([("label", pa.int64())]),
        ),
    )
    table = pads.dataset(str(tmp_path / record.features_path)).to_table()
    assert table.column("tile_index").to_pylist() == [0, 1, 2, 3, 4]
    assert table.column("label").to_pylist() == [7] * 5
    assert json.loads(table.schema.metadata[b"pathray.provenance"]) == {"x": 1}
    assert store.committed("m") == {"s1"}
    assert not list((tmp_path / "_staging").rglob("*.parquet"))
    assert not (tmp_path / "_staging" / "model=m" / "s1").exists()  # no empty folder per slide piles up


def test_committed_staging_left_by_a_killed_writer_is_removed_and_pending_staging_kept(tmp_path):
    store = FeatureStore(str(tmp_path))
    stage_and_commit(store, "s1", "A")
    store.write_chunk("m", "s1", "s1.c9", chunk_table("s1", [0]))  # staged again after the record
    store.write_chunk("m", "s2", "s2.c0", chunk_table("s2", [0]))  # a slide not committed yet
    assert store.remove_committed_staging("m") == 1
    staged = sorted(p.relative_to(tmp_path / "_staging").as_posix() for p in (tmp_path / "_staging").rglob("*.parquet"))
    assert staged == ["model=m/s2/s2.c0.parquet"]
    assert store.remove_committed_staging("m") == 0


def test_incomplete_or_duplicated_chunks_are_never_committed(tmp_path):
    store = FeatureStore(str(tmp_path))
    with pytest.raises(CommitMismatchError, match="expected 6"):
        stage_and_commit(store, "short", "C", n_tiles=6)  # a chunk is missing
    store.write_chunk("m", "dup", "a", chunk_table("dup", [0, 1]))
    store.write_chunk("m", "dup", "b", chunk_table("dup", [1, 2]))
    with pytest.raises(CommitMismatchError, match="unique"):
        finalize_slide(store, CommitRequest("m", "dup", "C", ["a", "b"], 4, {}, {}, "hash", "run1"))
    assert store.committed("m") == set()
    assert not (tmp_path / "features").exists()


def test_readers_see_whole_committed_slides_only(tmp_path):
    store = FeatureStore(str(tmp_path))
    stage_and_commit(store, "s1", "A")
    stage_and_commit(store, "s2", "B", sizes=(4,))
    # crash window: a features file written, its commit record not yet (re-run rewrites it)
    stage_and_commit(store, "s3", "B")
    os.remove(tmp_path / "_commits" / "model=m" / "s3.json")
    # and a half-staged slide: only in _staging
    store.write_chunk("m", "s4", "s4.c0", chunk_table("s4", [0]))

    assert sorted(set(store.dataset("m").to_table().column("slide_id").to_pylist())) == ["s1", "s2"]
    # plain readers never see staging (underscore folders are ignored)
    plain = pads.dataset(str(tmp_path / "features"), partitioning="hive").to_table()
    assert "s4" not in plain.column("slide_id").to_pylist()
    counts = duckdb.sql(
        f"SELECT slide_id, count(*) FROM read_parquet('{tmp_path}/features/**/*.parquet', "
        "hive_partitioning=true) GROUP BY 1 ORDER BY 1"
    ).fetchall()
    assert counts == [("s1", 5), ("s2", 4), ("s3", 5)]
    lazy = pl.scan_parquet(f"{tmp_path}/features/**/*.parquet", hive_partitioning=True)
    assert lazy.select(pl.col("cohort").unique().sort()).collect()["cohort"].to_list() == ["A", "B"]


def test_store_config_guard(tmp_path):
    store = FeatureStore(str(tmp_path))
    tiling = {"tile_px": 224, "fingerprint": "t1"}
    store.ensure_config(tiling, {"uni": {"weights": "a", "fingerprint": "u1"}})
    store.ensure_config(tiling, {"uni": {"weights": "a", "fingerprint": "u1"}, "kaiko": {"fingerprint": "k1"}})
    assert sorted(store.read_config().models) == ["kaiko", "uni"]  # adding a model is fine
    with pytest.raises(
        StoreConfigMismatchError, match="holds 'uni' at another tiling: tile_px: store has 224, this run asks for 256"
    ):
        store.ensure_config({"tile_px": 256, "fingerprint": "t2"}, {"uni": {"weights": "a", "fingerprint": "u1"}})
    with pytest.raises(StoreConfigMismatchError, match="holds 'kaiko' at another tiling"):
        store.ensure_config(tiling, {"kaiko": {"fingerprint": "k1"}}, {"kaiko": {"tile_px": 448, "fingerprint": "t4"}})
    with pytest.raises(
        StoreConfigMismatchError, match="model 'uni' .*weights: store has 'a', this run asks for 'b'[.] Use"
    ):
        store.ensure_config(tiling, {"uni": {"weights": "b", "fingerprint": "u2"}})


def test_store_config_keeps_each_models_own_tiling(tmp_path):
    """A model cut at its own native tile is recorded under model_tilings; the store's tiling
    stays the one of the models that share it, and both are checked on the next run."""
    store = FeatureStore(str(tmp_path))
    tiling, conch = {"tile_px": 224, "fingerprint": "t1"}, {"tile_px": 512, "fingerprint": "t5"}
    store.ensure_config(tiling, {"uni": {"fingerprint": "u1"}, "conch": {"fingerprint": "c1"}}, {"conch": conch})
    config = store.read_config()
    assert config.tiling == tiling and config.model_tilings == {"conch": conch}
    assert store.tiling_of("conch") == conch and store.tiling_of("uni") == tiling
    # a run of conch alone (its tiling first) finds it where it was: nothing changes
    assert store.check_config(conch, {"conch": {"fingerprint": "c1"}})[1] is False
    with pytest.raises(StoreConfigMismatchError, match="holds 'conch' at another tiling"):
        store.check_config(tiling, {"conch": {"fingerprint": "c1"}})


def test_check_config_writes_nothing(tmp_path):
    store = FeatureStore(str(tmp_path))
    config, changed = store.check_config({"tile_px": 224, "fingerprint": "t1"}, {"uni": {"fingerprint": "u1"}})
    assert changed and sorted(config.models) == ["uni"] and store.read_config() is None


_SLOW_WRITER = """
import sys, numpy as np, pyarrow as pa
from pathray.store import FeatureStore, embeddings_to_arrow, feature_schema
n, dim = 400_000, 384
emb = np.random.default_rng(0).normal(size=(n, dim)).astype(np.float32)
cols = [pa.array(["big"] * n), pa.array(np.arange(n)), pa.array(np.arange(n)), pa.array(np.zeros(n, np.int64)),
        pa.array(np.full(n, 448.0)), pa.array(np.full(n, 0.5)), pa.array(np.full(n, 224, np.int32)),
        pa.array(np.ones(n, np.float32)), embeddings_to_arrow(emb)]
table = pa.Table.from_arrays(cols, schema=feature_schema(dim, pa.float32()))
print("writing", flush=True)
FeatureStore(sys.argv[1]).write_table("features/model=m/cohort=A/big.parquet", table)
"""


@pytest.mark.slow  # writer subprocesses killed mid-write
def test_a_writer_killed_mid_write_leaves_nothing_readers_see(tmp_path):
    """A ~600 MB features file is being written when its process is SIGKILLed: the temporary
    it leaves must be invisible to pyarrow, DuckDB and polars, and the next run removes it."""
    import signal
    import subprocess
    import sys
    import time

    store = FeatureStore(str(tmp_path))
    stage_and_commit(store, "s1", "A")
    folder = tmp_path / "features" / "model=m" / "cohort=A"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(tmp_path)], stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"writing"
    deadline = time.monotonic() + 120
    while not any(p.name.startswith(".") for p in folder.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = [p for p in folder.iterdir() if p.name.startswith(".")]
    assert partial and not (folder / "big.parquet").exists()  # killed before os.replace: a partial temp file
    assert pads.dataset(str(tmp_path / "features"), partitioning="hive").to_table().num_rows == 5
    assert duckdb.sql(f"SELECT count(*) FROM read_parquet('{tmp_path}/features/**/*.parquet')").fetchall()[0][0] == 5
    assert pl.scan_parquet(f"{tmp_path}/features/**/*.parquet").select(pl.len()).collect().item() == 5
    assert store.remove_temporaries() == len(partial)
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]


def test_slide_table_latest_wins_and_backfills_unflushed_commits(tmp_path):
    store = FeatureStore(str(tmp_path))
    first = [
        status_row(slide_id="s1", model="m", status="error", error_type="slide_unreadable", updated_at=1.0),
        status_row(slide_id="s2", model="m", status="error", error_type="staging_failed", updated_at=1.0),
    ]
    store.write_table("_runs/r1/slides-00001.parquet", pa.Table.from_pylist(first, schema=SLIDE_STATUS_SCHEMA))
    second = [status_row(slide_id="s1", model="m", status="ok", n_tiles=5, updated_at=2.0)]
    store.write_table("_runs/r2/slides-00001.parquet", pa.Table.from_pylist(second, schema=SLIDE_STATUS_SCHEMA))
    # s2 was committed by a run that died before flushing its status rows
    stage_and_commit(store, "s2", "B", sizes=(4,))
    table = consolidate_slide_table(store, {"m": {"s1", "s2"}})
    rows = {r["slide_id"]: r for r in table.to_pylist()}
    assert (rows["s1"]["status"], rows["s1"]["n_tiles"]) == ("ok", 5)
    assert (rows["s2"]["status"], rows["s2"]["n_tiles"], rows["s2"]["cohort"]) == ("ok", 4, "B")
    assert store.slides().num_rows == 2


def test_slide_embeddings_pool_each_slide(tmp_path):
    store = FeatureStore(str(tmp_path))
    stage_and_commit(store, "s1", "A")
    stage_and_commit(store, "s2", "B", sizes=(4,))
    pooled = {r["slide_id"]: r for r in slide_embeddings(store.dataset("m")).to_pylist()}
    tiles = store.dataset("m").to_table()
    for slide_id, n in (("s1", 5), ("s2", 4)):
        rows = tiles.filter(pads.field("slide_id") == slide_id)
        want = np.stack(rows.column("embedding").to_numpy(zero_copy_only=False)).mean(axis=0)
        assert pooled[slide_id]["n_tiles"] == n
        np.testing.assert_allclose(pooled[slide_id]["embedding"], want, rtol=1e-6)
    assert pooled["s2"]["cohort"] == "B"
    with pytest.raises(ValueError, match="pooling"):
        slide_embeddings(store.dataset("m"), pooling="median")


def test_commit_index_serves_unchanged_records_and_reads_the_rest(tmp_path):
    store = FeatureStore(str(tmp_path))
    for i, cohort in enumerate("AAB"):
        stage_and_commit(store, f"s{i}", cohort)
    assert store.update_commit_index("m") == 3
    read: list[str] = []
    cat = store.fs.cat
    store.fs.cat = lambda names, **kw: read.extend(names) or cat(names, **kw)
    assert {s: r.cohort for s, r in store.commit_records("m").items()} == {"s0": "A", "s1": "A", "s2": "B"}
    assert read == []  # every record served by the index: a listing and one read, not one per slide
    stage_and_commit(store, "s1", "C")  # re-committed under another cohort: a new version of its record
    os.remove(tmp_path / "_commits" / "model=m" / "s2.json")
    stage_and_commit(store, "s3", "A")
    assert {s: r.cohort for s, r in store.commit_records("m").items()} == {"s0": "A", "s1": "C", "s3": "A"}
    assert sorted(os.path.basename(n) for n in read) == ["s1.json", "s3.json"]
    assert store.update_commit_index("m") == 3
    read.clear()
    assert {s: r.cohort for s, r in store.commit_records("m").items()} == {"s0": "A", "s1": "C", "s3": "A"}
    assert read == [] and store.committed("m") == {"s0", "s1", "s3"}
    (tmp_path / "_commits" / "index" / "model=m.parquet").write_bytes(b"not parquet")  # a cache: never needed
    assert {s: r.cohort for s, r in store.commit_records("m").items()} == {"s0": "A", "s1": "C", "s3": "A"}


def test_a_commit_given_the_listed_copies_removes_the_other_cohorts_copy_without_probing_each(tmp_path):
    store = FeatureStore(str(tmp_path))
    for cohort in "ABCDEFGH":  # eight cohort folders, as a multi-cohort store has
        stage_and_commit(store, f"x{cohort}", cohort)
    stage_and_commit(store, "s1", "A")
    os.remove(store.commit_path("m", "s1"))  # killed between its features file and its record
    copies = store.feature_copies("m", {"s1", "s2"})
    assert copies == {"s1": ("features/model=m/cohort=A/s1.parquet",)}
    store.fs.exists = lambda path: pytest.fail(f"probed {path}")  # the listing is all a commit needs
    stage_and_commit(store, "s1", "B", copies=copies["s1"])
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.glob("features/model=m/*/s1.parquet")) == [
        "features/model=m/cohort=B/s1.parquet"
    ]
    assert store.commit_records("m")["s1"].cohort == "B"


def test_layout_paths_are_the_documented_layout(tmp_path):
    """Every path derived from the declared partitions is the store's on-disk layout (the module
    doc of pathray.store.layout); a glob over a family finds each of its files."""
    from pathray.store.layout import AGGREGATOR_PIN, COMMIT_INDEX, FEATURES, RUN_STATUS, hive_value

    store = FeatureStore(str(tmp_path))
    assert store.features_relpath("m", None, "s") == "features/model=m/cohort=unassigned/s.parquet"
    assert store.staging_path("m", "s", "c0") == str(tmp_path / "_staging/model=m/s/c0.parquet")
    assert store.commit_path("m", "s") == str(tmp_path / "_commits/model=m/s.json")
    assert COMMIT_INDEX.file(model="m") == "_commits/index/model=m.parquet"
    assert store.slide_features_relpath("m", "mean") == "slide_features/model=m/aggregator=mean"
    assert store.slide_commit_relpath("m", "mean", "s") == "_commits/slide_features/model=m/aggregator=mean/s.json"
    assert AGGREGATOR_PIN.file(model="m", aggregator="mean") == "_commits/slide_features/model=m/aggregator=mean.json"
    assert store.errors_relpath("r", 2) == "errors/run_id=r/part-00002.parquet"
    assert (
        store.run_status_relpath("r", 2) == "_runs/r/slides-00002.parquet"
        and RUN_STATUS.glob() == "_runs/*/slides-*.parquet"
    )
    assert store.report_relpath("r") == "_runs/r/report.json"
    assert FEATURES.prefix() == "features" and FEATURES.prefix(model="m") == "features/model=m"
    assert (
        FEATURES.hive_keys == ("model", "cohort") and hive_value("features/model=m/cohort=c/s.parquet", "cohort") == "c"
    )
