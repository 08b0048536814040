"""The job's stages as plain callables over Arrow tables; none of them imports Ray.

plan (:class:`SlidePlanner`) -> read (:class:`ChunkReader`) -> encode (one
:class:`ChunkEncoder` per model) -> write (:class:`ChunkWriter`); the rows they pass on are
declared in :mod:`pathray.job.rows`, and :func:`pathray.job.stageplan.build_stages` builds
them from a job config for either runner.
"""

from __future__ import annotations

import functools
import json
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from pathray.errors import NonFiniteEmbeddingError, StagingError, StorageUnavailableError
from pathray.job.outage import with_storage_retries
from pathray.job.rows import CHUNK_SCHEMA, RESULT_SCHEMA, chunk_id, error_fields, result_row, unplanned_chunk
from pathray.store import FeatureStore, embeddings_to_arrow, feature_schema
from pathray.tiling.grid import TilingConfig, TilingGroup, as_groups, plan_tiles, read_tiles
from pathray.tiling.tissue import detect_tissue
from pathray.wsi.facts import SlideFacts
from pathray.wsi.scratch import DEFAULT_MAX_BYTES, Scratch, node_scratch_dir
from pathray.wsi.slide import open_slide


# --- plan -----------------------------------------------------------------------------------
class SlidePlanner:
    """slide rows -> chunk rows: open each slide once, detect tissue once per tissue setting,
    lay one tile grid per tiling group (a run whose models were trained on different tiles
    has several), and cut each grid into chunks of at most ``chunk_tiles`` tiles (in
    ``tile_index`` order). A chunk row's ``models`` are the slide's models of its tiling."""

    def __init__(
        self,
        tiling: TilingConfig | tuple[TilingGroup, ...],
        chunk_tiles: int,
        storage_options: dict | None = None,
        scratch_dir: str | None = None,
        scratch_max_bytes: int = DEFAULT_MAX_BYTES,
    ):
        self.groups = as_groups(tiling)
        self.chunk_tiles = int(chunk_tiles)
        self.storage_options = storage_options
        self.scratch = Scratch(scratch_dir or node_scratch_dir(), scratch_max_bytes)  # shared by the node's actors

    def __del__(self) -> None:  # Ray Data deletes the UDF when its actor exits gracefully
        self.scratch.close()

    def __call__(self, slides: pa.Table) -> pa.Table:
        rows: list[dict[str, Any]] = []
        for slide in slides.to_pylist():
            rows.extend(self.plan_one(slide))
        return pa.Table.from_pylist(rows, schema=CHUNK_SCHEMA)

    def plan_one(self, slide: dict[str, Any]) -> list[dict[str, Any]]:
        """The chunk rows of one slide row (one error row when planning fails), each with its
        share of the planning time."""
        start = time.perf_counter()
        empty = unplanned_chunk(slide)
        try:
            rows = with_storage_retries(lambda: self._plan(slide, empty))
        except Exception as exc:  # every failure becomes a recorded per-slide error
            rows = [dict(empty, **error_fields("plan", exc))]
        elapsed = time.perf_counter() - start
        return [dict(r, plan_s=elapsed / len(rows)) for r in rows]

    def _plan_group(
        self, handle: Any, slide_id: str, tiling: TilingConfig, empty: dict[str, Any], masks: dict[Any, Any]
    ) -> list[dict[str, Any]]:
        """The chunk rows of one tiling of an open slide (``masks``: tissue masks by setting)."""
        fingerprint = tiling.fingerprint()
        empty = dict(empty, tiling=fingerprint, tile_px=tiling.tile_px, target_mpp=tiling.target_mpp)
        if tiling.tissue not in masks:
            masks[tiling.tissue] = detect_tissue(handle, tiling.tissue)
        grid = plan_tiles(handle, slide_id, tiling, masks[tiling.tissue])
        n = len(grid.tile_index)
        if n == 0:
            return [dict(empty, status="no_tissue")]
        bounds = list(range(0, n, self.chunk_tiles))
        return [
            dict(
                empty,
                chunk_id=chunk_id(slide_id, fingerprint, i),
                chunk_index=i,
                n_chunks=len(bounds),
                n_tiles_slide=n,
                tile_index=np.asarray(grid.tile_index[lo : lo + self.chunk_tiles], dtype="<i8").tobytes(),
                x=np.asarray(grid.x[lo : lo + self.chunk_tiles], dtype="<i8").tobytes(),
                y=np.asarray(grid.y[lo : lo + self.chunk_tiles], dtype="<i8").tobytes(),
                tissue_fraction=np.asarray(grid.tissue_fraction[lo : lo + self.chunk_tiles], dtype="<f4").tobytes(),
                size_level0=float(grid.size_level0),
                status="ok",
                stage="",
            )
            for i, lo in enumerate(bounds)
        ]

    def _plan(self, slide: dict[str, Any], empty: dict[str, Any]) -> list[dict[str, Any]]:
        """The chunk rows of one slide row, every tiling group from one opening."""
        rows: list[dict[str, Any]] = []
        with open_slide(
            slide["path"],
            mpp_override=slide["mpp_override"],
            scratch=self.scratch,
            storage_options=self.storage_options,
        ) as handle:
            empty = dict(empty, slide_facts=SlideFacts.of(handle).to_json())
            masks: dict[Any, Any] = {}
            for group in self.groups:
                models = [m for m in slide["models"] if group.takes(m)]
                if models or not slide["models"]:
                    rows.extend(
                        self._plan_group(handle, slide["slide_id"], group.tiling, dict(empty, models=models), masks)
                    )
        return rows


