"""Tissue detection on a low-resolution thumbnail, and per-tile tissue fractions.

Steps (all thresholds in :class:`TissueConfig`):

1. thumbnail of the whole slide at ``thumbnail_mpp`` µm/px (default 8);
2. a pixel is tissue candidate when its HSV saturation exceeds an Otsu threshold (never
   below ``min_saturation``), it is not background-white (all of R, G, B ≥
   ``white_level``), not near-black (V < ``dark_level``: blank/black scans, black ink) and,
   with ``exclude_pen``, it is not marker ink: green/cyan hue (90°–200°, far from H&E
   pink/purple) or saturated blue (200°–250° with saturation > 0.65; hematoxylin is duller);
3. morphological closing then opening with a disc of ``smoothing_um`` µm radius;
4. connected regions smaller than ``min_region_um2`` µm² are dropped; holes are filled.

An empty mask is a valid outcome ("no tissue"): all-white, all-black and blank slides
give one, without error.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

GREEN_INK_HUE = (90.0, 200.0)  # degrees
BLUE_INK_HUE = (200.0, 250.0)  # degrees, only above BLUE_INK_SATURATION
BLUE_INK_SATURATION = 0.65


@dataclass(frozen=True)
class TissueConfig:
    thumbnail_mpp: float = 8.0  # µm/px of the thumbnail the mask is computed on
    min_saturation: float = 0.07  # floor of the Otsu saturation threshold, in [0, 1]
    white_level: int = 220  # RGB >= this on all channels = background
    dark_level: float = 0.15  # HSV value below this (in [0, 1]) = black/blank, not tissue
    exclude_pen: bool = True
    smoothing_um: float = 16.0  # radius of the closing/opening disc, µm
    min_region_um2: float = 20_000.0  # smaller connected regions are dropped, µm²
    fill_holes: bool = True


@dataclass
class TissueMask:
    """Boolean mask over the whole slide. One mask pixel spans ``mpp`` µm, i.e.
    ``level0_per_px`` level-0 pixels; mask pixel (0, 0) starts at level-0 (0, 0)."""

    mask: np.ndarray  # bool (height, width)
    mpp: float
    level0_per_px: float
    thumbnail: np.ndarray  # RGB uint8, same shape as mask
    saturation_threshold: float

    @property
    def is_empty(self) -> bool:
        return not bool(self.mask.any())

    def fraction(self, x: np.ndarray, y: np.ndarray, size_level0: float) -> np.ndarray:
        """Tissue fraction in [0, 1] of square tiles at level-0 ``(x, y)`` of side ``size_level0``.

        Exact area coverage of the mask pixels (bilinear interpolation of the integral image).
        """
        integral = np.zeros((self.mask.shape[0] + 1, self.mask.shape[1] + 1), dtype=np.float64)
        integral[1:, 1:] = self.mask.cumsum(0).cumsum(1)
        s = 1.0 / self.level0_per_px
        x0, y0 = np.asarray(x, dtype=np.float64) * s, np.asarray(y, dtype=np.float64) * s
        x1, y1 = x0 + size_level0 * s, y0 + size_level0 * s
        area = (
            _sample(integral, x1, y1)
            - _sample(integral, x0, y1)
            - _sample(integral, x1, y0)
            + _sample(integral, x0, y0)
        )
        return np.clip(area / (size_level0 * s) ** 2, 0.0, 1.0).astype(np.float32)


def detect_tissue(slide, config: TissueConfig = TissueConfig()) -> TissueMask:
    """Compute the tissue mask of ``slide`` (a :class:`pathray.wsi.slide.Slide`)."""
    thumbnail, thumb_mpp = slide.thumbnail(config.thumbnail_mpp)
    mask, threshold = tissue_mask_from_rgb(thumbnail, thumb_mpp, config)
    level0_per_px = slide.dimensions[0] / thumbnail.shape[1]
    return TissueMask(mask, thumb_mpp, level0_per_px, thumbnail, threshold)


def tissue_mask_from_rgb(
    rgb: np.ndarray, mpp: float, config: TissueConfig = TissueConfig()
) -> tuple[np.ndarray, float]:
    """Tissue mask of an RGB uint8 image at ``mpp`` µm/px; returns ``(mask, saturation_threshold)``."""
    hsv = np.asarray(Image.fromarray(rgb).convert("HSV"), dtype=np.float32) / 255.0
    hue, sat, val = hsv[..., 0] * 360.0, hsv[..., 1], hsv[..., 2]
    threshold = max(otsu_threshold(sat), config.min_saturation)
    mask = (sat > threshold) & (val >= config.dark_level) & ~np.all(rgb >= config.white_level, axis=-1)
    if config.exclude_pen:
        green = (hue >= GREEN_INK_HUE[0]) & (hue < GREEN_INK_HUE[1])
        blue = (hue >= BLUE_INK_HUE[0]) & (hue <= BLUE_INK_HUE[1]) & (sat > BLUE_INK_SATURATION)
        mask &= ~(green | blue)
    radius = int(round(config.smoothing_um / mpp))
    if radius > 0 and mask.any():
        disc = _disc(radius)
        mask = ndimage.binary_closing(np.pad(mask, radius), disc)[radius:-radius, radius:-radius]
        mask = ndimage.binary_opening(mask, disc)
    if mask.any():
        labels, count = ndimage.label(mask)
        areas = np.bincount(labels.ravel(), minlength=count + 1) * mpp * mpp
        keep = areas >= config.min_region_um2
        keep[0] = False
        mask = keep[labels]
    if config.fill_holes and mask.any():
        mask = ndimage.binary_fill_holes(mask)
    return mask, float(threshold)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1]; 1.0 for a constant image (nothing above it)."""
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    hist = hist.astype(np.float64)
    total = hist.sum()
    if total == 0 or np.count_nonzero(hist) < 2:
        return 1.0
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = total - w0
    m0 = np.cumsum(hist * centers)
    mean0 = m0 / np.maximum(w0, 1)
    mean1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = (w0 * w1 * (mean0 - mean1) ** 2)[:-1]
    best = np.flatnonzero(between >= between.max() * (1 - 1e-9))  # a plateau: take its middle
    return float(edges[int(round(best.mean())) + 1])


def _disc(radius: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return xx * xx + yy * yy <= radius * radius


def _sample(integral: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Bilinear interpolation of ``integral`` (shape (H+1, W+1)) at fractional (x, y), clamped."""
    h, w = integral.shape[0] - 1, integral.shape[1] - 1
    x, y = np.clip(x, 0, w), np.clip(y, 0, h)
    xi, yi = np.minimum(np.floor(x).astype(np.int64), w - 1), np.minimum(np.floor(y).astype(np.int64), h - 1)
    fx, fy = x - xi, y - yi
    return (
        integral[yi, xi] * (1 - fx) * (1 - fy)
        + integral[yi, xi + 1] * fx * (1 - fy)
        + integral[yi + 1, xi] * (1 - fx) * fy
        + integral[yi + 1, xi + 1] * fx * fy
    )
