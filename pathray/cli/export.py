"""`pathray export`: one file per slide in the layout TRIDENT / CLAM MIL code reads.

``--format trident-h5`` writes ``OUT/h5_files/<slide_id>.h5`` (``features``, ``coords`` in
level-0 px, TRIDENT's coords attributes), ``--format pt`` writes ``OUT/pt_files/<slide_id>.pt``
(CLAM's features tensor). Details: :mod:`pathray.exchange.export`. Exit status: 0 all exported,
1 some slide failed (listed), 2 nothing could start (e.g. ``--out`` holds another model's files:
``--overwrite`` replaces them).
"""

from __future__ import annotations

import argparse
import sys

from pathray.cli.s3 import add_s3_options, s3_options_from_args


def configure(parser: argparse.ArgumentParser) -> None:
    from pathray.exchange.export import FORMATS

    add = parser.add_argument
    add("--store", required=True, help="feature store root: local dir or s3://bucket/prefix")
    add("--model", required=True, help="tile model to export")
    add("--format", required=True, choices=sorted(FORMATS), dest="fmt", help="file layout")
    add("--out", required=True, help="local output directory (CLAM data_root_dir)")
    add(
        "--overwrite",
        action="store_true",
        help="rewrite existing files (default: skip this model's, refuse another model's)",
    )
    add_s3_options(parser, slides=False)


def run(args: argparse.Namespace) -> int:
    from pathray.exchange.export import ExportConflictError, export_store
    from pathray.store import FeatureStore

    storage, _ = s3_options_from_args(args)
    store = FeatureStore(args.store, storage)
    if args.model not in store.models():
        print(f"pathray export: model {args.model!r} is not in the store {args.store}", file=sys.stderr)
        return 2
    try:
        report = export_store(store, args.model, args.fmt, args.out, overwrite=args.overwrite)
    except ExportConflictError as exc:
        print(f"pathray export: {exc}", file=sys.stderr)
        return 2
    print(
        f"pathray export: {len(report.written)} written, {len(report.skipped)} skipped, "
        f"{len(report.errors)} failed -> {args.out}"
    )
    for slide_id, error in sorted(report.errors.items()):
        print(f"  {slide_id}: {error}", file=sys.stderr)
    return report.exit_code