# --- read -----------------------------------------------------------------------------------
class ChunkReader:
    """chunk rows -> chunk rows with ``pixels``: ``(N, tile_px, tile_px, 3)`` uint8 as bytes.

    Keeps the last ``max_open`` slides open (consecutive chunks usually share a slide). S3
    TIFF-family slides are read by byte range (only the chunk's tiles are fetched); other
    formats are staged into the node-wide cache, so each is fetched once per node. Read failures (e.g. a
    truncated file whose damage shows only past the header) turn the chunk into an error row.
    """

    def __init__(
        self,
        tiling: TilingConfig | tuple[TilingGroup, ...],
        storage_options: dict | None = None,
        scratch_dir: str | None = None,
        scratch_max_bytes: int = DEFAULT_MAX_BYTES,
        max_open: int = 4,
    ):
        self.tilings = {g.tiling.fingerprint(): g.tiling for g in as_groups(tiling)}
        self.storage_options = storage_options
        self.scratch = Scratch(scratch_dir or node_scratch_dir(), scratch_max_bytes)  # shared by the node's actors
        self.max_open = max_open
        self._open: OrderedDict[str, Any] = OrderedDict()

    def _slide(self, path: str, mpp_override: float | None):
        handle = self._open.pop(path, None)
        if handle is None:
            try:
                handle = open_slide(
                    path, mpp_override=mpp_override, scratch=self.scratch, storage_options=self.storage_options
                )
            except StagingError:  # the node cache may be full of slides this actor keeps open: let them go, retry once
                if not self._open:
                    raise
                self.close_open()
                handle = open_slide(
                    path, mpp_override=mpp_override, scratch=self.scratch, storage_options=self.storage_options
                )
        self._open[path] = handle
        while len(self._open) > self.max_open:
            self._open.popitem(last=False)[1].close()
        return handle

    def __call__(self, chunks: pa.Table) -> Iterator[pa.Table]:
        """One table per chunk row, in order: the job gives a reader every chunk of a slide
        (its whole planned block), so it reads them in sequence with one open handle and
        the stored tiles two neighbouring chunks share are fetched once."""
        for i in range(chunks.num_rows):
            yield self.read_chunk(chunks.slice(i, 1))

    def read_chunk(self, chunk: pa.Table) -> pa.Table:
        """``chunk`` (one chunk row) with its ``pixels``, ``tiles_read`` and ``read_s``."""
        (row,) = chunk.to_pylist()
        start = time.perf_counter()
        data, update, count = b"", {}, 0
        if row["status"] == "ok":
            try:
                tiles = with_storage_retries(functools.partial(self._read, row))
                data, count = np.ascontiguousarray(tiles, dtype=np.uint8).tobytes(), len(tiles)
            except Exception as exc:
                update = error_fields("read", exc)
        chunk = _apply_updates(chunk, [update])
        chunk = chunk.append_column(pa.field("pixels", pa.large_binary()), pa.array([data], type=pa.large_binary()))
        chunk = chunk.append_column("tiles_read", pa.array([count], type=pa.int64()))
        return chunk.append_column("read_s", pa.array([time.perf_counter() - start], type=pa.float64()))

    def _read(self, row: dict[str, Any]) -> np.ndarray:
        """The tiles of one chunk row; a slide whose storage failed is closed (reopened on retry)."""
        try:
            handle = self._slide(row["path"], row["mpp_override"])
            return read_tiles(
                handle,
                self.tilings[row["tiling"]],
                np.frombuffer(row["x"], dtype="<i8"),
                np.frombuffer(row["y"], dtype="<i8"),
            )
        except StorageUnavailableError:
            stale = self._open.pop(row["path"], None)
            if stale is not None:
                stale.close()
            raise

    def close_open(self) -> None:
        """Close open slides (their staged copies become evictable)."""
        while self._open:
            self._open.popitem()[1].close()

    def close(self) -> None:
        """Close open slides and release the scratch cache."""
        self.close_open()
        self.scratch.close()

    def __del__(self) -> None:  # Ray Data deletes the UDF when its actor exits gracefully
        self.close()


