"""Slide-level aggregation of tile embeddings read back from the store.

Works one features file (= one slide) at a time, so memory is bounded by the largest
slide, not the cohort.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads

POOLINGS = {
    "mean": lambda e: e.mean(axis=0),
    "max": lambda e: e.max(axis=0),
}


def slide_embeddings(dataset: pads.Dataset, pooling: str = "mean", min_tissue_fraction: float = 0.0) -> pa.Table:
    """One row per slide of ``dataset`` (e.g. ``FeatureStore(root).dataset(model)``):
    ``slide_id``, ``cohort``, ``n_tiles`` and ``embedding`` (float32, pooled over the
    slide's tiles with ``tissue_fraction >= min_tissue_fraction``). Pooling: mean | max."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {sorted(POOLINGS)}, got {pooling!r}")
    rows = []
    for fragment in dataset.get_fragments():
        table = fragment.to_table(columns=["slide_id", "embedding", "tissue_fraction"], schema=dataset.schema)
        keep = table.column("tissue_fraction").to_numpy() >= min_tissue_fraction
        if not keep.any():
            continue
        emb = table.column("embedding").combine_chunks()
        flat = emb.values.to_numpy().reshape(len(table), emb.type.list_size).astype(np.float32)[keep]
        keys = pads.get_partition_keys(fragment.partition_expression)
        rows.append({"slide_id": table.column("slide_id")[0].as_py(), "cohort": keys.get("cohort"),
                     "n_tiles": int(keep.sum()), "embedding": POOLINGS[pooling](flat)})
    dim = len(rows[0]["embedding"]) if rows else 0
    schema = pa.schema([("slide_id", pa.string()), ("cohort", pa.string()), ("n_tiles", pa.int64()),
                        ("embedding", pa.list_(pa.float32(), dim))])
    return pa.Table.from_pylist(rows, schema=schema)
