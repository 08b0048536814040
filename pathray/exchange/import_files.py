"""Reading tile features a lab already has (TRIDENT / CLAM h5, CLAM pt): coords, attributes,
features and each slide's tiling, as :mod:`pathray.exchange.importing` commits them.

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
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pathray.errors import CoordsMissingError, FeaturesUnreadableError, MppMissingError, PathrayError
from pathray.manifest import SlideEntry, check_safe_name

#: format -> extension of its files in ``features_dir``
FORMATS: dict[str, str] = {"trident-h5": "h5", "clam-h5": "h5", "pt": "pt"}
MAGNIFICATION_MPP = "10 / target_magnification (assumes 10x = 1.0 um/px, 20x = 0.5, 40x = 0.25)"


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


def source_files(
    fmt: str, features_dir: str, coords_dir: str | None, entries: dict[str, SlideEntry] | None
) -> list[SourceFile]:
    """The slides to import: every ``<slide_id>.<ext>`` of ``features_dir`` in format ``fmt``
    (only those of the manifest when one is given; a manifest slide without a file is still
    listed, to fail); coords files are ``<coords_dir>/<slide_id>.h5``."""
    ext = FORMATS[fmt]
    found = {
        name[: -len(ext) - 1]
        for name in os.listdir(features_dir)
        if name.endswith(f".{ext}") and not name.startswith(("_", "."))
    }
    slide_ids = sorted(entries) if entries is not None else sorted(found)
    sources = []
    for slide_id in slide_ids:
        path = os.path.abspath(os.path.join(features_dir, f"{slide_id}.{ext}"))
        entry = (entries or {}).get(slide_id) or SlideEntry(slide_id, path, None, None)
        coords = os.path.join(coords_dir, f"{slide_id}.h5") if coords_dir else None
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
