"""The feature store: tile embeddings as one Parquet file per (slide, model), committed by a
record written last, plus slide-level rows, a status table and an error ledger.

Modules: :mod:`~pathray.store.layout` (where each file lives, atomic writes, commit records),
:mod:`~pathray.store.schema` (columns), :mod:`~pathray.store.config` (``_pathray_store.json``),
:mod:`~pathray.store.feature_store` (:class:`FeatureStore`), :mod:`~pathray.store.commit` (the
commit protocol), :mod:`~pathray.store.read` (the read side), :mod:`~pathray.store.index` (the
commit index), :mod:`~pathray.store.status` (status rows, ``pathray status``),
:mod:`~pathray.store.ledger` (a run's status and error rows), :mod:`~pathray.store.lease` (one
driver per store).
"""

from pathray.store.commit import CommitRequest, commit_file, finalize_slide
from pathray.store.config import StoreConfig
from pathray.store.feature_store import FeatureStore
from pathray.store.layout import NO_COHORT, CommitRecord, SlideFeaturesRecord
from pathray.store.read import TileFeatures, read_slide
from pathray.store.schema import (
    ERROR_SCHEMA,
    PROVENANCE_KEY,
    SLIDE_STATUS_SCHEMA,
    TILE_COLUMNS,
    TILE_FIELDS,
    embedding_matrix,
    embeddings_to_arrow,
    feature_schema,
)
from pathray.store.status import consolidate_slide_table, status_row, status_row_from_commit

__all__ = [
    "ERROR_SCHEMA",
    "NO_COHORT",
    "PROVENANCE_KEY",
    "SLIDE_STATUS_SCHEMA",
    "TILE_COLUMNS",
    "TILE_FIELDS",
    "CommitRecord",
    "CommitRequest",
    "FeatureStore",
    "SlideFeaturesRecord",
    "StoreConfig",
    "TileFeatures",
    "commit_file",
    "consolidate_slide_table",
    "embedding_matrix",
    "embeddings_to_arrow",
    "feature_schema",
    "finalize_slide",
    "read_slide",
    "status_row",
    "status_row_from_commit",
]
