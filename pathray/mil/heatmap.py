"""Per-tile scores (ABMIL attention, or any per-tile column) drawn over a slide.

* :func:`render_heatmap`: the slide thumbnail with each scored tile filled in a colour
  of the viridis map (``alpha``-blended), and a colour bar with the score range on the right;
* :func:`scores_geojson`: the tiles as GeoJSON polygons in **level-0 pixels** with the
  score as a property and as a QuPath measurement (File > Import objects).

Tile positions are the store's ``x``, ``y``, ``size_level0`` (level-0 px), mapped onto the
thumbnail through the slide's own dimensions, so they land on the right tissue whatever
µm/px the slide was scanned at and whatever µm/px it was tiled at.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw

from pathray.fs import split_uri
from pathray.store import FeatureStore
from pathray.store.read import read_features_file
from pathray.wsi.slide import Slide

#: viridis at 0, 1/4, 1/2, 3/4, 1 (matplotlib's values), linearly interpolated in between.
VIRIDIS_ANCHORS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], float)
COLORBAR_PX = (24, 96)  # colour strip width, whole panel width
#: where a tile is (level-0 px), the columns a score is drawn with
POSITION_COLUMNS = ["tile_index", "x", "y", "size_level0"]


def colormap(values: np.ndarray) -> np.ndarray:
    """RGB uint8 ``(N, 3)`` of ``values`` in [0, 1] (clipped) on the viridis map."""
    pos = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0) * (len(VIRIDIS_ANCHORS) - 1)
    lo = np.minimum(pos.astype(int), len(VIRIDIS_ANCHORS) - 2)
    frac = (pos - lo)[:, None]
    return np.round(VIRIDIS_ANCHORS[lo] * (1 - frac) + VIRIDIS_ANCHORS[lo + 1] * frac).astype(np.uint8)


@dataclass(frozen=True)
class Heatmap:
    """The rendered image; the slide occupies its left ``thumbnail_size[0]`` columns at
    ``level0_per_px`` level-0 pixels per image pixel; scores ``vmin``..``vmax`` span the map."""

    image: Image.Image
    level0_per_px: float
    thumbnail_size: tuple[int, int]
    vmin: float
    vmax: float


def tile_scores(store: FeatureStore | str, model: str, slide_id: str, column: str) -> pa.Table:
    """One committed slide's tile_index, x, y, size_level0 and ``column`` from the store."""
    store = FeatureStore(store) if isinstance(store, str) else store
    record = store.commit_record(model, slide_id)
    if record is None or record.features_path is None:
        raise ValueError(f"{slide_id!r} has no committed tiles for model {model!r} in {store.root}")
    return read_features_file(store, record, [*POSITION_COLUMNS, column])


def render_heatmap(
    slide: Slide,
    scores: pa.Table,
    column: str = "attention",
    max_side_px: int = 1024,
    alpha: float = 0.6,
    value_range: tuple[float, float] | None = None,
) -> Heatmap:
    """Draw ``scores[column]`` of each tile (``x``, ``y``, ``size_level0``: level-0 px) over a
    thumbnail of ``slide`` whose long side is about ``max_side_px``. ``value_range`` (default:
    the scores' min and max) maps onto the colour map."""
    thumb, _ = slide.thumbnail(slide.mpp * max(slide.dimensions) / max_side_px)
    height, width = thumb.shape[:2]
    level0_per_px = slide.dimensions[0] / width
    values = scores.column(column).to_numpy(zero_copy_only=False).astype(np.float64)
    vmin, vmax = value_range or (float(values.min()), float(values.max()))
    colours = colormap((values - vmin) / ((vmax - vmin) or 1.0))
    overlay = thumb.astype(np.float64)
    x, y, side = (scores.column(c).to_numpy().astype(np.float64) / level0_per_px for c in ("x", "y", "size_level0"))
    for i in np.argsort(values, kind="stable"):  # hottest drawn last where tiles overlap
        r0, r1, c0, c1 = (round(float(v)) for v in (y[i], y[i] + side[i], x[i], x[i] + side[i]))
        overlay[r0:r1, c0:c1] = (1 - alpha) * thumb[r0:r1, c0:c1] + alpha * colours[i]
    image = Image.fromarray(np.round(overlay).astype(np.uint8))
    return Heatmap(_with_colorbar(image, vmin, vmax, column), level0_per_px, (width, height), vmin, vmax)


def _with_colorbar(image: Image.Image, vmin: float, vmax: float, label: str) -> Image.Image:
    strip_px, panel_px = COLORBAR_PX
    width, height = image.size
    canvas = Image.new("RGB", (width + panel_px, max(height, 160)), "white")
    canvas.paste(image, (0, 0))
    bar_h = max(64, min(height, 512) - 40)
    ramp = colormap(np.linspace(1.0, 0.0, bar_h))  # top = vmax
    bar = np.repeat(ramp[:, None, :], strip_px, axis=1)
    canvas.paste(Image.fromarray(bar), (width + 8, 20))
    draw = ImageDraw.Draw(canvas)
    draw.text((width + 8, 4), label[:14], fill="black")
    draw.text((width + 12 + strip_px, 20), f"{vmax:.3g}", fill="black")
    draw.text((width + 12 + strip_px, 20 + bar_h - 10), f"{vmin:.3g}", fill="black")
    return canvas


def scores_geojson(scores: pa.Table, column: str = "attention", slide_id: str = "") -> dict[str, Any]:
    """Tiles as a GeoJSON FeatureCollection of level-0 px squares; properties carry
    ``tile_index``, the score under ``column`` and ``measurements: {column: score}`` (QuPath)."""
    features = []
    for row in scores.select([*POSITION_COLUMNS, column]).to_pylist():
        x, y, s = row["x"], row["y"], row["size_level0"]
        ring = [[x, y], [x + s, y], [x + s, y + s], [x, y + s], [x, y]]
        score = float(row[column])
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {
                    "objectType": "tile",
                    "name": f"{slide_id} tile {row['tile_index']}".strip(),
                    "tile_index": row["tile_index"],
                    column: score,
                    "measurements": {column: score},
                },
            }
        )
    return {"type": "FeatureCollection", "features": features}


def write_heatmap(
    slide: Slide,
    scores: pa.Table,
    png_uri: str,
    geojson_uri: str | None = None,
    column: str = "attention",
    storage_options: dict[str, Any] | None = None,
) -> Heatmap:
    """Render and write the PNG (and the GeoJSON when ``geojson_uri`` is given), local or ``s3://``."""
    heatmap = render_heatmap(slide, scores, column)
    buffer = io.BytesIO()
    heatmap.image.save(buffer, format="PNG")
    _write_bytes(png_uri, buffer.getvalue(), storage_options)
    if geojson_uri is not None:
        slide_id = scores.column("slide_id")[0].as_py() if "slide_id" in scores.column_names else ""
        _write_bytes(geojson_uri, json.dumps(scores_geojson(scores, column, slide_id)).encode(), storage_options)
    return heatmap


def _write_bytes(uri: str, data: bytes, storage_options: dict[str, Any] | None) -> None:
    fs, path = split_uri(uri, storage_options)
    parent = path.rsplit("/", 1)[0] if "/" in path else "."
    fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(data)
