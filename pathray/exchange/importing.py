"""Import tile features a lab already has (TRIDENT / CLAM h5, CLAM pt) as committed slides of a model.

Formats (one file per slide, ``<slide_id>.<ext>`` in ``features_dir``; names starting with
``_`` or ``.`` are ignored):

``trident-h5``: datasets ``features`` ``(N, D)`` and ``coords`` ``(N, 2)`` (tile top-left,
level-0 px) with TRIDENT's coords attributes (``patch_size``, ``patch_size_level0``,
``level0_magnification``, ``target_magnification``, ``overlap``, ``level0_width`` /
``level0_height``); files written by ``pathray export`` add ``target_mpp``, ``level0_mpp``,
``size_level0``, a ``tissue_fraction`` dataset and the file attr ``pathray_provenance``.

``clam-h5``: CLAM's ``extract_features_fp.py`` output, ``features`` and ``coords`` without
attributes; the attributes (``patch_size``, ``patch_level``, ``downsample``, ``level_dim``)
are read from the matching patch file ``<coords_dir>/<slide_id>.h5`` that
``create_patches_fp.py`` wrote, when the features file has none.

``pt``: a ``torch.save``-d ``(N, D)`` tensor (loaded with ``weights_only=True``); coords and
attributes from ``<coords_dir>/<slide_id>.h5`` (a TRIDENT or CLAM h5), required.

Units. The tile side at the target resolution is ``patch_size`` px; its µm/px comes from the
``target_mpp`` attribute, else ``10 / target_magnification`` (the convention that 10x is
1.0 µm/px, 20x 0.5, 40x 0.25, stated in the tiling record), else, for CLAM files, the
manifest's level-0 ``mpp`` times the patch level's ``downsample``; a slide with none of
these is an ``mpp_missing`` error. The level-0 tile side is ``size_level0``, else
``patch_size * level0_magnification / target_magnification``, else ``patch_size_level0``,
else ``patch_size * downsample``. Files without ``tissue_fraction`` get 1.0 (their tiler's
tissue filter kept the tile). ``tile_index`` is the row order of the file.

The store config gets the model (``embed_dim`` and an ``imported`` record) and its tiling
(the files' most common ``(tile_px, target_mpp, stride_px)``), checked as ``pathray embed``
checks its own: another config or tiling for that model refuses the import. Each slide is
committed through the store's own protocol (one staged chunk, then
:func:`pathray.store.finalize_slide`), under the store's lease; a slide that cannot be
imported is an error row (``errors/``, ``slides.parquet``) and never stops the others; a
re-run skips committed slides.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from pathray import __version__
from pathray.errors import (
    CoordsMissingError,
    FeaturesUnreadableError,
    ImportMismatchError,
    MppMissingError,
    PathrayError,
    SlideIdConflictError,
    cap_message,
    describe,
)
from pathray.job.config import fingerprint
from pathray.job.report import RunReport
from pathray.job.resume import slide_id_conflict
from pathray.manifest import SlideEntry, check_safe_name, read_manifest
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

#: format -> extension of its files in ``features_dir``
FORMATS: dict[str, str] = {"trident-h5": "h5", "clam-h5": "h5", "pt": "pt"}
MAGNIFICATION_MPP = "10 / target_magnification (assumes 10x = 1.0 um/px, 20x = 0.5, 40x = 0.25)"
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


@dataclass(frozen=True)
class Geometry:
    """One slide's tiling as its file's attributes give it (see the module doc for units)."""

    tile_px: int
    target_mpp: float
    stride_px: int
    size_level0: float
    mpp_from: str
    slide: dict[str, Any]  # commit-record facts: path, width, height, mpp, mpp_source, vendor

    @property
    def key(self) -> tuple[int, float, int]:
        return self.tile_px, round(self.target_mpp, 6), self.stride_px


@dataclass(frozen=True)
class SourceFile:
    """Where one slide's features (and coords with their attributes) are read from."""

    slide_id: str
    features_path: str
    coords_path: str | None  # h5 holding ``coords`` when not the features file
    entry: SlideEntry  # the manifest's row, else one with the features file's absolute path and no cohort


@dataclass
class Probe:
    """Pass one over the files: each slide's geometry and width, or why it cannot be imported."""

    geometry: dict[str, Geometry] = field(default_factory=dict)
    widths: dict[str, int] = field(default_factory=dict)
    failed: dict[str, Exception] = field(default_factory=dict)


