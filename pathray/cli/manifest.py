"""`pathray manifest idc`: write a slide manifest from the IDC index shipped in ``idc-index-data``.

Example: ``pathray manifest idc --collection tcga_luad --diagnostic-only --out luad.parquet``
writes one row per DICOM slide-microscopy series (see :mod:`pathray.idc` for the columns and
the slide_id rule) and prints per-collection counts. No network is used. Exit status 0, or 2
for an unknown collection / an empty selection.
"""

from __future__ import annotations

import argparse
import sys


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source", choices=["idc"], help="where the series list comes from (idc: NCI Imaging Data Commons)"
    )
    parser.add_argument(
        "--collection", action="append", required=True, help="IDC collection_id, e.g. tcga_luad (repeatable)"
    )
    parser.add_argument(
        "--diagnostic-only",
        action="store_true",
        help="keep diagnostic FFPE slides only (TCGA SeriesDescription 'FFPE ... DX<n>')",
    )
    parser.add_argument("--preparation", choices=["ffpe", "frozen"], help="keep FFPE or frozen-section slides only")
    parser.add_argument(
        "--sm-index",
        metavar="PARQUET",
        help="IDC sm_index.parquet (from the idc-index package): add width_px/height_px/index_mpp "
        "so tiles can be estimated without touching the bucket",
    )
    parser.add_argument(
        "--out", default="manifest.parquet", help="output manifest: .parquet (default) or .csv, local or s3://"
    )


def run(args: argparse.Namespace) -> int:
    from pathray.idc import IdcSelection, attach_geometry, idc_manifest, index_version, write_manifest

    try:
        selection = IdcSelection(tuple(args.collection), args.diagnostic_only, args.preparation)
        table, counts = idc_manifest(selection)
    except ValueError as exc:
        print(f"pathray manifest: {exc}", file=sys.stderr)
        return 2
    print(f"IDC index (idc-index-data {index_version()}):")
    for collection, stats in counts.items():
        print(
            f"  {collection}: {stats['kept']} of {stats['series']} SM series kept"
            + (f" ({stats['unclassified']} without an FFPE/frozen SeriesDescription)" if stats["unclassified"] else "")
        )
    if table.num_rows == 0:
        print("pathray manifest: no series left after filtering", file=sys.stderr)
        return 2
    if args.sm_index:
        table = attach_geometry(table, args.sm_index)
    write_manifest(table, args.out)
    size_tb = sum(table.column("series_size_mb").to_pylist()) / 1e6
    print(f"wrote {table.num_rows} slides ({size_tb:.3f} TB in the bucket) to {args.out}")
    return 0