def _apply_updates(table: pa.Table, updates: list[dict[str, str]]) -> pa.Table:
    """Overwrite status/stage/error columns of the rows that got an update."""
    if not any(updates):
        return table
    for name in ("status", "stage", "error_type", "error_message"):
        values = [u.get(name, old) for u, old in zip(updates, table.column(name).to_pylist())]
        table = table.set_column(table.schema.get_field_index(name), name, pa.array(values, type=pa.string()))
    return table


def tile_batches(pixels: pa.ChunkedArray, tile_px: list[int]) -> list[np.ndarray]:
    """Zero-copy, read-only uint8 ``(N, tile_px[i], tile_px[i], 3)`` views of a ``pixels`` column,
    one per row (no copy into Python bytes: at GPU rates that is ~1 GB/s of memcpy saved). A
    row without pixels gives an empty ``(0, 1, 1, 3)`` view when its ``tile_px`` is 0."""
    views, sides = [], iter(tile_px)
    for chunk in pixels.chunks:
        offsets = np.frombuffer(chunk.buffers()[1], dtype=np.int64)[chunk.offset : chunk.offset + len(chunk) + 1]
        data = np.frombuffer(chunk.buffers()[2], dtype=np.uint8) if len(chunk) else np.empty(0, np.uint8)
        data.flags.writeable = False  # the buffer may live in the shared object store
        for lo, hi in zip(offsets[:-1], offsets[1:]):
            side = max(int(next(sides)), 1)
            views.append(data[lo:hi].reshape(-1, side, side, 3))
    return views


# --- encode ---------------------------------------------------------------------------------
class ChunkEncoder:
    """chunk rows -> chunk rows with ``emb:<model>``: the model's ``(N, D)`` embeddings as bytes.

    ``make_encoder()`` builds the model once per actor. If it fails (weights missing, gated,
    mismatched), the actor stays up and marks every chunk needing this model as an error
    for this model only, so other models keep going. ``threads`` sets torch's intra-op
    threads for the actor's process. Embeddings are cast to ``output_dtype``, the type the
    write stage reads them as (a custom encoder may return another float type). Rows not needing this model, or
    already failed, pass through with empty embeddings.
    """

    def __init__(
        self,
        model: str,
        make_encoder: Callable[[], Any],
        drop_pixels: bool,
        threads: int | None = None,
        output_dtype: str = "float32",
    ):
        if threads:  # the actor's CPU share, not Ray's OMP_NUM_THREADS=1 default for fractional actors
            import torch

            torch.set_num_threads(threads)
        self.model = model
        self.output_dtype = np.dtype(output_dtype)
        self.drop_pixels = drop_pixels
        self.encoder, self.load_error = None, None
        try:
            self.encoder = make_encoder()
            self.provenance = json.dumps(self.encoder.provenance(), sort_keys=True, default=str)
        except Exception as exc:
            self.load_error = error_fields("encode", exc)
            self.provenance = "{}"

    def __call__(self, chunks: pa.Table) -> pa.Table:
        embeddings, seconds, finished, errors = [], [], [], []
        rows = zip(
            chunks.column("status").to_pylist(),
            chunks.column("models").to_pylist(),
            tile_batches(chunks.column("pixels"), chunks.column("tile_px").to_pylist()),
        )
        for status, models, tiles in rows:
            start, data, error = time.perf_counter(), b"", ""
            if status == "ok" and self.model in models:
                if self.load_error:
                    error = json.dumps(self.load_error)
                else:
                    try:
                        data = self._embed(tiles).tobytes()
                    except Exception as exc:
                        error = json.dumps(error_fields("encode", exc))
            embeddings.append(data)
            seconds.append(time.perf_counter() - start)
            finished.append(time.time() if data else 0.0)
            errors.append(error)
        if self.drop_pixels:
            chunks = chunks.drop_columns(["pixels"])
        chunks = chunks.append_column(f"emb:{self.model}", pa.array(embeddings, type=pa.large_binary()))
        chunks = chunks.append_column(f"err:{self.model}", pa.array(errors, type=pa.string()))
        chunks = chunks.append_column(f"prov:{self.model}", pa.array([self.provenance] * len(chunks), type=pa.string()))
        chunks = chunks.append_column(f"encoded_at:{self.model}", pa.array(finished, type=pa.float64()))
        return chunks.append_column(f"encode_s:{self.model}", pa.array(seconds, type=pa.float64()))

    def _embed(self, tiles: np.ndarray) -> np.ndarray:
        """The chunk's embeddings as ``output_dtype``; raises :class:`NonFiniteEmbeddingError`
        if any value is NaN or infinite (after the cast: a float16 overflow shows here)."""
        with np.errstate(over="ignore"):  # an overflow is reported below, as an error row
            embeddings = np.ascontiguousarray(self.encoder(tiles), dtype=self.output_dtype)
        bad = np.flatnonzero(~np.isfinite(embeddings.reshape(len(embeddings), -1)).all(axis=1))
        if len(bad):
            raise NonFiniteEmbeddingError(
                f"{self.model} returned NaN/inf embeddings ({self.output_dtype}) for {len(bad)} of {len(embeddings)} "
                f"tiles of the chunk (positions {bad[:5].tolist()}); a float16 overflow shows as inf: try --dtype "
                "bf16/fp32 or --output-dtype float32"
            )
        return embeddings


