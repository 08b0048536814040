"""`pathray aggregate`: slide-level rows from a store's committed tile features (also the body
of ``jobs/aggregate.py``).

Exit status: 0 every slide aggregated (or without tissue), 1 some slide failed (recorded in
the store's ``errors/``), 2 the job could not start (unknown aggregator or model, an
aggregator that does not take this model's embeddings or this store's tiling, other weights than the existing
output was made with).
"""

from __future__ import annotations

import argparse
import sys

from pathray.cli.s3 import add_s3_options, s3_options_from_args
from pathray.errors import PathrayError

SAMPLE_QUERY = """\
import duckdb
duckdb.sql("SELECT slide_id, cohort, n_tiles FROM read_parquet('{root}/slide_features/model={model}/aggregator={agg}/*.parquet')")
# or: pathray.store.FeatureStore("{root}").slide_features("{model}", "{agg}").to_table()"""


def configure(parser: argparse.ArgumentParser) -> None:
    from pathray.slide_level.aggregators import AGGREGATORS

    add = parser.add_argument
    add("--store", required=True, help="feature store root: local dir or s3://bucket/prefix")
    add("--model", required=True, help="tile model whose committed features are aggregated")
    add("--aggregator", required=True, choices=sorted(AGGREGATORS), help="how tiles become one slide embedding")
    add("--weights", help="weights of a slide encoder: file, hub-layout dir or hf-hub:org/name")
    add("--num-gpus", type=float, help="GPUs per aggregator actor (default: 1 when the cluster has GPUs)")
    add("--actors", type=int, help="aggregator actors (default: one per GPU, else 1)")
    add_s3_options(parser, slides=False)
    add("--ray-address", help="Ray cluster address (default: the job's cluster, or a local one)")
    add("--run-id", help="name of this run (default: agg-<timestamp>)")
    add(
        "--runner",
        choices=["auto", "ray", "local"],
        default="auto",
        help="auto (default): in this process when there is no Ray cluster to join and no GPU, else Ray",
    )
    add("--no-progress", action="store_true", help="no live progress display")
    add(
        "--verbose",
        action="store_true",
        help="show every log line and Ray's own progress and logs on the terminal "
        "(otherwise they go to the run's log, _runs/RUN_ID/run.log in the store)",
    )


def run(args: argparse.Namespace) -> int:
    from pathray.job.runtime import new_run_id
    from pathray.monitor.runlog import run_footer, run_terminal
    from pathray.slide_level.job import AggregateConfig, run_aggregate

    storage, _ = s3_options_from_args(args)
    config = AggregateConfig(
        store=args.store,
        model=args.model,
        aggregator=args.aggregator,
        weights=args.weights,
        storage_options=storage,
        ray_address=args.ray_address,
        run_id=args.run_id or new_run_id("agg-"),
        num_gpus=args.num_gpus,
        actors=args.actors,
        runner=args.runner,
    )
    try:
        with run_terminal(config.store, config.run_id, args.verbose) as terminal:
            report = run_aggregate(
                config,
                progress_bars=args.verbose and not args.no_progress,
                display=None if args.no_progress else terminal.stream,
            )
            log_uri = terminal.finish(config.store, config.run_id, config.storage_options)
    except (PathrayError, ValueError) as exc:
        print(f"pathray aggregate: {exc}", file=sys.stderr)
        return 2
    print(report.summary())
    print("Query it:\n" + SAMPLE_QUERY.format(root=report.store, model=args.model, agg=args.aggregator))
    print(run_footer(log_uri, report.store, report.run_id, report.html))
    return report.exit_code
