"""The feature store: layout, schema, chunk writer, commit protocol and readers.

Layout under ``ROOT`` (a local directory or ``s3://bucket/prefix``)::

    _pathray_store.json                                   store config: tiling(s) + every model's config
    features/model=<model>/cohort=<cohort>/<slide_id>.parquet
                                                          all tiles of one committed (slide, model)
    _staging/model=<model>/<slide_id>/<chunk_id>.parquet  chunk outputs of the write stage (transient)
    _commits/model=<model>/<slide_id>.json                commit record, written last
    _commits/index/model=<model>.parquet                  every record of the model with its listed
                                                          version (a cache: FeatureStore.commit_records)
    slides.parquet                                        latest status per (slide, model)
    slide_features/model=<model>/aggregator=<name>/<slide_id>.parquet
                                                          one slide-level row (``pathray aggregate``)
    _commits/slide_features/model=<model>/aggregator=<name>/<slide_id>.json
                                                          its commit record, written last
    errors/run_id=<run_id>/part-<k>.parquet               error ledger, one row per failure
    _runs/<run_id>/report.json, slides-<k>.parquet        run report and raw per-run status rows

Commit protocol (no rename needed, so it holds on S3):

1. The write stage puts each chunk's rows at a deterministic staging name; a retried chunk
   overwrites the same object.
2. When every chunk of a (slide, model) is staged, :func:`finalize_slide` reads exactly
   those chunk names, writes the slide's single features file (one object PUT; local files
   are written to a temporary name and ``os.replace``-d), then writes the commit record,
   then deletes the staging objects.
3. A (slide, model) is committed iff its commit record exists. A re-run skips committed
   pairs (whose record names the same slide path and cohort as its manifest) and redoes the
   rest, overwriting any features file left by a crash between steps 2 and 3; a copy left
   under another cohort folder is deleted before the record is written, so no slide is ever
   present twice. Staged chunks a killed writer left after its record are deleted by the
   next run (:meth:`FeatureStore.remove_committed_staging`).

Local writes are durable in that order: each file is fsync-ed before its rename and its
directory after, so a commit record on disk implies its features file is.

Files under ``_``-prefixed folders are ignored by pyarrow.dataset, DuckDB globs over
``features/`` and polars, so plain readers see only whole per-slide files;
:meth:`FeatureStore.dataset` reads exactly the files the commit records name.

Units: ``x``/``y`` are level-0 pixels (top-left of the tile), ``size_level0`` is the tile's
side in level-0 pixels, ``target_mpp`` is µm per pixel of the encoded tile.
"""

from __future__ import annotations

import io
import json
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from pathray import __version__
from pathray.errors import CommitMismatchError, StoreConfigMismatchError
from pathray.fs import join, split_uri
from pathray.tiling.grid import TILE_SCHEMA

STORE_FORMAT = 1
STORE_META = "_pathray_store.json"
NO_COHORT = "unassigned"
#: in the names of local temporary files (``.<name>.tmp-<hex>``), never in a store object's name
TEMP_MARKER = ".tmp-"
#: every run's raw status parts (:meth:`FeatureStore.run_status_relpath`)
RUN_STATUS_GLOB = "_runs/*/slides-*.parquet"
#: the run lease object (see :mod:`pathray.store.lease`)
LEASE = "_lease.json"
#: Parquet key-value metadata key holding the provenance JSON.
PROVENANCE_KEY = b"pathray.provenance"

#: The tile columns of a features file: the tiler's record schema, non-null.
TILE_FIELDS: tuple[pa.Field, ...] = tuple(f.with_nullable(False) for f in TILE_SCHEMA)

SLIDE_STATUS_SCHEMA = pa.schema(
    [
        ("slide_id", pa.string()),
        ("model", pa.string()),
        ("path", pa.string()),
        ("cohort", pa.string()),
        ("status", pa.string()),  # ok | no_tissue | error
        ("stage", pa.string()),  # where it failed: plan | read | encode | write | finalize | config
        ("error_type", pa.string()),
        ("error_message", pa.string()),
        ("width", pa.int64()),  # level-0 px
        ("height", pa.int64()),
        ("mpp", pa.float64()),  # level-0 µm/px
        ("mpp_source", pa.string()),
        ("vendor", pa.string()),
        ("n_tiles", pa.int64()),
        ("run_id", pa.string()),
        ("updated_at", pa.float64()),  # unix seconds
    ]
)