# --- write ----------------------------------------------------------------------------------
class ChunkWriter:
    """chunk rows with embeddings -> result rows; stages one Parquet object per (chunk, model).

    ``embedding_types`` maps each model to its Arrow float type (float32/float16). Each tile
    row records the tiling (``target_mpp``, ``tile_px``) of its chunk.
    """

    def __init__(self, root: str, storage_options: dict | None, models: list[str], embedding_types: dict[str, str]):
        self.store = FeatureStore(root, storage_options)
        self.models = list(models)
        self.embedding_types = {m: np.dtype(t) for m, t in embedding_types.items()}

    def __call__(self, chunks: pa.Table) -> pa.Table:
        results = []
        for row in chunks.to_pylist():
            for i, model in enumerate(m for m in self.models if m in row["models"]):
                results.append(self._write_one(row, model, first=i == 0))
        return pa.Table.from_pylist(results, schema=RESULT_SCHEMA)

    def _write_one(self, row: dict[str, Any], model: str, first: bool) -> dict[str, Any]:
        """The result row of one chunk row for ``model``; an ok chunk's tiles are staged first."""
        start = time.perf_counter()
        result = result_row(row, model, first)
        if result["status"] != "ok":
            return result
        try:
            table = self._tile_table(row, model)
            self.store.write_chunk(model, row["slide_id"], row["chunk_id"], table)
            result["n_tiles"] = table.num_rows
        except Exception as exc:
            result.update(error_fields("write", exc))
        result["write_s"] = time.perf_counter() - start
        return result

    def _tile_table(self, row: dict[str, Any], model: str) -> pa.Table:
        """The features-file rows (:func:`pathray.store.feature_schema`) of one chunk row for ``model``."""
        n = len(row["x"]) // 8
        embeddings = np.frombuffer(row[f"emb:{model}"], dtype=self.embedding_types[model]).reshape(n, -1)
        return pa.Table.from_arrays(
            [
                pa.array([row["slide_id"]] * n, type=pa.string()),
                pa.array(np.frombuffer(row["tile_index"], dtype="<i8")),
                pa.array(np.frombuffer(row["x"], dtype="<i8")),
                pa.array(np.frombuffer(row["y"], dtype="<i8")),
                pa.array(np.full(n, row["size_level0"], dtype=np.float64)),
                pa.array(np.full(n, row["target_mpp"], dtype=np.float64)),
                pa.array(np.full(n, row["tile_px"], dtype=np.int32)),
                pa.array(np.frombuffer(row["tissue_fraction"], dtype="<f4")),
                embeddings_to_arrow(embeddings),
            ],
            schema=feature_schema(embeddings.shape[1], pa.from_numpy_dtype(embeddings.dtype)),
        )
