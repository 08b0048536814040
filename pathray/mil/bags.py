"""Bags of tile embeddings streamed from the store, one slide (one Parquet file) at a time.

:func:`index_bags` reads no embeddings: per committed slide it keeps the file's fragment,
its row count (Parquet footer) and the first row of the manifest columns the job kept
(e.g. ``case_id``), which are constant within a slide. :func:`load_bag` then reads one
slide's ``embedding`` column when asked, so memory is bounded by the largest slide.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads

from pathray.store import TILE_COLUMNS, FeatureStore, StoreConfig, embedding_matrix


@dataclass(frozen=True)
class BagIndex:
    """Committed slides of one model. ``slides``: slide_id, cohort, n_tiles and every kept
    manifest column (one row per slide, sorted by slide_id); ``config``: the store's config,
    read once when indexing."""

    store: FeatureStore
    config: StoreConfig | None
    model: str
    in_dim: int
    slides: pa.Table
    fragments: dict[str, pads.FileFragment]

    def column(self, name: str) -> dict[str, Any]:
        """Per-slide value of a ``slides`` column: slide_id -> value."""
        return dict(zip(self.slides.column("slide_id").to_pylist(), self.slides.column(name).to_pylist()))

    def fingerprint(self) -> str:
        """sha256 (16 hex) of the store's tiling and model fingerprints and every slide's
        (slide_id, n_tiles): changes when the features a model would see change."""
        payload = {
            "tiling": self.config.tiling_of(self.model).get("fingerprint") if self.config else None,
            "model": self.config.model_fingerprint(self.model) if self.config else None,
            "slides": list(zip(self.slides.column("slide_id").to_pylist(), self.slides.column("n_tiles").to_pylist())),
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def index_bags(store: FeatureStore | str, model: str) -> BagIndex:
    """Index the committed slides of ``model`` in ``store`` (a store or its root URI)."""
    store = FeatureStore(store) if isinstance(store, str) else store
    dataset = store.dataset(model)
    emb_type = dataset.schema.field("embedding").type if "embedding" in dataset.schema.names else None
    if emb_type is None or not dataset.files:
        raise ValueError(f"no committed slides of model {model!r} in {store.root}")
    kept = [n for n in dataset.schema.names if n not in TILE_COLUMNS and n not in ("model", "cohort")]
    rows, fragments = [], {}
    for fragment in dataset.get_fragments():
        slide_id = os.path.basename(fragment.path)[: -len(".parquet")]
        present = [n for n in kept if n in fragment.physical_schema.names]
        first = fragment.head(1, columns=present).to_pylist() if present else [{}]
        cohort = pads.get_partition_keys(fragment.partition_expression).get("cohort")
        rows.append({"slide_id": slide_id, "cohort": cohort, "n_tiles": fragment.count_rows(), **first[0]})
        fragments[slide_id] = fragment
    schema = pa.schema(
        [
            ("slide_id", pa.string()),
            ("cohort", pa.string()),
            ("n_tiles", pa.int64()),
            *(dataset.schema.field(n) for n in kept),
        ]
    )
    slides = pa.Table.from_pylist(rows, schema=schema).sort_by("slide_id")
    return BagIndex(store, store.read_config(), model, emb_type.list_size, slides, fragments)


def load_tiles(index: BagIndex, slide_id: str, columns: list[str]) -> pa.Table:
    """``columns`` of one slide's tiles, in tile_index order."""
    return index.fragments[slide_id].to_table(columns=columns)


def load_bag(index: BagIndex, slide_id: str) -> np.ndarray:
    """One slide's embeddings as float32 ``(n_tiles, in_dim)``."""
    return embedding_matrix(load_tiles(index, slide_id, ["embedding"]))


def check_finite(index: BagIndex, slide_ids: list[str]) -> None:
    """Raise ``ValueError`` naming every slide of ``slide_ids`` whose bag holds a NaN or
    infinite embedding (stores written before the job refused them); one read of each bag."""
    bad = [s for s in slide_ids if not np.isfinite(load_bag(index, s)).all()]
    if bad:
        raise ValueError(
            f"{len(bad)} slide(s) of model {index.model!r} have NaN/inf tile embeddings: "
            f"{', '.join(bad[:20])}{' ...' if len(bad) > 20 else ''}. Re-embed them (delete their "
            f"commit records under _commits/model={index.model}/ and re-run) or leave them out of the labels."
        )
