"""Write tests/data/store_v1/: a small feature store written by pathray's own job, kept as a
fixture so that tests/test_store_fixture.py proves stores written by earlier code still read.

Run once from the repository root (it replaces the fixture): ``.venv/bin/python
tests/reference/store_fixture.py``. The store holds two stand-in models (8-d and 16-d
embeddings), two synthetic slides in two cohorts with a ``case_id`` column kept, one unreadable
slide (an error row), and ``mean`` slide features of the 8-d model.
"""

from __future__ import annotations

import csv
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "data" / "store_v1"


def write_slides(tmp: Path) -> Path:
    from pathray.demo.synthetic import write_synthetic_svs

    rows = []
    for i, (cohort, rects) in enumerate([("brca", ((224, 224, 672, 448),)), ("luad", ((0, 0, 448, 448),))]):
        path = write_synthetic_svs(
            tmp / f"slide{i}.svs", (2016, 1344), mpp=0.5, tissue_rects=rects, seed=i, downsamples=(1, 4)
        )
        rows.append({"slide_id": f"slide{i}", "path": str(path), "cohort": cohort, "case_id": f"case{i}"})
    (tmp / "broken.svs").write_bytes(b"")
    rows.append({"slide_id": "broken", "path": str(tmp / "broken.svs"), "cohort": "brca", "case_id": "case9"})
    manifest = tmp / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def main() -> int:
    from pathray.job.config import build_job_config
    from pathray.job.raydata import run_job
    from pathray.slide_level.job import AggregateConfig, run_aggregate
    from pathray.testing import sleep_encoder

    with tempfile.TemporaryDirectory() as tmp:
        manifest = write_slides(Path(tmp))
        store = Path(tmp) / "store"
        config = build_job_config(
            dict(
                manifest=str(manifest),
                out=str(store),
                models=["sleep8", "sleep16"],
                tiling={"tile_px": 224, "target_mpp": 0.5},
                chunk_tiles=4,
                keep_columns=["case_id"],
                runner="local",
                run_id="fixture-embed",
            )
        )
        custom = {"sleep8": sleep_encoder(1e6, embed_dim=8), "sleep16": sleep_encoder(1e6, embed_dim=16)}
        run_job(config, custom, progress_bars=False)
        run_aggregate(
            AggregateConfig(
                store=str(store), model="sleep8", aggregator="mean", runner="local", run_id="fixture-aggregate"
            )
        )
        shutil.rmtree(OUT, ignore_errors=True)
        shutil.copytree(store, OUT)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
