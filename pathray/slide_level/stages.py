"""The two per-slide stages of ``pathray aggregate`` (:mod:`pathray.slide_level.job` runs them
in a Ray Data plan or in-process):

1. :func:`load_slides`: per slide, its tile commit record and its features file, read once by
   :func:`pathray.store.read_slide` (checked against the record: row count, order) -> tiles as
   bytes (:data:`LOADED_SCHEMA`);
2. :class:`SlideAggregatorStage`: builds the aggregator once per actor, computes each slide's
   embedding and commits it with :func:`pathray.store.commit_file`: the one-row Parquet file
   ``slide_features/model=<m>/aggregator=<a>/<slide_id>.parquet``, then its commit record.

A slide that cannot be read, aggregated or committed is an error row, never an exception.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from pathray.errors import AggregatorError, FeaturesUnreadableError, cap_message, describe
from pathray.slide_level.aggregators import AggregatorSpec, SlideTiles, build_aggregator
from pathray.store import (
    PROVENANCE_KEY,
    CommitRecord,
    FeatureStore,
    SlideFeaturesRecord,
    TileFeatures,
    commit_file,
    embeddings_to_arrow,
    read_slide,
)

if TYPE_CHECKING:
    from pathray.slide_level.job import AggregateConfig

LOADED_SCHEMA = pa.schema(
    [
        ("slide_id", pa.string()),
        ("cohort", pa.string()),
        ("status", pa.string()),
        ("stage", pa.string()),
        ("error_type", pa.string()),
        ("error_message", pa.string()),
        ("n_tiles", pa.int64()),
        ("dim", pa.int64()),
        ("embeddings", pa.large_binary()),  # (n_tiles, dim) float32, little-endian
        ("x", pa.large_binary()),
        ("y", pa.large_binary()),  # (n_tiles,) int64 level-0 px
        ("slide_mpp", pa.float64()),
        ("kept", pa.large_binary()),  # kept manifest columns: 1-row Arrow IPC stream
        ("tile_provenance", pa.string()),
        ("features_path", pa.string()),
        ("load_s", pa.float64()),
    ]
)

AGGREGATE_RESULT_SCHEMA = pa.schema(
    [
        ("slide_id", pa.string()),
        ("status", pa.string()),
        ("stage", pa.string()),
        ("error_type", pa.string()),
        ("error_message", pa.string()),
        ("n_tiles", pa.int64()),
        ("load_s", pa.float64()),
        ("aggregate_s", pa.float64()),
    ]
)


# --- stage 1: load ----------------------------------------------------------------------------
def load_slides(batch: pa.Table, root: str, storage_options: dict | None, model: str) -> pa.Table:
    """Slide ids -> :data:`LOADED_SCHEMA` rows; a slide that cannot be read is an error row."""
    store = FeatureStore(root, storage_options)
    return pa.Table.from_pylist(
        [_load_one(store, model, s) for s in batch.column("slide_id").to_pylist()], schema=LOADED_SCHEMA
    )


def _load_one(store: FeatureStore, model: str, slide_id: str) -> dict[str, Any]:
    start = time.perf_counter()
    row = {name: None for name in LOADED_SCHEMA.names}
    row.update(slide_id=slide_id, status="ok", n_tiles=0, dim=0)
    try:
        record = store.commit_record(model, slide_id)
        if record is None:
            raise FeaturesUnreadableError(f"{slide_id}: the commit record of model {model!r} disappeared")
        row.update(cohort=record.cohort, features_path=record.features_path)
        if record.features_path is None:
            row["status"] = "no_tissue"
        else:
            row.update(_loaded(record, read_slide(store, model, record)))
    except Exception as exc:  # noqa: BLE001 - one slide's failure is recorded, never fatal
        error_type, message = describe(exc)
        row.update(status="error", stage="load", error_type=error_type, error_message=cap_message(message))
    row["load_s"] = time.perf_counter() - start
    return row


def _loaded(record: CommitRecord, tiles: TileFeatures) -> dict[str, Any]:
    """The :data:`LOADED_SCHEMA` fields of a slide's tiles; the slide's µm/px is its commit
    record's, else the one its tiling implies."""
    slide_mpp = record.slide.get("mpp")
    return {
        "n_tiles": record.n_tiles,
        "dim": tiles.embeddings.shape[1],
        "embeddings": tiles.embeddings.astype("<f4", copy=False).tobytes(),
        "x": tiles.coords[:, 0].astype("<i8").tobytes(),
        "y": tiles.coords[:, 1].astype("<i8").tobytes(),
        "slide_mpp": float(slide_mpp if slide_mpp is not None else tiles.level0_mpp),
        "kept": _ipc_bytes(tiles.kept) if tiles.kept.num_columns else b"",
        "tile_provenance": tiles.provenance,
    }


