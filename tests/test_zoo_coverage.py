"""Every registered encoder has an exactness test against its official code.

Each reference module (``tests/test_encoder_reference.py`` for the seed models,
``tests/test_zoo_<family>.py`` for the others) declares ``COVERED_MODELS``: the models it
compares with their official code. Their union must be exactly the registry.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from pathray.encoders import list_models

TESTS = Path(__file__).parent


def _covered() -> dict[str, str]:
    covered: dict[str, str] = {}
    for path in [TESTS / "test_encoder_reference.py", *sorted(TESTS.glob("test_zoo_*.py"))]:
        if path.name == Path(__file__).name:
            continue
        spec = importlib.util.spec_from_file_location(f"_coverage_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for name in module.COVERED_MODELS:
            assert name not in covered, f"{name} covered by both {covered[name]} and {path.name}"
            covered[name] = path.name
    return covered


def test_every_registered_model_has_an_exactness_test():
    covered = _covered()
    missing = sorted(set(list_models()) - set(covered))
    stale = sorted(set(covered) - set(list_models()))
    assert not missing, f"registered models without an exactness test: {missing}"
    assert not stale, f"exactness tests for unregistered models: {stale}"
