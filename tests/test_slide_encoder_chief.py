"""CHIEF slide encoder (pathray.slide_level.encoders.chief) against the official code's frozen outputs.

``tests/data/chief_golden.npz`` was written by ``tests/reference/chief_golden.py``: the official
``models/CHIEF.py`` of github.com/hms-dbmi/CHIEF (commit in the file), built and loaded as
``Get_CHIEF_WSI_level_feature.py`` does, with pathray's random weights (seed and weights sha256
in the file) loaded strictly, ``WSI_feature`` of synthetic slides of 1, 5, 257 and 20,000 tiles.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures.slide_goldens import DATA, assert_store_check, assert_tiling_check, golden_case

from pathray.errors import WeightsCorruptError, WeightsMismatchError, WeightsUnavailableError
from pathray.slide_level.aggregators import SlideTiles, build_aggregator, get_aggregator
from pathray.slide_level.encoders import chief
from pathray.slide_level.encoders.release import random_net, state_sha256

GOLDEN = DATA / "chief_golden.npz"
TOL = 1e-5


@pytest.fixture(scope="module")
def golden():
    return np.load(GOLDEN)


@pytest.fixture(scope="module")
def weights_file(golden, tmp_path_factory) -> Path:
    path = chief.write_random_weights(tmp_path_factory.mktemp("chief"), seed=int(golden["weights_seed"]))
    assert state_sha256(torch.load(path, weights_only=True)) == str(golden["weights_sha256"])  # the golden's weights
    return path


@pytest.fixture(scope="module")
def encoder(weights_file):
    return chief.from_weights(weights_file)


@pytest.mark.parametrize("tag", ["one", "few", "mid", "long"])
def test_matches_the_official_wsi_feature(golden, encoder, tag):
    tiles, official = golden_case(golden, tag, 768)
    got = encoder(tiles)
    assert got.shape == (768,) and got.dtype == np.float32
    assert np.abs(got - official).max() <= TOL
    if len(tiles) > 1:  # attention pooling, not a plain mean
        assert np.abs(got - tiles.mean(0)).max() > 1e-3


def test_aggregator_through_the_spec(weights_file, golden):
    spec = get_aggregator("chief")
    assert (spec.input_dim, spec.output_dim, spec.tile_models, spec.needs_weights) == (768, 768, ("ctranspath",), True)
    agg = build_aggregator(spec, str(weights_file.parent))  # a directory holding CHIEF_pretraining.pth
    tiles = golden_case(golden, "few", 768)[0].astype(np.float16)
    got = agg(SlideTiles("s", tiles, np.zeros(5, np.int64), np.zeros(5, np.int64), 0.5))
    assert np.abs(got - chief.from_weights(weights_file)(tiles.astype(np.float32))).max() == 0
    prov = agg.provenance()
    assert prov["architecture"] == "chief_small_gated_abmil" and prov["weights_fingerprint"].startswith("sha256:")
    assert "WSI_feature" in prov["output"]


def test_release_layout_is_loaded_strictly(weights_file, tmp_path):
    state = torch.load(weights_file, weights_only=True)
    assert "organ_embedding" in state and "attention_net.3.attention_a.0.weight" in state
    for k, v in random_net(chief.ChiefNet, 11).state_dict().items():
        assert torch.equal(state[k], v), k
    torch.save({k: v for k, v in state.items() if k != "attention_net.3.attention_c.bias"}, tmp_path / "m.pth")
    with pytest.raises(WeightsMismatchError, match=r"missing keys: attention_net\.3\.attention_c\.bias"):
        chief.from_weights(tmp_path / "m.pth")
    torch.save({**state, "attention_net.0.weight": torch.zeros(512, 1024)}, tmp_path / "big.pth")
    with pytest.raises(WeightsMismatchError, match=r"attention_net\.0\.weight: checkpoint \(512, 1024\)"):
        chief.from_weights(tmp_path / "big.pth")  # a 'large' (2048-d input) CHIEF is another architecture
    torch.save({"model": {"patch_embed.proj.weight": torch.zeros(768, 1536)}}, tmp_path / "giga.pth")
    with pytest.raises(WeightsMismatchError, match="unexpected keys: patch_embed.proj.weight"):
        chief.from_weights(tmp_path / "giga.pth")
    (tmp_path / "junk.pth").write_bytes(b"no")
    with pytest.raises(WeightsCorruptError):
        chief.from_weights(tmp_path / "junk.pth")
    with pytest.raises(WeightsUnavailableError, match="Google Drive"):
        chief.from_weights(None)
    with pytest.raises(WeightsUnavailableError, match="CHIEF_pretraining.pth"):
        chief.from_weights(tmp_path / "nowhere")


def test_bad_inputs(encoder):
    with pytest.raises(ValueError, match="768"):
        encoder(np.zeros((3, 1536), np.float32))
    with pytest.raises(ValueError, match="N >= 1"):
        encoder(np.zeros((0, 768), np.float32))


def test_store_check_refuses_another_tile_model(tmp_path):
    assert_store_check(tmp_path / "store", "chief", "ctranspath")


def test_spec_states_its_tiles():
    """256-px tiles at 10x, 1.0 µm/px by the 10x = 1.0 µm/px convention (module doc: README, TRIDENT)."""
    spec = get_aggregator("chief")
    assert (spec.tiles.tile_px, spec.tiles.target_mpp) == (256, 1.0)
    assert spec.record("w")["tiles"] == "256-px tiles at 1 µm/px without overlap"


def test_store_check_refuses_other_tiles(tmp_path):
    assert_tiling_check(tmp_path / "store", "chief", "ctranspath")
