"""Which store a run writes: the one at ``out``, or a new version of it beside the old.

A store holds one tiling and one record per model (:meth:`FeatureStore.check_config`). A run
whose config differs is refused, or with ``new_version`` writes ``out/versions/<hash>``, named
by the fingerprints of what differs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pathray.errors import StoreConfigMismatchError
from pathray.job.config import JobConfig, fingerprint, model_tiling_records, tiling_record
from pathray.job.modelplan import ModelPlan
from pathray.store import FeatureStore


@dataclass(frozen=True)
class StoreRecords:
    """What a run declares in its store's config: the run's tiling record, each model's
    record, and the tiling records of the models cut at their own native tile (each record
    carries its ``fingerprint``)."""

    tiling: dict[str, Any]
    models: dict[str, dict[str, Any]]
    model_tilings: dict[str, dict[str, Any]]

    @classmethod
    def of(cls, config: JobConfig, models: Sequence[ModelPlan]) -> StoreRecords:
        """The records of a run of ``models`` under ``config``."""
        records = {m.name: m.record for m in models}
        return cls(tiling_record(config.tiling), records, model_tiling_records(config, list(records)))

    def tiling_of(self, model: str) -> dict[str, Any]:
        """The tiling record ``model``'s tiles are cut at."""
        return self.model_tilings.get(model, self.tiling)

    def version_name(self) -> str:
        """The fingerprint naming the store version of these records."""
        identity: dict[str, Any] = {
            "tiling": self.tiling["fingerprint"],
            "models": sorted(r["fingerprint"] for r in self.models.values()),
        }
        if self.model_tilings:  # runs with one tiling keep the version names they always had
            identity["model_tilings"] = {m: r["fingerprint"] for m, r in self.model_tilings.items()}
        return fingerprint(identity)


def choose_store(config: JobConfig, records: StoreRecords) -> FeatureStore:
    """The store this run writes: ``out``, or with ``new_version`` and a config mismatch,
    ``out/versions/<hash>``. Only reads; raises :class:`StoreConfigMismatchError` otherwise."""
    store = FeatureStore(config.out, config.storage_options)
    try:
        store.check_config(records.tiling, records.models, records.model_tilings)
        return store
    except StoreConfigMismatchError:
        if not config.new_version:
            raise
    store = FeatureStore(f"{config.out.rstrip('/')}/versions/{records.version_name()}", config.storage_options)
    store.check_config(records.tiling, records.models, records.model_tilings)
    return store
