"""Import tile features a lab already has (TRIDENT / CLAM h5, CLAM pt) as committed slides of a model.

The files, their formats and units: :mod:`pathray.exchange.import_files`.

The store config gets the model (``embed_dim`` and an ``imported`` record) and its tiling
(the files' most common ``(tile_px, target_mpp, stride_px)``), checked as ``pathray embed``
checks its own: another config or tiling for that model refuses the import. Each slide is
committed through the store's own protocol (one staged chunk, then
:func:`pathray.store.finalize_slide`), under the store's lease; a slide that cannot be
imported is an error row (``errors/``, ``slides.parquet``) and never stops the others; a
re-run skips committed slides.
"""

from __future__ import annotations

import os
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from pathray import __version__
from pathray.errors import ImportMismatchError, SlideIdConflictError, cap_message, describe
from pathray.exchange.import_files import (
    FORMATS,
    Geometry,
    Probe,
    SourceFile,
    probe,
    read_coords,
    read_features,
    source_files,
)
from pathray.job.config import fingerprint
from pathray.job.report import RunReport
from pathray.job.resume import slide_id_conflict
from pathray.manifest import SlideEntry, read_manifest
from pathray.store import (
    CommitRequest,
    FeatureStore,
    consolidate_slide_table,
    embeddings_to_arrow,
    feature_schema,
    finalize_slide,
    status_row,
)
from pathray.store.lease import StoreLease
from pathray.store.ledger import StatusLedger

CHUNK_ID = "import"


@dataclass(frozen=True)
class ImportConfig:
    """One ``pathray import``: ``fmt`` files of ``features_dir`` into ``store`` as ``model``."""

    store: str
    model: str
    fmt: str
    features_dir: str
    coords_dir: str | None = None
    manifest: str | None = None
    keep_columns: tuple[str, ...] = ()
    storage_options: dict[str, Any] | None = None
    run_id: str | None = None


def model_record(config: ImportConfig, embed_dim: int) -> dict[str, Any]:
    """What the store config says about an imported model; its ``fingerprint`` covers all of it."""
    record = {
        "model": config.model,
        "embed_dim": embed_dim,
        "imported": {
            "format": config.fmt,
            "features_dir": os.path.abspath(config.features_dir),
            "coords_dir": os.path.abspath(config.coords_dir) if config.coords_dir else None,
        },
    }
    return {**record, "fingerprint": fingerprint(record)}


def tiling_record(geometry: Geometry, fmt: str) -> dict[str, Any]:
    """The imported tiling's record; its ``fingerprint`` covers tile px, µm/px and stride only
    (how the µm/px was found is stated, not identifying)."""
    tile_px, target_mpp, stride_px = geometry.key
    identity = {"tile_px": tile_px, "target_mpp": target_mpp, "stride_px": stride_px, "imported": True}
    return {
        "tile_px": tile_px,
        "target_mpp": target_mpp,
        "stride_px": stride_px,
        "min_tissue_fraction": None,
        "imported": {
            "format": fmt,
            "target_mpp_from": geometry.mpp_from,
            "tissue_fraction": "the file's tissue_fraction dataset where present, else 1.0",
        },
        "fingerprint": fingerprint(identity),
    }


def decide_records(store: FeatureStore, config: ImportConfig, found: Probe) -> tuple[dict, dict]:
    """``(model record, tiling record)`` this import asks the store for: the files' most common
    tiling, and the width the store already holds for the model, else the registered width, else
    the files' most common one (so another tiling or source of a model already in the store is
    refused by :meth:`FeatureStore.ensure_config`, as ``pathray embed`` is). Raises
    ``ValueError`` when no slide's attributes could be read and the store lacks the model."""
    store_config = store.read_config()
    stored = store_config.models.get(config.model) if store_config else None
    if not found.geometry:
        if stored:
            return model_record(config, stored["embed_dim"]), store_config.tiling_of(config.model)
        raise ValueError(
            f"no slide of {config.features_dir} could be read as {config.fmt}: "
            + "; ".join(f"{s}: {describe(e)[1]}" for s, e in sorted(found.failed.items())[:5])
        )
    common = Counter(g.key for g in found.geometry.values()).most_common(1)[0][0]
    representative = next(g for _, g in sorted(found.geometry.items()) if g.key == common)
    embed_dim = stored["embed_dim"] if stored else _embed_dim(config.model, found.widths)
    return model_record(config, embed_dim), tiling_record(representative, config.fmt)


def _embed_dim(model: str, widths: dict[str, int]) -> int:
    """A registered model's width, else the most common width among the files."""
    from pathray.encoders.registry import REGISTRY

    if model in REGISTRY:
        return REGISTRY[model].embed_dim
    nonzero = [w for w in widths.values() if w]
    if not nonzero:
        raise ValueError(f"no file holds a tile of {model!r}: its embedding width is unknown")
    return Counter(nonzero).most_common(1)[0][0]