def _ipc_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


# --- stage 2: aggregate + commit --------------------------------------------------------------
class SlideAggregatorStage:
    """Loaded slides -> :data:`AGGREGATE_RESULT_SCHEMA` rows, committing each slide's row.

    The aggregator is built once per actor. If that fails (weights missing, module absent),
    the actor stays up and every slide it receives becomes an error row with that cause
    (stage ``aggregate``, the build error's ``error_type``)."""

    def __init__(self, config: AggregateConfig, spec: AggregatorSpec, device: str, base_provenance: dict[str, Any]):
        self.store = FeatureStore(config.store, config.storage_options)
        self.model, self.spec = config.model, spec
        self.aggregator, self.build_error = None, None
        try:
            self.aggregator = build_aggregator(spec, config.weights, device)
            self.provenance = {**base_provenance, "aggregator_provenance": self.aggregator.provenance()}
        except Exception as exc:  # noqa: BLE001 - reported on every slide this actor receives
            self.build_error = describe(exc)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.Table.from_pylist([self._one(row) for row in batch.to_pylist()], schema=AGGREGATE_RESULT_SCHEMA)

    def _one(self, row: dict[str, Any]) -> dict[str, Any]:
        result = {
            k: row[k] for k in ("slide_id", "status", "stage", "error_type", "error_message", "n_tiles", "load_s")
        }
        result["aggregate_s"] = 0.0
        if row["status"] == "error":
            return result
        if self.build_error:
            error_type, message = self.build_error
            result.update(
                status="error",
                stage="aggregate",
                error_type=error_type,
                error_message=cap_message(f"{self.spec.name} could not be built: {message}"),
            )
            return result
        start, stage = time.perf_counter(), "aggregate"
        try:
            table = self._slide_row(row) if row["status"] == "ok" else None
            stage = "commit"
            self._commit(row, table)
        except Exception as exc:  # noqa: BLE001 - one slide's failure is recorded, never fatal
            error_type, message = describe(exc)
            result.update(status="error", stage=stage, error_type=error_type, error_message=cap_message(message))
        result["aggregate_s"] = time.perf_counter() - start
        return result

    def _slide_row(self, row: dict[str, Any]) -> pa.Table:
        n, dim = row["n_tiles"], row["dim"]
        tiles = SlideTiles(
            row["slide_id"],
            np.frombuffer(row["embeddings"], "<f4").reshape(n, dim),
            np.frombuffer(row["x"], "<i8"),
            np.frombuffer(row["y"], "<i8"),
            row["slide_mpp"],
        )
        vector = self.aggregator(tiles)
        want = self.spec.out_dim(dim)
        if vector.shape != (want,) or not np.all(np.isfinite(vector)):
            raise AggregatorError(
                f"{self.spec.name} returned shape {vector.shape} (finite: "
                f"{bool(np.all(np.isfinite(vector)))}), expected ({want},) finite"
            )
        table = pa.table(
            {
                "slide_id": pa.array([row["slide_id"]]),
                "cohort": pa.array([row["cohort"]]),
                "n_tiles": pa.array([n], pa.int64()),
                "embedding": embeddings_to_arrow(vector[None, :]),
            }
        )
        if row["kept"]:
            kept = pa.ipc.open_stream(row["kept"]).read_all()
            for name in kept.column_names:
                table = table.append_column(kept.schema.field(name), kept.column(name))
        provenance = {
            **self.provenance,
            "source": {"features_path": row["features_path"], "n_tiles": n},
            "tile_provenance": json.loads(row["tile_provenance"] or "{}"),
        }
        return table.replace_schema_metadata({PROVENANCE_KEY: json.dumps(provenance, sort_keys=True, default=str)})

    def _commit(self, row: dict[str, Any], table: pa.Table | None) -> None:
        """The slide's file (if it has tiles), then its commit record (:func:`commit_file`)."""
        slide_id = row["slide_id"]
        data = None
        if table is not None:
            data = (self.store.slide_features_relpath(self.model, self.spec.name, slide_id), table)
        record = SlideFeaturesRecord(
            slide_id=slide_id,
            model=self.model,
            aggregator=self.spec.name,
            cohort=row["cohort"],
            n_tiles=row["n_tiles"],
            slide_features_path=data[0] if data else None,
            features_path=row["features_path"],
            aggregator_fingerprint=self.provenance["aggregator"]["fingerprint"],
            run_id=self.provenance["run_id"],
        )
        commit_file(
            self.store, self.store.slide_commit_relpath(self.model, self.spec.name, slide_id), asdict(record), data
        )
