"""Native tile geometry of the encoder specs, and Prov-GigaPath's coordinate contract.

The official Prov-GigaPath slide encoder takes each tile's top-left in pixels of the slide's
0.5 µm/px image, tiles being 256 px on that image (github.com/prov-gigapath/prov-gigapath,
issue #116), and indexes its position table by ``floor(coord / 256)``. These tests lay
pathray's own grid on real (synthetic Aperio) slides at several µm/px and check that what
the encoder is given equals what the official preprocessing produces.
"""

from __future__ import annotations

import numpy as np
import pytest

from pathray.demo.synthetic import write_synthetic_svs
from pathray.encoders import REGISTRY, get_spec
from pathray.slide_level.encoders import gigapath_coords
from pathray.tiling.grid import TilingConfig, plan_tiles
from pathray.wsi.slide import open_slide

GIGAPATH_TILING = TilingConfig(tile_px=256, target_mpp=0.5, min_tissue_fraction=0.0)


#: models whose official pipeline cuts tiles of another size than its transform's target (the
#: card's own Resize then resamples them): CONCH v1.5 (TITAN: 512 px at 20x -> 448), GPFM
#: (512 px at 40x -> 224), CLAM's ResNet-50 (256 px at 20x -> 224)
RESIZED_BY_OFFICIAL_PIPELINE = {"conch-v1.5": 512, "gpfm": 256, "resnet50-trunc": 256}


def test_each_spec_tiles_at_the_size_its_card_resize_leaves_unchanged():
    for name, spec in REGISTRY.items():
        p = spec.preprocess
        assert spec.tile_source, f"{name}: no source recorded for its native tile"
        if name in RESIZED_BY_OFFICIAL_PIPELINE:
            assert spec.tile_px == RESIZED_BY_OFFICIAL_PIPELINE[name] != p.resize_px, name
            assert "resize" in spec.tile_source.lower(), name  # the source says the official transform resizes
            continue
        assert spec.tile_px == (p.resize_px or p.crop_px), name  # a native tile is neither resampled nor padded
    gigapath = get_spec("prov-gigapath")
    assert (gigapath.tile_px, gigapath.native_mpp, gigapath.input_px) == (256, 0.5, 224)
    assert get_spec("timm:vit_tiny_patch16_224").tile_px == 224  # no card: the network input


def official_tile_coords(width_05: int, height_05: int, tile: int = 256) -> np.ndarray:
    """Tile top-lefts of the official preprocessing on a whole-slide 0.5 µm/px image
    (origin 0, margin 0), transcribed from gigapath/preprocessing/data/tiling.py
    ``get_1d_padding`` / ``tile_array_2d`` (@09d8e87): symmetric padding to a multiple of the
    tile, coordinates ``tile * k - offset``, x varying fastest."""
    pad_w, pad_h = (tile - width_05 % tile) % tile, (tile - height_05 % tile) % tile
    coords_w = tile * np.arange((width_05 + pad_w) // tile) - pad_w // 2
    coords_h = tile * np.arange((height_05 + pad_h) // tile) - pad_h // 2
    return np.stack(np.meshgrid(coords_w, coords_h), axis=-1).reshape(-1, 2)


def official_positions(coords: np.ndarray) -> np.ndarray:
    """``LongNetViT.coords_to_pos`` (gigapath/slide_encoder.py L166-179): floor(c / 256) -> x * 1000 + y + 1."""
    cells = np.floor(coords / 256.0)
    return (cells[:, 0] * 1000 + cells[:, 1]).astype(np.int64) + 1


# level-0 sizes whose 0.5 µm/px image, floor(size * mpp / 0.5), is 1024 x 768: no official padding
@pytest.mark.parametrize("mpp, width, height", [(0.25, 2048, 1536), (0.2631, 1947, 1460), (0.5, 1024, 768)])
def test_gigapath_coords_equal_the_official_preprocessing(tmp_path, mpp, width, height):
    path = write_synthetic_svs(
        tmp_path / "s.svs", (width, height), mpp=mpp, tissue_rects=((0, 0, width, height),), downsamples=(1, 4)
    )
    with open_slide(str(path)) as slide:
        grid = plan_tiles(slide, "s", GIGAPATH_TILING)
    official = official_tile_coords(int(width * mpp / 0.5), int(height * mpp / 0.5))
    assert len(grid) == len(official) == 12  # 4 x 3 tiles of 256 px at 0.5 µm/px, same row-major order
    coords = gigapath_coords(grid.x, grid.y, mpp)
    np.testing.assert_array_equal(coords, official)  # the very integers the official tiler writes
    np.testing.assert_array_equal(official_positions(coords), official_positions(official))


def test_naive_conversions_put_tiles_in_the_wrong_cells():
    """What the contract protects against: the raw level-0 coordinates (the official
    tile_one_slide writes those, issue #65) double the cell index of a 0.25 µm/px slide, and
    the unrounded ``x * mpp / 0.5`` lands just below a cell boundary on a 0.2631 µm/px one."""
    step = 256 * 0.5 / 0.2631
    x = np.round(np.arange(6) * step)
    assert np.floor(x * 0.2631 / 0.5 / 256).tolist() != list(range(6))
    assert (gigapath_coords(x, x, 0.2631)[:, 0] // 256).tolist() == list(range(6))
    x25 = np.arange(6) * 512.0
    assert (x25 // 256).tolist() == [0, 2, 4, 6, 8, 10]
    assert (gigapath_coords(x25, x25, 0.25)[:, 0] // 256).tolist() == list(range(6))


@pytest.mark.parametrize("mpp", [0.2631, 0.3, 0.5, 0.9, 1.0])
def test_every_grid_tile_lands_in_its_own_cell(tmp_path, mpp):
    """Tissue-filtered grids, slides finer and coarser than 0.5 µm/px: tile (i, j) of pathray's
    256-px grid at 0.5 µm/px is in cell (i, j) of the encoder's position table."""
    width = height = int(np.ceil(256 * 9 * 0.5 / mpp))
    rects = ((width // 5, height // 4, width // 2, height // 2),)
    path = write_synthetic_svs(tmp_path / "s.svs", (width, height), mpp=mpp, tissue_rects=rects, downsamples=(1, 2))
    with open_slide(str(path)) as slide:
        grid = plan_tiles(slide, "s", TilingConfig(tile_px=256, target_mpp=0.5, min_tissue_fraction=0.25))
    step = 256 * 0.5 / mpp
    columns = np.round(np.arange(grid.grid_shape[0]) * step).astype(np.int64)
    rows = np.round(np.arange(grid.grid_shape[1]) * step).astype(np.int64)
    i, j = np.searchsorted(columns, grid.x), np.searchsorted(rows, grid.y)
    assert 0 < len(grid) < grid.grid_shape[0] * grid.grid_shape[1]
    assert (columns[i] == grid.x).all() and (rows[j] == grid.y).all()
    cells = gigapath_coords(grid.x, grid.y, mpp) // 256
    np.testing.assert_array_equal(cells, np.stack([i, j], 1))
