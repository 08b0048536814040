import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pathray.demo.synthetic import synthetic_image
from pathray.tiling.grid import TILE_SCHEMA, TilingConfig, plan_tiles, read_geometry, read_tiles, resize_tile
from pathray.wsi.slide import open_slide


def _reference(slide, grid, i):
    """Direct OpenSlide read_region + the documented resize, at the tile's own coordinates."""
    ds = slide.level_downsamples[grid.level]
    x, y = round(round(grid.x[i] / ds) * ds), round(round(grid.y[i] / ds) * ds)
    return resize_tile(slide.read_region_openslide(x, y, grid.level, grid.read_px, grid.read_px), grid.tile_px)


def test_025_slide_at_05_reads_level0_and_halves(synthetic_svs_025):
    config = TilingConfig(tile_px=224, target_mpp=0.5)
    with open_slide(str(synthetic_svs_025)) as slide:
        grid = plan_tiles(slide, "s", config)
        assert (grid.level, grid.read_px, grid.size_level0, grid.grid_shape) == (0, 448, 448.0, (9, 6))
        assert set(zip(grid.x.tolist(), grid.y.tolist())) == synthetic_svs_025.expected_tiles(0.5, 224)
        assert len(grid) == 10 and grid.tile_index.tolist() == list(range(10))
        assert (grid.tissue_fraction > 0.9).all()
        tiles = read_tiles(slide, config, grid.x, grid.y)
        assert tiles.shape == (10, 224, 224, 3) and tiles.dtype == np.uint8
        truth = synthetic_image(synthetic_svs_025.width, synthetic_svs_025.height, synthetic_svs_025.tissue_rects)
        for i in range(len(grid)):
            assert np.array_equal(tiles[i], _reference(slide, grid, i))
            x, y = grid.x[i], grid.y[i]
            expected = np.asarray(Image.fromarray(truth[y : y + 448, x : x + 448]).reduce(2))
            assert np.abs(tiles[i].astype(int) - expected).mean() < 2.0  # only JPEG loss


def test_05_slide_at_05_reads_without_resizing(synthetic_svs_05):
    config = TilingConfig(tile_px=224, target_mpp=0.5)
    with open_slide(str(synthetic_svs_05)) as slide:
        grid = plan_tiles(slide, "s", config)
        assert (grid.level, grid.read_px, grid.size_level0) == (0, 224, 224.0)
        assert set(zip(grid.x.tolist(), grid.y.tolist())) == synthetic_svs_05.expected_tiles(0.5, 224)
        tiles = read_tiles(slide, config, grid.x, grid.y)
        for i in range(len(grid)):
            assert np.array_equal(tiles[i], slide.read_region_openslide(int(grid.x[i]), int(grid.y[i]), 0, 224, 224))


@pytest.mark.parametrize(
    "tile_px, target_mpp, level, read_px",
    [
        (224, 1.0, 1, 224),  # level 1 (1.0 µm/px) read as is
        (224, 2.0, 1, 448),  # level 1, halved
        (64, 4.0, 2, 64),  # level 2 (4.0 µm/px)
        (224, 0.3, 0, 269),  # non-integer factor: area-average resize
        (224, 1.004, 1, 225),
        (224, 0.995, 1, 223),  # level 1 is 0.5 % coarser: within tolerance, enlarged 223 -> 224
        (224, 0.98, 0, 878),  # 2 % coarser: not within tolerance, level 0
    ],
)
def test_level_choice_and_pixels_at_several_resolutions(synthetic_svs_025, tile_px, target_mpp, level, read_px):
    config = TilingConfig(tile_px=tile_px, target_mpp=target_mpp, min_tissue_fraction=0.0)
    with open_slide(str(synthetic_svs_025)) as slide:
        assert read_geometry(slide, config) == (level, read_px)
        grid = plan_tiles(slide, "s", config)
        assert grid.size_level0 == pytest.approx(tile_px * target_mpp / 0.25)
        pick = np.linspace(0, len(grid) - 1, 4).astype(int)
        tiles = read_tiles(slide, config, grid.x[pick], grid.y[pick])
        for out, i in zip(tiles, pick):
            assert np.array_equal(out, _reference(slide, grid, i))


