"""`pathray status STORE`: what is in a store, without writing to it.

Models with their tilings, slides committed / failed by error type / never tried (with
``--manifest``), runs with their dates and wall times, slide-level aggregations. ``--json`` for
scripts. Exit status: 0, or 2 when there is no store there.
"""

from __future__ import annotations

import argparse
import json
import sys

from pathray.cli.s3 import add_s3_options, s3_options_from_args


def configure(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("store", help="feature store root: local dir or s3://bucket/prefix")
    add("--manifest", help="a manifest: also count its slides never tried, per model")
    add("--json", action="store_true", help="print the summary as JSON")
    add_s3_options(parser, slides=False)


def run(args: argparse.Namespace) -> int:
    from pathray.manifest import read_manifest
    from pathray.store import FeatureStore
    from pathray.store.status import format_status, store_status

    storage, _ = s3_options_from_args(args)
    ids = [e.slide_id for e in read_manifest(args.manifest, storage)] if args.manifest else None
    try:
        status = store_status(FeatureStore(args.store, storage), ids)
    except FileNotFoundError as exc:
        print(f"pathray status: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(status, indent=2, sort_keys=True) if args.json else format_status(status))
    return 0
