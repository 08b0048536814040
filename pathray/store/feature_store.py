""":class:`FeatureStore`: a feature store's root, its paths (:mod:`pathray.store.layout`), its
atomic writes, its config (:mod:`pathray.store.config`), its commit records and its readers
(:mod:`pathray.store.read`)."""

from __future__ import annotations

import os
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads

from pathray.fs import join, split_uri
from pathray.store import config as store_config
from pathray.store import index, read
from pathray.store.layout import (
    COMMITS,
    ERRORS,
    FEATURES,
    LEASE,
    NO_COHORT,
    RUN_REPORT,
    RUN_STATUS,
    SLIDE_COMMITS,
    SLIDE_FEATURES,
    STAGING,
    TEMP_MARKER,
    CommitRecord,
    is_local,
    json_bytes,
    parquet_bytes,
    read_json,
    write_bytes,
)


class FeatureStore:
    """A feature store rooted at a local directory or ``s3://`` prefix.

    Writers use :meth:`ensure_config`, :meth:`write_chunk`, :func:`pathray.store.finalize_slide`;
    readers use :meth:`dataset`, :meth:`committed`, :meth:`slides`, :func:`pathray.store.read_slide`.
    Paths named ``*_path`` are filesystem paths (without the ``s3://`` scheme); ``relpath``s are
    relative to the root.
    """

    def __init__(self, root: str, storage_options: dict[str, Any] | None = None):
        self.root = root.rstrip("/")
        self.storage_options = storage_options
        self.fs, self._root_path = split_uri(self.root, storage_options)

    # paths -----------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        """The filesystem path of ``parts`` (relative paths) under the root."""
        return join(self._root_path, *parts)

    def relpath(self, path: str) -> str:
        """``path`` (a filesystem path under the root) relative to the root."""
        return path[len(self._root_path) + 1 :]

    def features_relpath(self, model: str, cohort: str | None, slide_id: str) -> str:
        return FEATURES.file(model=model, cohort=cohort or NO_COHORT, slide_id=slide_id)

    def staging_path(self, model: str, slide_id: str, chunk_id: str) -> str:
        return self.path(STAGING.file(model=model, slide_id=slide_id, chunk_id=chunk_id))

    def commit_path(self, model: str, slide_id: str) -> str:
        return self.path(COMMITS.file(model=model, slide_id=slide_id))

    def lease_path(self) -> str:
        return self.path(LEASE)

    @staticmethod
    def run_status_relpath(run_id: str, part: int) -> str:
        return RUN_STATUS.file(run_id=run_id, part=part)

    @staticmethod
    def errors_relpath(run_id: str, part: int) -> str:
        return ERRORS.file(run_id=run_id, part=part)

    @staticmethod
    def report_relpath(run_id: str) -> str:
        return RUN_REPORT.file(run_id=run_id)

    @staticmethod
    def slide_features_relpath(model: str, aggregator: str, slide_id: str | None = None) -> str:
        """The slide-level file of ``slide_id``, or the folder of them all without one."""
        keys = {"model": model, "aggregator": aggregator}
        return SLIDE_FEATURES.dir(**keys) if slide_id is None else SLIDE_FEATURES.file(**keys, slide_id=slide_id)

    @staticmethod
    def slide_commit_relpath(model: str, aggregator: str, slide_id: str | None = None) -> str:
        """The commit record of ``slide_id``'s slide-level row, or the folder of them all without one."""
        keys = {"model": model, "aggregator": aggregator}
        return SLIDE_COMMITS.dir(**keys) if slide_id is None else SLIDE_COMMITS.file(**keys, slide_id=slide_id)

    # atomic I/O ------------------------------------------------------------------------------
    def write_bytes(self, relpath: str, data: bytes, durable: bool = True) -> None:
        """Put ``data`` at ``relpath`` whole (see :func:`pathray.store.layout.write_bytes`)."""
        write_bytes(self.fs, self.path(relpath), data, durable)

    def write_table(self, relpath: str, table: pa.Table) -> None:
        self.write_bytes(relpath, parquet_bytes(table))

    def write_json(self, relpath: str, obj: dict) -> None:
        self.write_bytes(relpath, json_bytes(obj))

    def write_chunk(self, model: str, slide_id: str, chunk_id: str, table: pa.Table) -> None:
        """Stage one chunk's tile rows (schema :func:`pathray.store.feature_schema`) at its
        deterministic name (not durable: a crash makes a re-run stage it again)."""
        relpath = STAGING.file(model=model, slide_id=slide_id, chunk_id=chunk_id)
        self.write_bytes(relpath, parquet_bytes(table), durable=False)

    def read_json(self, relpath: str) -> dict | None:
        """The JSON object at ``relpath``; ``None`` when there is none."""
        return read_json(self.fs, self.path(relpath))

    # config ----------------------------------------------------------------------------------
    def read_config(self) -> store_config.StoreConfig | None:
        """The store config (one GET; ``None`` for a store not written yet): read it once per run."""
        return store_config.read_config(self)

    def check_config(
        self,
        tiling: dict[str, Any],
        models: dict[str, dict[str, Any]],
        model_tilings: dict[str, dict[str, Any]] | None = None,
    ) -> tuple[store_config.StoreConfig, bool]:
        """See :func:`pathray.store.config.check_config`."""
        return store_config.check_config(self, tiling, models, model_tilings)

    def ensure_config(
        self,
        tiling: dict[str, Any],
        models: dict[str, dict[str, Any]],
        model_tilings: dict[str, dict[str, Any]] | None = None,
    ) -> store_config.StoreConfig:
        """See :func:`pathray.store.config.ensure_config`."""
        return store_config.ensure_config(self, tiling, models, model_tilings)

    def tiling_of(self, model: str) -> dict[str, Any]:
        """The tiling record ``model`` was embedded at in this store ({} when unknown; one GET)."""
        config = self.read_config()
        return config.tiling_of(model) if config else {}

    def models(self) -> list[str]:
        """The models in the store config (one GET)."""
        config = self.read_config()
        return sorted(config.models) if config else []

    # commit records --------------------------------------------------------------------------
    def committed(self, model: str) -> set[str]:
        """Slide ids with a commit record for ``model``."""
        return self._record_ids(COMMITS.dir(model=model))

    def aggregated(self, model: str, aggregator: str) -> set[str]:
        """Slide ids whose slide-level row for (``model``, ``aggregator``) is committed."""
        return self._record_ids(SLIDE_COMMITS.dir(model=model, aggregator=aggregator))

    def _record_ids(self, relpath: str) -> set[str]:
        try:
            names = self.fs.ls(self.path(relpath), detail=False)
        except FileNotFoundError:
            return set()
        return {os.path.basename(n)[: -len(".json")] for n in names if n.endswith(".json")}

    def commit_record(self, model: str, slide_id: str) -> CommitRecord | None:
        raw = self.read_json(COMMITS.file(model=model, slide_id=slide_id))
        return CommitRecord(**raw) if raw else None

    def commit_records(self, model: str) -> dict[str, CommitRecord]:
        """Every commit record of ``model`` by slide id (:func:`pathray.store.index.indexed_records`:
        on a store whose index is current a listing and one GET, not one per slide)."""
        return {slide_id: CommitRecord(**raw) for slide_id, (raw, _) in index.indexed_records(self, model)[0].items()}

    def update_commit_index(self, model: str) -> int:
        """See :func:`pathray.store.index.update_index`. Call only while holding the store's lease."""
        return index.update_index(self, model)

    def feature_copies(self, model: str, slide_ids: set[str]) -> dict[str, tuple[str, ...]]:
        """The features files (relative paths) of each of ``slide_ids`` that has any, under every
        cohort folder of ``model``: one recursive listing (on S3 one LIST per 1,000 files). Taken
        under the store's lease it stays exact for the run (only the run writes features files
        then, each under its manifest's cohort), so a commit can remove a copy left under another
        cohort without looking under each cohort folder (:attr:`CommitRequest.copies`)."""
        try:
            found = self.fs.find(self.path(FEATURES.prefix(model=model)))
        except FileNotFoundError:
            return {}
        copies: dict[str, list[str]] = {}
        for name in found:
            slide_id = os.path.basename(name)[: -len(".parquet")]
            if name.endswith(".parquet") and slide_id in slide_ids:
                copies.setdefault(slide_id, []).append(self.relpath(name))
        return {k: tuple(v) for k, v in copies.items()}

    # housekeeping (call only while holding the store's lease) ------------------------------------
    def remove_temporaries(self) -> int:
        """Delete temporary files a killed writer left behind (local stores only: S3 objects
        are put whole). Returns how many."""
        if not is_local(self.fs) or not os.path.isdir(self._root_path):
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
        gone may still be listed, as SeaweedFS does: it is never visited). Returns how many
        slides' folders."""
        folder = self.path(STAGING.prefix(model=model))
        try:
            staged = self.fs.find(folder)
        except FileNotFoundError:
            return 0
        slides = {f[len(folder) :].lstrip("/").split("/", 1)[0] for f in staged if f.startswith(folder)}
        stale = sorted(slides & self.committed(model))
        for slide_id in stale:
            self.fs.rm(join(folder, slide_id), recursive=True)
        return len(stale)

    # readers -----------------------------------------------------------------------------------
    def dataset(self, model: str) -> pads.Dataset:
        """See :func:`pathray.store.read.tile_dataset`."""
        return read.tile_dataset(self, model)

    def slide_features(self, model: str, aggregator: str) -> pads.Dataset:
        """See :func:`pathray.store.read.slide_features_dataset`."""
        return read.slide_features_dataset(self, model, aggregator)

    def slides(self) -> pa.Table:
        """See :func:`pathray.store.read.slide_status_table`."""
        return read.slide_status_table(self)

    def errors(self) -> pa.Table:
        """See :func:`pathray.store.read.error_table`."""
        return read.error_table(self)
