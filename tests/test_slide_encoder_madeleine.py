"""MADELEINE slide encoder (pathray.slide_level.encoders.madeleine) against the official code's frozen outputs.

``tests/data/madeleine_golden.npz`` was written by ``tests/reference/madeleine_golden.py``: the
official ``madeleine/models/Model.py`` of github.com/mahmoodlab/MADELEINE (commit in the file),
built and loaded by its own ``create_model`` from pathray's random ``model.pt`` +
``model_config.json`` (seed and weights sha256 in the file), ``encode_he`` of synthetic slides of
1, 5, 257 and 20,000 tiles, fp32 on CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures.slide_goldens import DATA, assert_store_check, assert_tiling_check, golden_case

from pathray.errors import WeightsMismatchError, WeightsUnavailableError
from pathray.slide_level.aggregators import SlideTiles, build_aggregator, get_aggregator
from pathray.slide_level.encoders import madeleine
from pathray.slide_level.encoders.release import random_net, state_sha256

GOLDEN = DATA / "madeleine_golden.npz"
TOL = 1e-5


@pytest.fixture(scope="module")
def golden():
    return np.load(GOLDEN)


@pytest.fixture(scope="module")
def weights_file(golden, tmp_path_factory) -> Path:
    path = madeleine.write_random_weights(tmp_path_factory.mktemp("madeleine"), seed=int(golden["weights_seed"]))
    assert state_sha256(torch.load(path, weights_only=True)) == str(golden["weights_sha256"])
    return path


@pytest.fixture(scope="module")
def encoder(weights_file):
    return madeleine.from_weights(weights_file.parent)


@pytest.mark.parametrize("tag", ["one", "few", "mid", pytest.param("long", marks=pytest.mark.slow)])
def test_matches_the_official_encode_he(golden, encoder, tag):
    tiles, official = golden_case(golden, tag, 512)
    got = encoder(tiles)
    assert got.shape == (512,) and got.dtype == np.float32
    assert np.abs(got - official).max() <= TOL


def test_heads_take_interleaved_features(encoder, golden):
    """The official ``rearrange('b t (e c) -> b t e c')`` gives head c the features c, c+4, ...;
    contiguous 512-feature blocks per head give another vector."""
    tiles, official = golden_case(golden, "mid", 512)
    net = encoder.net
    with torch.inference_mode():
        h = net.wsi_embedders.pre_attn(torch.from_numpy(tiles)).reshape(len(tiles), 4, 512)  # contiguous blocks
        pooled = torch.stack([torch.softmax(a(h[:, c]), 0) @ h[:, c] for c, a in enumerate(net.wsi_embedders.attn)], -1)
        blocks = net.projector(pooled.reshape(-1)).numpy()
    assert np.abs(blocks - official).max() > 1e-2


def test_aggregator_through_the_spec(weights_file, golden, encoder):
    spec = get_aggregator("madeleine")
    assert (spec.input_dim, spec.output_dim, spec.tile_models, spec.needs_weights) == (512, 512, ("conch-v1",), True)
    agg = build_aggregator(spec, str(weights_file))
    tiles = golden_case(golden, "few", 512)[0]
    got = agg(SlideTiles("s", tiles, np.zeros(5, np.int64), np.zeros(5, np.int64), 1.0))
    np.testing.assert_array_equal(got, encoder(tiles))
    prov = agg.provenance()
    assert prov["architecture"] == "madeleine_abmil_4heads_conch_v1" and "encode_he" in prov["output"]


def test_release_layout_is_loaded_strictly(weights_file, tmp_path):
    state = torch.load(weights_file, weights_only=True)
    assert all(
        k.startswith("module.wsi_embedders.") or k.startswith(("module.projector.", "module.token_projector."))
        for k in state
    )  # DDP-saved, as the official create_model expects
    expected = random_net(madeleine.MadeleineNet, 12).state_dict()
    assert len(state) == len(expected) == 40  # pre_attn 12, 4 heads x 6, projector 2, token_projector 2
    bare = {k[len("module.") :]: v for k, v in state.items()}
    torch.save(bare, tmp_path / "model.pt")  # without the DDP prefix: the official loader takes it too
    np.testing.assert_array_equal(
        madeleine.from_weights(tmp_path)(np.ones((3, 512), np.float32)),
        madeleine.from_weights(weights_file)(np.ones((3, 512), np.float32)),
    )
    torch.save({**bare, "embedding.weight": torch.zeros(2, 32)}, tmp_path / "model.pt")  # a stain-encoding model
    with pytest.raises(WeightsMismatchError, match="unexpected keys: embedding.weight"):
        madeleine.from_weights(tmp_path)
    torch.save({k: v for k, v in bare.items() if not k.startswith("wsi_embedders.attn.3.")}, tmp_path / "model.pt")
    with pytest.raises(WeightsMismatchError, match=r"missing keys: wsi_embedders\.attn\.3\.attention_a\.0\.bias"):
        madeleine.from_weights(tmp_path)
    torch.save(bare, tmp_path / "model.pt")
    (tmp_path / "model_config.json").write_text(json.dumps({"n_heads": 8, "patch_embedding_dim": 512}))
    with pytest.raises(WeightsMismatchError, match="another architecture.*'n_heads': 8"):
        madeleine.from_weights(tmp_path)


def test_missing_weights_name_the_hub_repo(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailableError, match="MahmoodLab/madeleine"):
        madeleine.from_weights(None)
    with pytest.raises(WeightsUnavailableError, match="model.pt"):
        madeleine.from_weights(tmp_path / "nowhere")


def test_store_check_refuses_another_tile_model(tmp_path):
    assert_store_check(tmp_path / "store", "madeleine", "conch-v1")


def test_spec_states_its_tiles():
    """256-px tiles at 10x, 1.0 µm/px by the 10x = 1.0 µm/px convention (module doc: README, TRIDENT)."""
    spec = get_aggregator("madeleine")
    assert (spec.tiles.tile_px, spec.tiles.target_mpp) == (256, 1.0)
    assert spec.record("w")["tiles"] == "256-px tiles at 1 µm/px without overlap"


def test_store_check_refuses_other_tiles(tmp_path):
    assert_tiling_check(tmp_path / "store", "madeleine", "conch-v1")
