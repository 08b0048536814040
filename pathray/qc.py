"""Quality-control outputs for one tiled slide.

* a PNG thumbnail (the tissue-detection thumbnail, enlarged to ≥ 1024 px on its long
  side) with the tissue contour in green and every kept tile's outline in blue;
* a GeoJSON FeatureCollection of kept tiles as polygons in **level-0 pixel** coordinates,
  ``objectType: "tile"``, which QuPath imports (File > Import objects) onto the slide.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from pathray.fs import split_uri
from pathray.tiling import TileGrid

CONTOUR_RGB = (0, 200, 0)
TILE_RGB = (30, 60, 230)
MIN_LONG_SIDE = 1024


def qc_image(grid: TileGrid) -> Image.Image:
    """Thumbnail with tissue contour and kept tile grid drawn on it."""
    tissue = grid.tissue
    thumb = tissue.thumbnail.copy()
    edge = tissue.mask & ~ndimage.binary_erosion(tissue.mask, border_value=0)
    scale = max(1, MIN_LONG_SIDE // max(thumb.shape[:2]))
    if scale > 1:
        thumb = np.repeat(np.repeat(thumb, scale, 0), scale, 1)
        edge = np.repeat(np.repeat(edge, scale, 0), scale, 1)
    thumb[edge] = CONTOUR_RGB
    image = Image.fromarray(thumb)
    draw = ImageDraw.Draw(image)
    f = scale / tissue.level0_per_px  # level-0 px -> image px
    side = grid.size_level0 * f
    for x, y in zip(grid.x.tolist(), grid.y.tolist()):
        draw.rectangle([x * f, y * f, x * f + side - 1, y * f + side - 1], outline=TILE_RGB)
    return image


def tiles_geojson(grid: TileGrid) -> dict[str, Any]:
    """Kept tiles as a GeoJSON FeatureCollection of level-0 pixel polygons (QuPath tiles)."""
    s = grid.size_level0
    features = []
    for index, x, y, fraction in zip(grid.tile_index.tolist(), grid.x.tolist(), grid.y.tolist(), grid.tissue_fraction.tolist()):
        ring = [[x, y], [x + s, y], [x + s, y + s], [x, y + s], [x, y]]
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {
                    "objectType": "tile",
                    "name": f"{grid.slide_id} tile {index}",
                    "tile_index": index,
                    "tissue_fraction": round(fraction, 4),
                },
            }
        )
    return {"type": "FeatureCollection", "features": features}


def write_qc(grid: TileGrid, png_uri: str, geojson_uri: str | None = None, storage_options: dict[str, Any] | None = None) -> None:
    """Write the QC PNG (and the GeoJSON when ``geojson_uri`` is given), local or ``s3://``."""
    buffer = io.BytesIO()
    qc_image(grid).save(buffer, format="PNG")
    _write_bytes(png_uri, buffer.getvalue(), storage_options)
    if geojson_uri is not None:
        _write_bytes(geojson_uri, json.dumps(tiles_geojson(grid)).encode(), storage_options)


def _write_bytes(uri: str, data: bytes, storage_options: dict[str, Any] | None) -> None:
    fs, path = split_uri(uri, storage_options)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(data)
