"""Shared parts of the zoo-vit golden scripts (``tests/reference/*_golden.py``; never collected by
pytest): export an official repository from its bare git mirror, read the real H&E tiles, hash
weights and write the golden ``.npz``.

Run them with ``ATEN_CPU_CAPABILITY=avx2`` (as tests/conftest.py runs the tests): the random
weights come from ``torch.randn``, whose bits depend on the CPU kernels ATen picks.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import numpy as np
import torch

#: level-0 origins of tissue-rich regions of CMU-1-Small-Region (0.499 µm/px), read at each side:
#: 224 px (no resampling for 224-px cards) and 256 px (resized by the card's transform)
TILE_ORIGINS = ((1152, 896), (1024, 1792))
TILE_SIDES = (224, 256)
DATA = Path(__file__).resolve().parents[1] / "data"
TILE_SOURCE = "CMU-1-Small-Region.svs level 0 read_region((x, y), 0, (side, side)), RGB"


def export_mirror(mirror: Path, paths: list[str], dest: Path) -> str:
    """``git archive`` ``paths`` of the bare mirror's HEAD into ``dest``; returns the commit."""
    commit = subprocess.run(
        ["git", "--git-dir", str(mirror), "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()
    archive = subprocess.run(
        ["git", "--git-dir", str(mirror), "archive", "HEAD", *paths], check=True, capture_output=True
    ).stdout
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return commit


def read_tiles() -> tuple[list, np.ndarray]:
    """PIL tiles (every origin at every side) and their ``(x, y, side)`` rows."""
    import openslide

    from pathray.demo.cmu import fetch_cmu_small_region

    images, rows = [], []
    with openslide.OpenSlide(str(fetch_cmu_small_region())) as slide:
        for side in TILE_SIDES:
            for x, y in TILE_ORIGINS:
                images.append(slide.read_region((x, y), 0, (side, side)).convert("RGB"))
                rows.append((x, y, side))
    return images, np.array(rows, dtype=np.int64)


def weights_sha256(state_dict: dict) -> str:
    """sha256 of a state dict's contents (sorted names, dtypes, shapes, bytes): the identity of the
    weights, independent of the file format's header layout."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_golden(name: str, images: list, rows: np.ndarray, **arrays) -> Path:
    """Write ``tests/data/<name>_golden.npz`` with the tile rows, their pixels' sha256 and ``arrays``."""
    out = DATA / f"{name}_golden.npz"
    pixels = hashlib.sha256(b"".join(np.asarray(im).tobytes() for im in images)).hexdigest()
    np.savez_compressed(out, tiles=rows, tile_source=TILE_SOURCE, tile_pixels_sha256=pixels, **arrays)
    return out
