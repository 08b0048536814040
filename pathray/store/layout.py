"""Where everything lives in a feature store, and how a file is written there whole.

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
    _commits/slide_features/model=<model>/aggregator=<name>.json
                                                          the aggregator's pinned identity
    errors/run_id=<run_id>/part-<k>.parquet               error ledger, one row per failure
    _runs/<run_id>/report.json, slides-<k>.parquet        run report and raw per-run status rows
    _runs/<run_id>/report.html, qc/, run.log              the run's page, its QC images, its log
    _lease.json                                           the run lease (pathray.store.lease)

Each file family is declared once below as a :class:`Partition`; every path is derived from
those declarations. Files under ``_``-prefixed folders are ignored by pyarrow.dataset, DuckDB
globs over ``features/`` and polars, so plain readers see only whole per-slide files.
"""

from __future__ import annotations

import io
import json
import os
import uuid
from dataclasses import dataclass
from string import Formatter
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

STORE_META = "_pathray_store.json"
SLIDES = "slides.parquet"
#: the run lease object (see :mod:`pathray.store.lease`)
LEASE = "_lease.json"
NO_COHORT = "unassigned"
#: in the names of local temporary files (``.<name>.tmp-<hex>``), never in a store object's name
TEMP_MARKER = ".tmp-"


@dataclass(frozen=True)
class Partition:
    """One family of store files: the ``folder`` template (hive ``key=value`` parts and plain
    fields, as :meth:`str.format` fields) and the ``name`` template of a file in it. Paths are
    relative to the store's root."""

    folder: str
    name: str

    def dir(self, **keys: Any) -> str:
        """The folder for ``keys``."""
        return self.folder.format(**keys)

    def file(self, **keys: Any) -> str:
        """The file for ``keys``."""
        return f"{self.dir(**keys)}/{self.name.format(**keys)}"

    def glob(self, **keys: Any) -> str:
        """Every file of the family with ``keys``: each other field as ``*``."""
        return _wildcard(f"{self.folder}/{self.name}", keys)

    def dir_glob(self) -> str:
        """Every folder of the family: each field as ``*``."""
        return _wildcard(self.folder)

    def prefix(self, **keys: Any) -> str:
        """The leading parts of the folder whose fields are all in ``keys`` (``prefix()``: the
        base directory of a hive-partitioned dataset; ``prefix(model=m)``: all of ``m``'s files)."""
        parts = []
        for part in self.folder.split("/"):
            if any(name is not None and name not in keys for _, name, _, _ in Formatter().parse(part)):
                break
            parts.append(part.format(**keys))
        return "/".join(parts)

    @property
    def hive_keys(self) -> tuple[str, ...]:
        """The ``key`` of each ``key={key}`` part of the folder, in order."""
        return tuple(part.split("=", 1)[0] for part in self.folder.split("/") if "=" in part)


def _wildcard(template: str, keys: dict[str, Any] | None = None) -> str:
    """``template`` with the fields in ``keys`` filled in and every other field as ``*``."""
    keys = keys or {}
    out = []
    for text, name, spec, _ in Formatter().parse(template):
        out.append(text)
        if name is not None:
            out.append(format(keys[name], spec) if name in keys else "*")
    return "".join(out)


def hive_value(path: str, key: str) -> str | None:
    """The value of the ``key=<value>`` part of ``path`` (``None`` when it has none)."""
    for part in path.split("/"):
        if part.startswith(f"{key}="):
            return part[len(key) + 1 :]
    return None


FEATURES = Partition("features/model={model}/cohort={cohort}", "{slide_id}.parquet")
STAGING = Partition("_staging/model={model}/{slide_id}", "{chunk_id}.parquet")
COMMITS = Partition("_commits/model={model}", "{slide_id}.json")
COMMIT_INDEX = Partition("_commits/index", "model={model}.parquet")
SLIDE_FEATURES = Partition("slide_features/model={model}/aggregator={aggregator}", "{slide_id}.parquet")
SLIDE_COMMITS = Partition("_commits/slide_features/model={model}/aggregator={aggregator}", "{slide_id}.json")
#: beside the folder of SLIDE_COMMITS, not among its records
AGGREGATOR_PIN = Partition("_commits/slide_features/model={model}", "aggregator={aggregator}.json")
ERRORS = Partition("errors/run_id={run_id}", "part-{part:05d}.parquet")
RUN_STATUS = Partition("_runs/{run_id}", "slides-{part:05d}.parquet")
RUN_REPORT = Partition("_runs/{run_id}", "report.json")
RUN_PAGE = Partition("_runs/{run_id}", "report.html")  # and its full QC images under qc/
RUN_LOG = Partition("_runs/{run_id}", "run.log")


# --- commit records -------------------------------------------------------------------------
@dataclass(frozen=True)
class CommitRecord:
    """What a commit record (:data:`COMMITS`) says about one (slide, model)."""

    slide_id: str
    model: str
    cohort: str
    n_tiles: int
    features_path: str | None  # relative to ROOT; None when the slide had no tissue
    store_config_hash: str
    run_id: str
    slide: dict[str, Any]  # width, height, mpp, mpp_source, vendor, path


@dataclass(frozen=True)
class SlideFeaturesRecord:
    """What a slide-level commit record (:data:`SLIDE_COMMITS`) says about one (slide, model,
    aggregator)."""

    slide_id: str
    model: str
    aggregator: str
    cohort: str
    n_tiles: int
    slide_features_path: str | None  # relative to ROOT; None when the slide had no tissue
    features_path: str | None  # the tile features file it was computed from
    aggregator_fingerprint: str
    run_id: str


# --- atomic I/O -----------------------------------------------------------------------------
def write_bytes(fs, path: str, data: bytes, durable: bool = True) -> None:
    """Write ``data`` at ``path`` (a filesystem path) so that readers see either nothing or all of it.

    S3 PUTs are atomic per object; on a local filesystem we write a temporary sibling and
    ``os.replace`` it (atomic on POSIX). The temporary name starts with ``.`` and does not end
    in ``.parquet`` (see :data:`TEMP_MARKER`), so pyarrow, DuckDB and polars never list a
    half-written file, even one a killed process left behind;
    :meth:`FeatureStore.remove_temporaries` deletes those.

    ``durable`` (local only): once this returns, the file survives a power loss: the
    temporary file is fsync-ed before the rename, and its directory (and the parent of any
    directory created for it) after, so a later write (a commit record) is never on disk
    without this one. Staged chunks skip it: a crash makes a re-run stage them again."""
    if not is_local(fs):
        with fs.open(path, "wb") as f:
            f.write(data)
        return
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


def is_local(fs) -> bool:
    """Whether ``fs`` (fsspec) is the local filesystem."""
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def parquet_bytes(table: pa.Table) -> bytes:
    """``table`` as a zstd-compressed Parquet file."""
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd", row_group_size=max(1, min(len(table), 65536)))
    return sink.getvalue()


def json_bytes(obj: dict[str, Any]) -> bytes:
    """``obj`` as the store writes JSON: indented, keys sorted, non-JSON values as ``str``."""
    return json.dumps(obj, indent=2, sort_keys=True, default=str).encode()


def read_json(fs, path: str) -> dict | None:
    """The JSON object at ``path`` (a filesystem path); ``None`` when there is no file."""
    try:
        with fs.open(path, "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None
