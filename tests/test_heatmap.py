"""Attention heatmaps land on the right tissue: an ABMIL model trained on a planted cohort
attends most to the planted tile of a real SVS (0.25 µm/px, tiled at 0.5 µm/px, so a tile
is 448 level-0 px), and that tile is the hottest in both the PNG and the GeoJSON, at its
level-0 location."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from fixtures.feature_stores import commit_slide, write_planted_store
from PIL import Image

from pathray import mil
from pathray.cli import main
from pathray.mil.heatmap import colormap, render_heatmap, scores_geojson, tile_scores, write_heatmap
from pathray.mil.train import torch_threads
from pathray.store import FeatureStore
from pathray.tiling.grid import TilingConfig, plan_tiles
from pathray.wsi.slide import open_slide

PLANTED_XY = (2688, 1792)  # top-left of the second tissue rectangle of synthetic_svs_025, level-0 px
ALPHA = 0.6


@pytest.fixture(scope="module")
def svs_attention(tmp_path_factory, synthetic_svs_025):
    """(store root, slide id, planted tile index, attention table) for the SVS slide."""
    root = tmp_path_factory.mktemp("heatmap") / "store"
    planted = write_planted_store(root, n_patients=12)
    with open_slide(str(synthetic_svs_025)) as slide:
        grid = plan_tiles(slide, "svs-025", TilingConfig(tile_px=224, target_mpp=0.5))
    hot = int(np.flatnonzero((grid.x == PLANTED_XY[0]) & (grid.y == PLANTED_XY[1]))[0])
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(len(grid), planted.dim))
    emb[hot] += 4.0 * planted.direction  # the cohort's planted signal, on one tile
    tiles = {
        "x": grid.x,
        "y": grid.y,
        "size_level0": grid.size_level0,
        "target_mpp": 0.5,
        "tile_px": 224,
        "tissue_fraction": grid.tissue_fraction,
    }
    commit_slide(FeatureStore(str(root)), "m", "svs-025", tiles, emb, "case-svs", slide_path=str(synthetic_svs_025))
    labels = pa.concat_tables(
        [planted.labels, pa.table({"slide_id": ["svs-025"], "case_id": ["case-svs"], "label": [1]})]
    )
    config = mil.TrainConfig(
        n_folds=3, max_epochs=20, patience=5, lr=3e-3, hidden_dim=16, attention_dim=8, dropout=0.0, cpu_threads=1
    )
    result = mil.train(str(root), "m", labels, config=config, out=root.parent / "run")
    with torch_threads(1):
        scores = mil.attention(result, str(root), "m", "svs-025")
    return root, hot, scores, grid


def test_hottest_tile_is_the_planted_one_in_png_and_geojson(svs_attention, synthetic_svs_025, tmp_path):
    _, hot, scores, grid = svs_attention
    assert grid.size_level0 == 448.0  # slide 0.25 µm/px, tiles 0.5 µm/px
    assert int(np.argmax(scores.column("attention").to_numpy())) == hot
    with open_slide(str(synthetic_svs_025)) as slide:
        heatmap = write_heatmap(slide, scores, str(tmp_path / "h.png"), str(tmp_path / "h.geojson"))
        base, _ = slide.thumbnail(slide.mpp * max(slide.dimensions) / 1024)
    # PNG: undo the blend over the plain thumbnail; pixels painted the top colour of the map are the hottest tile
    png = np.asarray(Image.open(tmp_path / "h.png").convert("RGB")).astype(np.float64)
    width, height = heatmap.thumbnail_size
    assert png.shape[1] > width  # the colour bar sits right of the slide
    painted = (png[:height, :width] - (1 - ALPHA) * base) / ALPHA
    top = np.all(np.abs(painted - colormap(np.array([1.0]))[0]) <= 3.0, axis=-1)
    rows, cols = np.nonzero(top)
    f = heatmap.level0_per_px
    assert f == pytest.approx(4.0)
    np.testing.assert_allclose([cols.min() * f, rows.min() * f], PLANTED_XY, atol=f)
    np.testing.assert_allclose([(cols.max() + 1) * f, (rows.max() + 1) * f], np.add(PLANTED_XY, 448), atol=f)
    assert top.sum() == pytest.approx((448 / f) ** 2, rel=0.05)
    assert base[top].mean() < 235  # under it is tissue (pink), not white background
    # GeoJSON: the feature with the highest attention is the planted tile, as a level-0 px square
    features = json.loads((tmp_path / "h.geojson").read_text())["features"]
    best = max(features, key=lambda f: f["properties"]["attention"])
    x, y = PLANTED_XY
    assert best["properties"]["tile_index"] == hot and best["properties"]["measurements"]["attention"] > 0
    assert best["geometry"]["coordinates"][0] == [[x, y], [x + 448, y], [x + 448, y + 448], [x, y + 448], [x, y]]


def test_any_tile_column_can_be_drawn(svs_attention, synthetic_svs_025):
    root, _, _, grid = svs_attention
    scores = tile_scores(str(root), "m", "svs-025", "tissue_fraction")
    assert scores.column("x").to_pylist() == grid.x.tolist()
    with open_slide(str(synthetic_svs_025)) as slide:
        heatmap = render_heatmap(slide, scores, "tissue_fraction", max_side_px=512)
    assert heatmap.thumbnail_size == (512, 384) and heatmap.level0_per_px == pytest.approx(8.0)
    assert len(scores_geojson(scores, "tissue_fraction")["features"]) == len(grid)


def test_cli_heatmap_from_a_run_and_from_a_column(svs_attention, tmp_path):
    root, hot, _, grid = svs_attention
    run = root.parent / "run"
    assert (
        main(
            [
                "mil",
                "heatmap",
                "--store",
                str(root),
                "--slide",
                "svs-025",
                "--run",
                str(run),
                "--out",
                str(tmp_path / "att"),
            ]
        )
        == 0
    )  # the slide file is found through its commit record
    features = json.loads((tmp_path / "att.geojson").read_text())["features"]
    assert max(features, key=lambda f: f["properties"]["attention"])["properties"]["tile_index"] == hot
    assert Image.open(tmp_path / "att.png").size[0] > 1024
    assert (
        main(
            [
                "mil",
                "heatmap",
                "--store",
                str(root),
                "--slide",
                "svs-025",
                "--column",
                "tissue_fraction",
                "--out",
                str(tmp_path / "tissue"),
            ]
        )
        == 0
    )
    features = json.loads((tmp_path / "tissue.geojson").read_text())["features"]
    assert [f["properties"]["tissue_fraction"] for f in features] == pytest.approx(grid.tissue_fraction.tolist())
    assert (
        main(["mil", "heatmap", "--store", str(root), "--slide", "nope", "--column", "x", "--out", str(tmp_path / "x")])
        == 2
    )
