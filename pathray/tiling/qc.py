"""Quality-control outputs for one tiled slide.

* a PNG thumbnail (the tissue-detection thumbnail, enlarged by a whole factor to ≥ 1024 px
  on its long side) with the tissue contour in green, every kept tile's outline in cyan (2 px
  where the scale allows: visible on dark purple tissue), and a label with the slide id, the
  slide's and the tiles' µm/px and the tile count;
* a GeoJSON FeatureCollection of kept tiles as polygons in **level-0 pixel** coordinates,
  ``objectType: "tile"``, which QuPath imports (File > Import objects) onto the slide.
"""

from __future__ import annotations

import io
import json
import math
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from pathray.fs import split_uri
from pathray.tiling.grid import TileGrid

CONTOUR_RGB = (0, 200, 0)
TILE_RGB = (0, 255, 255)
LABEL_BG_RGB = (255, 255, 255)
MIN_LONG_SIDE = 1024


def qc_image(grid: TileGrid) -> Image.Image:
    """Thumbnail with tissue contour, kept tile grid and a label (slide id, µm/px, tile count)."""
    tissue = grid.tissue
    thumb = tissue.thumbnail.copy()
    edge = tissue.mask & ~ndimage.binary_erosion(tissue.mask, border_value=0)
    scale = max(1, math.ceil(MIN_LONG_SIDE / max(thumb.shape[:2])))
    if scale > 1:
        thumb = np.repeat(np.repeat(thumb, scale, 0), scale, 1)
        edge = np.repeat(np.repeat(edge, scale, 0), scale, 1)
    thumb[edge] = CONTOUR_RGB
    image = Image.fromarray(thumb)
    draw = ImageDraw.Draw(image)
    f = scale / tissue.level0_per_px  # level-0 px -> image px
    side = grid.size_level0 * f
    width = 2 if side >= 8 else 1
    for x, y in zip(grid.x.tolist(), grid.y.tolist()):
        draw.rectangle([x * f, y * f, x * f + side - 1, y * f + side - 1], outline=TILE_RGB, width=width)
    _label(draw, qc_label(grid))
    return image


def qc_label(grid: TileGrid) -> str:
    """``<slide id> | slide <µm/px> µm/px | <n> tiles of <px> px at <µm/px> µm/px``."""
    slide_mpp = grid.target_mpp * grid.tile_px / grid.size_level0 if grid.size_level0 else float("nan")
    return (
        f"{grid.slide_id} | slide {slide_mpp:.4g} µm/px | {len(grid)} tiles of {grid.tile_px} px "
        f"at {grid.target_mpp:g} µm/px"
    )


#: fonts with a "µ" glyph, tried in order (Pillow's built-in font has none: it drew "□m/px")
LABEL_FONTS = ("DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")


def label_font(size: int = 18) -> tuple[ImageFont.ImageFont | ImageFont.FreeTypeFont, bool]:
    """``(font, has_micro)``: the first of :data:`LABEL_FONTS` that draws "µ" (matplotlib's
    DejaVu Sans when installed, else the system's), else Pillow's default, which does not."""
    candidates = list(LABEL_FONTS)
    try:
        import matplotlib

        candidates.insert(0, f"{matplotlib.get_data_path()}/fonts/ttf/DejaVuSans.ttf")
    except ImportError:
        pass
    for name in candidates:
        try:
            font = ImageFont.truetype(name, size)
        except OSError:
            continue
        if draws_glyph(font, "µ"):
            return font, True
    return ImageFont.load_default(size=size), False


def draws_glyph(font: ImageFont.ImageFont | ImageFont.FreeTypeFont, char: str) -> bool:
    """True when ``font`` draws ``char`` as something other than its missing-glyph box (the
    glyph an unassigned code point, U+0378, gets)."""

    def pixels(c: str) -> bytes:
        return bytes(font.getmask(c))

    return pixels(char) != pixels("\u0378")


def _label(draw: ImageDraw.ImageDraw, text: str) -> None:
    font, has_micro = label_font(18)
    if not has_micro:
        text = text.replace("µm/px", "um/px")
    left, top, right, bottom = draw.textbbox((6, 4), text, font=font)
    draw.rectangle([0, 0, right + 6, bottom + 4], fill=LABEL_BG_RGB)
    draw.text((6, 4), text, fill=(0, 0, 0), font=font)


def tiles_geojson(grid: TileGrid) -> dict[str, Any]:
    """Kept tiles as a GeoJSON FeatureCollection of level-0 pixel polygons (QuPath tiles)."""
    s = grid.size_level0
    features = []
    for index, x, y, fraction in zip(
        grid.tile_index.tolist(), grid.x.tolist(), grid.y.tolist(), grid.tissue_fraction.tolist()
    ):
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


def write_qc(
    grid: TileGrid, png_uri: str, geojson_uri: str | None = None, storage_options: dict[str, Any] | None = None
) -> None:
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
