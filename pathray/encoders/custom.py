"""Encoders supplied from Python instead of the registry (own backbones, tests, benchmarks)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class CustomEncoder:
    """An encoder supplied from Python instead of the registry (own backbones, tests,
    benchmarks). ``factory()`` runs once per actor and returns an object with
    ``__call__(uint8 NHWC) -> (N, D)``, ``embed_dim`` and ``provenance()``; ``record`` is the
    JSON-able identity stored in the store config (its fingerprint guards store versions)."""

    factory: Callable[[], Any]
    record: dict[str, Any]
    output_dtype: str = "float32"
