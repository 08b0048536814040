"""The store's read side: one slide's tile features (:func:`read_slide`), and the datasets and
tables a reader queries (:func:`tile_dataset`, :func:`slide_features_dataset`,
:func:`slide_status_table`, :func:`error_table`; also methods of :class:`FeatureStore`).

Units: ``coords`` are level-0 pixels (top-left of the tile), ``size_level0`` is the tile's side
in level-0 pixels, ``target_mpp`` is µm per pixel of the encoded tile.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from pathray.errors import FeaturesUnreadableError
from pathray.store.layout import ERRORS, FEATURES, SLIDE_FEATURES, SLIDES, CommitRecord
from pathray.store.schema import ERROR_SCHEMA, PROVENANCE_KEY, TILE_COLUMNS, embedding_matrix

if TYPE_CHECKING:
    from pathray.store.feature_store import FeatureStore

#: threads reading files' footers for :func:`unified_dataset` (latency-bound on S3)
FOOTER_READERS = 16


@dataclass(frozen=True)
class TileFeatures:
    """One slide's tiles read back from its features file, in ``tile_index`` order."""

    slide_id: str
    embeddings: np.ndarray  # (N, D) float32
    coords: np.ndarray  # (N, 2) int64: x, y in level-0 px
    tissue_fraction: np.ndarray  # (N,) float32
    tile_px: int  # tile side at the target resolution
    target_mpp: float  # µm/px of the encoded tiles
    size_level0: float  # tile side in level-0 px
    kept: pa.Table  # the kept manifest columns (constant per slide): one row, no column when none
    provenance: str  # JSON of the features file's provenance metadata

    @property
    def level0_mpp(self) -> float:
        """The slide's level-0 µm/px as the tiling saw it (``size_level0 = tile_px * target_mpp / level0_mpp``)."""
        return self.tile_px * self.target_mpp / self.size_level0


def read_features_file(store: FeatureStore, record: CommitRecord, columns: list[str] | None = None) -> pa.Table:
    """``columns`` (all without) of the features file ``record`` commits; raises
    :class:`FeaturesUnreadableError` when the slide has no file (no tissue) or it is missing
    or not readable Parquet."""
    relpath = record.features_path
    if relpath is None:
        raise FeaturesUnreadableError(
            f"{record.slide_id}: committed without tissue for {record.model!r}: no features file"
        )
    try:
        with store.fs.open(store.path(relpath), "rb") as f:
            return pq.read_table(f, columns=columns)
    except FileNotFoundError as exc:
        raise FeaturesUnreadableError(f"{relpath}: committed but missing ({exc})") from exc
    except (pa.ArrowException, OSError) as exc:
        raise FeaturesUnreadableError(f"{relpath}: not a readable Parquet file ({type(exc).__name__}: {exc})") from exc


def read_slide(store: FeatureStore, model: str, slide: str | CommitRecord) -> TileFeatures:
    """The committed tiles of ``slide`` (a slide id, or its commit record) for ``model``: the one
    read of its features file, checked against its commit record (row count, ``tile_index``
    order). Raises :class:`FeaturesUnreadableError` for a slide without a record or file, or a
    file that disagrees with its record."""
    record = store.commit_record(model, slide) if isinstance(slide, str) else slide
    if record is None:
        raise FeaturesUnreadableError(f"{slide}: no commit record of model {model!r}")
    table = read_features_file(store, record)
    if table.num_rows != record.n_tiles or "embedding" not in table.column_names:
        raise FeaturesUnreadableError(
            f"{record.features_path}: {table.num_rows} rows, its commit record says {record.n_tiles}"
        )
    if not np.all(np.diff(table.column("tile_index").to_numpy()) > 0):
        raise FeaturesUnreadableError(f"{record.features_path}: tile_index is not strictly increasing")
    return tile_features(record.slide_id, table)


