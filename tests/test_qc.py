import json

import numpy as np

from pathray.tiling.grid import TilingConfig, plan_tiles
from pathray.tiling.qc import CONTOUR_RGB, TILE_RGB, qc_image, qc_label, tiles_geojson, write_qc
from pathray.wsi.slide import open_slide


def _grid(slide_path):
    with open_slide(str(slide_path)) as slide:
        return plan_tiles(slide, "s", TilingConfig())


def test_qc_image_draws_contour_and_kept_tiles(synthetic_svs_025):
    grid = _grid(synthetic_svs_025)
    image = np.asarray(qc_image(grid))
    scale = 1024 // 128  # 128x96 thumbnail (8 µm/px) enlarged to >= 1024 px
    assert image.shape == (96 * scale, 128 * scale, 3)
    f = scale / grid.tissue.level0_per_px
    for x, y in zip(grid.x, grid.y):  # top-left corner of each kept tile is outlined, 2 px wide
        assert tuple(image[int(y * f), int(x * f) + 3]) == tuple(image[int(y * f) + 1, int(x * f) + 3]) == TILE_RGB
    assert (image == CONTOUR_RGB).all(-1).sum() > 100
    assert not (image[: int(448 * f) - 2] == TILE_RGB).all(-1).any()  # no kept tile in the first grid row


def test_qc_image_of_a_real_slide_is_at_least_1024_px_and_labelled(cmu_slide):
    """CMU's thumbnail is 690 px wide at 8 µm/px: a whole-factor enlargement rounding down left
    it below the documented 1024 px."""
    grid = _grid(cmu_slide)
    image = np.asarray(qc_image(grid))
    assert max(image.shape[:2]) >= 1024
    assert max(grid.tissue.thumbnail.shape[:2]) * 2 <= max(image.shape[:2])
    assert qc_label(grid).startswith(f"s | slide 0.499 µm/px | {len(grid)} tiles of 224 px at 0.5 µm/px")
    banner = image[:20, :200]
    assert (banner == 255).all(-1).any() and (banner < 60).all(-1).any()  # white box with dark text


def test_geojson_polygons_in_level0_pixels(synthetic_svs_025, tmp_path):
    grid = _grid(synthetic_svs_025)
    doc = tiles_geojson(grid)
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == len(grid)
    feature = doc["features"][3]
    ring = feature["geometry"]["coordinates"][0]
    x, y = int(grid.x[3]), int(grid.y[3])
    assert ring == [[x, y], [x + 448.0, y], [x + 448.0, y + 448.0], [x, y + 448.0], [x, y]]
    assert feature["properties"]["objectType"] == "tile" and feature["properties"]["tile_index"] == 3
    write_qc(grid, str(tmp_path / "qc" / "s.png"), str(tmp_path / "qc" / "s.geojson"))
    assert (tmp_path / "qc" / "s.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "qc" / "s.geojson").read_text()) == json.loads(json.dumps(doc))


def test_qc_of_blank_slide(blank_svs):
    grid = _grid(blank_svs)
    assert tiles_geojson(grid)["features"] == []
    assert not (np.asarray(qc_image(grid)) == TILE_RGB).all(-1).any()


def test_qc_label_font_draws_micro_not_a_missing_glyph_box():
    """Pillow's default font has no "µ" (the label read "□m/px"); the label font draws it."""
    from PIL import ImageFont

    from pathray.tiling.qc import draws_glyph, label_font

    assert not draws_glyph(ImageFont.load_default(size=18), "µ")  # the check sees the box
    font, has_micro = label_font(18)
    assert has_micro and draws_glyph(font, "µ") and draws_glyph(font, "m")


def test_qc_label_renders_micro_in_the_image(synthetic_svs_05):
    from PIL import Image, ImageDraw

    from pathray.tiling.qc import label_font

    grid = _grid(synthetic_svs_05)
    image = np.asarray(qc_image(grid))
    font, _ = label_font(18)
    expected = Image.new("RGB", (image.shape[1], 40), (255, 255, 255))
    ImageDraw.Draw(expected).text((6, 4), qc_label(grid), fill=(0, 0, 0), font=font)
    _, _, right, bottom = ImageDraw.Draw(expected).textbbox((6, 4), qc_label(grid), font=font)
    assert "µm/px" in qc_label(grid)
    assert np.array_equal(image[4:bottom, 6:right], np.asarray(expected)[4:bottom, 6:right])