@dataclass(frozen=True)
class ImportRun:
    """What importing each slide needs, decided once the store's lease is held."""

    config: ImportConfig
    store: FeatureStore
    model_rec: dict[str, Any]
    tiling_rec: dict[str, Any]
    store_hash: str
    run_id: str
    passthrough_schema: pa.Schema


def tile_table(
    slide_id: str, geometry: Geometry, coords: np.ndarray, features: np.ndarray, tissue: np.ndarray | None
) -> pa.Table:
    """The slide's rows in :func:`pathray.store.feature_schema` (float32 embeddings)."""
    n, dim = features.shape
    columns = [
        pa.array([slide_id] * n, pa.string()),
        pa.array(np.arange(n, dtype=np.int64)),
        pa.array(coords[:, 0]),
        pa.array(coords[:, 1]),
        pa.array(np.full(n, geometry.size_level0, np.float64)),
        pa.array(np.full(n, geometry.target_mpp)),
        pa.array(np.full(n, geometry.tile_px, np.int32)),
        pa.array(np.ones(n, np.float32) if tissue is None else tissue.astype(np.float32)),
        embeddings_to_arrow(features.astype(np.float32, copy=False)),
    ]
    return pa.Table.from_arrays(columns, schema=feature_schema(dim, pa.float32()))


def import_slide(run: ImportRun, source: SourceFile, geometry: Geometry) -> int:
    """Read, check and commit one slide; returns its tile count. Raises the slide's error."""
    tiling = run.tiling_rec
    if geometry.key != (tiling["tile_px"], round(tiling["target_mpp"], 6), tiling["stride_px"]):
        raise ImportMismatchError(
            f"{source.slide_id}: tiles of {geometry.tile_px} px at {geometry.target_mpp:g} "
            f"um/px, stride {geometry.stride_px}; {run.config.model} in this store has "
            f"{tiling['tile_px']} px at {tiling['target_mpp']:g} um/px, stride {tiling['stride_px']}"
        )
    features, provenance = read_features(source, run.config.fmt)
    coords, _, tissue = read_coords(source, run.config.fmt)
    features = features.reshape(0, run.model_rec["embed_dim"]) if features.size == 0 else features
    if features.ndim != 2 or features.shape[1] != run.model_rec["embed_dim"]:
        raise ImportMismatchError(
            f"{source.slide_id}: features of shape {features.shape}, "
            f"{run.config.model} is {run.model_rec['embed_dim']}-d"
        )
    if len(coords) != len(features) or (tissue is not None and len(tissue) != len(features)):
        raise ImportMismatchError(f"{source.slide_id}: {len(features)} feature rows but {len(coords)} coords")
    chunk_ids: tuple[str, ...] = ()
    if len(features):
        run.store.write_chunk(
            run.config.model, source.slide_id, CHUNK_ID, tile_table(source.slide_id, geometry, coords, features, tissue)
        )
        chunk_ids = (CHUNK_ID,)
    finalize_slide(run.store, _commit_request(run, source, geometry, chunk_ids, len(features), provenance))
    return len(features)


def _commit_request(
    run: ImportRun,
    source: SourceFile,
    geometry: Geometry,
    chunk_ids: tuple[str, ...],
    n_tiles: int,
    source_provenance: dict,
) -> CommitRequest:
    entry = source.entry
    imported = {
        "format": run.config.fmt,
        "file": os.path.abspath(source.features_path),
        "coords_file": source.coords_path,
        "target_mpp_from": geometry.mpp_from,
        "source_provenance": source_provenance,
    }
    provenance = {
        "model": run.model_rec,
        "tiling": run.tiling_rec,
        "run_id": run.run_id,
        "pathray_version": __version__,
        "store_config_hash": run.store_hash,
        "imported": imported,
    }
    passthrough = {c: entry.extra.get(c) for c in run.config.keep_columns}
    return CommitRequest(
        run.config.model,
        source.slide_id,
        entry.cohort,
        chunk_ids,
        n_tiles,
        geometry.slide,
        provenance,
        run.store_hash,
        run.run_id,
        passthrough,
        run.passthrough_schema,
    )


