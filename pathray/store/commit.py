"""The store's one commit protocol, used by ``pathray embed`` / ``pathray import``
(:func:`finalize_slide`) and ``pathray aggregate`` (:func:`commit_file`).

A file is committed iff its commit record exists (no rename needed, so this holds on S3):

1. The write stage puts each chunk's rows at a deterministic staging name; a retried chunk
   overwrites the same object.
2. When every chunk of a (slide, model) is staged, :func:`finalize_slide` reads exactly
   those chunk names, writes the slide's single features file (one object PUT; local files
   are written to a temporary name, fsync-ed and ``os.replace``-d), then writes the commit
   record, then deletes the staging objects.
3. A re-run skips committed pairs (whose record names the same slide path and cohort as its
   manifest) and redoes the rest, overwriting any features file left by a crash between
   steps 2 and 3; a copy left under another cohort folder is deleted before the record is
   written, so no slide is ever present twice. Staged chunks a killed writer left after its
   record are deleted by the next run (:meth:`FeatureStore.remove_committed_staging`).

Local writes are durable in that order: each file is fsync-ed before its rename and its
directory after, so a commit record on disk implies its data file is.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pathray.errors import CommitMismatchError
from pathray.fs import join
from pathray.store.feature_store import FeatureStore
from pathray.store.layout import COMMITS, FEATURES, NO_COHORT, STAGING, CommitRecord, is_local, json_bytes
from pathray.store.schema import PROVENANCE_KEY


def commit_file(
    store: FeatureStore,
    record_relpath: str,
    record: dict[str, Any],
    data: tuple[str, pa.Table] | None = None,
    stale: Iterable[str] = (),
) -> None:
    """Commit one file: ``data`` (relative path, table) first, durably (fsync, rename); then
    the ``stale`` files (relative paths: copies the record must not coexist with) removed;
    then the commit ``record`` at ``record_relpath``, last. ``data`` is ``None`` for a commit
    without a file (a slide without tissue)."""
    if data is not None:
        store.write_table(*data)
    for relpath in stale:
        try:
            store.fs.rm(store.path(relpath))
        except FileNotFoundError:
            pass
    store.write_bytes(record_relpath, json_bytes(record))


@dataclass(frozen=True)
class CommitRequest:
    """One (slide, model) to commit: exactly the chunks the plan produced (never a listing, so
    stale objects cannot leak in), the tile count they must hold, and what the features file
    and commit record carry. ``passthrough`` values (one per slide) become constant columns
    typed by ``passthrough_schema``."""

    model: str
    slide_id: str
    cohort: str | None
    chunk_ids: tuple[str, ...]
    n_tiles: int
    slide: dict[str, Any]  # slide facts for the commit record (pathray.wsi.facts.COMMIT_FIELDS)
    provenance: dict[str, Any]  # into the file's Parquet key-value metadata
    store_config_hash: str
    run_id: str
    passthrough: dict[str, Any] = field(default_factory=dict)
    passthrough_schema: pa.Schema | None = None
    #: the slide's features files (relative paths) in a listing taken under the lease
    #: (:meth:`FeatureStore.feature_copies`); None: look under every cohort folder now
    copies: tuple[str, ...] | None = None


def finalize_slide(store: FeatureStore, request: CommitRequest) -> CommitRecord:
    """Merge a (slide, model)'s staged chunks into its features file, then commit it
    (:func:`commit_file`: the file, rows sorted by ``tile_index``, then the commit record),
    then delete the staged chunks. A row count other than ``request.n_tiles`` or a repeated
    ``tile_index`` raises :class:`CommitMismatchError` before anything becomes visible."""
    r = request
    data = None
    if r.chunk_ids:
        data = (
            FEATURES.file(model=r.model, cohort=r.cohort or NO_COHORT, slide_id=r.slide_id),
            _merged_chunks(store, r),
        )
    features_relpath = data[0] if data else None
    copies = r.copies if r.copies is not None else _feature_copies(store, r.model, r.slide_id)
    record = CommitRecord(
        slide_id=r.slide_id,
        model=r.model,
        cohort=r.cohort or NO_COHORT,
        n_tiles=r.n_tiles,
        features_path=features_relpath,
        store_config_hash=r.store_config_hash,
        run_id=r.run_id,
        slide=r.slide,
    )
    stale = sorted(set(copies) - {features_relpath})
    commit_file(store, COMMITS.file(model=r.model, slide_id=r.slide_id), asdict(record), data, stale)
    _remove_staged(store, r)
    return record


def _remove_staged(store: FeatureStore, r: CommitRequest) -> None:
    """Delete the committed slide's staged chunks (and, locally, their emptied folder)."""
    for chunk_id in r.chunk_ids:
        try:
            store.fs.rm(store.staging_path(r.model, r.slide_id, chunk_id))
        except FileNotFoundError:
            pass
    if r.chunk_ids and is_local(store.fs):  # an empty folder per slide would pile up with the cohort
        try:
            os.rmdir(store.path(STAGING.dir(model=r.model, slide_id=r.slide_id)))
        except OSError:
            pass


def _feature_copies(store: FeatureStore, model: str, slide_id: str) -> list[str]:
    """The relative paths of ``slide_id``'s features file under every cohort folder of
    ``model`` that might hold one: left by a run killed between writing its file and its
    record, under a cohort the slide no longer has, they would show the slide twice to a
    plain glob over ``features/``. One listing of the cohort folders."""
    try:
        cohorts = store.fs.ls(store.path(FEATURES.prefix(model=model)), detail=False, refresh=True)
    except FileNotFoundError:
        return []
    return [store.relpath(join(cohort, f"{slide_id}.parquet")) for cohort in cohorts]


def _merged_chunks(store: FeatureStore, r: CommitRequest) -> pa.Table:
    """The slide's staged chunks as one table sorted by ``tile_index``, checked against
    ``r.n_tiles``, with the passthrough columns and the provenance metadata."""
    parts = []
    for chunk_id in r.chunk_ids:
        with store.fs.open(store.staging_path(r.model, r.slide_id, chunk_id), "rb") as f:
            parts.append(pq.read_table(f))
    table = pa.concat_tables(parts).sort_by("tile_index")
    tile_index = table.column("tile_index").to_numpy()
    if len(table) != r.n_tiles or len(np.unique(tile_index)) != len(tile_index):
        raise CommitMismatchError(
            f"staged chunks of {r.slide_id}/{r.model} hold {len(table)} rows "
            f"({len(np.unique(tile_index))} unique tiles), expected {r.n_tiles}"
        )
    for column in r.passthrough_schema or []:
        value = r.passthrough.get(column.name)
        table = table.append_column(column, pa.array([value] * len(table), type=column.type))
    meta = dict(table.schema.metadata or {})
    meta[PROVENANCE_KEY] = json.dumps(r.provenance, sort_keys=True, default=str).encode()
    return table.replace_schema_metadata(meta)
