"""Stand-ins for benchmarks and tests of the pipeline itself (never for science).

:class:`SleepEncoder` mimics an accelerator of a given speed without needing one: it
sleeps ``N / tiles_per_s`` seconds per call, idle like a CPU thread waiting on a GPU, and
returns a cheap deterministic function of the pixels (per-channel means and spreads, tiled
to ``embed_dim``) so tests can check that each embedding belongs to its tile.

:func:`build_store` writes a feature store of stand-in slides through the store's public
chunk / commit API (real Parquet files, real commit records, a slide table), for tests of
what reads a store; :func:`stage_fake_slide` stages chunks only, for tests of the commit.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from pathray.encoders.custom import CustomEncoder

if TYPE_CHECKING:
    import pyarrow as pa

    from pathray.store import FeatureStore


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


@dataclass(frozen=True)
class TileLayout:
    """How a stand-in slide was tiled: ``tile_px`` px tiles at ``target_mpp`` µm/px, each
    ``size_level0_px`` level-0 px wide, laid row-major from the origin in rows of ``columns``
    tiles (``None``: all in one row). Tile ``i`` lies at ((i % columns) * size, (i // columns) * size)."""

    size_level0_px: float = 448.0
    target_mpp: float = 0.5
    tile_px: int = 224
    columns: int | None = None

    def positions(self, tile_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Level-0 px (x, y) of the tiles numbered ``tile_index`` (int64 arrays)."""
        index = np.asarray(tile_index, np.int64)
        column, row = (index, np.zeros_like(index)) if self.columns is None else np.divmod(index, self.columns)[::-1]
        return np.round(column * self.size_level0_px).astype(np.int64), np.round(row * self.size_level0_px).astype(
            np.int64
        )


@dataclass(frozen=True)
class FakeTiles:
    """Rows of one slide's features file: ``embeddings`` (n, embed_dim) of the tiles numbered
    ``tile_index`` (default 0..n-1), at ``xy_level0_px`` (default: the ``layout``'s positions)."""

    slide_id: str
    embeddings: np.ndarray
    tile_index: np.ndarray | None = None
    layout: TileLayout = TileLayout()
    xy_level0_px: tuple[np.ndarray, np.ndarray] | None = None
    tissue_fraction: np.ndarray | None = None  # default 1 for every tile

    def table(self) -> pa.Table:
        """The rows as a chunk table (schema :func:`pathray.store.feature_schema`, float32 embeddings)."""
        import pyarrow as pa

        from pathray.store import embeddings_to_arrow, feature_schema

        n, embed_dim = self.embeddings.shape
        index = np.arange(n, dtype=np.int64) if self.tile_index is None else np.asarray(self.tile_index, np.int64)
        x, y = self.xy_level0_px if self.xy_level0_px is not None else self.layout.positions(index)
        tissue = np.ones(n) if self.tissue_fraction is None else self.tissue_fraction
        columns = [
            pa.array([self.slide_id] * n),
            pa.array(index),
            pa.array(np.asarray(x, np.int64)),
            pa.array(np.asarray(y, np.int64)),
            pa.array(np.full(n, self.layout.size_level0_px, np.float64)),
            pa.array(np.full(n, self.layout.target_mpp, np.float64)),
            pa.array(np.full(n, self.layout.tile_px, np.int32)),
            pa.array(np.asarray(tissue, np.float32)),
            embeddings_to_arrow(np.asarray(self.embeddings, np.float32)),
        ]
        return pa.Table.from_arrays(columns, schema=feature_schema(embed_dim, pa.float32()))


def random_embeddings(n_tiles: int, embed_dim: int, seed: int = 0) -> np.ndarray:
    """(n_tiles, embed_dim) float32 N(0, 1) draws from ``numpy.random.default_rng(seed)``."""
    return np.random.default_rng(seed).normal(size=(n_tiles, embed_dim)).astype(np.float32)


@dataclass(frozen=True)
class FakeSlide:
    """One slide of a :func:`build_store` store. Its embeddings are ``embeddings`` when given,
    else ``n_tiles`` random N(0, 1) rows drawn with ``seed``; its tiles lie at ``xy_level0_px``
    or on the store's :class:`TileLayout` (``size_level0_px`` overrides the layout's tile size).
    ``path`` is the slide file named in the commit record (default ``/<slide_id>.svs``) and in
    the status row (default none); ``case_id``, when given, is kept as a ``case_id`` column;
    ``tissue_fraction`` defaults to 1 per tile; ``status`` holds further slide-status fields
    (``mpp``, ``vendor``, ``width``, ...)."""

    slide_id: str
    n_tiles: int = 0
    cohort: str = "C"
    seed: int = 0
    embeddings: np.ndarray | None = None
    case_id: str | None = None
    path: str | None = None
    xy_level0_px: tuple[np.ndarray, np.ndarray] | None = None
    size_level0_px: float | None = None
    tissue_fraction: np.ndarray | None = None
    status: dict[str, Any] = field(default_factory=dict)

    def tiles(self, embed_dim: int, layout: TileLayout) -> FakeTiles:
        """The slide's feature rows (``embed_dim`` wide unless ``embeddings`` were given)."""
        if self.embeddings is None:
            embeddings = random_embeddings(self.n_tiles, embed_dim, self.seed)
        else:
            embeddings = np.asarray(self.embeddings, np.float32)
        if self.size_level0_px is not None:
            layout = TileLayout(self.size_level0_px, layout.target_mpp, layout.tile_px, layout.columns)
        return FakeTiles(self.slide_id, embeddings, None, layout, self.xy_level0_px, self.tissue_fraction)


def open_fake_store(
    root: str,
    model: str,
    embed_dim: int,
    layout: TileLayout = TileLayout(),
    storage_options: dict[str, Any] | None = None,
) -> FeatureStore:
    """The store at ``root`` with a config (created, or ``model`` added to it) that says
    ``model`` is ``embed_dim`` wide and tiled as ``layout`` (fingerprints ``tiling-1``,
    ``<model>-1``), as a run's start leaves it."""
    from pathray.store import FeatureStore

    store = FeatureStore(root, storage_options)
    store.ensure_config(
        {"tile_px": layout.tile_px, "target_mpp": layout.target_mpp, "fingerprint": "tiling-1"},
        {model: {"name": model, "embed_dim": embed_dim, "fingerprint": f"{model}-1"}},
    )
    return store


def commit_fake_slide(
    store: FeatureStore, model: str, slide: FakeSlide, embed_dim: int, layout: TileLayout = TileLayout()
) -> int:
    """Stage ``slide``'s rows as one chunk and commit them (run ``run1``) through
    :func:`pathray.store.finalize_slide`, as a run's committer would; returns its tile count."""
    import pyarrow as pa

    from pathray.store import CommitRequest, finalize_slide

    table = slide.tiles(embed_dim, layout).table()
    store.write_chunk(model, slide.slide_id, "c0", table)
    kept = {} if slide.case_id is None else {"case_id": slide.case_id}
    request = CommitRequest(
        model,
        slide.slide_id,
        slide.cohort,
        ("c0",),
        table.num_rows,
        {"path": slide.path or f"/{slide.slide_id}.svs"},
        {"model": model},
        "hash",
        "run1",
        kept,
        pa.schema([("case_id", pa.string())]) if kept else None,
    )
    finalize_slide(store, request)
    return table.num_rows


def build_store(
    root: str,
    model: str,
    slides: Sequence[FakeSlide],
    embed_dim: int = 8,
    layout: TileLayout = TileLayout(),
    storage_options: dict[str, Any] | None = None,
) -> FeatureStore:
    """Write ``slides`` for ``model`` into the store at ``root`` (created, or added to) as one
    run ``run1`` would leave it: the store config (``model`` as ``embed_dim`` wide, tiled as
    ``layout``), each slide committed (:func:`commit_fake_slide`), their ``ok`` status rows,
    and ``slides.parquet`` rebuilt for ``model``. Building a second model into the same root
    replaces run ``run1``'s status rows, so the slide table then lists that model's slides.
    Returns the store."""
    import pyarrow as pa

    from pathray.store import SLIDE_STATUS_SCHEMA, consolidate_slide_table, status_row

    store = open_fake_store(root, model, embed_dim, layout, storage_options)
    rows = []
    for slide in slides:
        n_tiles = commit_fake_slide(store, model, slide, embed_dim, layout)
        facts = {"path": slide.path, **slide.status}
        rows.append(
            status_row(slide_id=slide.slide_id, model=model, cohort=slide.cohort, status="ok", n_tiles=n_tiles, **facts)
        )
    store.write_table(store.run_status_relpath("run1", 1), pa.Table.from_pylist(rows, schema=SLIDE_STATUS_SCHEMA))
    consolidate_slide_table(store, {model: store.committed(model)})
    return store


def stage_fake_slide(store: FeatureStore, model: str, slide: FakeSlide, chunk_tiles: int, embed_dim: int) -> list[str]:
    """Stage ``slide.n_tiles`` rows of random ``embed_dim``-d float32 embeddings (drawn with
    ``slide.seed``) for (``slide.slide_id``, model) in chunks of ``chunk_tiles`` named
    ``<slide_id>.c00000``, ``.c00001``, ..., as the write stage would; returns the chunk ids, ready
    for :func:`pathray.store.finalize_slide` (commit tests and the commit benchmark)."""
    embeddings, chunk_ids = random_embeddings(slide.n_tiles, embed_dim, slide.seed), []
    for k, lo in enumerate(range(0, slide.n_tiles, chunk_tiles)):
        index = np.arange(lo, min(lo + chunk_tiles, slide.n_tiles), dtype=np.int64)
        chunk_ids.append(f"{slide.slide_id}.c{k:05d}")
        store.write_chunk(
            model, slide.slide_id, chunk_ids[-1], FakeTiles(slide.slide_id, embeddings[index], index).table()
        )
    return chunk_ids
