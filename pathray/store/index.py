"""A model's commit index, ``_commits/index/model=<model>.parquet``: every commit record of the
model with the version its listing showed (the ETag on S3, mtime and size locally), so that
reading every record of a model costs a listing and one GET instead of one GET per slide.

Only a cache: a missing, stale or unreadable index costs reads, never correctness.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from pathray.store.layout import COMMIT_INDEX, COMMITS

if TYPE_CHECKING:
    from pathray.store.feature_store import FeatureStore

#: slide id -> (the raw commit record, its listed version)
Indexed = dict[str, tuple[dict[str, Any], str]]


def indexed_records(store: FeatureStore, model: str) -> tuple[Indexed, bool]:
    """``model``'s records with their listed versions, and whether they differ from the index:
    one listing, the index for each record it holds at the version listed, and only the other
    records read, together (fsspec ``cat`` of many paths, concurrent on S3). A record deleted
    between listing and read is left out."""
    listed = _listed_versions(store, store.path(COMMITS.dir(model=model)))
    index = _read_index(store, model)
    fresh = {sid: (index[sid][0], v) for sid, (_, v) in listed.items() if sid in index and index[sid][1] == v}
    names = sorted(path for sid, (path, _) in listed.items() if sid not in fresh)
    found = store.fs.cat(names, on_error="omit") if names else {}
    read = {os.path.basename(n)[: -len(".json")]: json.loads(data) for n, data in found.items()}
    records = {**fresh, **{sid: (raw, listed[sid][1]) for sid, raw in read.items()}}
    return records, bool(read) or len(fresh) != len(index)


def update_index(store: FeatureStore, model: str) -> int:
    """Rewrite ``model``'s commit index when records were added, changed or removed since it
    was written; returns how many records it holds. Call only while holding the store's lease."""
    records, changed = indexed_records(store, model)
    if changed:
        ids = sorted(records)
        table = pa.table(
            {
                "slide_id": pa.array(ids, pa.string()),
                "version": pa.array([records[i][1] for i in ids], pa.string()),
                "record": pa.array([json.dumps(records[i][0], sort_keys=True) for i in ids], pa.string()),
            }
        )
        store.write_table(COMMIT_INDEX.file(model=model), table)
    return len(records)


def _version(info: dict[str, Any]) -> str:
    """A listed object's version: its ETag (S3; changes with the content), else mtime and size."""
    return str(info.get("ETag") or f"{info.get('mtime')}:{info.get('size')}")


def _listed_versions(store: FeatureStore, prefix: str) -> dict[str, tuple[str, str]]:
    """slide id -> (path, version) of the ``.json`` records under ``prefix``."""
    try:
        infos = store.fs.ls(prefix, detail=True, refresh=True)
    except FileNotFoundError:
        return {}
    return {
        os.path.basename(i["name"])[: -len(".json")]: (i["name"], _version(i))
        for i in infos
        if i["name"].endswith(".json")
    }


def _read_index(store: FeatureStore, model: str) -> Indexed:
    try:
        with store.fs.open(store.path(COMMIT_INDEX.file(model=model)), "rb") as f:
            table = pq.read_table(f)
    except (FileNotFoundError, pa.ArrowInvalid):
        return {}
    columns = (table.column(c).to_pylist() for c in ("slide_id", "version", "record"))
    return {sid: (json.loads(raw), v) for sid, v, raw in zip(*columns)}