# --- reading the files ---------------------------------------------------------------------
def source_files(config: ImportConfig, entries: dict[str, SlideEntry] | None) -> list[SourceFile]:
    """The slides to import: every ``<slide_id>.<ext>`` of ``features_dir`` (only those of the
    manifest when one is given; a manifest slide without a file is still listed, to fail)."""
    ext = FORMATS[config.fmt]
    found = {
        name[: -len(ext) - 1]
        for name in os.listdir(config.features_dir)
        if name.endswith(f".{ext}") and not name.startswith(("_", "."))
    }
    slide_ids = sorted(entries) if entries is not None else sorted(found)
    sources = []
    for slide_id in slide_ids:
        path = os.path.abspath(os.path.join(config.features_dir, f"{slide_id}.{ext}"))
        entry = (entries or {}).get(slide_id) or SlideEntry(slide_id, path, None, None)
        coords = os.path.join(config.coords_dir, f"{slide_id}.h5") if config.coords_dir else None
        sources.append(SourceFile(slide_id, path, coords, entry))
    return sources


def _coords_h5(source: SourceFile, fmt: str):
    """The open h5 file whose ``coords`` carry the tile attributes (caller closes it)."""
    import h5py

    if fmt == "trident-h5":
        return h5py.File(source.features_path, "r")
    if fmt == "clam-h5":
        f = h5py.File(source.features_path, "r")
        if "coords" in f and "patch_size" in f["coords"].attrs:
            return f
        f.close()
    if source.coords_path is None or not os.path.exists(source.coords_path):
        raise CoordsMissingError(
            f"{source.slide_id}: the {fmt} file has no coords attributes and there is no "
            f"{source.slide_id}.h5 in --coords-dir ({source.coords_path or 'not given'})"
        )
    return h5py.File(source.coords_path, "r")


def read_coords(source: SourceFile, fmt: str) -> tuple[np.ndarray, dict[str, Any], np.ndarray | None]:
    """``(coords (N, 2) int64 level-0 px, coords attributes, tissue_fraction or None)``."""
    try:
        f = _coords_h5(source, fmt)
    except CoordsMissingError:
        raise
    except Exception as exc:  # any h5 read failure of the file is one error type
        raise FeaturesUnreadableError(f"{source.slide_id}: {type(exc).__name__}: {exc}") from exc
    with f:
        if "coords" not in f:
            raise CoordsMissingError(f"{source.slide_id}: {f.filename} has no 'coords' dataset")
        coords = np.asarray(f["coords"][:]).reshape(-1, 2).astype(np.int64)
        attrs = {k: _plain(v) for k, v in f["coords"].attrs.items()}
        tissue = np.asarray(f["tissue_fraction"][:], np.float32) if "tissue_fraction" in f else None
    return coords, attrs, tissue


def read_features(source: SourceFile, fmt: str) -> tuple[np.ndarray, dict[str, Any]]:
    """``(features (N, D) float32 as stored, source provenance)`` (raises
    :class:`FeaturesUnreadableError`)."""
    if not os.path.exists(source.features_path):
        raise FeaturesUnreadableError(f"{source.slide_id}: no file {source.features_path}")
    try:
        if fmt == "pt":
            import torch

            return torch.load(source.features_path, map_location="cpu", weights_only=True).numpy(), {}
        import h5py

        with h5py.File(source.features_path, "r") as f:
            features = np.asarray(f["features"][:])
            provenance = json.loads(f.attrs.get("pathray_provenance", "{}"))
            encoder = _plain(f["features"].attrs.get("encoder"))
    except Exception as exc:  # any read failure of a source file is one error type
        raise FeaturesUnreadableError(f"{source.features_path}: {type(exc).__name__}: {exc}") from exc
    return features, provenance or ({"encoder": encoder} if encoder else {})


