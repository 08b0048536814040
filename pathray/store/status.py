"""Slide status: the rows of the status table (``slides.parquet``, :func:`status_row`), its
consolidation from every run's raw parts (:func:`consolidate_slide_table`), and what is in a
store (:func:`store_status`, ``pathray status``).

:func:`store_status` reads without writing: models and their tilings, slides committed / failed
by error type / never tried (given a manifest), the runs with their dates and wall times, and the
slide-level aggregations present. It costs a few listings and small reads: the store config, the
commit-record folders, the status table, the run reports and the slide-level record folders; no
features file is opened.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pathray.store.config import StoreConfig
from pathray.store.feature_store import FeatureStore
from pathray.store.layout import RUN_REPORT, RUN_STATUS, SLIDE_COMMITS, SLIDES, STORE_META, CommitRecord, hive_value
from pathray.store.schema import SLIDE_STATUS_SCHEMA


def status_row(**fields: Any) -> dict[str, Any]:
    """A slide-status row with every column of :data:`SLIDE_STATUS_SCHEMA` present."""
    row = {name: None for name in SLIDE_STATUS_SCHEMA.names}
    row.update(fields)
    if row["updated_at"] is None:
        row["updated_at"] = time.time()
    return row


def status_row_from_commit(record: CommitRecord) -> dict[str, Any]:
    """The status row a commit record implies (``ok``, or ``no_tissue`` for zero tiles); its slide
    columns are the record's slide facts (:func:`pathray.wsi.facts.status_fields` when committed)."""
    slide = {k: v for k, v in record.slide.items() if k in SLIDE_STATUS_SCHEMA.names}
    return status_row(
        **slide,
        slide_id=record.slide_id,
        model=record.model,
        cohort=record.cohort,
        status="ok" if record.n_tiles else "no_tissue",
        n_tiles=record.n_tiles,
        run_id=record.run_id,
    )


def consolidate_slide_table(store: FeatureStore, committed: dict[str, set[str]]) -> pa.Table:
    """Rebuild ``slides.parquet`` from every run's raw status parts (``_runs/*/slides-*.parquet``):
    the latest row per (slide_id, model) wins. ``committed`` (model -> slide ids with a commit
    record) fills in pairs whose status row a crashed run never flushed, from their commit
    records. Returns the table written."""
    table = _latest_rows(_run_status_parts(store))
    statuses = zip(*(table.column(c).to_pylist() for c in ("slide_id", "model", "status")))
    have_ok = {(s, m) for s, m, st in statuses if st in ("ok", "no_tissue")}
    backfill = []
    for model, slide_ids in committed.items():
        for slide_id in sorted(slide_ids):
            record = None if (slide_id, model) in have_ok else store.commit_record(model, slide_id)
            if record is not None:
                backfill.append(status_row_from_commit(record))
    if backfill:
        done = {(r["slide_id"], r["model"]) for r in backfill}
        keep = [
            pair not in done for pair in zip(table.column("slide_id").to_pylist(), table.column("model").to_pylist())
        ]
        filled = pa.Table.from_pylist(backfill, schema=SLIDE_STATUS_SCHEMA)
        table = pa.concat_tables([table.filter(pa.array(keep, type=pa.bool_())), filled])
    table = table.sort_by([("slide_id", "ascending"), ("model", "ascending")])
    store.write_table(SLIDES, table)
    return table


def _run_status_parts(store: FeatureStore) -> pa.Table:
    """Every run's raw status rows, concatenated."""
    tables = []
    for part in sorted(store.fs.glob(store.path(RUN_STATUS.glob()))):
        with store.fs.open(part, "rb") as f:
            tables.append(pq.read_table(f).cast(SLIDE_STATUS_SCHEMA))
    return pa.concat_tables(tables) if tables else SLIDE_STATUS_SCHEMA.empty_table()


def _latest_rows(table: pa.Table) -> pa.Table:
    """The latest row (``updated_at``) of each (slide_id, model) of ``table``."""
    if not len(table):
        return table
    order = pc.sort_indices(table, [("slide_id", "ascending"), ("model", "ascending"), ("updated_at", "descending")])
    table = table.take(order)
    pairs = zip(table.column("slide_id").to_pylist(), table.column("model").to_pylist())
    keys = np.array([f"{s}\x00{m}" for s, m in pairs])
    first = np.ones(len(keys), dtype=bool)
    first[1:] = keys[1:] != keys[:-1]
    return table.filter(pa.array(first))


def store_status(store: FeatureStore, manifest_ids: list[str] | None = None) -> dict[str, Any]:
    """The store's summary as a JSON-able dict (see the module doc). ``manifest_ids``: slide ids
    of a manifest, to count the slides of it never tried per model."""
    config = store.read_config()
    if config is None:
        raise FileNotFoundError(f"no pathray store at {store.root} (no {store.path(STORE_META)})")
    latest = _latest_status(store)
    models = {}
    for name in sorted(config.models):
        models[name] = _model_status(store, config, name, latest.get(name, {}), manifest_ids)
    return {
        "store": store.root,
        "format": config.format,
        "created_by": config.created_by,
        "models": models,
        "runs": _runs(store),
        "aggregations": _aggregations(store),
    }