ERROR_SCHEMA = pa.schema(
    [
        ("slide_id", pa.string()),
        ("model", pa.string()),
        ("stage", pa.string()),
        ("error_type", pa.string()),
        ("message", pa.string()),
        ("time", pa.float64()),
    ]
)


def feature_schema(embed_dim: int, embedding_type: pa.DataType, extra: pa.Schema | None = None) -> pa.Schema:
    """Schema of one features file: the tile fields, ``embedding`` as
    ``fixed_size_list<embedding_type>[embed_dim]``, then pass-through manifest columns."""
    fields = [*TILE_FIELDS, pa.field("embedding", pa.list_(embedding_type, embed_dim), nullable=False)]
    return pa.schema(fields + list(extra or []))


def embeddings_to_arrow(embeddings: np.ndarray) -> pa.FixedSizeListArray:
    """(N, D) float32/float16 array -> ``fixed_size_list<...>[D]`` without copying rows."""
    n, d = embeddings.shape
    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(embeddings).reshape(n * d)), d)


# --- low-level atomic writes --------------------------------------------------------------
def _put_bytes(fs, path: str, data: bytes, durable: bool = True) -> None:
    """Write ``data`` at ``path`` so that readers see either nothing or all of it.

    S3 PUTs are atomic per object; on a local filesystem we write a temporary sibling and
    ``os.replace`` it (atomic on POSIX). The temporary name starts with ``.`` and does not end
    in ``.parquet`` (see :data:`TEMP_MARKER`), so pyarrow, DuckDB and polars never list a
    half-written file, even one a killed process left behind;
    :meth:`FeatureStore.remove_temporaries` deletes those.

    ``durable`` (local only): once this returns, the file survives a power loss: the
    temporary file is fsync-ed before the rename, and its directory (and the parent of any
    directory created for it) after, so a later write (a commit record) is never on disk
    without this one. Staged chunks skip it: a crash makes a re-run stage them again."""
    if _is_local(fs):
        head, name = os.path.split(path)
        _makedirs(head, durable)
        tmp = os.path.join(head, f".{name}{TEMP_MARKER}{uuid.uuid4().hex}")
        with open(tmp, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if durable:
            _fsync_dir(head)
    else:
        with fs.open(path, "wb") as f:
            f.write(data)


def _makedirs(directory: str, durable: bool) -> None:
    """``os.makedirs``; with ``durable``, the parent of each directory it created is fsync-ed
    (top-down), so the new directory entries are on disk too."""
    missing = []
    head = directory
    while head and not os.path.isdir(head):
        missing.append(head)
        head = os.path.dirname(head)
    os.makedirs(directory, exist_ok=True)
    if durable:
        for created in reversed(missing):
            _fsync_dir(os.path.dirname(created))


def _fsync_dir(directory: str) -> None:
    """fsync a directory (its entries: a rename or a new file in it)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_local(fs) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd", row_group_size=max(1, min(len(table), 65536)))
    return sink.getvalue()


def _read_json(fs, path: str) -> dict | None:
    try:
        with fs.open(path, "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None


# --- the store ------------------------------------------------------------------------------
@dataclass(frozen=True)
class CommitRecord:
    """What a commit record says about one (slide, model)."""

    slide_id: str
    model: str
    cohort: str
    n_tiles: int
    features_path: str | None  # relative to ROOT; None when the slide had no tissue
    store_config_hash: str
    run_id: str
    slide: dict[str, Any]  # width, height, mpp, mpp_source, vendor, path


def _identity(record: dict[str, Any]) -> str:
    """A config record's identity: its ``fingerprint``, else its whole content."""
    return str(record.get("fingerprint") or json.dumps(record, sort_keys=True, default=str))


def model_tiling(config: dict[str, Any], model: str) -> dict[str, Any]:
    """The tiling record of ``model`` in a store config: its ``model_tilings`` entry, else the
    store's ``tiling`` (stores written before per-model tilings have only the latter)."""
    return (config.get("model_tilings") or {}).get(model) or config.get("tiling") or {}


class FeatureStore:
    """A feature store rooted at a local directory or ``s3://`` prefix.

    Writers use :meth:`ensure_config`, :meth:`write_chunk`, :func:`finalize_slide`;
    readers use :meth:`dataset`, :meth:`committed`, :meth:`slides`.
    """

    def __init__(self, root: str, storage_options: dict[str, Any] | None = None):
        self.root = root.rstrip("/")
        self.storage_options = storage_options
        self.fs, self._root_path = split_uri(self.root, storage_options)

    # paths (filesystem paths, i.e. without the s3:// scheme) ----------------------------
    def path(self, *parts: str) -> str:
        return join(self._root_path, *parts)

    def features_relpath(self, model: str, cohort: str | None, slide_id: str) -> str:
        return f"features/model={model}/cohort={cohort or NO_COHORT}/{slide_id}.parquet"

    def staging_path(self, model: str, slide_id: str, chunk_id: str) -> str:
        return self.path("_staging", f"model={model}", slide_id, f"{chunk_id}.parquet")

    def commit_path(self, model: str, slide_id: str) -> str:
        return self.path(self.commit_relpath(model, slide_id))

    def lease_path(self) -> str:
        return self.path(LEASE)

    # relative paths of a run's records (the store owns its layout; see the module doc)
    @staticmethod
    def run_status_relpath(run_id: str, part: int) -> str:
        return f"_runs/{run_id}/slides-{part:05d}.parquet"

    @staticmethod
    def errors_relpath(run_id: str, part: int) -> str:
        return f"errors/run_id={run_id}/part-{part:05d}.parquet"

    @staticmethod
    def report_relpath(run_id: str) -> str:
        return f"_runs/{run_id}/report.json"

    @staticmethod
    def commit_relpath(model: str, slide_id: str) -> str:
        return f"_commits/model={model}/{slide_id}.json"

    def remove_temporaries(self) -> int:
        """Delete temporary files a killed writer left behind (local stores only: S3 objects
        are put whole). Call only while holding the store's lease. Returns how many."""
        if not _is_local(self.fs) or not os.path.isdir(self._root_path):
            return 0
        removed = 0
        for directory, _, names in os.walk(self._root_path):
            for name in names:
                if name.startswith(".") and TEMP_MARKER in name:
                    os.remove(os.path.join(directory, name))
                    removed += 1
        return removed

    def remove_committed_staging(self, model: str) -> int:
        """Delete the staged chunks of ``model``'s committed slides: a writer killed between a
        commit record and the deletion of its chunks leaves them, and a re-run skips the
        slide. One recursive listing of the staged objects (on S3 a folder whose objects are
        gone may still be listed, as SeaweedFS does: it is never visited). Call only while
        holding the store's lease. Returns how many slides' folders."""
        folder = self.path("_staging", f"model={model}")
        try:
            staged = self.fs.find(folder)
        except FileNotFoundError:
            return 0
        slides = {f[len(folder) :].lstrip("/").split("/", 1)[0] for f in staged if f.startswith(folder)}
        stale = sorted(slides & self.committed(model))
        for slide_id in stale:
            self.fs.rm(join(folder, slide_id), recursive=True)
        return len(stale)

    def slide_features_relpath(self, model: str, aggregator: str, slide_id: str | None = None) -> str:
        """``slide_features/model=<model>/aggregator=<aggregator>[/<slide_id>.parquet]``."""
        folder = f"slide_features/model={model}/aggregator={aggregator}"
        return folder if slide_id is None else f"{folder}/{slide_id}.parquet"

    def slide_commit_relpath(self, model: str, aggregator: str, slide_id: str | None = None) -> str:
        """Where the commit records of ``slide_features`` live (one ``<slide_id>.json`` each)."""
        folder = f"_commits/slide_features/model={model}/aggregator={aggregator}"
        return folder if slide_id is None else f"{folder}/{slide_id}.json"

    # store config ------------------------------------------------------------------------
    def read_config(self) -> dict | None:
        return _read_json(self.fs, self.path(STORE_META))

    def ensure_config(
        self,
        tiling: dict[str, Any],
        models: dict[str, dict[str, Any]],
        model_tilings: dict[str, dict[str, Any]] | None = None,
    ) -> dict:
        """Create the store config, or check a run's config against the existing one and add
        new models to it. Raises :class:`StoreConfigMismatchError` as :meth:`check_config`.
        Returns the config now in force."""
        current, changed = self.check_config(tiling, models, model_tilings)
        if changed:
            _put_bytes(self.fs, self.path(STORE_META), json.dumps(current, indent=2, sort_keys=True).encode())
        return current

    def check_config(
        self,
        tiling: dict[str, Any],
        models: dict[str, dict[str, Any]],
        model_tilings: dict[str, dict[str, Any]] | None = None,
    ) -> tuple[dict, bool]:
        """The config a run with ``tiling`` and ``models`` would put in force, and whether it
        differs from the stored one; nothing is written (``--dry-run`` uses this).

        ``tiling``, each ``models[name]`` and each ``model_tilings[name]`` (models cut at a
        tiling other than ``tiling``: their native tile) are JSON-able dicts whose
        ``fingerprint`` key identifies them. Each model has one tiling in a store: the config's
        ``tiling``, or its entry in the config's ``model_tilings``. A model already in the store
        with a different tiling or a different fingerprint raises
        :class:`StoreConfigMismatchError` naming the fields that differ; a new model is added,
        under ``model_tilings`` when its tiling is not the store's ``tiling``."""
        model_tilings = model_tilings or {}
        current = self.read_config()
        if current is None:
            current = {"format": STORE_FORMAT, "created_by": f"pathray {__version__}", "tiling": tiling, "models": {}}
            fresh = True
        else:
            fresh = False
            if current.get("format") != STORE_FORMAT:
                raise StoreConfigMismatchError(
                    f"{self.root} has store format {current.get('format')}, expected {STORE_FORMAT}"
                )
        merged = dict(current, models=dict(current["models"]), model_tilings=dict(current.get("model_tilings", {})))
        for name, cfg in models.items():
            want = model_tilings.get(name, tiling)
            if name in merged["models"]:
                self._check_model(name, merged, cfg, want)
                continue
            merged["models"][name] = cfg
            if _identity(want) != _identity(merged["tiling"]):
                merged["model_tilings"][name] = want
        if not merged["model_tilings"]:
            del merged["model_tilings"]
        return merged, fresh or merged != current

    def _check_model(self, name: str, config: dict, record: dict[str, Any], tiling: dict[str, Any]) -> None:
        have = model_tiling(config, name)
        if _identity(have) != _identity(tiling):
            raise StoreConfigMismatchError(
                f"{self.root} holds {name!r} at another tiling: {config_diff(have, tiling)}. Write to a new --out "
                f"root, or pass --new-version to store this configuration as a separate version under "
                f"{self.root}/versions/."
            )
        old = config["models"][name]
        if _identity(old) != _identity(record):
            raise StoreConfigMismatchError(
                f"model {name!r} in {self.root} was written with another config: {config_diff(old, record)}. "
                "Use a new --out root, or --new-version."
            )

    def tiling_of(self, model: str) -> dict[str, Any]:
        """The tiling record ``model`` was embedded at in this store ({} when unknown)."""
        return model_tiling(self.read_config() or {}, model)

    # writing -----------------------------------------------------------------------------
    def write_chunk(self, model: str, slide_id: str, chunk_id: str, table: pa.Table) -> None:
        """Stage one chunk's tile rows (schema :func:`feature_schema`) at its deterministic name."""
        _put_bytes(self.fs, self.staging_path(model, slide_id, chunk_id), _parquet_bytes(table), durable=False)

    def write_table(self, relpath: str, table: pa.Table) -> None:
        _put_bytes(self.fs, self.path(relpath), _parquet_bytes(table))

    def write_bytes(self, relpath: str, data: bytes) -> None:
        _put_bytes(self.fs, self.path(relpath), data)

    def write_json(self, relpath: str, obj: dict) -> None:
        _put_bytes(self.fs, self.path(relpath), json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    # reading -----------------------------------------------------------------------------
    def committed(self, model: str) -> set[str]:
        """Slide ids with a commit record for ``model``."""
        return self._record_ids(self.path("_commits", f"model={model}"))

    def aggregated(self, model: str, aggregator: str) -> set[str]:
        """Slide ids whose slide-level row for (``model``, ``aggregator``) is committed."""
        return self._record_ids(self.path(self.slide_commit_relpath(model, aggregator)))

    def _record_ids(self, prefix: str) -> set[str]:
        try:
            names = self.fs.ls(prefix, detail=False)
        except FileNotFoundError:
            return set()
        return {os.path.basename(n)[: -len(".json")] for n in names if n.endswith(".json")}

    def feature_copies(self, model: str, slide_ids: set[str]) -> dict[str, tuple[str, ...]]:
        """The features files (paths relative to the root) of each of ``slide_ids`` that has any,
        under every cohort folder of ``model``: one recursive listing (on S3 one LIST per 1,000
        files). Taken under the store's lease it stays exact for the run (only the run writes
        features files then, each under its manifest's cohort), so a commit can remove a copy
        left under another cohort without looking under each cohort folder
        (:attr:`CommitRequest.copies`)."""
        folder = self.path("features", f"model={model}")
        try:
            found = self.fs.find(folder)
        except FileNotFoundError:
            return {}
        copies: dict[str, list[str]] = {}
        for name in found:
            slide_id = os.path.basename(name)[: -len(".parquet")]
            if name.endswith(".parquet") and slide_id in slide_ids:
                copies.setdefault(slide_id, []).append(name[len(self._root_path) + 1 :])
        return {k: tuple(v) for k, v in copies.items()}

    def commit_record(self, model: str, slide_id: str) -> CommitRecord | None:
        raw = _read_json(self.fs, self.commit_path(model, slide_id))
        return CommitRecord(**raw) if raw else None

    def commit_records(self, model: str) -> dict[str, CommitRecord]:
        """Every commit record of ``model`` by slide id: one listing, the model's commit index
        (:meth:`update_commit_index`) for each record it holds at the version listed (the
        ETag on S3, mtime and size locally), and only the other records read, together (fsspec
        ``cat`` of many paths, concurrent on S3). A record deleted between listing and read is
        left out. On a store whose index is current this is a listing and one GET, not one per slide."""
        return {slide_id: CommitRecord(**raw) for slide_id, (raw, _) in self._indexed_records(model)[0].items()}

    def update_commit_index(self, model: str) -> int:
        """Rewrite ``model``'s commit index (``_commits/index/model=<model>.parquet``: slide id, the
        record's listed version, the record) when records were added, changed or removed since it
        was written; returns how many records it holds. Only a cache: a missing, stale or
        unreadable index costs reads, never correctness. Call only while holding the store's lease."""
        records, changed = self._indexed_records(model)
        if changed:
            ids = sorted(records)
            self.write_table(
                self.commit_index_relpath(model),
                pa.table(
                    {
                        "slide_id": pa.array(ids, pa.string()),
                        "version": pa.array([records[i][1] for i in ids], pa.string()),
                        "record": pa.array([json.dumps(records[i][0], sort_keys=True) for i in ids], pa.string()),
                    }
                ),
            )
        return len(records)

    @staticmethod
    def commit_index_relpath(model: str) -> str:
        return f"_commits/index/model={model}.parquet"

    def _indexed_records(self, model: str) -> tuple[dict[str, tuple[dict, str]], bool]:
        """slide id -> (record, listed version) of ``model``'s records, and whether that differs from the index."""
        listed = self._listed_versions(self.path("_commits", f"model={model}"))
        index = self._read_commit_index(model)
        fresh = {sid: (index[sid][0], v) for sid, (_, v) in listed.items() if sid in index and index[sid][1] == v}
        names = sorted(path for sid, (path, _) in listed.items() if sid not in fresh)
        found = self.fs.cat(names, on_error="omit") if names else {}
        read = {os.path.basename(n)[: -len(".json")]: json.loads(data) for n, data in found.items()}
        records = {**fresh, **{sid: (raw, listed[sid][1]) for sid, raw in read.items()}}
        return records, bool(read) or len(fresh) != len(index)

    def _listed_versions(self, prefix: str) -> dict[str, tuple[str, str]]:
        """slide id -> (path, version) of the ``.json`` records under ``prefix``."""
        try:
            infos = self.fs.ls(prefix, detail=True, refresh=True)
        except FileNotFoundError:
            return {}
        return {
            os.path.basename(i["name"])[: -len(".json")]: (i["name"], _version(i))
            for i in infos
            if i["name"].endswith(".json")
        }

    def _read_commit_index(self, model: str) -> dict[str, tuple[dict, str]]:
        try:
            with self.fs.open(self.path(self.commit_index_relpath(model)), "rb") as f:
                table = pq.read_table(f)
        except (FileNotFoundError, pa.ArrowInvalid):
            return {}
        return {
            sid: (json.loads(raw), v)
            for sid, v, raw in zip(*(table.column(c).to_pylist() for c in ("slide_id", "version", "record")))
        }

    def models(self) -> list[str]:
        return sorted((self.read_config() or {}).get("models", {}))

    def dataset(self, model: str) -> pads.Dataset:
        """pyarrow dataset over the committed slides of ``model``: exactly the features files
        their commit records name (a file of the same slide under another cohort, left by a
        run killed before its record, is not read). ``model`` and ``cohort`` come from the
        hive partitioning of the path. The schema is unified over every file: a manifest
        column one run kept and another did not is present, null for the slides without it.
        Costs a listing, the commit records and each file's footer."""
        records = self.commit_records(model)
        files = sorted(self.path(r.features_path) for r in records.values() if r.features_path)
        partitioning = pa.schema([("model", pa.string()), ("cohort", pa.string())])
        return _unified_dataset(self.fs, files, partitioning, self.path("features"))

    def slide_features(self, model: str, aggregator: str) -> pads.Dataset:
        """pyarrow dataset of the committed slide-level rows of (``model``, ``aggregator``):
        ``slide_id``, ``cohort``, ``n_tiles``, ``embedding``, kept manifest columns (schema
        unified over the files, as :meth:`dataset`), and ``model``/``aggregator`` from the
        hive partitioning."""
        committed = self.aggregated(model, aggregator)
        try:
            found = self.fs.ls(self.path(self.slide_features_relpath(model, aggregator)), detail=False)
        except FileNotFoundError:
            found = []
        files = sorted(
            f for f in found if f.endswith(".parquet") and os.path.basename(f)[: -len(".parquet")] in committed
        )
        partitioning = pa.schema([("model", pa.string()), ("aggregator", pa.string())])
        return _unified_dataset(self.fs, files, partitioning, self.path("slide_features"))

    def slides(self) -> pa.Table:
        """The slide status table (one row per slide and model, latest status)."""
        with self.fs.open(self.path("slides.parquet"), "rb") as f:
            return pq.read_table(f)

    def errors(self) -> pa.Table:
        """Every error recorded by every run (``run_id`` from the partitioning)."""
        try:
            return pads.dataset(
                self.path("errors"), filesystem=self.fs, format="parquet", partitioning="hive"
            ).to_table()
        except (FileNotFoundError, pa.ArrowInvalid):
            return ERROR_SCHEMA.empty_table()


#: threads reading files' footers for :func:`_unified_dataset` (latency-bound on S3)
FOOTER_READERS = 16


def _version(info: dict[str, Any]) -> str:
    """A listed object's version: its ETag (S3; changes with the content), else mtime and size."""
    return str(info.get("ETag") or f"{info.get('mtime')}:{info.get('size')}")


def _unified_dataset(fs, files: list[str], partitioning: pa.Schema, base_dir: str) -> pads.Dataset:
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


def config_diff(stored: dict, requested: dict, prefix: str = "") -> str:
    """``field: stored -> requested`` for every field that differs (nested keys dotted),
    fingerprints left out."""
    diffs = []
    for key in sorted(set(stored) | set(requested)):
        if key == "fingerprint":
            continue
        old, new = stored.get(key), requested.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            inner = config_diff(old, new, f"{prefix}{key}.")
            diffs += [inner] if inner else []
        elif old != new:
            diffs.append(f"{prefix}{key}: store has {old!r}, this run asks for {new!r}")
    return "; ".join(diffs)


# --- commit ---------------------------------------------------------------------------------
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
    """Merge a (slide, model)'s staged chunks into its features file, then commit it: the
    file (rows sorted by ``tile_index``), then the commit record, then the staged chunks are
    deleted. A row count other than ``request.n_tiles`` or a repeated ``tile_index`` raises
    :class:`CommitMismatchError` before anything becomes visible."""
    r = request
    features_relpath = None
    if r.chunk_ids:
        features_relpath = store.features_relpath(r.model, r.cohort, r.slide_id)
        store.write_table(features_relpath, _merged_chunks(store, r))
    if r.copies is None:
        _remove_stale_copies(store, r.model, r.slide_id, features_relpath)
    else:
        for stale in set(r.copies) - {features_relpath}:
            try:
                store.fs.rm(store.path(stale))
            except FileNotFoundError:
                pass
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
    store.write_json(store.commit_relpath(r.model, r.slide_id), record.__dict__)
    for chunk_id in r.chunk_ids:
        try:
            store.fs.rm(store.staging_path(r.model, r.slide_id, chunk_id))
        except FileNotFoundError:
            pass
    if r.chunk_ids and _is_local(store.fs):  # an empty folder per slide would pile up with the cohort
        try:
            os.rmdir(os.path.dirname(store.staging_path(r.model, r.slide_id, r.chunk_ids[0])))
        except OSError:
            pass
    return record


def _remove_stale_copies(store: FeatureStore, model: str, slide_id: str, keep: str | None) -> None:
    """Delete the features files of ``slide_id`` under every cohort folder of ``model`` but
    ``keep``: left by a run killed between writing its file and its record, under a cohort
    the slide no longer has, they would show the slide twice to a plain glob over
    ``features/``. One listing of the cohort folders, one delete per other cohort."""
    folder = store.path("features", f"model={model}")
    try:
        cohorts = store.fs.ls(folder, detail=False, refresh=True)
    except FileNotFoundError:
        return
    keep_path = store.path(keep) if keep else None
    for cohort in cohorts:
        stale = join(cohort, f"{slide_id}.parquet")
        if stale != keep_path and store.fs.exists(stale):
            store.fs.rm(stale)


def _merged_chunks(store: FeatureStore, r: CommitRequest) -> pa.Table:
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


def consolidate_slide_table(store: FeatureStore, committed: dict[str, set[str]]) -> pa.Table:
    """Rebuild ``slides.parquet`` from every run's raw status parts (``_runs/*/slides-*.parquet``):
    the latest row per (slide_id, model) wins. ``committed`` (model -> slide ids with a commit
    record) fills in pairs whose status row a crashed run never flushed, from their commit
    records. Returns the table written."""
    parts = sorted(store.fs.glob(store.path(RUN_STATUS_GLOB)))
    tables = []
    for part in parts:
        with store.fs.open(part, "rb") as f:
            tables.append(pq.read_table(f).cast(SLIDE_STATUS_SCHEMA))
    table = pa.concat_tables(tables) if tables else SLIDE_STATUS_SCHEMA.empty_table()
    if len(table):
        order = pc.sort_indices(
            table, [("slide_id", "ascending"), ("model", "ascending"), ("updated_at", "descending")]
        )
        table = table.take(order)
        keys = np.array(
            [f"{s}\x00{m}" for s, m in zip(table.column("slide_id").to_pylist(), table.column("model").to_pylist())]
        )
        first = np.ones(len(keys), dtype=bool)
        first[1:] = keys[1:] != keys[:-1]
        table = table.filter(pa.array(first))
    have_ok = {
        (s, m)
        for s, m, st in zip(
            table.column("slide_id").to_pylist(), table.column("model").to_pylist(), table.column("status").to_pylist()
        )
        if st in ("ok", "no_tissue")
    }
    backfill = []
    for model, slide_ids in committed.items():
        for slide_id in sorted(slide_ids):
            if (slide_id, model) in have_ok:
                continue
            record = store.commit_record(model, slide_id)
            if record is not None:
                backfill.append(status_row_from_commit(record))
    if backfill:
        done = {(r["slide_id"], r["model"]) for r in backfill}
        keep = [
            (s, m) not in done for s, m in zip(table.column("slide_id").to_pylist(), table.column("model").to_pylist())
        ]
        table = pa.concat_tables(
            [table.filter(pa.array(keep, type=pa.bool_())), pa.Table.from_pylist(backfill, schema=SLIDE_STATUS_SCHEMA)]
        )
    table = table.sort_by([("slide_id", "ascending"), ("model", "ascending")])
    store.write_table("slides.parquet", table)
    return table


def status_row_from_commit(record: CommitRecord) -> dict[str, Any]:
    """The status row a commit record implies (``ok``, or ``no_tissue`` for zero tiles)."""
    slide = record.slide
    return status_row(
        slide_id=record.slide_id,
        model=record.model,
        path=slide.get("path"),
        cohort=record.cohort,
        status="ok" if record.n_tiles else "no_tissue",
        width=slide.get("width"),
        height=slide.get("height"),
        mpp=slide.get("mpp"),
        mpp_source=slide.get("mpp_source"),
        vendor=slide.get("vendor"),
        n_tiles=record.n_tiles,
        run_id=record.run_id,
    )


def status_row(**fields: Any) -> dict[str, Any]:
    """A slide-status row with every column of :data:`SLIDE_STATUS_SCHEMA` present."""
    row = {name: None for name in SLIDE_STATUS_SCHEMA.names}
    row.update(fields)
    if row["updated_at"] is None:
        row["updated_at"] = time.time()
    return row
