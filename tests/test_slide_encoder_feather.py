"""FEATHER slide encoder (pathray.slide_level.encoders.feather) against the official code's frozen outputs.

``tests/data/feather_golden.npz`` was written by ``tests/reference/feather_golden.py``: the
official ``src/models/abmil.py`` of github.com/mahmoodlab/MIL-Lab (commit in the file),
``ABMILModel`` built from pathray's random ``config.json`` with its ``model.safetensors`` loaded
strictly (seed and weights sha256 in the file), ``forward_features`` of synthetic slides of 1,
5, 257 and 20,000 tiles, fp32 on CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures.slide_goldens import DATA, assert_store_check, golden_case
from safetensors.torch import load_file, save_file

from pathray.errors import WeightsMismatchError, WeightsUnavailableError
from pathray.slide_level.aggregators import SlideTiles, build_aggregator, get_aggregator
from pathray.slide_level.encoders import feather
from pathray.slide_level.encoders.release import state_sha256

GOLDEN = DATA / "feather_golden.npz"
TOL = 1e-5


@pytest.fixture(scope="module")
def golden():
    return np.load(GOLDEN)


@pytest.fixture(scope="module")
def weights_file(golden, tmp_path_factory) -> Path:
    path = feather.write_random_weights(tmp_path_factory.mktemp("feather"), seed=int(golden["weights_seed"]))
    assert state_sha256(load_file(str(path))) == str(golden["weights_sha256"])
    return path


@pytest.fixture(scope="module")
def encoder(weights_file):
    return feather.from_weights(weights_file.parent)


@pytest.mark.parametrize("tag", ["one", "few", "mid", "long"])
def test_matches_the_official_forward_features(golden, encoder, tag):
    tiles, official = golden_case(golden, tag, 768)
    got = encoder(tiles)
    assert got.shape == (512,) and got.dtype == np.float32
    assert np.abs(got - official).max() <= TOL


def test_aggregator_through_the_spec(weights_file, golden, encoder):
    spec = get_aggregator("feather")
    assert (spec.input_dim, spec.output_dim, spec.tile_models, spec.needs_weights) == (768, 512, ("conch-v1.5",), True)
    agg = build_aggregator(spec, str(weights_file))
    tiles = golden_case(golden, "few", 768)[0]
    got = agg(SlideTiles("s", tiles, np.zeros(5, np.int64), np.zeros(5, np.int64), 0.5))
    np.testing.assert_array_equal(got, encoder(tiles))
    assert agg.provenance()["architecture"] == "feather_abmil_base_conch_v15"


def test_release_layout_is_loaded_strictly(weights_file, tmp_path):
    state = load_file(str(weights_file))
    assert sorted(state) == sorted(
        f"model.{k}.{w}"
        for k in ("patch_embed.0", "global_attn.attention_a.0", "global_attn.attention_b.0", "global_attn.attention_c")
        for w in ("weight", "bias")
    )
    x = np.ones((3, 768), np.float32)
    # the PC-108 head is dropped, as the official loader does (keep_classifier=False)
    save_file(
        {**state, "model.classifier.weight": torch.zeros(108, 512), "model.classifier.bias": torch.zeros(108)},
        str(tmp_path / "model.safetensors"),
    )
    np.testing.assert_array_equal(feather.from_weights(tmp_path)(x), feather.from_weights(weights_file)(x))
    save_file({k[len("model.") :]: v for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(WeightsMismatchError, match="unexpected keys: global_attn.attention_a.0.bias"):
        feather.from_weights(tmp_path)  # not the HF layout
    save_file({**state, "model.patch_embed.0.weight": torch.zeros(512, 1536)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(WeightsMismatchError, match=r"patch_embed\.0\.weight: checkpoint \(512, 1536\)"):
        feather.from_weights(tmp_path)  # FEATHER on UNI2 features is another release
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"in_dim": 1024, "gate": True}))
    with pytest.raises(WeightsMismatchError, match="'in_dim': 1024"):
        feather.from_weights(tmp_path)


def test_missing_weights_name_the_hub_repo(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailableError, match="MahmoodLab/abmil.base.conch_v15.pc108-24k"):
        feather.from_weights(None)


def test_store_check_refuses_another_tile_model(tmp_path):
    assert_store_check(tmp_path / "store", "feather", "conch-v1.5")