def import_features(config: ImportConfig) -> RunReport:
    """Import every slide of ``config.features_dir`` not yet committed for ``config.model``;
    return the run report (also saved in the store). Per-slide problems are error rows and a
    non-zero :attr:`RunReport.exit_code`. Raised before anything is written: an unknown
    format, ``pt`` without ``coords_dir``, an unusable manifest (:class:`ManifestError`), no
    readable slide at all (``ValueError``), another config or tiling of the model in the store
    (:class:`StoreConfigMismatchError`), another live driver (:class:`StoreBusyError`)."""
    _check_config(config)
    run_id = config.run_id or "import-" + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
    report = RunReport(
        run_id=run_id,
        store=config.store,
        started_at=time.time(),
        runner="import",
        config={k: v for k, v in config.__dict__.items() if k != "storage_options"},
    )
    entries = None
    if config.manifest:
        entries = {e.slide_id: e for e in read_manifest(config.manifest, config.storage_options)}
    sources = source_files(config.fmt, config.features_dir, config.coords_dir, entries)
    store = FeatureStore(config.store, config.storage_options)
    committed, conflicts = resume(store, config.model, sources)
    found = probe(sources, config.fmt, committed | set(conflicts))
    found.failed.update({s: SlideIdConflictError(message) for s, message in conflicts.items()})
    model_rec, tiling_rec = decide_records(store, config, found)
    with StoreLease(store, run_id):
        store_hash = fingerprint(
            store.ensure_config(tiling_rec, {config.model: model_rec}, {config.model: tiling_rec}).to_json()
        )
        store.remove_temporaries()
        run = ImportRun(
            config,
            store,
            model_rec,
            store.tiling_of(config.model),
            store_hash,
            run_id,
            _passthrough_schema(list((entries or {}).values()), config.keep_columns),
        )
        _import_all(run, sources, found, committed, report)
        consolidate_slide_table(store, {config.model: store.committed(config.model)})
        report.ended_at = time.time()
        store.write_json(store.report_relpath(run_id), report.to_dict())
    return report


def resume(store: FeatureStore, model: str, sources: list[SourceFile]) -> tuple[set[str], dict[str, str]]:
    """``(done slide ids, {slide id: why it conflicts})``: a slide is done when its commit record is of
    the same path and cohort, as :func:`pathray.job.raydata.resume_state` decides for the job; a
    record of another slide under the same id is a ``slide_id_conflict``."""
    records = store.commit_records(model)
    done, conflicts = set(), {}
    for source in sources:
        record = records.get(source.slide_id)
        message = slide_id_conflict(record, source.entry) if record is not None else None
        if message:
            conflicts[source.slide_id] = message
        elif record is not None:
            done.add(source.slide_id)
    return done, conflicts


def _check_config(config: ImportConfig) -> None:
    if config.fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {config.fmt!r}")
    if config.fmt == "pt" and not config.coords_dir:
        raise ValueError(
            "pt files hold features only: give --coords-dir, the folder of the matching h5 files "
            "(TRIDENT coords or CLAM patches) with each slide's coords"
        )
    if config.keep_columns and not config.manifest:
        raise ValueError("--keep-columns names manifest columns: give --manifest too")
    if not os.path.isdir(config.features_dir):
        raise ValueError(f"--features-dir {config.features_dir!r} is not a directory")


def _import_all(
    run: ImportRun, sources: list[SourceFile], found: Probe, committed: set[str], report: RunReport
) -> None:
    """Pass two: commit every slide not yet committed; record one status row per slide tried."""
    ledger, model = StatusLedger(run.store, run.run_id), run.config.model
    counts = report.per_model.setdefault(model, {"ok": 0, "no_tissue": 0, "error": 0, "tiles": 0})
    report.slides_in_manifest, report.committed_before = len(sources), {model: len(committed)}
    todo = [s for s in sources if s.slide_id not in committed]
    report.slides_skipped, report.pairs_to_do = len(sources) - len(todo), len(todo)
    for source in todo:
        geometry = found.geometry.get(source.slide_id)
        base = dict(
            slide_id=source.slide_id,
            model=model,
            cohort=source.entry.cohort,
            run_id=run.run_id,
            **(geometry.slide if geometry else {"path": source.entry.path}),
        )
        try:
            if source.slide_id in found.failed:
                raise found.failed[source.slide_id]
            n_tiles = import_slide(run, source, geometry)
            status = "ok" if n_tiles else "no_tissue"
            row = status_row(**base, status=status, n_tiles=n_tiles)
            counts["tiles"] += n_tiles
            report.tiles_read += n_tiles
        except Exception as exc:  # noqa: BLE001 - one slide's failure is its error row, the rest go on
            status = "error"
            error_type, message = describe(exc)
            row = status_row(
                **base, status=status, stage="import", error_type=error_type, error_message=cap_message(message)
            )
            report.errors += 1
        counts[status] += 1
        ledger.record(row)
    ledger.flush()


def _passthrough_schema(entries: list[SlideEntry], keep: tuple[str, ...]) -> pa.Schema:
    """Types of the kept manifest columns (an all-empty column is a string)."""
    if not keep:
        return pa.schema([])
    schema = pa.Table.from_pylist([{c: e.extra.get(c) for c in keep} for e in entries]).schema
    return pa.schema([pa.field(f.name, pa.string() if pa.types.is_null(f.type) else f.type) for f in schema])
