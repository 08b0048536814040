"""The zoo's specs, one module per model family; each module has ``SPECS: list[EncoderSpec]``.

:func:`all_specs` collects them: the seed models first, then the other families in module
name order. A name registered twice is an error.
"""

from __future__ import annotations

import importlib
import pkgutil

from ..spec import EncoderSpec


def all_specs() -> list[EncoderSpec]:
    names = ["seed"] + sorted(i.name for i in pkgutil.iter_modules(__path__) if i.name != "seed")
    specs: list[EncoderSpec] = []
    for name in names:
        specs.extend(importlib.import_module(f"{__name__}.{name}").SPECS)
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise ValueError(f"encoder {spec.name!r} registered twice")
        seen.add(spec.name)
    return specs
