"""The models of one run, resolved once up front: registry names and Python-supplied encoders
alike become a :class:`ModelPlan` (how to build it in an actor, its store record, its output
dtype), so nothing downstream asks where a model came from."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from pathray.encoders import get_spec, load_encoder
from pathray.encoders.custom import CustomEncoder
from pathray.errors import UnknownModelError
from pathray.job.config import JobConfig, fingerprint, model_record


@dataclass(frozen=True)
class ModelPlan:
    """One model of a run."""

    name: str
    factory: Callable[[], Any]  # builds the encoder, once per actor
    record: dict[str, Any]  # JSON-able identity in the store config (``fingerprint`` key included)
    output_dtype: str  # float32 | float16, as stored


def plan_models(
    config: JobConfig, custom: dict[str, CustomEncoder] | None = None
) -> tuple[list[ModelPlan], list[tuple[str, str]]]:
    """``(plans, unknown)``: a plan per usable requested model (in request order) and
    ``(name, message)`` per name neither registered nor supplied in ``custom``."""
    custom = custom or {}
    plans, unknown = [], []
    for name in config.models:
        if name in custom:
            enc = custom[name]
            plans.append(
                ModelPlan(name, enc.factory, {**enc.record, "fingerprint": fingerprint(enc.record)}, enc.output_dtype)
            )
            continue
        try:
            get_spec(name)
        except UnknownModelError as exc:
            unknown.append((name, str(exc)))
            continue
        cfg = config.encoders[name]
        plans.append(ModelPlan(name, partial(load_encoder, cfg), model_record(name, cfg), cfg.output_dtype))
    return plans, unknown
