"""Export a store's tile features as per-slide files that existing MIL code reads unchanged.

Formats (one file per committed slide with tissue, ``<slide_id>.<ext>``):

``trident-h5`` -> ``OUT/h5_files/<slide_id>.h5``, the layout TRIDENT writes and CLAM's
``Generic_MIL_Dataset`` (``use_h5``) reads:

- dataset ``features``: ``(N, D)`` float32; attrs ``name``, ``savetodir``, ``encoder``
  (TRIDENT ``WSI.extract_features``, trident/wsi_objects/WSI.py @ a91fa84);
- dataset ``coords``: ``(N, 2)`` int64, tile top-left ``(x, y)`` in level-0 px; attrs as
  TRIDENT's ``coords_to_h5`` (trident/IO.py @ a91fa84) writes them and ``read_coords`` /
  ``extract_features`` / its slide encoders read them: ``patch_size`` (tile side at the
  target resolution, px), ``patch_size_level0`` (tile side in level-0 px, rounded),
  ``level0_magnification``, ``target_magnification``, ``overlap`` (px at the target
  resolution), ``name``, ``savetodir``, ``level0_width``, ``level0_height``.
  Magnifications are ``10 / µm/px`` (0.5 µm/px = 20x) without TRIDENT's rounding to
  40x/20x buckets, so ``patch_size * level0_magnification / target_magnification`` is the
  exact level-0 tile side; pathray's exact units are added as ``target_mpp``,
  ``level0_mpp`` and ``size_level0`` (float, level-0 px).
- dataset ``tissue_fraction``: ``(N,)`` float32, pathray's own (TRIDENT and CLAM read
  ``features`` and ``coords`` by name and ignore it), so ``pathray import`` restores every
  tile column.
- file attr ``pathray_provenance``: the features file's provenance JSON.

``pt`` -> ``OUT/pt_files/<slide_id>.pt``: ``torch.save`` of the ``(N, D)`` float32
features tensor, as CLAM's ``extract_features_fp.py`` writes and ``Generic_MIL_Dataset``
reads (``torch.load(pt_files/<slide_id>.pt)``; CLAM @ 53e2409). A tensor, not a numpy
array, so ``torch.load(..., weights_only=True)`` (torch's default since 2.6) loads it.

So ``OUT`` is a CLAM ``data_root_dir`` entry as is, and ``OUT/h5_files`` a TRIDENT
features directory. Files are written to a ``_``-prefixed temporary name and renamed, and
a slide whose file exists is skipped, so an interrupted export can simply be re-run. A
file there that this model did not write (an h5 whose ``features`` ``encoder`` attribute
names another model; pt files, which carry no model, when ``_last_export.json`` names another
model or is missing) makes the export refuse before writing anything
(:class:`ExportConflictError`), unless ``overwrite`` rewrites every existing file.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field

from pathray.errors import describe
from pathray.store import CommitRecord, FeatureStore, TileFeatures, read_slide

#: what the last export into a folder wrote (model, format, slides)
LAST_EXPORT = "_last_export.json"
#: format name -> (sub-folder of OUT, file extension)
FORMATS: dict[str, tuple[str, str]] = {"trident-h5": ("h5_files", "h5"), "pt": ("pt_files", "pt")}


@dataclass
class ExportReport:
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # file already there, or no tissue
    errors: dict[str, str] = field(default_factory=dict)  # slide_id -> "error_type: message"

    @property
    def exit_code(self) -> int:
        return 1 if self.errors else 0


def trident_coords_attrs(slide: TileFeatures, record: CommitRecord, stride_px: int, out_dir: str) -> dict:
    """The ``coords`` attributes TRIDENT writes (trident/IO.py ``coords_to_h5``), in pathray's units."""
    level0_mpp = slide.level0_mpp
    return {
        "patch_size": slide.tile_px,
        "patch_size_level0": round(slide.size_level0),
        "level0_magnification": 10.0 / level0_mpp,
        "target_magnification": 10.0 / slide.target_mpp,
        "overlap": max(0, slide.tile_px - stride_px),
        "name": record.slide_id,
        "savetodir": out_dir,
        "level0_width": int(record.slide.get("width") or -1),
        "level0_height": int(record.slide.get("height") or -1),
        "target_mpp": slide.target_mpp,
        "level0_mpp": level0_mpp,
        "size_level0": slide.size_level0,
    }


