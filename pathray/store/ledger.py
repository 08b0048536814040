"""The status/error ledger of a run: one status row per (slide, model) decided, one error row
per failure, written to the store's ``_runs/<run_id>/`` and ``errors/run_id=<run_id>/``."""

from __future__ import annotations

import time

import pyarrow as pa

from pathray.store.feature_store import FeatureStore
from pathray.store.schema import ERROR_SCHEMA, SLIDE_STATUS_SCHEMA

FLUSH_ROWS = 1000


class StatusLedger:
    """Buffers a run's status and error rows; flushes them to the store in parts of at most
    :data:`FLUSH_ROWS` rows (so driver memory does not grow with the manifest)."""

    def __init__(self, store: FeatureStore, run_id: str):
        self.store, self.run_id = store, run_id
        self.status: list[dict] = []
        self.errors: list[dict] = []
        self.parts = 0

    def record(self, row: dict) -> None:
        """Keep ``row`` (a :func:`~pathray.store.status.status_row`); an error row also goes to the error ledger."""
        self.status.append(row)
        if row["status"] == "error":
            self.errors.append(
                {
                    "slide_id": row["slide_id"],
                    "model": row["model"],
                    "stage": row["stage"],
                    "error_type": row["error_type"],
                    "message": row["error_message"],
                    "time": time.time(),
                }
            )
        if len(self.status) >= FLUSH_ROWS:
            self.flush()

    def flush(self) -> None:
        if not self.status and not self.errors:
            return
        self.parts += 1
        if self.status:
            self.store.write_table(
                self.store.run_status_relpath(self.run_id, self.parts),
                pa.Table.from_pylist(self.status, schema=SLIDE_STATUS_SCHEMA),
            )
        if self.errors:
            self.store.write_table(
                self.store.errors_relpath(self.run_id, self.parts),
                pa.Table.from_pylist(self.errors, schema=ERROR_SCHEMA),
            )
        self.status, self.errors = [], []
