"""PRISM slide encoder (pathray.slide_level.encoders.prism) against the official code's frozen outputs.

``tests/data/prism_golden.npz`` was written by ``tests/reference/prism_golden.py``: the official
``PerceiverResampler`` (``perceiver.py`` of github.com/clemsgrs/prism-embedder, Paige's PRISM
modelling code; commit in the file) with pathray's random resampler weights in the release
layout (seed and weights sha256 in the file), ``image_embedding`` of synthetic slides of 1, 7,
300 and 4,000 Virchow-width tiles, fp32 on CPU. Each full-size forward takes 10-30 s on 2 CPUs,
so those comparisons are ``slow``; loading rules are checked on a shrunk Perceiver.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures.slide_goldens import DATA, assert_store_check, golden_case
from safetensors.torch import load_file, save_file

from pathray.errors import WeightsMismatchError, WeightsUnavailableError
from pathray.slide_level.aggregators import get_aggregator
from pathray.slide_level.encoders import prism
from pathray.slide_level.encoders.release import load_release, random_net, shared_names, state_sha256

GOLDEN = DATA / "prism_golden.npz"
#: fp32 agreement, absolute plus relative to the value: the long bag's 1280-d output (|x| up to ~1.4)
#: differs from the golden by up to 1.05e-5 on an AVX-512 CPU (other summation orders in its
#: kernels; within 1e-5 with ATEN_CPU_CAPABILITY=avx2, and 0 on the machine that wrote the golden)
ATOL = RTOL = 1e-5
SMALL = prism.PerceiverConfig(
    latent_seq=6, latent_dim=16, context_dim=24, mhsa_heads=2, perceiver_depth=4, transformer_depth=2
)


@pytest.fixture(scope="module")
def golden():
    return np.load(GOLDEN)


@pytest.fixture(scope="module")
def encoder(golden, tmp_path_factory):
    path = prism.write_random_weights(tmp_path_factory.mktemp("prism"), seed=int(golden["weights_seed"]))
    assert state_sha256(load_file(str(path))) == str(golden["weights_sha256"])
    return prism.from_weights(path.parent)


@pytest.mark.slow  # one full-size PRISM forward each, 10-30 s on 2 CPUs
@pytest.mark.parametrize("tag", ["one", "few", "mid", "long"])
def test_matches_the_official_image_embedding(golden, encoder, tag):
    tiles, official = golden_case(golden, tag, 2560)
    got = encoder(tiles)
    assert got.shape == (1280,) and got.dtype == np.float32
    np.testing.assert_allclose(got, official, rtol=RTOL, atol=ATOL)


def test_released_architecture_and_sharing():
    with torch.device("meta"):
        net = prism.PrismNet()
    # latents 513 x 1280 + 2 LayerNorms + 2 cross-attention blocks (q, kv, out, GEGLU FF) + 6 self-attention blocks
    assert sum(p.numel() for p in net.parameters()) == 99_037_440
    sd = net.state_dict()
    assert tuple(sd["perceiver.latents"].shape) == (513, 1280)
    assert tuple(sd["perceiver.layers.0.xattn.xattn.to_kv.weight"].shape) == (2560, 2560)
    assert tuple(sd["perceiver.layers.7.tf.5.mhsa.mha.in_proj_weight"].shape) == (3840, 1280)
    assert (
        "perceiver.layers.0.xattn.xattn.c_norm.weight" not in sd
        and "perceiver.layers.0.tf.0.mhsa.mha.in_proj_bias" not in sd
    )
    groups = {names[0]: names for names in shared_names(net)}
    assert groups["perceiver.layers.1.xattn.xattn.to_q.weight"] == [
        f"perceiver.layers.{i}.xattn.xattn.to_q.weight" for i in range(1, 8)
    ]  # layers 2-7 reuse layer 1
    assert len(groups["perceiver.layers.0.tf.3.ff.net.0.bias"]) == 8  # one self-attention stack for all layers
    assert "perceiver.layers.0.xattn.xattn.to_q.weight" not in groups  # layer 0's cross-attention is its own


def test_shared_tensors_under_any_name_and_ignored_parts(tmp_path):
    """A release stores a shared tensor once (any of its names) or under every name; the text
    decoder and contrastive heads are set aside; anything else must fit."""
    net = random_net(lambda: prism.PrismNet(SMALL), 3)
    full = {f"image_resampler.{k}": v.contiguous() for k, v in net.state_dict().items()}
    x = torch.from_numpy(np.random.default_rng(0).random((9, 24)).astype(np.float32))
    with torch.inference_mode():
        want = net(x)
    last = {n: v for n, v in full.items() if "layers.3." in n or "layers.0.xattn" in n or "layers." not in n}
    extras = {
        "text_decoder.model.biogpt.embed_tokens.weight": torch.zeros(4, 2),
        "temperature": torch.tensor(1.0),
        "img_to_latents.to_latents.weight": torch.zeros(3, 16),
    }
    torch.save(full, tmp_path / "full.bin")  # a pickle keeps every name of a shared tensor
    save_file({k: v.clone() for k, v in {**last, **extras}.items()}, str(tmp_path / "last.safetensors"))
    for name in ("full.bin", "last.safetensors"):
        with torch.device("meta"):
            fresh = prism.PrismNet(SMALL)
        loaded = load_release(fresh, prism.RELEASE, str(tmp_path / name))
        with torch.inference_mode():
            assert torch.equal(loaded(x), want), name
    torch.save({**full, "image_resampler.perceiver.layers.3.xattn.ff.norm.bias": torch.ones(16)}, tmp_path / "bad.bin")
    with torch.device("meta"), pytest.raises(WeightsMismatchError, match="shared tensor .* different values"):
        load_release(prism.PrismNet(SMALL), prism.RELEASE, str(tmp_path / "bad.bin"))
    torch.save({**full, "image_embedder.weight": torch.zeros(2)}, tmp_path / "extra.bin")
    with torch.device("meta"), pytest.raises(WeightsMismatchError, match="unexpected keys: image_embedder.weight"):
        load_release(prism.PrismNet(SMALL), prism.RELEASE, str(tmp_path / "extra.bin"))


def test_wrong_weights_are_refused(tmp_path):
    small = prism.write_random_weights(tmp_path / "small", seed=1, config=SMALL)
    with pytest.raises(WeightsMismatchError, match=r"perceiver\.latents: checkpoint \(7, 16\) vs model \(513, 1280\)"):
        prism.from_weights(small)
    save_file({"image_resampler.cls_norm.weight": torch.ones(1280)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(WeightsMismatchError, match="missing keys: .*perceiver.latents"):
        prism.from_weights(tmp_path)
    with pytest.raises(WeightsUnavailableError, match="model.safetensors"):
        prism.from_weights(tmp_path / "nowhere")


def test_aggregator_spec_and_store_check(tmp_path):
    spec = get_aggregator("prism")
    assert (spec.input_dim, spec.output_dim, spec.tile_models, spec.accelerated) == (2560, 1280, ("virchow",), True)
    assert_store_check(Path(tmp_path) / "store", "prism", "virchow")