def write_trident_h5(path: str, slide: TileFeatures, coords_attrs: dict, encoder: str) -> None:
    import h5py

    with h5py.File(path, "w") as f:
        features = f.create_dataset("features", data=slide.embeddings)
        features.attrs.update({"name": slide.slide_id, "savetodir": os.path.dirname(path), "encoder": encoder})
        coords = f.create_dataset("coords", data=slide.coords)
        coords.attrs.update(coords_attrs)
        f.create_dataset("tissue_fraction", data=slide.tissue_fraction)
        f.attrs["pathray_provenance"] = slide.provenance


def write_pt(path: str, slide: TileFeatures) -> None:
    import torch

    torch.save(torch.tensor(slide.embeddings, dtype=torch.float32), path)


class ExportConflictError(ValueError):
    """``OUT`` holds files another model wrote (or of unknown origin) for slides to export."""


def export_store(store: FeatureStore, model: str, fmt: str, out_dir: str, overwrite: bool = False) -> ExportReport:
    """Write one ``fmt`` file per committed slide of ``model`` under ``out_dir`` (local).
    Per-slide failures are collected in the report, never raised. Existing files are
    skipped, or rewritten with ``overwrite``; without it, files not written for ``model``
    raise :class:`ExportConflictError` before anything is written."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    folder, ext = FORMATS[fmt]
    target = os.path.join(os.path.abspath(out_dir), folder)
    os.makedirs(target, exist_ok=True)
    tiling = store.tiling_of(model)
    stride_px = tiling.get("stride_px") or tiling.get("tile_px") or 0
    report = ExportReport()
    slide_ids = sorted(store.committed(model))
    if not overwrite:
        _refuse_foreign_files(target, fmt, model, [os.path.join(target, f"{s}.{ext}") for s in slide_ids])
    _write_manifest(target, model, fmt, report)  # names the model now: an interrupted pt export is re-run as is
    for slide_id in slide_ids:
        path = os.path.join(target, f"{slide_id}.{ext}")
        record = store.commit_record(model, slide_id)
        if (os.path.exists(path) and not overwrite) or record is None or record.features_path is None:
            report.skipped.append(slide_id)
            continue
        tmp = os.path.join(target, f"_{slide_id}.{ext}.tmp-{uuid.uuid4().hex}")
        try:
            slide = read_slide(store, model, record)
            if fmt == "pt":
                write_pt(tmp, slide)
            else:
                write_trident_h5(tmp, slide, trident_coords_attrs(slide, record, stride_px, target), model)
            os.replace(tmp, path)
            report.written.append(slide_id)
        except Exception as exc:  # noqa: BLE001 - one slide's failure is reported, the rest exported
            error_type, message = describe(exc)
            report.errors[slide_id] = f"{error_type}: {message}"
            if os.path.exists(tmp):
                os.remove(tmp)
    _write_manifest(target, model, fmt, report)
    return report


def written_by(path: str, fmt: str, target: str) -> str | None:
    """The model an existing export file was written for: an h5's ``features`` ``encoder``
    attribute; for pt files (no attribute) the model of ``target``'s ``_last_export.json``.
    ``None`` when it cannot be told."""
    if fmt == "pt":
        try:
            with open(os.path.join(target, LAST_EXPORT)) as f:
                return json.load(f).get("model")
        except (OSError, ValueError):
            return None
    import h5py

    try:
        with h5py.File(path, "r") as f:
            encoder = f["features"].attrs.get("encoder") if "features" in f else None
    except OSError:
        return None
    return encoder.decode() if isinstance(encoder, bytes) else (str(encoder) if encoder is not None else None)


def _refuse_foreign_files(target: str, fmt: str, model: str, paths: list[str]) -> None:
    """Raise :class:`ExportConflictError` naming the files at ``paths`` not written for ``model``."""
    foreign = {}
    for path in paths:
        if os.path.exists(path):
            owner = written_by(path, fmt, target)
            if owner != model:
                foreign[os.path.basename(path)] = owner
    if foreign:
        names = ", ".join(f"{name} ({owner or 'unknown model'})" for name, owner in sorted(foreign.items())[:5])
        raise ExportConflictError(
            f"{target} already holds {len(foreign)} file(s) of these slides written for another model than {model!r}: "
            f"{names}{' ...' if len(foreign) > 5 else ''}. Export to another --out, or pass --overwrite to replace them."
        )


def _write_manifest(target: str, model: str, fmt: str, report: ExportReport) -> None:
    """``_last_export.json`` next to the files: what the last export wrote, skipped and failed on."""
    with open(os.path.join(target, LAST_EXPORT), "w") as f:
        json.dump(
            {
                "model": model,
                "format": fmt,
                "written": report.written,
                "skipped": report.skipped,
                "errors": report.errors,
            },
            f,
            indent=2,
        )
