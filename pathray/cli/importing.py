"""`pathray import`: existing TRIDENT / CLAM feature files into a store, as committed slides of a model.

``--format trident-h5`` reads TRIDENT's (and ``pathray export``'s) ``<slide_id>.h5``;
``clam-h5`` CLAM's ``h5_files/<slide_id>.h5`` (coords attributes from ``--coords-dir``, its
``patches/`` folder, where the file has none); ``pt`` CLAM's / TRIDENT's ``<slide_id>.pt``
with coords from ``--coords-dir``. Details: :mod:`pathray.exchange.importing`. Exit status:
0 every slide imported, 1 some slide failed (recorded in the store's ``errors/``), 2 nothing
could start (bad arguments, another config of the model in the store, a busy store).
"""

from __future__ import annotations

import argparse
import sys

from pathray.cli.s3 import add_s3_options, s3_options_from_args
from pathray.errors import PathrayError


def configure(parser: argparse.ArgumentParser) -> None:
    from pathray.exchange.importing import FORMATS

    add = parser.add_argument
    add("--store", required=True, help="feature store root: local dir or s3://bucket/prefix")
    add("--model", required=True, help="model name the features are stored under, e.g. conch-v1.5")
    add("--format", required=True, choices=sorted(FORMATS), dest="fmt", help="file layout")
    add("--features-dir", required=True, help="local folder of <slide_id>.h5 / .pt files")
    add("--coords-dir", help="folder of <slide_id>.h5 files with coords (required for pt; CLAM's patches/)")
    add(
        "--manifest",
        help="slides to import with cohort (and mpp for CLAM files); default: every file, cohort 'unassigned'",
    )
    add("--keep-columns", nargs="*", default=[], help="manifest columns carried into every tile row")
    add_s3_options(parser, slides=False)
    add("--run-id", help="name of this run (default: import-<timestamp>)")


def run(args: argparse.Namespace) -> int:
    from pathray.exchange.importing import ImportConfig, import_features

    storage, _ = s3_options_from_args(args)
    config = ImportConfig(
        store=args.store,
        model=args.model,
        fmt=args.fmt,
        features_dir=args.features_dir,
        coords_dir=args.coords_dir,
        manifest=args.manifest,
        keep_columns=tuple(args.keep_columns),
        storage_options=storage,
        run_id=args.run_id,
    )
    try:
        report = import_features(config)
    except (PathrayError, ValueError) as exc:
        print(f"pathray import: {exc}", file=sys.stderr)
        return 2
    print(report.summary())
    return report.exit_code
