"""``pathray tile MANIFEST --out DIR``: tile every slide of a manifest, without Ray.

Writes, under ``--out`` (local or ``s3://``):

* ``tiles.parquet``: one row per kept tile (:data:`pathray.tiling.grid.TILE_SCHEMA`); the tiling
  config and its fingerprint are in the file's schema metadata;
* ``slides.parquet``: one row per manifest slide with ``status`` ``ok`` / ``no_tissue`` /
  ``error``, and ``error_type`` + ``error_message`` for errors;
* ``qc/<slide_id>.png`` (and ``qc/<slide_id>.geojson`` with ``--geojson``).

A failing slide never stops the others. Exit status: 0 all slides ok or without tissue,
1 some slide failed, 2 the manifest itself is invalid.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pathray.cli.s3 import add_s3_options, s3_options_from_args
from pathray.errors import ManifestError, PathrayError, describe
from pathray.fs import join, split_uri
from pathray.manifest import SlideEntry, read_manifest
from pathray.tiling.grid import TILE_SCHEMA, TilingConfig, plan_tiles
from pathray.tiling.qc import write_qc
from pathray.tiling.tissue import TissueConfig
from pathray.wsi.scratch import DEFAULT_MAX_BYTES, Scratch
from pathray.wsi.slide import open_slide

TILE_STATUS_SCHEMA = pa.schema(
    [
        ("slide_id", pa.string()),
        ("path", pa.string()),
        ("cohort", pa.string()),
        ("status", pa.string()),  # ok | no_tissue | error
        ("error_type", pa.string()),
        ("error_message", pa.string()),
        ("n_tiles", pa.int64()),
        ("mpp", pa.float64()),  # level-0 µm/px used
        ("mpp_source", pa.string()),
        ("width", pa.int64()),  # level-0 px
        ("height", pa.int64()),
        ("level", pa.int32()),  # pyramid level read
        ("read_px", pa.int32()),  # level px read per tile side
        ("etag", pa.string()),
        ("size_bytes", pa.int64()),
        ("seconds", pa.float64()),
    ]
)


@dataclass(frozen=True)
class TileOutput:
    """Where QC files go: ``root`` (local or ``s3://``) with its s3fs options."""

    root: str
    storage_options: dict[str, Any] | None = None
    geojson: bool = False  # also write QuPath-importable GeoJSON


def configure(parser: argparse.ArgumentParser) -> None:
    defaults = TilingConfig()
    parser.add_argument("manifest", help="CSV/TSV/Parquet/JSONL manifest, local or s3://")
    parser.add_argument("--out", required=True, help="output directory, local or s3://")
    parser.add_argument(
        "--tile-px", type=int, default=defaults.tile_px, help="tile side in pixels (default %(default)s)"
    )
    parser.add_argument(
        "--target-mpp", type=float, default=defaults.target_mpp, help="tile resolution, µm/px (default %(default)s)"
    )
    parser.add_argument(
        "--stride-px", type=int, default=None, help="grid step in target pixels (default: tile-px, no overlap)"
    )
    parser.add_argument(
        "--min-tissue",
        type=float,
        default=defaults.min_tissue_fraction,
        help="minimum tissue fraction of a kept tile, 0-1 (default %(default)s)",
    )
    parser.add_argument(
        "--thumbnail-mpp",
        type=float,
        default=defaults.tissue.thumbnail_mpp,
        help="µm/px of the tissue-detection thumbnail (default %(default)s)",
    )
    parser.add_argument("--geojson", action="store_true", help="also write QuPath-importable GeoJSON of the kept tiles")
    parser.add_argument(
        "--scratch-dir", default=None, help="local directory for staging s3:// slides (default: a temporary one)"
    )
    parser.add_argument(
        "--scratch-gb",
        type=float,
        default=DEFAULT_MAX_BYTES / 1024**3,
        help="most GB of staged slides at once (default %(default)s)",
    )
    add_s3_options(parser)


def run(args: argparse.Namespace) -> int:
    config = TilingConfig(
        tile_px=args.tile_px,
        target_mpp=args.target_mpp,
        stride_px=args.stride_px,
        min_tissue_fraction=args.min_tissue,
        tissue=TissueConfig(thumbnail_mpp=args.thumbnail_mpp),
    )
    store_options, slide_options = s3_options_from_args(args)
    try:
        entries = _read_reachable(args.manifest, args.out, store_options, slide_options)
    except (ManifestError, PathrayError) as exc:
        print(f"pathray tile: {exc}", file=sys.stderr)
        return 2
    tiles, statuses = [], []
    out = TileOutput(args.out, store_options, args.geojson)
    with Scratch(args.scratch_dir, int(args.scratch_gb * 1024**3)) as scratch:
        for entry in entries:
            table, status = tile_slide(entry, config, out, scratch, slide_options)
            tiles.append(table)
            statuses.append(status)
            print(
                f"{entry.slide_id}: {status['status']} {status['error_type'] or ''} {status['n_tiles']} tiles",
                file=sys.stderr,
            )
    metadata = {
        b"pathray.tiling_config": json.dumps(config.to_dict(), sort_keys=True).encode(),
        b"pathray.tiling_fingerprint": config.fingerprint().encode(),
    }
    tiles_table = pa.concat_tables(tiles or [TILE_SCHEMA.empty_table()]).replace_schema_metadata(metadata)
    _write_parquet(tiles_table, join(args.out, "tiles.parquet"), store_options)
    _write_parquet(
        pa.Table.from_pylist(statuses, schema=TILE_STATUS_SCHEMA), join(args.out, "slides.parquet"), store_options
    )
    failed = sum(s["status"] == "error" for s in statuses)
    print(
        f"{len(entries) - failed}/{len(entries)} slides tiled, {tiles_table.num_rows} tiles -> {args.out}",
        file=sys.stderr,
    )
    return 1 if failed else 0


def _read_reachable(
    manifest: str, out: str, store_options: dict[str, Any] | None, slide_options: dict[str, Any] | None
) -> list[SlideEntry]:
    """The manifest's entries once the manifest, the output and the slides' storage answer
    (:mod:`pathray.job.outage`): an outage stops the command at once."""
    from pathray.job.outage import check_reachable, check_slide_sources

    check_reachable(manifest, store_options, "manifest")
    check_reachable(out, store_options, "output")
    entries = read_manifest(manifest, store_options)
    check_slide_sources((e.path for e in entries), slide_options)
    return entries


def tile_slide(
    entry: SlideEntry,
    config: TilingConfig,
    out: TileOutput,
    scratch: Scratch,
    storage_options: dict[str, Any] | None = None,
) -> tuple[pa.Table, dict[str, Any]]:
    """Plan one slide's tiles and write its QC files under ``out``; never raises for a bad
    slide. ``storage_options``: the slide's s3fs options.

    Returns ``(tile table, status row)``; on failure the table is empty and the status row
    carries ``error_type`` (a :class:`PathrayError` type, or ``unexpected_error``).
    """
    started = time.monotonic()
    status: dict[str, Any] = {name: None for name in TILE_STATUS_SCHEMA.names}
    status.update(slide_id=entry.slide_id, path=entry.path, cohort=entry.cohort, n_tiles=0)
    table = TILE_SCHEMA.empty_table()
    try:
        with open_slide(entry.path, entry.mpp, scratch, storage_options) as slide:
            status.update(
                mpp=slide.mpp,
                mpp_source=slide.mpp_source,
                width=slide.dimensions[0],
                height=slide.dimensions[1],
                etag=slide.etag,
                size_bytes=slide.size_bytes,
            )
            grid = plan_tiles(slide, entry.slide_id, config)
        qc_dir = join(out.root, "qc")
        write_qc(
            grid,
            join(qc_dir, f"{entry.slide_id}.png"),
            join(qc_dir, f"{entry.slide_id}.geojson") if out.geojson else None,
            out.storage_options,
        )
        status.update(
            level=grid.level, read_px=grid.read_px, n_tiles=len(grid), status="no_tissue" if grid.no_tissue else "ok"
        )
        table = grid.to_table()
    except Exception as exc:  # every failure is recorded, never fatal for the other slides
        error_type, message = describe(exc)
        status.update(status="error", error_type=error_type, error_message=message)
    status["seconds"] = round(time.monotonic() - started, 3)
    return table, status


def _write_parquet(table: pa.Table, uri: str, storage_options: dict[str, Any] | None) -> None:
    fs, path = split_uri(uri, storage_options)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    with fs.open(path, "wb") as f:
        f.write(buffer.getvalue())
