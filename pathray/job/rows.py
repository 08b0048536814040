"""The rows the job's stages pass one another, declared once: their schemas and builders.

Row kinds flowing between stages (all columns typed and non-null, so Ray Data can
concatenate blocks produced by different tasks):

* **slide rows** (driver -> plan): :data:`SLIDE_SCHEMA`, one per slide to (re)do
  (:func:`slide_row`).
* **chunk rows** (plan -> read -> encode -> write): :data:`CHUNK_SCHEMA`, one per work
  unit of at most ``chunk_tiles`` tiles of one slide. Coordinates travel as raw
  little-endian bytes (``int64`` x/y/tile_index, ``float32`` tissue fraction) so that
  empty chunks have the same type as full ones. The read stage adds ``pixels``
  (``N*tile_px*tile_px*3`` uint8 bytes); each encode stage adds ``emb:<model>``
  (``N*D`` float bytes), ``prov:<model>`` (provenance JSON) and ``encode_s:<model>``;
  the last encode stage drops ``pixels``.
* **result rows** (write -> driver): :data:`RESULT_SCHEMA`, one per (chunk, model)
  (:func:`result_row`).

A slide that fails or has no tissue still yields exactly one chunk row
(``n_chunks == 0``, ``status`` error / no_tissue) so the driver learns its fate from the
same stream.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import pyarrow as pa

from pathray.errors import cap_message, describe
from pathray.manifest import SlideEntry

SLIDE_SCHEMA = pa.schema(
    [
        ("slide_id", pa.string()),
        ("path", pa.string()),
        ("cohort", pa.string()),  # "" when the manifest has none
        ("mpp_override", pa.float64()),  # the manifest's µm/px, null when it has none
        ("models", pa.list_(pa.string())),  # models still to do for this slide
    ]
)

CHUNK_SCHEMA = pa.schema(
    [
        *SLIDE_SCHEMA,  # mpp_override travels on so readers open the slide as the planner did
        ("tiling", pa.string()),  # fingerprint of the chunk's tiling ("" when planning failed)
        ("tile_px", pa.int32()),  # that tiling's tile side (px at target_mpp)
        ("target_mpp", pa.float64()),
        ("chunk_id", pa.string()),
        ("chunk_index", pa.int32()),
        ("n_chunks", pa.int32()),
        ("n_tiles_slide", pa.int64()),
        ("tile_index", pa.binary()),
        ("x", pa.binary()),
        ("y", pa.binary()),
        ("tissue_fraction", pa.binary()),
        ("size_level0", pa.float64()),
        ("status", pa.string()),  # ok | no_tissue | error
        ("stage", pa.string()),
        ("error_type", pa.string()),
        ("error_message", pa.string()),
        ("slide_facts", pa.string()),  # pathray.wsi.facts.SlideFacts as JSON ("{}" when planning failed)
        ("plan_s", pa.float64()),
    ]
)

RESULT_SCHEMA = pa.schema(
    [
        ("slide_id", pa.string()),
        ("model", pa.string()),
        ("cohort", pa.string()),
        ("chunk_id", pa.string()),
        ("chunk_index", pa.int32()),
        ("n_chunks", pa.int32()),
        ("n_tiles_slide", pa.int64()),
        ("n_tiles", pa.int64()),  # tiles of this chunk written for this model
        ("first", pa.bool_()),  # the chunk's first model row: carries the chunk-level figures below
        ("tiles_read", pa.int64()),  # tiles whose pixels were read for this chunk
        ("status", pa.string()),
        ("stage", pa.string()),
        ("error_type", pa.string()),
        ("error_message", pa.string()),
        ("slide_facts", pa.string()),
        ("provenance", pa.string()),
        ("plan_s", pa.float64()),
        ("read_s", pa.float64()),
        ("encode_s", pa.float64()),
        ("encoded_at", pa.float64()),  # unix time this model finished this chunk (0: not encoded)
        ("write_s", pa.float64()),
    ]
)

#: the columns a result row copies from its chunk row
_FROM_CHUNK = tuple(name for name in RESULT_SCHEMA.names if name in CHUNK_SCHEMA.names)


#: a chunk row's columns before its slide is planned
_UNPLANNED: dict[str, Any] = {
    "tiling": "",
    "tile_px": 0,
    "target_mpp": 0.0,
    "chunk_id": "",
    "chunk_index": 0,
    "n_chunks": 0,
    "n_tiles_slide": 0,
    "tile_index": b"",
    "x": b"",
    "y": b"",
    "tissue_fraction": b"",
    "size_level0": 0.0,
    "stage": "plan",
    "error_type": "",
    "error_message": "",
    "slide_facts": "{}",
}


def chunk_id(slide_id: str, tiling_fingerprint: str, index: int) -> str:
    """Deterministic name of a slide's ``index``-th chunk under one tiling config."""
    return f"{slide_id}.{tiling_fingerprint[:8]}.c{index:05d}"


def slide_row(entry: SlideEntry, models: list[str]) -> dict[str, Any]:
    """The slide row (:data:`SLIDE_SCHEMA`) of a manifest entry with the ``models`` still to do
    (``[]``: plan every tiling of the run, as the dry run's sample does)."""
    return {
        "slide_id": entry.slide_id,
        "path": entry.path,
        "cohort": entry.cohort or "",
        "mpp_override": entry.mpp,
        "models": models,
    }


def unplanned_chunk(slide: dict[str, Any]) -> dict[str, Any]:
    """A slide row as a chunk row with no tiling, no tiles and no facts yet, at stage ``plan``
    and without a status: what the planner builds every chunk row of the slide from."""
    return {k: slide[k] for k in SLIDE_SCHEMA.names} | _UNPLANNED


def error_fields(stage: str, exc: BaseException) -> dict[str, str]:
    """The status columns of a row that failed at ``stage`` with ``exc``."""
    error_type, message = describe(exc)
    return {"status": "error", "stage": stage, "error_type": error_type, "error_message": cap_message(message)}


def result_row(chunk: dict[str, Any], model: str, first: bool) -> dict[str, Any]:
    """The result row (:data:`RESULT_SCHEMA`) of one chunk row for ``model`` before it is
    written (``n_tiles`` 0): the chunk's status and timings, and the model's encode figures and
    error (an encode error of an ``ok`` chunk becomes the row's status)."""
    row = {k: chunk[k] for k in _FROM_CHUNK}
    row.update(
        model=model,
        first=first,
        n_tiles=0,
        tiles_read=chunk.get("tiles_read") or 0,
        provenance=chunk.get(f"prov:{model}") or "{}",
        read_s=chunk.get("read_s") or 0.0,
        encode_s=chunk.get(f"encode_s:{model}") or 0.0,
        encoded_at=chunk.get(f"encoded_at:{model}") or 0.0,
        write_s=0.0,
    )
    error = chunk.get(f"err:{model}")
    if row["status"] == "ok" and error:
        row.update(json.loads(error))
    return row


def passthrough_schema(entries: Iterable[SlideEntry], keep: tuple[str, ...]) -> pa.Schema:
    """The Arrow schema of the manifest columns ``keep`` copied onto every tile row, inferred
    from ``entries``' values (a column null in every entry is a string column)."""
    if not keep:
        return pa.schema([])
    schema = pa.Table.from_pylist([{c: e.extra.get(c) for c in keep} for e in entries]).schema
    return pa.schema([pa.field(f.name, pa.string() if pa.types.is_null(f.type) else f.type) for f in schema])
