import numpy as np
import pytest

from pathray.tiling.tissue import TissueConfig, detect_tissue, otsu_threshold, tissue_mask_from_rgb
from pathray.wsi.slide import open_slide

PINK = (205, 120, 170)


def _canvas(h=200, w=200, colour=(255, 255, 255)):
    return np.full((h, w, 3), colour, dtype=np.uint8)


def test_synthetic_mask_matches_known_rectangles(synthetic_svs_025):
    with open_slide(str(synthetic_svs_025)) as slide:
        tissue = detect_tissue(slide)
    assert tissue.mpp == pytest.approx(8.0) and tissue.level0_per_px == pytest.approx(32.0)
    truth = np.zeros_like(tissue.mask)
    for x, y, w, h in synthetic_svs_025.tissue_rects:
        truth[y // 32 : (y + h) // 32, x // 32 : (x + w) // 32] = True
    iou = (tissue.mask & truth).sum() / (tissue.mask | truth).sum()
    assert iou > 0.95


@pytest.mark.parametrize("colour", [(255, 255, 255), (0, 0, 0), (128, 128, 128), (240, 240, 235)])
def test_uniform_slides_have_no_tissue(colour):
    mask, _ = tissue_mask_from_rgb(_canvas(colour=colour), 8.0)
    assert not mask.any()


def test_noise_on_white_background_is_not_tissue():
    rng = np.random.default_rng(0)
    image = (255 - rng.integers(0, 12, size=(200, 200, 3))).astype(np.uint8)
    mask, _ = tissue_mask_from_rgb(image, 8.0)
    assert not mask.any()


def test_pen_marks_are_not_tissue_but_tissue_next_to_them_is():
    image = _canvas()
    image[20:40, 10:190] = (30, 160, 60)  # green marker
    image[60:75, 10:190] = (40, 60, 200)  # blue marker
    image[100:180, 100:180] = PINK
    mask, _ = tissue_mask_from_rgb(image, 8.0)
    assert not mask[:90].any()
    assert mask[110:170, 110:170].all()


def test_holes_filled_and_small_regions_dropped():
    image = _canvas()
    image[40:160, 40:160] = PINK
    image[90:110, 90:110] = 255  # a hole inside the tissue
    image[5:8, 5:8] = PINK  # 9 px * 64 µm² = 576 µm², below min_region_um2
    mask, _ = tissue_mask_from_rgb(image, 8.0)
    assert mask[90:110, 90:110].all()
    assert not mask[:20, :20].any()
    unfilled, _ = tissue_mask_from_rgb(image, 8.0, TissueConfig(fill_holes=False))
    assert not unfilled[95:105, 95:105].any()


def test_tile_fraction_is_exact_area_coverage(synthetic_svs_05):
    with open_slide(str(synthetic_svs_05)) as slide:
        tissue = detect_tissue(slide)
    tissue.mask[:] = False
    tissue.mask[:, :10] = True  # left 10 mask px = 160 level-0 px (16 per mask px at 8 µm/px)
    assert tissue.level0_per_px == pytest.approx(16.0)
    got = tissue.fraction(np.array([0, 80, 160, 120]), np.array([0, 0, 0, 40]), 80.0)
    assert got.tolist() == pytest.approx([1.0, 1.0, 0.0, 0.5])


def test_otsu_splits_two_modes():
    values = np.concatenate([np.full(100, 0.05), np.full(100, 0.45)])
    assert 0.05 < otsu_threshold(values) < 0.45
    assert otsu_threshold(np.full(10, 0.3)) == 1.0


def test_real_slide_has_plausible_tissue(cmu_slide, blank_svs):
    with open_slide(str(cmu_slide)) as slide:
        assert 0.15 < detect_tissue(slide).mask.mean() < 0.8
    with open_slide(str(blank_svs)) as slide:
        assert detect_tissue(slide).is_empty
