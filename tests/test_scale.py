"""The 1k-slide point of the scale rehearsal (``benchmarks/scale.py`` times it; this counts):
a TCGA-shaped manifest of 1,000 slides through the local runner on local disk, then the
re-run on the committed store."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from pathray.demo.synthetic import write_synthetic_svs
from pathray.job.config import build_job_config
from pathray.job.raydata import run_job
from pathray.testing import sleep_encoder

SLIDES = 1000
MODELS = ("sleep_a", "sleep_b")
COHORTS = ("tcga_brca", "tcga_luad", "tcga_coad")
TILES_PER_SLIDE = 4  # 1024 x 1024 px at 0.25 µm/px, tiles of 224 px at 0.5 µm/px


def tcga_cohort(directory: Path, n: int) -> Path:
    """``n`` hard links of one 4-tile slide under TCGA-style ids, and their manifest."""
    source = write_synthetic_svs(
        directory / "source.svs", (1024, 1024), mpp=0.25, tissue_rects=[(0, 0, 1024, 1024)], downsamples=(1, 4)
    )
    lines = ["slide_id,path,cohort,case_id"]
    for i in range(n):
        sid = f"TCGA-{i % 90 + 10:02d}-{i:04d}-01Z-00-DX1"
        os.link(source, directory / f"{sid}.svs")
        lines.append(f"{sid},{directory / sid}.svs,{COHORTS[i % len(COHORTS)]},{sid[:12]}")
    (directory / "manifest.csv").write_text("\n".join(lines) + "\n")
    return directory / "manifest.csv"


def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_thousand_slides_commit_once_and_the_rerun_writes_nothing(tmp_path):
    (tmp_path / "slides").mkdir()
    manifest, out = tcga_cohort(tmp_path / "slides", SLIDES), tmp_path / "store"
    config = build_job_config(
        dict(
            manifest=str(manifest),
            out=str(out),
            models=list(MODELS),
            runner="local",
            keep_columns=["case_id"],
            tiling={"tile_px": 224, "target_mpp": 0.5},
        )
    )
    encoders = {m: sleep_encoder(4000.0) for m in MODELS}
    first = run_job(config, encoders, progress_bars=False)
    assert first.exit_code == 0 and first.errors == 0
    assert {m: c["ok"] for m, c in first.per_model.items()} == {m: SLIDES for m in MODELS}

    expected = {(f"TCGA-{i % 90 + 10:02d}-{i:04d}-01Z-00-DX1", COHORTS[i % len(COHORTS)]) for i in range(SLIDES)}
    for model in MODELS:  # every slide committed exactly once (one file, its tiles once), under its own cohort
        assert len(list((out / "features" / f"model={model}").glob("cohort=*/*.parquet"))) == SLIDES
        assert len(list((out / "_commits" / f"model={model}").glob("*.json"))) == SLIDES
        tiles = pads.dataset(out / "features" / f"model={model}", partitioning="hive").to_table(
            columns=["slide_id", "cohort"]
        )
        per_slide = Counter(zip(tiles.column("slide_id").to_pylist(), tiles.column("cohort").to_pylist()))
        assert set(per_slide) == expected and set(per_slide.values()) == {TILES_PER_SLIDE}
    status = pq.read_table(out / "slides.parquet")
    assert status.num_rows == SLIDES * len(MODELS)
    assert set(status.column("status").to_pylist()) == {"ok"}
    assert not list((out / "_staging").glob("model=*/*"))  # no staged chunk, no empty slide folder left behind

    before = files_under(out)
    rerun = run_job(config, encoders, progress_bars=False)
    assert rerun.slides_skipped == SLIDES and rerun.pairs_to_do == 0 and rerun.tiles_read == 0
    assert {m: c["ok"] for m, c in rerun.per_model.items()} == {m: 0 for m in MODELS}
    added = files_under(out) - before
    assert added and all(f.startswith(f"_runs/{rerun.run_id}/") for f in added), sorted(added)
    assert pq.read_table(out / "slides.parquet").num_rows == SLIDES * len(MODELS)
