"""``pathray tile MANIFEST --out DIR``: tile every slide of a manifest, without Ray.

The work is :func:`pathray.tiling.tile_job.tile_manifest` (what it writes under ``--out``:
see that module). Exit status: 0 all slides ok or without tissue, 1 some slide failed,
2 the manifest itself is invalid.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from pathray.cli.s3 import add_s3_options, s3_options_from_args
from pathray.errors import ManifestError, PathrayError
from pathray.manifest import SlideEntry, read_manifest
from pathray.tiling.grid import TilingConfig
from pathray.tiling.tile_job import TileOutput, tile_manifest
from pathray.tiling.tissue import TissueConfig
from pathray.wsi.scratch import DEFAULT_MAX_BYTES, Scratch


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
    out = TileOutput(args.out, store_options, args.geojson)
    with Scratch(args.scratch_dir, int(args.scratch_gb * 1024**3)) as scratch:
        done = tile_manifest(entries, config, out, scratch, slide_options, _print_slide)
    print(
        f"{len(entries) - done.failed}/{len(entries)} slides tiled, {done.tiles.num_rows} tiles -> {args.out}",
        file=sys.stderr,
    )
    return 1 if done.failed else 0


def _print_slide(entry: SlideEntry, status: dict[str, Any]) -> None:
    print(
        f"{entry.slide_id}: {status['status']} {status['error_type'] or ''} {status['n_tiles']} tiles", file=sys.stderr
    )


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