def tile_features(slide_id: str, table: pa.Table) -> TileFeatures:
    """A features file's table (at least one row) as :class:`TileFeatures`: the one place its
    columns become arrays."""
    first = table.slice(0, 1).to_pylist()[0]
    xy = [table.column(c).to_numpy().astype(np.int64) for c in ("x", "y")]
    return TileFeatures(
        slide_id=slide_id,
        embeddings=embedding_matrix(table),
        coords=np.stack(xy, axis=1),
        tissue_fraction=table.column("tissue_fraction").to_numpy().astype(np.float32),
        tile_px=int(first["tile_px"]),
        target_mpp=float(first["target_mpp"]),
        size_level0=float(first["size_level0"]),
        kept=table.select([c for c in table.column_names if c not in TILE_COLUMNS]).slice(0, 1),
        provenance=(table.schema.metadata or {}).get(PROVENANCE_KEY, b"{}").decode(),
    )


def tile_dataset(store: FeatureStore, model: str) -> pads.Dataset:
    """pyarrow dataset over the committed slides of ``model``: exactly the features files
    their commit records name (a file of the same slide under another cohort, left by a
    run killed before its record, is not read). ``model`` and ``cohort`` come from the
    hive partitioning of the path. The schema is unified over every file: a manifest
    column one run kept and another did not is present, null for the slides without it.
    Costs a listing, the commit records and each file's footer."""
    records = store.commit_records(model)
    files = sorted(store.path(r.features_path) for r in records.values() if r.features_path)
    partitioning = pa.schema([(k, pa.string()) for k in FEATURES.hive_keys])
    return unified_dataset(store.fs, files, partitioning, store.path(FEATURES.prefix()))


def slide_features_dataset(store: FeatureStore, model: str, aggregator: str) -> pads.Dataset:
    """pyarrow dataset of the committed slide-level rows of (``model``, ``aggregator``):
    ``slide_id``, ``cohort``, ``n_tiles``, ``embedding``, kept manifest columns (schema
    unified over the files, as :func:`tile_dataset`), and ``model``/``aggregator`` from the
    hive partitioning."""
    committed = store.aggregated(model, aggregator)
    try:
        found = store.fs.ls(store.path(SLIDE_FEATURES.dir(model=model, aggregator=aggregator)), detail=False)
    except FileNotFoundError:
        found = []
    files = sorted(f for f in found if f.endswith(".parquet") and os.path.basename(f)[: -len(".parquet")] in committed)
    partitioning = pa.schema([(k, pa.string()) for k in SLIDE_FEATURES.hive_keys])
    return unified_dataset(store.fs, files, partitioning, store.path(SLIDE_FEATURES.prefix()))


def slide_status_table(store: FeatureStore) -> pa.Table:
    """The slide status table (one row per slide and model, latest status)."""
    with store.fs.open(store.path(SLIDES), "rb") as f:
        return pq.read_table(f)


def error_table(store: FeatureStore) -> pa.Table:
    """Every error recorded by every run (``run_id`` from the partitioning)."""
    try:
        return pads.dataset(
            store.path(ERRORS.prefix()), filesystem=store.fs, format="parquet", partitioning="hive"
        ).to_table()
    except (FileNotFoundError, pa.ArrowInvalid):
        return ERROR_SCHEMA.empty_table()


def unified_dataset(fs, files: list[str], partitioning: pa.Schema, base_dir: str) -> pads.Dataset:
    """A hive-partitioned Parquet dataset over ``files`` whose schema holds every column of
    every file (pyarrow otherwise takes the first file's schema and silently drops columns
    only later files have); a file without a column reads it as null."""
    dataset = pads.dataset(
        files,
        filesystem=fs,
        format="parquet",
        partitioning=pads.partitioning(partitioning, flavor="hive"),
        partition_base_dir=base_dir,
    )
    fragments = list(dataset.get_fragments())
    if len(fragments) < 2:
        return dataset
    with ThreadPoolExecutor(FOOTER_READERS) as pool:
        schemas = list(pool.map(lambda fragment: fragment.physical_schema, fragments))
    unified = pa.unify_schemas([*schemas, partitioning], promote_options="permissive")
    return dataset if unified.equals(dataset.schema) else dataset.replace_schema(unified)