def _plain(value: Any) -> Any:
    """An h5 attribute as a JSON-able Python value."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value.item() if isinstance(value, np.generic) else value


def geometry_of(attrs: dict[str, Any], source: SourceFile, fmt: str) -> Geometry:
    """The slide's tiling from its coords attributes (and the manifest's level-0 mpp for CLAM)."""
    if "patch_size" not in attrs:
        raise CoordsMissingError(f"{source.slide_id}: coords have no 'patch_size' attribute")
    tile_px = int(attrs["patch_size"])
    downsample = float(np.ravel(attrs.get("downsample", [1.0]))[0])
    manifest_mpp = source.entry.mpp
    if "target_mpp" in attrs:
        target_mpp, mpp_from = float(attrs["target_mpp"]), "target_mpp attribute"
    elif "target_magnification" in attrs:
        target_mpp, mpp_from = 10.0 / float(attrs["target_magnification"]), MAGNIFICATION_MPP
    elif manifest_mpp and "downsample" in attrs:
        target_mpp, mpp_from = manifest_mpp * downsample, "manifest level-0 mpp x the patch level's downsample"
    else:
        raise MppMissingError(
            f"{source.slide_id}: the coords attributes give no target_mpp or target_magnification; "
            "for CLAM files give each slide's level-0 mpp in --manifest"
        )
    return Geometry(
        tile_px,
        target_mpp,
        tile_px - int(attrs.get("overlap", 0)),
        _size_level0(attrs, tile_px, downsample),
        mpp_from,
        _slide_facts(attrs, source, fmt, manifest_mpp),
    )


def _size_level0(attrs: dict[str, Any], tile_px: int, downsample: float) -> float:
    """The tile side in level-0 px, exact where the attributes allow (see the module doc)."""
    if "size_level0" in attrs:
        return float(attrs["size_level0"])
    if "level0_magnification" in attrs and "target_magnification" in attrs:
        return tile_px * float(attrs["level0_magnification"]) / float(attrs["target_magnification"])
    if "patch_size_level0" in attrs:
        return float(attrs["patch_size_level0"])
    return tile_px * downsample


def _slide_facts(attrs: dict[str, Any], source: SourceFile, fmt: str, manifest_mpp: float | None) -> dict[str, Any]:
    """Commit-record facts of the slide: level-0 size and mpp where the attributes give them."""
    width, height = int(attrs.get("level0_width", -1)), int(attrs.get("level0_height", -1))
    if width <= 0 and int(attrs.get("patch_level", -1)) == 0 and "level_dim" in attrs:
        width, height = (int(v) for v in attrs["level_dim"])
    if "level0_mpp" in attrs:
        mpp, mpp_source = float(attrs["level0_mpp"]), f"imported:{fmt}:level0_mpp"
    elif "level0_magnification" in attrs:
        mpp, mpp_source = 10.0 / float(attrs["level0_magnification"]), f"imported:{fmt}:10/level0_magnification"
    else:
        mpp, mpp_source = manifest_mpp, "manifest" if manifest_mpp else None
    return {
        "path": source.entry.path,
        "width": width if width > 0 else None,
        "height": height if height > 0 else None,
        "mpp": mpp,
        "mpp_source": mpp_source,
        "vendor": None,
    }


def probe(sources: list[SourceFile], fmt: str, skip: set[str]) -> Probe:
    """Pass one: geometry and embedding width of every slide not in ``skip`` (attributes and
    shapes only for h5 files; a ``pt`` file is loaded whole). A slide whose attributes were
    read keeps its geometry even when its features then fail (it still votes for the tiling)."""
    import h5py

    out = Probe()
    for source in sources:
        if source.slide_id in skip:
            continue
        try:
            check_safe_name(source.slide_id)
            _, attrs, _ = read_coords(source, fmt)
            out.geometry[source.slide_id] = geometry_of(attrs, source, fmt)
            if fmt == "pt":
                out.widths[source.slide_id] = _width(read_features(source, fmt)[0].shape)
            else:
                with h5py.File(source.features_path, "r") as f:
                    out.widths[source.slide_id] = _width(f["features"].shape)
        except Exception as exc:  # noqa: BLE001 - one slide's problem is its error row
            out.failed[source.slide_id] = (
                exc
                if isinstance(exc, PathrayError)
                else FeaturesUnreadableError(f"{source.features_path}: {type(exc).__name__}: {exc}")
            )
    return out


def _width(shape: tuple[int, ...]) -> int:
    """Embedding width of a features array shape; 0 for an empty slide (TRIDENT writes ``(0,)``)."""
    return int(shape[1]) if len(shape) == 2 else 0


# --- the store's records ---------------------------------------------------------------------
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


# --- one slide ---------------------------------------------------------------------------------
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


# --- the run -------------------------------------------------------------------------------------
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
    sources = source_files(config, entries)
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
