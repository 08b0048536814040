"""The store config, ``_pathray_store.json``: the store's format, its tiling, and the config of
every model in it (with the tiling of each model cut at another tiling).

Read it once per run (:meth:`FeatureStore.read_config`, one GET) and pass the
:class:`StoreConfig` on; :func:`check_config` / :func:`ensure_config` check a run's records
against it and add new models.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from pathray import __version__
from pathray.errors import StoreConfigMismatchError
from pathray.store.layout import STORE_META, json_bytes

if TYPE_CHECKING:
    from pathray.store.feature_store import FeatureStore

STORE_FORMAT = 1


@dataclass(frozen=True)
class StoreConfig:
    """The parsed ``_pathray_store.json``. ``tiling`` and each record of ``models`` and
    ``model_tilings`` are JSON-able dicts whose ``fingerprint`` key identifies them; a model
    has one tiling in a store: its ``model_tilings`` entry, else ``tiling``."""

    format: int | None
    created_by: str | None
    tiling: dict[str, Any]
    models: dict[str, dict[str, Any]]
    model_tilings: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> StoreConfig:
        """Parse the file's JSON object."""
        return cls(
            format=raw.get("format"),
            created_by=raw.get("created_by"),
            tiling=raw.get("tiling") or {},
            models=raw.get("models") or {},
            model_tilings=raw.get("model_tilings") or {},
        )

    @classmethod
    def new(cls, tiling: dict[str, Any]) -> StoreConfig:
        """The config of a new store at ``tiling``, holding no model yet."""
        return cls(format=STORE_FORMAT, created_by=f"pathray {__version__}", tiling=tiling, models={})

    def to_json(self) -> dict[str, Any]:
        """The file's JSON object (``model_tilings`` only when there are any; the object whose
        fingerprint is a run's ``store_config_hash``)."""
        out = {"format": self.format, "created_by": self.created_by, "tiling": self.tiling, "models": self.models}
        return {**out, "model_tilings": self.model_tilings} if self.model_tilings else out

    def tiling_of(self, model: str) -> dict[str, Any]:
        """The tiling record ``model`` is embedded at: its ``model_tilings`` entry, else the
        store's ``tiling`` (stores written before per-model tilings have only the latter)."""
        return self.model_tilings.get(model) or self.tiling or {}

    def model_fingerprint(self, model: str) -> str | None:
        """The ``fingerprint`` of ``model``'s record (``None`` when it is not in the store)."""
        return self.models.get(model, {}).get("fingerprint")


def _identity(record: dict[str, Any]) -> str:
    """A config record's identity: its ``fingerprint``, else its whole content."""
    return str(record.get("fingerprint") or json.dumps(record, sort_keys=True, default=str))


def config_diff(stored: dict, requested: dict, prefix: str = "") -> str:
    """``field: stored -> requested`` for every field that differs (nested keys dotted),
    fingerprints left out."""
    diffs = []
    for key in sorted(set(stored) | set(requested)):
        if key == "fingerprint":
            continue
        old, new = stored.get(key), requested.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            inner = config_diff(old, new, f"{prefix}{key}.")
            diffs += [inner] if inner else []
        elif old != new:
            diffs.append(f"{prefix}{key}: store has {old!r}, this run asks for {new!r}")
    return "; ".join(diffs)


def read_config(store: FeatureStore) -> StoreConfig | None:
    """The store's config (one GET); ``None`` when the store has none yet."""
    raw = store.read_json(STORE_META)
    return StoreConfig.from_json(raw) if raw is not None else None


def check_config(
    store: FeatureStore,
    tiling: dict[str, Any],
    models: dict[str, dict[str, Any]],
    model_tilings: dict[str, dict[str, Any]] | None = None,
) -> tuple[StoreConfig, bool]:
    """The config a run with ``tiling`` and ``models`` would put in force, and whether it
    differs from the stored one; nothing is written (``--dry-run`` uses this).

    ``model_tilings`` holds the tiling of each model cut at a tiling other than ``tiling``
    (its native tile). A model already in the store with a different tiling or a different
    fingerprint raises :class:`StoreConfigMismatchError` naming the fields that differ; a new
    model is added, under ``model_tilings`` when its tiling is not the store's ``tiling``."""
    model_tilings = model_tilings or {}
    current = read_config(store)
    if current is not None and current.format != STORE_FORMAT:
        raise StoreConfigMismatchError(f"{store.root} has store format {current.format}, expected {STORE_FORMAT}")
    base = current or StoreConfig.new(tiling)
    merged = replace(base, models=dict(base.models), model_tilings=dict(base.model_tilings))
    for name, record in models.items():
        want = model_tilings.get(name, tiling)
        if name in merged.models:
            _check_model(store.root, merged, name, record, want)
            continue
        merged.models[name] = record
        if _identity(want) != _identity(merged.tiling):
            merged.model_tilings[name] = want
    return merged, current is None or merged != current


def _check_model(root: str, config: StoreConfig, name: str, record: dict[str, Any], tiling: dict[str, Any]) -> None:
    """Raise :class:`StoreConfigMismatchError` unless ``name`` is in ``config`` at ``tiling`` with ``record``."""
    have = config.tiling_of(name)
    if _identity(have) != _identity(tiling):
        raise StoreConfigMismatchError(
            f"{root} holds {name!r} at another tiling: {config_diff(have, tiling)}. Write to a new --out "
            f"root, or pass --new-version to store this configuration as a separate version under "
            f"{root}/versions/."
        )
    old = config.models[name]
    if _identity(old) != _identity(record):
        raise StoreConfigMismatchError(
            f"model {name!r} in {root} was written with another config: {config_diff(old, record)}. "
            "Use a new --out root, or --new-version."
        )


def ensure_config(
    store: FeatureStore,
    tiling: dict[str, Any],
    models: dict[str, dict[str, Any]],
    model_tilings: dict[str, dict[str, Any]] | None = None,
) -> StoreConfig:
    """Create the store config, or check a run's config against the existing one and add new
    models to it (raises as :func:`check_config`). Returns the config now in force."""
    config, changed = check_config(store, tiling, models, model_tilings)
    if changed:
        store.write_bytes(STORE_META, json_bytes(config.to_json()))
    return config
