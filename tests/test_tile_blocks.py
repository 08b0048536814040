"""Tile production's fast path: blocks of decoded stored tiles and the exact 2x reduce.

The pixels must be those of the per-window reads and of PIL's ``reduce(2)`` bit for bit;
only how often a stored JPEG tile is fetched and decoded may change.
"""

import numpy as np
import pytest
import tifffile
from PIL import Image

from pathray.tiling.grid import TilingConfig, plan_tiles, read_tiles, resize_tile
from pathray.wsi.slide import open_slide
from pathray.wsi.tifftiles import DECODE_OFFSET, BlockLoader, TiledLevel


def _pil_halve(region: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(np.ascontiguousarray(region)).reduce(2))


@pytest.mark.parametrize("into", [False, True], ids=["block", "into"])
def test_block_loader_decodes_each_stored_tile_once_and_matches_window_reads(cmu_slide, into):
    with open_slide(str(cmu_slide)) as slide:
        tiled = slide.backend._levels[0]  # 240-px JPEG tiles; 224-px windows straddle them
        fetched: list[tuple[int, int]] = []

        def fetch(ranges):
            fetched.extend(ranges)
            return slide.backend._pread(ranges)

        groups = [
            [(0, 0, 224, 224), (224, 0, 224, 224)],
            [(224, 224, 224, 224), (100, 300, 224, 224)],  # shares stored tiles with group 0
            [(2100, 2800, 224, 224)],
        ]  # sticks out of the 2220 x 2967 level: white there
        loader = BlockLoader(tiled, groups, fetch)
        for k, group in enumerate(groups):
            if into:
                got = [np.zeros((h, w, 3), np.uint8) for _, _, w, h in group]
                loader.load_into(k, got)
            else:
                block = loader.load(k)
                got = [block.window(*window) for window in group]
            for (lx, ly, w, h), pixels in zip(group, got):
                assert np.array_equal(pixels, slide.read_region(lx, ly, 0, w, h))
        touched = {i for g in groups for win in g for i in tiled.tile_indices(*win)}
        assert sorted(fetched) == sorted((int(tiled.offsets[i]), int(tiled.counts[i])) for i in touched)
        assert loader.decoded == {}  # every decoded tile released after its last group


def test_halving_is_bit_identical_to_pil_reduce(cmu_slide):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (1001, 1001, 3), dtype=np.uint8)
    image[:40], image[40:80] = 255, 0
    for x, y, n in [(0, 0, 448), (1, 3, 448), (7, 2, 128), (5, 5, 2)]:  # views at odd offsets too
        view = image[y : y + n, x : x + n]
        assert np.array_equal(resize_tile(view, n // 2), _pil_halve(view))
    with open_slide(str(cmu_slide)) as slide:
        region = slide.read_region(600, 900, 0, 448, 448)
    assert np.array_equal(resize_tile(region, 224), _pil_halve(region))


@pytest.mark.parametrize("mpp, odd", [(None, False), (0.2501, True)], ids=["even-halved-per-stored-tile", "odd-block"])
def test_read_tiles_equal_openslide_reads_halved_by_pil(synthetic_svs_025, mpp, odd):
    """Overlapping tiles (blocks share stored tiles). At 0.25 µm/px every position is even and
    stored tiles are halved one by one; at µm/px 0.2501 some are odd and blocks stay full size."""
    config = TilingConfig(tile_px=224, target_mpp=0.5, stride_px=150, min_tissue_fraction=0.5)
    with open_slide(str(synthetic_svs_025), mpp_override=mpp) as slide:
        grid = plan_tiles(slide, "s", config)
        assert grid.read_px == 448 and (grid.x % 2 == 1).any() == odd and len(grid) > 20
        tiles = read_tiles(slide, config, grid.x, grid.y)
        for i in range(len(grid)):
            region = slide.read_region_openslide(int(grid.x[i]), int(grid.y[i]), 0, 448, 448)
            assert np.array_equal(tiles[i], _pil_halve(region))


def test_halved_blocks_equal_full_blocks_halved(cmu_slide):
    with open_slide(str(cmu_slide)) as slide:
        tiled = slide.backend._levels[0]
        groups = [[(0, 0, 448, 448), (240, 478, 448, 448)], [(1, 0, 448, 448)], [(1800, 2600, 448, 448)]]
        loader = BlockLoader(tiled, groups, slide.backend._pread)
        assert [loader.halvable(k) for k in range(3)] == [True, False, False]  # odd x; outside the level
        block = loader.load(0, halve=_pil_halve)  # stored tiles cut at 240-px edges: pieces as thin as 2 px
        assert block.scale == 2
        for lx, ly, w, h in groups[0]:
            assert np.array_equal(block.window(lx, ly, w, h), _pil_halve(slide.read_region(lx, ly, 0, w, h)))


@pytest.mark.parametrize("fixture", ["synthetic_svs_025", "cmu_slide"])  # YCbCr JFIF tiles; Aperio RGB-coded tiles
def test_tiles_decode_as_tifffile_decodes_them(request, fixture):
    with tifffile.TiffFile(str(request.getfixturevalue(fixture))) as tif:
        page, fh = tif.pages[0], tif.filehandle
        level = TiledLevel.from_page(page)
        for index in range(0, len(page.dataoffsets), 7):
            fh.seek(page.dataoffsets[index])
            data = fh.read(page.databytecounts[index])
            expected = page.decode(data, index, jpegtables=page.jpegtables)[0].reshape(
                level.tile_height, level.tile_width, 3
            )
            tile = level.decode_tile(data, index)
            assert np.array_equal(tile, expected) and tile.ctypes.data % 32 == DECODE_OFFSET