def test_kept_tiles_are_those_with_enough_tissue(synthetic_svs_025):
    config = TilingConfig(tile_px=224, target_mpp=1.0, min_tissue_fraction=0.25)
    with open_slide(str(synthetic_svs_025)) as slide:
        kept = plan_tiles(slide, "s", config)
        every = plan_tiles(slide, "s", TilingConfig(tile_px=224, target_mpp=1.0, min_tissue_fraction=0.0))
    assert len(every) == 4 * 3
    assert synthetic_svs_025.expected_tiles(1.0, 224) <= set(zip(kept.x.tolist(), kept.y.tolist()))
    assert (kept.tissue_fraction >= 0.25).all()
    dropped = ~np.isin(every.x * 10**6 + every.y, kept.x * 10**6 + kept.y)
    assert (every.tissue_fraction[dropped] < 0.25).all()


def test_stride_gives_overlapping_grid(synthetic_svs_05):
    config = TilingConfig(tile_px=224, target_mpp=0.5, stride_px=112, min_tissue_fraction=0.0)
    with open_slide(str(synthetic_svs_05)) as slide:
        grid = plan_tiles(slide, "s", config)
    assert grid.grid_shape == ((2048 - 224) // 112 + 1, (1536 - 224) // 112 + 1)
    assert sorted(set(grid.x.tolist()))[:3] == [0, 112, 224]


def test_tiles_do_not_depend_on_chunking_or_reader(synthetic_svs_025):
    config = TilingConfig(tile_px=224, target_mpp=0.5, min_tissue_fraction=0.0)
    with open_slide(str(synthetic_svs_025)) as slide:
        grid = plan_tiles(slide, "s", config)
        full = read_tiles(slide, config, grid.x, grid.y)
        order = np.random.default_rng(0).permutation(len(grid))[:7]
        assert np.array_equal(read_tiles(slide, config, grid.x[order], grid.y[order]), full[order])
        slide.backend._levels = [None] * slide.level_count  # force the OpenSlide fallback for every read
        assert not slide.has_direct_reads(0)
        assert np.array_equal(read_tiles(slide, config, grid.x, grid.y), full)


def test_real_slide_tiles(cmu_slide):
    config = TilingConfig(tile_px=224, target_mpp=0.5)
    with open_slide(str(cmu_slide)) as slide:
        grid = plan_tiles(slide, "cmu", config)
        assert (grid.level, grid.read_px) == (0, 224)
        assert grid.size_level0 == pytest.approx(224 * 0.5 / 0.499)
        assert 20 < len(grid) < grid.grid_shape[0] * grid.grid_shape[1]
        tiles = read_tiles(slide, config, grid.x[:5], grid.y[:5])
        for i in range(5):
            assert np.abs(tiles[i].astype(int) - _reference(slide, grid, i)).max() <= 1


def test_blank_slide_gives_empty_grid(blank_svs):
    config = TilingConfig()
    with open_slide(str(blank_svs)) as slide:
        grid = plan_tiles(slide, "blank", config)
        assert grid.no_tissue and grid.tissue.is_empty
        assert read_tiles(slide, config, grid.x, grid.y).shape == (0, 224, 224, 3)
    assert grid.to_table().schema == TILE_SCHEMA and grid.to_table().num_rows == 0


def test_table_schema_and_units(synthetic_svs_05):
    with open_slide(str(synthetic_svs_05)) as slide:
        table = plan_tiles(slide, "s05", TilingConfig()).to_table()
    assert table.schema == TILE_SCHEMA
    row = table.to_pylist()[0]
    assert row == {
        "slide_id": "s05",
        "tile_index": 0,
        "x": 224,
        "y": 224,
        "size_level0": 224.0,
        "target_mpp": 0.5,
        "tile_px": 224,
        "tissue_fraction": pytest.approx(row["tissue_fraction"]),
    }


def test_fingerprint_is_stable_and_sensitive():
    a = TilingConfig()
    assert a.fingerprint() == TilingConfig().fingerprint()
    assert a.fingerprint() != TilingConfig(target_mpp=0.25).fingerprint()
    assert a.fingerprint() != TilingConfig(stride_px=112).fingerprint()
    code = "from pathray.tiling.grid import TilingConfig; print(TilingConfig().fingerprint())"
    other = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONHASHSEED": "123"}, check=True
    )
    assert other.stdout.strip() == a.fingerprint()
    with pytest.raises(ValueError):
        TilingConfig(min_tissue_fraction=1.5)
