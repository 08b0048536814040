"""Store identity of a model's weights: their content, not their path."""

from __future__ import annotations

import shutil

import pytest

from pathray.errors import StoreConfigMismatchError
from pathray.job.config import build_job_config, model_record, tiling_record
from pathray.store import FeatureStore


def _records(weights) -> tuple[dict, dict]:
    config = build_job_config(
        {
            "manifest": "m.csv",
            "out": "o",
            "models": "kaiko-vits16",
            "encoders": {"kaiko-vits16": {"weights": str(weights)}},
        }
    )
    return tiling_record(config.tiling), {"kaiko-vits16": model_record("kaiko-vits16", config.encoders["kaiko-vits16"])}


def test_weights_moved_elsewhere_keep_their_identity_and_new_weights_at_the_old_path_do_not(tmp_path, random_weights):
    store = FeatureStore(str(tmp_path / "store"))
    original = tmp_path / "weights-a"
    shutil.copytree(random_weights("kaiko-vits16", depth=1, seed=1), original)
    store.ensure_config(*_records(original))
    moved = tmp_path / "elsewhere" / "weights"
    shutil.copytree(original, moved)
    store.ensure_config(*_records(moved))  # same bytes, another path: the same model config
    shutil.rmtree(original)
    shutil.copytree(random_weights("kaiko-vits16", depth=1, seed=2), original)  # other weights, same path
    with pytest.raises(StoreConfigMismatchError, match="weights: store has 'sha256:"):
        store.ensure_config(*_records(original))
