"""Stand-in encoders for benchmarks and tests of the pipeline itself (never for science).

:class:`SleepEncoder` mimics an accelerator of a given speed without needing one: it
sleeps ``N / tiles_per_s`` seconds per call, idle like a CPU thread waiting on a GPU, and
returns a cheap deterministic function of the pixels (per-channel means and spreads, tiled
to ``embed_dim``) so tests can check that each embedding belongs to its tile.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from pathray.pipeline import CustomEncoder


class SleepEncoder:
    def __init__(self, tiles_per_s: float, embed_dim: int = 8, dtype: str = "float32"):
        self.tiles_per_s = float(tiles_per_s)
        self.embed_dim = int(embed_dim)
        self.dtype = dtype

    def provenance(self) -> dict[str, Any]:
        return {"model": "sleep", "tiles_per_s": self.tiles_per_s, "embed_dim": self.embed_dim}

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        time.sleep(len(tiles) / self.tiles_per_s)
        return pixel_statistics(tiles, self.embed_dim).astype(self.dtype)


def pixel_statistics(tiles: np.ndarray, embed_dim: int) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, embed_dim) float32: channel means and stds over every 4th
    row and column (cheap, so the stand-in stays idle like a thread feeding a GPU), repeated."""
    flat = tiles[:, ::4, ::4].reshape(len(tiles), -1, 3).astype(np.float32)
    stats = np.concatenate([flat.mean(axis=1), flat.std(axis=1)], axis=1)
    reps = -(-embed_dim // stats.shape[1])
    return np.tile(stats, (1, reps))[:, :embed_dim].astype(np.float32)


def sleep_encoder(tiles_per_s: float, embed_dim: int = 8, output_dtype: str = "float32") -> CustomEncoder:
    """A :class:`~pathray.pipeline.CustomEncoder` building a :class:`SleepEncoder` per actor;
    its embeddings are ``output_dtype`` (the job stores a custom encoder's output as is)."""
    return CustomEncoder(
        factory=lambda: SleepEncoder(tiles_per_s, embed_dim, output_dtype),
        record={"model": "sleep", "embed_dim": embed_dim, "output_dtype": output_dtype},
        output_dtype=output_dtype,
    )
