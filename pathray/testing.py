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

from pathray.encoders.custom import CustomEncoder


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
    """A :class:`~pathray.encoders.custom.CustomEncoder` building a :class:`SleepEncoder` per actor;
    its embeddings are ``output_dtype`` (the job stores a custom encoder's output as is)."""
    return CustomEncoder(
        factory=lambda: SleepEncoder(tiles_per_s, embed_dim, output_dtype),
        record={"model": "sleep", "embed_dim": embed_dim, "output_dtype": output_dtype},
        output_dtype=output_dtype,
    )


def stage_fake_slide(
    store, model: str, slide_id: str, n_tiles: int, chunk_tiles: int, embed_dim: int, seed: int = 0
) -> list[str]:
    """Stage ``n_tiles`` rows of random ``embed_dim``-d float32 embeddings for (slide_id, model)
    in chunks of ``chunk_tiles``, as the write stage would; returns the chunk ids, ready for
    :func:`pathray.store.finalize_slide` (commit tests and the commit benchmark)."""
    import pyarrow as pa

    from pathray.store import embeddings_to_arrow, feature_schema

    rng = np.random.default_rng(seed)
    schema, chunk_ids = feature_schema(embed_dim, pa.float32()), []
    for k, lo in enumerate(range(0, n_tiles, chunk_tiles)):
        index = np.arange(lo, min(lo + chunk_tiles, n_tiles), dtype=np.int64)
        n = len(index)
        columns = [
            pa.array([slide_id] * n),
            pa.array(index),
            pa.array(index * 448),
            pa.array(np.zeros(n, np.int64)),
            pa.array(np.full(n, 448.0)),
            pa.array(np.full(n, 0.5)),
            pa.array(np.full(n, 224, np.int32)),
            pa.array(np.ones(n, np.float32)),
            embeddings_to_arrow(rng.normal(size=(n, embed_dim)).astype(np.float32)),
        ]
        chunk_ids.append(f"{slide_id}.c{k:05d}")
        store.write_chunk(model, slide_id, chunk_ids[-1], pa.Table.from_arrays(columns, schema=schema))
    return chunk_ids
