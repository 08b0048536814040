"""Synthetic pyramidal Aperio-style SVS slides with tissue in known rectangles.

The level-0 image is a pure function of ``(width, height, tissue_rects, seed)``
(:func:`synthetic_image`), so tests can compare what a reader returns with the exact
pixels that were written (up to JPEG loss). Background is white (255); tissue is an
H&E-like pink with a deterministic texture of 64-px blocks and smooth gradients, unique
enough that a coordinate shift of a few pixels is visible.

Files are written with tifffile: JPEG-compressed 256-px tiles, one TIFF page per
pyramid level (Aperio's layout, no SubIFDs), and an ``Aperio Image Library`` ImageDescription
on page 0 carrying ``MPP`` so OpenSlide reports ``openslide.mpp-x/y``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

Rect = tuple[int, int, int, int]  # (x, y, width, height) in level-0 pixels

TISSUE_RGB = np.array([205.0, 120.0, 170.0])


def synthetic_image(width: int, height: int, tissue_rects: Sequence[Rect], seed: int = 0) -> np.ndarray:
    """Level-0 RGB uint8 image ``(height, width, 3)``: white, with textured tissue in ``tissue_rects``."""
    rng = np.random.default_rng(seed)
    blocks = rng.uniform(0.75, 1.0, size=(height // 64 + 1, width // 64 + 1, 3))
    image = np.full((height, width, 3), 255, dtype=np.uint8)
    for x, y, w, h in tissue_rects:
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)
        xs = np.arange(x0, x1)
        for s0 in range(y0, y1, 256):  # strips keep memory bounded on large slides
            ys = np.arange(s0, min(s0 + 256, y1))
            texture = blocks[np.ix_(ys // 64, xs // 64)]
            wave = 0.9 + 0.1 * np.outer(np.cos(ys / 53.0), np.sin(xs / 37.0))[..., None]
            image[ys[0] : ys[-1] + 1, x0:x1] = np.clip(TISSUE_RGB * texture * wave, 0, 255).astype(np.uint8)
    return image


def write_synthetic_svs(
    path: str | Path,
    size: tuple[int, int] = (4096, 3072),
    mpp: float | None = 0.25,
    tissue_rects: Sequence[Rect] = ((512, 512, 1536, 1024),),
    seed: int = 0,
    downsamples: Sequence[int] = (1, 4, 16),
) -> Path:
    """Write a pyramidal Aperio-style SVS of :func:`synthetic_image` and return its path.

    ``size`` (width, height) and ``tissue_rects`` are in level-0 pixels; ``mpp`` in µm/px
    (``None`` writes a slide without any µm/px metadata). ``downsamples`` are the integer
    pyramid factors of the levels, the first being 1.
    """
    return write_svs(path, synthetic_image(*size, tissue_rects, seed), mpp, downsamples)


def write_svs(
    path: str | Path,
    level0: np.ndarray,
    mpp: float | None,
    downsamples: Sequence[int] = (1, 4, 16),
    tile: int = 256,
    quality: int = 95,
) -> Path:
    """Write RGB uint8 ``level0`` as a pyramidal Aperio-style SVS (JPEG tiles, one page per level)."""
    import tifffile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = level0.shape[:2]
    fields = [
        f"Aperio Image Library v12.0.15 \r\n{width}x{height} [0,0 {width}x{height}] ({tile}x{tile}) JPEG/RGB Q={quality}"
    ]
    fields.append("AppMag = 40")
    if mpp is not None:
        fields.append(f"MPP = {mpp:g}")
    description = "|".join(fields)
    with tifffile.TiffWriter(path) as tif:
        for i, factor in enumerate(downsamples):
            if factor == 1:
                data = level0
            else:
                size = (max(1, width // factor), max(1, height // factor))
                data = np.asarray(Image.fromarray(level0).resize(size, Image.Resampling.BOX))
            tif.write(
                data,
                tile=(tile, tile),
                compression="jpeg",
                compressionargs={"level": quality},
                photometric="rgb",
                description=description if i == 0 else None,
                metadata=None,
                subfiletype=0 if i == 0 else 1,
            )
    return path
