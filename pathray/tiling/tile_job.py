"""Tile every slide of a manifest without Ray (``pathray tile``): tile records, QC images and
a status table per slide.

Writes, under the output root (local or ``s3://``):

* ``tiles.parquet``: one row per kept tile (:data:`pathray.tiling.grid.TILE_SCHEMA`); the tiling
  config and its fingerprint are in the file's schema metadata;
* ``slides.parquet``: one row per manifest slide (:data:`TILE_STATUS_SCHEMA`) with ``status``
  ``ok`` / ``no_tissue`` / ``error``, and ``error_type`` + ``error_message`` for errors;
* ``qc/<slide_id>.png`` (and ``qc/<slide_id>.geojson`` when asked).

A failing slide never stops the others.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pathray.errors import describe
from pathray.fs import join, split_uri
from pathray.manifest import SlideEntry
from pathray.tiling.grid import TILE_SCHEMA, TilingConfig, plan_tiles
from pathray.tiling.qc import write_qc
from pathray.wsi.facts import SlideFacts, status_fields
from pathray.wsi.scratch import Scratch
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
    """Where the outputs go: ``root`` (local or ``s3://``) with its s3fs options."""

    root: str
    storage_options: dict[str, Any] | None = None
    geojson: bool = False  # also write QuPath-importable GeoJSON


@dataclass(frozen=True)
class TiledManifest:
    """What :func:`tile_manifest` wrote: the tile table and one status row per slide."""

    tiles: pa.Table  # TILE_SCHEMA, with the tiling config in its schema metadata
    statuses: list[dict[str, Any]]  # TILE_STATUS_SCHEMA rows, in manifest order

    @property
    def failed(self) -> int:
        return sum(s["status"] == "error" for s in self.statuses)


def tile_manifest(
    entries: Sequence[SlideEntry],
    config: TilingConfig,
    out: TileOutput,
    scratch: Scratch,
    storage_options: dict[str, Any] | None = None,
    on_slide: Callable[[SlideEntry, dict[str, Any]], None] | None = None,
) -> TiledManifest:
    """Tile each slide (:func:`tile_slide`), then write ``tiles.parquet`` and ``slides.parquet``
    under ``out``. ``storage_options``: the slides' s3fs options; ``on_slide(entry, status row)``
    is called as each slide is done. Never raises for a bad slide."""
    tiles, statuses = [], []
    for entry in entries:
        table, status = tile_slide(entry, config, out, scratch, storage_options)
        tiles.append(table)
        statuses.append(status)
        if on_slide is not None:
            on_slide(entry, status)
    metadata = {
        b"pathray.tiling_config": json.dumps(config.to_dict(), sort_keys=True).encode(),
        b"pathray.tiling_fingerprint": config.fingerprint().encode(),
    }
    tiles_table = pa.concat_tables(tiles or [TILE_SCHEMA.empty_table()]).replace_schema_metadata(metadata)
    _write_parquet(tiles_table, join(out.root, "tiles.parquet"), out.storage_options)
    status_table = pa.Table.from_pylist(statuses, schema=TILE_STATUS_SCHEMA)
    _write_parquet(status_table, join(out.root, "slides.parquet"), out.storage_options)
    return TiledManifest(tiles_table, statuses)


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
            facts = status_fields(SlideFacts.of(slide))
            status.update({name: value for name, value in facts.items() if name in TILE_STATUS_SCHEMA.names})
            grid = plan_tiles(slide, entry.slide_id, config)
        qc_dir = join(out.root, "qc")
        geojson = join(qc_dir, f"{entry.slide_id}.geojson") if out.geojson else None
        write_qc(grid, join(qc_dir, f"{entry.slide_id}.png"), geojson, out.storage_options)
        status.update(
            level=grid.level,
            read_px=grid.read_px,
            n_tiles=len(grid),
            status="no_tissue" if grid.no_tissue else "ok",
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