def _model_status(
    store: FeatureStore, config: StoreConfig, name: str, latest: dict[str, dict], manifest_ids: list[str] | None
) -> dict[str, Any]:
    record = config.models[name]
    committed = store.committed(name)
    errors = Counter(r["error_type"] for sid, r in latest.items() if r["status"] == "error" and sid not in committed)
    tiling = config.tiling_of(name)
    out = {
        "embed_dim": record.get("embed_dim"),
        "weights": record.get("weights"),
        "tiling": {"tile_px": tiling.get("tile_px"), "target_mpp": tiling.get("target_mpp")},
        "committed": len(committed),
        "no_tissue": sum(1 for sid, r in latest.items() if r["status"] == "no_tissue" and sid in committed),
        "errors": dict(sorted(errors.items())),
    }
    if manifest_ids is not None:
        tried = committed | set(latest)
        out["never_tried"] = sum(1 for sid in manifest_ids if sid not in tried)
    return out


def _latest_status(store: FeatureStore) -> dict[str, dict[str, dict]]:
    """model -> slide id -> its status row in ``slides.parquet`` ({} when there is none)."""
    try:
        rows = store.slides().to_pylist()
    except (FileNotFoundError, OSError):
        return {}
    latest: dict[str, dict[str, dict]] = {}
    for row in rows:
        latest.setdefault(row["model"], {})[row["slide_id"]] = row
    return latest


def _runs(store: FeatureStore) -> list[dict[str, Any]]:
    """One entry per run report under ``_runs/``, oldest first."""
    try:
        paths = store.fs.glob(store.path(RUN_REPORT.glob()))
    except FileNotFoundError:
        return []
    runs = []
    for path in paths:
        try:
            with store.fs.open(path, "rb") as f:
                report = json.load(f)
        except (OSError, ValueError):
            continue
        started, ended = report.get("started_at") or 0.0, report.get("ended_at") or 0.0
        runs.append(
            {
                "run_id": report.get("run_id") or os.path.basename(os.path.dirname(path)),
                "kind": _run_kind(report),
                "started_at": started,
                "wall_s": round(ended - started, 1) if ended and started else None,
                "errors": report.get("errors", (report.get("counts") or {}).get("error")),
                "aborted": report.get("aborted") or "",
            }
        )
    return sorted(runs, key=lambda r: r["started_at"])


def _run_kind(report: dict[str, Any]) -> str:
    """``aggregate``, ``import`` (``pathray import``'s reports have runner ``import``) or ``embed``."""
    if "aggregator" in report:
        return "aggregate"
    return "import" if report.get("runner") == "import" else "embed"


def _aggregations(store: FeatureStore) -> list[dict[str, Any]]:
    """(model, aggregator, committed slides) for every slide-level output folder."""
    try:
        folders = store.fs.glob(store.path(SLIDE_COMMITS.dir_glob()))
    except FileNotFoundError:
        return []
    out = []
    for folder in sorted(f for f in folders if not f.endswith(".json")):  # <aggregator>.json: its pinned identity
        relpath = store.relpath(folder)
        model, aggregator = hive_value(relpath, "model"), hive_value(relpath, "aggregator")
        out.append({"model": model, "aggregator": aggregator, "slides": len(store.aggregated(model, aggregator))})
    return out


def format_status(status: dict[str, Any]) -> str:
    """The summary as a few lines of text."""
    import time

    lines = [f"store {status['store']} ({status['created_by']}, format {status['format']})", "", "models:"]
    for name, m in status["models"].items():
        errors = ", ".join(f"{k} {v}" for k, v in m["errors"].items()) or "none"
        never = f", never tried {m['never_tried']}" if "never_tried" in m else ""
        lines.append(
            f"  {name}: {m['committed']} slides committed ({m['no_tissue']} without tissue), "
            f"errors: {errors}{never}; {m['embed_dim']}-d, tiles {m['tiling']['tile_px']} px at "
            f"{m['tiling']['target_mpp']} µm/px"
        )
    lines += ["", f"runs ({len(status['runs'])}):"]
    for r in status["runs"]:
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(r["started_at"])) if r["started_at"] else "?"
        wall = f"{r['wall_s']:.0f} s" if r["wall_s"] is not None else "unfinished"
        aborted = f", aborted: {r['aborted'][:80]}" if r["aborted"] else ""
        lines.append(f"  {r['run_id']} ({r['kind']}) {when}, {wall}, {r['errors'] or 0} errors{aborted}")
    lines += ["", "slide-level aggregations:" if status["aggregations"] else "slide-level aggregations: none"]
    lines += [f"  {a['model']} -> {a['aggregator']}: {a['slides']} slides" for a in status["aggregations"]]
    return "\n".join(lines)
