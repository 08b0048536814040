"""The committer pool: stable routing, sizing from the cluster, real commits on several actors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pathray.job.committers import CommitPool, committer_count, route
from pathray.job.config import build_job_config
from pathray.job.raydata import run_job
from pathray.store import CommitRequest, FeatureStore
from pathray.testing import FakeSlide, sleep_encoder, stage_fake_slide

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[1]


def test_route_is_stable_across_processes_and_uses_every_committer():
    keys = [(f"slide-{i}", m) for i in range(400) for m in ("uni", "virchow2")]
    here = [route(s, m, 4) for s, m in keys]
    # a fresh interpreter has another hash() salt; the route must not change with it
    code = (
        "import json,sys; from pathray.job.committers import route; "
        "print(json.dumps([route(s, m, 4) for s, m in json.loads(sys.argv[1])]))"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345", PYTHONPATH=str(ROOT))
    there = subprocess.run(
        [sys.executable, "-c", code, __import__("json").dumps(keys)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert here == __import__("json").loads(there)
    counts = np.bincount(here, minlength=4)
    assert counts.min() > len(keys) / 4 * 0.8  # roughly even, so no committer becomes the bottleneck


def test_committer_count_follows_cluster_cpus_unless_pinned():
    assert committer_count(None, {"CPU": 2}) == 1
    assert committer_count(None, {"CPU": 0}) == 1
    assert committer_count(None, {"CPU": 64, "GPU": 8}) == 4
    assert committer_count(None, {"CPU": 100_000}) == 32
    assert committer_count(3, {"CPU": 2}) == 3


def test_pool_commits_every_pair_once_across_actors(ray_cluster, tmp_path):
    import ray

    store = FeatureStore(str(tmp_path / "store"))
    pairs = [(f"s{i}", m) for i in range(6) for m in ("a", "b")]
    staged = {
        p: stage_fake_slide(store, p[1], FakeSlide(p[0], n_tiles=10, seed=i), chunk_tiles=4, embed_dim=16)
        for i, p in enumerate(pairs)
    }
    expected = {
        p: pa.concat_tables([pq.read_table(store.staging_path(p[1], p[0], c)) for c in ids])
        for p, ids in staged.items()
    }
    pool = CommitPool(ray, store, 3, max_concurrency=4)
    pids = ray.get([a.__ray_call__.remote(lambda self: os.getpid()) for a in pool.actors])
    assert len(set(pids)) == 3  # three processes share the commits

    def commit_all():
        return ray.get([pool.submit(CommitRequest(m, s, "c", staged[(s, m)], 10, {}, {}, "h", "r1")) for s, m in pairs])

    records = commit_all()
    assert {(r.slide_id, r.model) for r in records} == set(pairs)
    for model in ("a", "b"):
        assert store.committed(model) == {f"s{i}" for i in range(6)}
        table = store.dataset(model).to_table()
        assert len(table) == 60 and len(set(zip(table["slide_id"].to_pylist(), table["tile_index"].to_pylist()))) == 60
    for (slide_id, model), want in expected.items():
        got = pq.read_table(tmp_path / "store" / store.features_relpath(model, "c", slide_id))
        assert got.select(want.column_names).equals(want)
    assert not list((tmp_path / "store" / "_staging").rglob("*.parquet"))

    # a retried commit (Ray re-runs it after a committer died) rewrites the same bytes at the same names
    before = {p: (tmp_path / "store" / store.features_relpath(p[1], "c", p[0])).read_bytes() for p in pairs}
    for i, p in enumerate(pairs):
        stage_fake_slide(store, p[1], FakeSlide(p[0], n_tiles=10, seed=i), chunk_tiles=4, embed_dim=16)
    commit_all()
    assert before == {p: (tmp_path / "store" / store.features_relpath(p[1], "c", p[0])).read_bytes() for p in pairs}
    assert len(list((tmp_path / "store" / "features").rglob("*.parquet"))) == len(pairs)
    for actor in pool.actors:
        ray.kill(actor)


def test_job_commits_through_several_committers(ray_cluster, synthetic_svs_025, synthetic_svs_05, tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"slide_id,path\na,{synthetic_svs_025}\nb,{synthetic_svs_05}\n")
    config = build_job_config(
        dict(
            manifest=str(manifest),
            out=str(tmp_path / "store"),
            models=["sleep"],
            tiling={"tile_px": 224, "target_mpp": 0.5},
            chunk_tiles=4,
            resources={"committers": 3},
        )
    )
    report = run_job(config, {"sleep": sleep_encoder(tiles_per_s=1e4)}, progress_bars=False)
    assert report.resources["committers"] == 3
    assert report.per_model["sleep"]["ok"] == 2 and report.exit_code == 0
    table = FeatureStore(config.out).dataset("sleep").to_table()
    assert table.num_rows == report.tiles_planned > 0


def test_commits_survive_their_committer_being_killed_mid_flight(ray_cluster, tmp_path):
    import ray

    store = FeatureStore(str(tmp_path / "store"))
    staged = {
        f"s{i}": stage_fake_slide(store, "m", FakeSlide(f"s{i}", n_tiles=2048, seed=i), chunk_tiles=256, embed_dim=256)
        for i in range(8)
    }
    expected = {
        s: pa.concat_tables([pq.read_table(store.staging_path("m", s, c)) for c in ids]) for s, ids in staged.items()
    }
    pool = CommitPool(ray, store, 1, max_concurrency=2)
    ray.get(pool.actors[0].__ray_ready__.remote())
    refs = [pool.submit(CommitRequest("m", s, "c", ids, 2048, {}, {}, "h", "r1")) for s, ids in staged.items()]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0.3)
    ray.kill(pool.actors[0], no_restart=False)  # the process dies; Ray restarts it and retries its commits
    assert len(ready) < len(refs), "every commit had finished before the kill"
    records = ray.get(refs, timeout=120)
    assert sorted(r.slide_id for r in records) == sorted(staged) and store.committed("m") == set(staged)
    for slide_id, want in expected.items():
        got = pq.read_table(tmp_path / "store" / store.features_relpath("m", "c", slide_id))
        assert got.select(want.column_names).equals(want)
    assert len(list((tmp_path / "store" / "features").rglob("*.parquet"))) == len(staged)
    assert not list((tmp_path / "store" / "_staging").rglob("*.parquet"))
    ray.kill(pool.actors[0])
