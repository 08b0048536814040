"""`pathray aggregate`: slide-level rows from a store's committed tile features (also the body
of ``jobs/aggregate.py``).

Exit status: 0 every slide aggregated (or without tissue), 1 some slide failed (recorded in
the store's ``errors/``), 2 the job could not start (unknown aggregator or model, an
aggregator that does not take this model's embeddings or this store's tiling, other weights than the existing
output was made with).
"""

from __future__ import annotations

import argparse
import logging
import sys

from pathray.errors import PathrayError

SAMPLE_QUERY = """\
import duckdb
duckdb.sql("SELECT slide_id, cohort, n_tiles FROM read_parquet('{root}/slide_features/model={model}/aggregator={agg}/*.parquet')")
# or: pathray.store.FeatureStore("{root}").slide_features("{model}", "{agg}").to_table()"""


def configure(parser: argparse.ArgumentParser) -> None:
    from pathray.aggregate import AGGREGATORS

    add = parser.add_argument
    add("--store", required=True, help="feature store root: local dir or s3://bucket/prefix")
    add("--model", required=True, help="tile model whose committed features are aggregated")
    add("--aggregator", required=True, choices=sorted(AGGREGATORS), help="how tiles become one slide embedding")
    add("--weights", help="weights of a slide encoder: file, hub-layout dir or hf-hub:org/name")
    add("--num-gpus", type=float, help="GPUs per aggregator actor (default: 1 when the cluster has GPUs)")
    add("--actors", type=int, help="aggregator actors (default: one per GPU, else 1)")
    add("--s3-endpoint-url", help="S3-compatible endpoint (else AWS_ENDPOINT_URL / AWS default)")
    add("--ray-address", help="Ray cluster address (default: the job's cluster, or a local one)")
    add("--run-id", help="name of this run (default: agg-<timestamp>)")
    add("--no-progress", action="store_true", help="no Ray Data progress bars")


def run(args: argparse.Namespace) -> int:
    from pathray.aggregate_job import AggregateConfig, run_aggregate

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    storage = {"client_kwargs": {"endpoint_url": args.s3_endpoint_url}} if args.s3_endpoint_url else None
    config = AggregateConfig(store=args.store, model=args.model, aggregator=args.aggregator, weights=args.weights,
                             storage_options=storage, ray_address=args.ray_address, run_id=args.run_id,
                             num_gpus=args.num_gpus, actors=args.actors)
    try:
        report = run_aggregate(config, progress_bars=not args.no_progress)
    except (PathrayError, ValueError) as exc:
        print(f"pathray aggregate: {exc}", file=sys.stderr)
        return 2
    print(report.summary())
    print("Query it:\n" + SAMPLE_QUERY.format(root=report.store, model=args.model, agg=args.aggregator))
    return report.exit_code
