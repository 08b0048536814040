"""Exactness of the misc zoo family (CTransPath, MUSK, KEEP) against their official code.

Each model's official code was run by ``tests/reference/<model>_golden.py`` (fetched official
repository, pinned dependencies, separate process) on 4 real H&E tiles of CMU-1-Small-Region
with the random weights ``write_random_weights(model, seed=..., **overrides)`` writes; the
embeddings are frozen in ``tests/data/<model>_golden.npz``. Here the same weights are
regenerated (the sha256 of their tensors must be the golden's) and pathray's encoder must reproduce the
official embeddings within 1e-5 (fp32), at the tile size the card feeds as is and at one it
resizes. Full-size architectures are checked on the meta device against the official counts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from reference.golden_common import tensors_sha256
from safetensors.torch import load_file

from pathray.encoders import EncoderConfig, get_spec, load_encoder, write_random_weights
from pathray.encoders.build import count_params, create_model
from pathray.errors import WeightsMismatchError

DATA = Path(__file__).parent / "data"
TOL = 1e-5
#: model -> (tile sizes of the golden, arch overrides of its weights)
GOLDENS = {"ctranspath": ((224, 256), {})}
COVERED_MODELS = tuple(GOLDENS)


@pytest.fixture(scope="module", autouse=True)
def _torch_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(min(2, old))
    yield
    torch.set_num_threads(old)


def _golden(model: str) -> dict[str, np.ndarray]:
    with np.load(DATA / f"{model}_golden.npz") as z:
        return dict(z)


def _golden_weights(model: str, golden: dict, tmp_path: Path) -> Path:
    wdir = write_random_weights(model, tmp_path / model, seed=int(golden["seed"]), **GOLDENS[model][1])
    if tensors_sha256(wdir / "model.safetensors") != str(golden["weights_sha256"]):
        pytest.fail(f"the random weights of {model} changed: regenerate the golden with "
                    f"tests/reference/{model.replace('-', '_')}_golden.py")
    return wdir


@pytest.mark.parametrize("model", list(GOLDENS))
def test_matches_official_code(model, he_tiles, tmp_path):
    golden = _golden(model)
    wdir = _golden_weights(model, golden, tmp_path)
    encoder = load_encoder(EncoderConfig(model, weights=str(wdir), device="cpu", batch_size=2))
    for px in GOLDENS[model][0]:
        ref = golden[f"emb_{px}"]
        tiles = np.ascontiguousarray(he_tiles[: len(ref), :px, :px])
        got = encoder(tiles)
        assert got.shape == ref.shape == (len(ref), get_spec(model).embed_dim)
        diff = float(np.abs(got - ref).max())
        assert diff <= TOL, f"{model} @ {px}px: max abs diff {diff:.3g} > {TOL}"
        assert float(np.abs(ref).max()) > 1e-2


def test_ctranspath_release_checkpoint_layout(he_tiles, tmp_path):
    """The release is a ``.pth`` holding ``{'model': state_dict}`` (attention masks included)."""
    golden = _golden("ctranspath")
    wdir = _golden_weights("ctranspath", golden, tmp_path)
    sd = load_file(str(wdir / "model.safetensors"))
    assert "layers.0.blocks.1.attn_mask" in sd and "layers.3.blocks.1.attn_mask" not in sd
    assert "layers.0.downsample.reduction.weight" in sd and "patch_embed.proj.4.running_var" in sd
    pth = tmp_path / "ctranspath.pth"
    torch.save({"model": sd}, pth)
    encoder = load_encoder(EncoderConfig("ctranspath", weights=str(pth), device="cpu", batch_size=4))
    np.testing.assert_allclose(encoder(np.ascontiguousarray(he_tiles[:4, :224, :224])), golden["emb_224"],
                               rtol=0, atol=TOL)


@pytest.mark.parametrize(("model", "other"), [("ctranspath", "kaiko-vits16")])
def test_other_architecture_refused(model, other, random_weights):
    with pytest.raises(WeightsMismatchError, match="missing keys|unexpected keys|architecture"):
        load_encoder(EncoderConfig(model, weights=str(random_weights(other, depth=1)), device="cpu"))


def test_ctranspath_refuses_other_input_size():
    spec = get_spec("ctranspath")
    net = create_model(spec.architecture, spec.model_kwargs, builder="module")
    with pytest.raises(ValueError, match="224x224"):
        net(torch.zeros(1, 3, 256, 256))


#: parameter counts of the full official networks (counted on the official code: TransPath's
#: ctranspath() on timm-ctp 0.5.4 with head = Identity)
FULL_PARAMS = {"ctranspath": 27_520_038}


@pytest.mark.parametrize("model", list(FULL_PARAMS))
def test_full_architecture_on_meta(model):
    spec = get_spec(model)
    net = create_model(spec.architecture, spec.model_kwargs, meta=True, builder=spec.builder)
    assert count_params(net) == FULL_PARAMS[model]
    out = net(torch.empty(2, 3, spec.input_px, spec.input_px, device="meta"))
    assert tuple(out.shape) == (2, spec.embed_dim)
