"""The columns of the store's tables: features files, the slide status table, the error ledger.

Units: ``x``/``y`` are level-0 pixels (top-left of the tile), ``size_level0`` is the tile's
side in level-0 pixels, ``target_mpp`` is µm per pixel of the encoded tile.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pathray.tiling.grid import TILE_SCHEMA

#: Parquet key-value metadata key holding the provenance JSON.
PROVENANCE_KEY = b"pathray.provenance"

#: The tile columns of a features file: the tiler's record schema, non-null.
TILE_FIELDS: tuple[pa.Field, ...] = tuple(f.with_nullable(False) for f in TILE_SCHEMA)
#: Columns of a features file that are per tile; every other column is a kept manifest column (one value per slide).
TILE_COLUMNS = frozenset(f.name for f in TILE_FIELDS) | {"embedding"}

SLIDE_STATUS_SCHEMA = pa.schema(
    [
        ("slide_id", pa.string()),
        ("model", pa.string()),
        ("path", pa.string()),
        ("cohort", pa.string()),
        ("status", pa.string()),  # ok | no_tissue | error
        ("stage", pa.string()),  # where it failed: plan | read | encode | write | finalize | config
        ("error_type", pa.string()),
        ("error_message", pa.string()),
        ("width", pa.int64()),  # level-0 px
        ("height", pa.int64()),
        ("mpp", pa.float64()),  # level-0 µm/px
        ("mpp_source", pa.string()),
        ("vendor", pa.string()),
        ("n_tiles", pa.int64()),
        ("run_id", pa.string()),
        ("updated_at", pa.float64()),  # unix seconds
    ]
)

ERROR_SCHEMA = pa.schema(
    [
        ("slide_id", pa.string()),
        ("model", pa.string()),
        ("stage", pa.string()),
        ("error_type", pa.string()),
        ("message", pa.string()),
        ("time", pa.float64()),
    ]
)


def feature_schema(embed_dim: int, embedding_type: pa.DataType, extra: pa.Schema | None = None) -> pa.Schema:
    """Schema of one features file: the tile fields, ``embedding`` as
    ``fixed_size_list<embedding_type>[embed_dim]``, then pass-through manifest columns."""
    fields = [*TILE_FIELDS, pa.field("embedding", pa.list_(embedding_type, embed_dim), nullable=False)]
    return pa.schema(fields + list(extra or []))


def embeddings_to_arrow(embeddings: np.ndarray) -> pa.FixedSizeListArray:
    """(N, D) float32/float16 array -> ``fixed_size_list<...>[D]`` without copying rows."""
    n, d = embeddings.shape
    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(embeddings).reshape(n * d)), d)


def embedding_matrix(table: pa.Table) -> np.ndarray:
    """The ``embedding`` column of ``table`` as a writable float32 ``(rows, dim)`` array (a copy
    when stored as float16; torch needs a writable one)."""
    column = table.column("embedding").combine_chunks()
    flat = column.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(len(column), column.type.list_size).astype(np.float32)
