"""A slide too large for a slide encoder's memory is a per-slide error, decided before any work.

Each attention-pooling encoder (CHIEF, MADELEINE, FEATHER, PRISM) states a linear memory model;
with the free memory pinned (``PATHRAY_SLIDE_ENCODER_MEMORY_BYTES``) a slide over the limit is
refused with ``slide_too_large_for_encoder`` naming its tiles and the limit, and the same
aggregator then embeds a slide that fits (the actor is not lost).
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest

from pathray.errors import SlideTooLargeForEncoderError, describe
from pathray.slide_level.aggregators import SlideTiles, build_aggregator, get_aggregator

ENCODERS = {"chief": 768, "madeleine": 512, "feather": 768, "prism": 2560}


def _tiles(n: int, dim: int) -> SlideTiles:
    rng = np.random.default_rng(n)
    return SlideTiles(
        "s",
        rng.normal(size=(n, dim)).astype(np.float32),
        np.arange(n, dtype=np.int64) * 512,
        np.zeros(n, np.int64),
        0.5,
    )


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "prism" else n for n in ENCODERS])
def test_a_slide_over_the_memory_limit_is_refused_and_the_next_one_runs(name, tmp_path, monkeypatch):
    module = importlib.import_module(f"pathray.slide_level.encoders.{name}")
    weights = module.write_random_weights(tmp_path / name)
    aggregator = build_aggregator(get_aggregator(name), str(weights), "cpu")
    limit = 50
    monkeypatch.setenv("PATHRAY_SLIDE_ENCODER_MEMORY_BYTES", str(module.FIXED_BYTES + limit * module.BYTES_PER_TILE))
    with pytest.raises(SlideTooLargeForEncoderError) as info:
        aggregator(_tiles(limit + 1, ENCODERS[name]))
    error_type, message = describe(info.value)
    assert error_type == "slide_too_large_for_encoder" and "51 tiles" in message and "limit of 50 tiles" in message
    out = aggregator(_tiles(limit, ENCODERS[name]))
    assert out.ndim == 1 and np.isfinite(out).all()
