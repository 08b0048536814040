"""Exactness of the misc zoo family (CTransPath, MUSK, KEEP, GenBio-PathFM) against their official code.

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
from safetensors.torch import load_file, save_file

from pathray.encoders import EncoderConfig, get_spec, load_encoder, write_random_weights
from pathray.encoders.build import count_params, create_model
from pathray.encoders.builders import from_release_layout
from pathray.errors import WeightsMismatchError

DATA = Path(__file__).parent / "data"
TOL = 1e-5
#: model -> (stem of its golden file and script, arch overrides of its weights)
GOLDENS = {
    "ctranspath": ("ctranspath", {}),
    "musk": ("musk", {"depth": 2}),
    "musk-cls": ("musk", {"depth": 2}),
    "keep": ("keep", {"depth": 2}),
    "genbio-pathfm": ("genbio_pathfm", {"depth": 1}),
}
COVERED_MODELS = tuple(GOLDENS)


@pytest.fixture(scope="module", autouse=True)
def _torch_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(min(2, old))
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def he_tiles_by_px(cmu_slide):
    """px -> the golden scripts' tiles: real H&E of CMU-1-Small-Region at HE_TILE_ORIGINS, ``px`` wide."""
    import openslide
    from fixtures.weights import HE_TILE_ORIGINS

    def read(px: int, n: int) -> np.ndarray:
        with openslide.OpenSlide(str(cmu_slide)) as slide:
            return np.stack(
                [np.asarray(slide.read_region(xy, 0, (px, px)).convert("RGB")) for xy in HE_TILE_ORIGINS[:n]]
            ).astype(np.uint8)

    return read


def _golden(model: str) -> dict[str, np.ndarray]:
    with np.load(DATA / f"{GOLDENS[model][0]}_golden.npz") as z:
        return dict(z)


def _golden_weights(model: str, golden: dict, tmp_path: Path) -> Path:
    wdir = write_random_weights(model, tmp_path / model, seed=int(golden["seed"]), **GOLDENS[model][1])
    if tensors_sha256(wdir / "model.safetensors") != str(golden["weights_sha256"]):
        pytest.fail(
            f"the random weights of {model} changed: regenerate the golden with "
            f"tests/reference/{GOLDENS[model][0]}_golden.py"
        )
    return wdir


@pytest.mark.parametrize(
    "model",
    [pytest.param(m, marks=pytest.mark.slow) if m in ("musk", "musk-cls", "ctranspath") else m for m in GOLDENS],
)
def test_matches_official_code(model, he_tiles_by_px, tmp_path):
    golden = _golden(model)
    wdir = _golden_weights(model, golden, tmp_path)
    encoder = load_encoder(EncoderConfig(model, weights=str(wdir), device="cpu", batch_size=2))
    sizes = sorted(int(k.rsplit("_", 1)[1]) for k in golden if k.startswith(f"{model}_emb_"))
    assert len(sizes) == 2  # one tile size the card feeds as is, one it resizes
    for px in sizes:
        ref = golden[f"{model}_emb_{px}"]
        got = encoder(he_tiles_by_px(px, len(ref)))
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
    np.testing.assert_allclose(
        encoder(np.ascontiguousarray(he_tiles[:4, :224, :224])), golden["ctranspath_emb_224"], rtol=0, atol=TOL
    )


def test_musk_release_layout_ignores_text_parts(tmp_path):
    """xiangjx/musk's model.safetensors holds the whole MUSK model: the image tower under ``beit3.``
    plus the text embedding, the text (``B``) experts of every multiway module, both heads, the
    logit scale and the mask token, which are dropped; a missing image-tower key is refused."""
    golden = _golden("musk")
    wdir = _golden_weights("musk", golden, tmp_path)
    sd = load_file(str(wdir / "model.safetensors"))
    assert all(k.startswith("beit3.") for k in sd)
    extra = {
        "beit3.text_embed.weight": torch.zeros(8, 1024),
        "beit3.vision_embed.mask_token": torch.zeros(1, 1, 1024),
        "beit3.encoder.embed_positions.B.weight": torch.zeros(4, 1024),
        "beit3.encoder.layers.1.ffn.B.fc1.weight": torch.zeros(4096, 1024),
        "beit3.encoder.layer_norm.B.bias": torch.zeros(1024),
        "language_head.weight": torch.zeros(1024, 1024),
        "vision_head.weight": torch.zeros(1024, 1024),
        "logit_scale": torch.zeros(()),
    }
    full = tmp_path / "full"
    full.mkdir()
    save_file({**sd, **extra}, str(full / "model.safetensors"))
    (full / "config.json").write_text((wdir / "config.json").read_text())
    tiles = np.full((1, 384, 384, 3), 200, np.uint8)
    ref = load_encoder(EncoderConfig("musk-cls", weights=str(wdir), device="cpu"))(tiles)
    np.testing.assert_array_equal(load_encoder(EncoderConfig("musk-cls", weights=str(full), device="cpu"))(tiles), ref)
    del sd["beit3.encoder.layers.1.ffn.A.fc1.weight"]
    save_file({**sd, **extra}, str(full / "model.safetensors"))
    with pytest.raises(WeightsMismatchError, match="ffn.A.fc1.weight"):
        load_encoder(EncoderConfig("musk-cls", weights=str(full), device="cpu"))


def test_genbio_rope_tables_stay_bfloat16(tmp_path):
    """The official RoPE runs in bfloat16 (its ``rope_embed.periods`` buffer too); the encoder holds
    its network in float32 (``model.float()``), which must not change the embedding."""
    golden = _golden("genbio-pathfm")
    wdir = _golden_weights("genbio-pathfm", golden, tmp_path)
    sd = load_file(str(wdir / "model.safetensors"))
    assert sd["rope_embed.periods"].dtype == torch.bfloat16
    encoder = load_encoder(EncoderConfig("genbio-pathfm", weights=str(wdir), device="cpu"))
    assert encoder.model.rope_embed.periods.dtype == torch.float32
    tiles = np.full((1, 224, 224, 3), 180, np.uint8)
    ref = encoder(tiles)
    encoder.model.rope_embed.periods = encoder.model.rope_embed.periods.bfloat16()
    np.testing.assert_array_equal(encoder(tiles), ref)


def test_genbio_hub_weights_are_model_pth(tmp_path, monkeypatch, he_tiles_by_px):
    """The default weights are the hub repo's ``model.pth`` (the official loader's file), read here
    from a pre-populated HF cache offline; its fingerprint is the snapshot's commit."""
    from huggingface_hub import constants

    golden = _golden("genbio-pathfm")
    wdir = _golden_weights("genbio-pathfm", golden, tmp_path)
    cache = tmp_path / "hf-cache"
    repo = cache / "models--genbio-ai--genbio-pathfm"
    sha = "0123456789abcdef0123456789abcdef01234567"
    snap = repo / "snapshots" / sha
    snap.mkdir(parents=True)
    torch.save(load_file(str(wdir / "model.safetensors")), snap / "model.pth")
    (snap / "config.json").write_text((wdir / "config.json").read_text())  # records the test's depth=1
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    encoder = load_encoder(EncoderConfig("genbio-pathfm", device="cpu"))
    assert encoder.provenance()["weights_fingerprint"] == f"hf:genbio-ai/genbio-pathfm@{sha}"
    ref = golden["genbio-pathfm_emb_224"]
    np.testing.assert_allclose(encoder(he_tiles_by_px(224, len(ref))), ref, rtol=0, atol=TOL)


@pytest.mark.parametrize(
    ("model", "shrink"),
    [
        ("ctranspath", {"depth": 1, "embed_dim": 48}),
        ("musk", {"depth": 1, "embed_dim": 64, "num_heads": 4}),
        ("keep", {"depth": 1, "embed_dim": 64}),
        ("genbio-pathfm", {"depth": 1, "embed_dim": 96}),
    ],
)
def test_nets_accept_channels_last_input(model, shrink):
    """On CUDA the encoder feeds channels-last batches: same embedding as a contiguous batch."""
    spec = get_spec(model)
    torch.manual_seed(0)
    net = create_model(spec.architecture, {**spec.model_kwargs, **shrink}, builder="module").eval()
    x = torch.randn(2, 3, spec.input_px, spec.input_px)
    with torch.inference_mode():
        ref = net(x)
        got = net(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


def test_checkpoint_ignore_globs():
    sd = {"beit3.a.A.w": 1, "beit3.a.B.w": 2, "beit3.text_embed.weight": 3, "logit_scale": 4, "other.x": 5}
    out = from_release_layout(sd, "beit3.", ("beit3.text_embed.", "logit_scale", "*.B.*"))
    assert out == {"a.A.w": 1, "other.x": 5}


@pytest.mark.parametrize(
    ("model", "other", "overrides"),
    [
        ("ctranspath", "kaiko-vits16", {"depth": 1}),
        ("musk", "ctranspath", {}),
        ("musk-cls", "kaiko-vits16", {"depth": 1}),
        ("keep", "uni", {"depth": 1}),
        ("keep", "musk", {"depth": 1}),
        ("genbio-pathfm", "h-optimus-0", {"depth": 1}),
    ],
)
def test_other_architecture_refused(model, other, overrides, random_weights):
    with pytest.raises(WeightsMismatchError, match="missing keys|unexpected keys|architecture"):
        load_encoder(EncoderConfig(model, weights=str(random_weights(other, **overrides)), device="cpu"))


def test_ctranspath_refuses_other_input_size():
    spec = get_spec("ctranspath")
    net = create_model(spec.architecture, spec.model_kwargs, builder="module")
    with pytest.raises(ValueError, match="224x224"):
        net(torch.zeros(1, 3, 256, 256))


#: parameter counts of the full official networks, counted on the official code: TransPath's
#: ctranspath() on timm-ctp 0.5.4 with head = Identity; MUSK: musk_large_patch16_384 (675,188,737
#: parameters in all) less its text embedding, text experts, heads, logit scale and mask token); KEEP:
#: quick_start KEEPModel less its text tower and logit scale
#: GenBio-PathFM: GenBio_PathFM_Inference's VisionTransformer (README: "a 1.1B-parameter FM")
FULL_PARAMS = {
    "ctranspath": 27_520_038,
    "musk": 303_938_560,
    "musk-cls": 303_938_560,
    "keep": 304_728_576,
    "genbio-pathfm": 1_133_686_784,
}


@pytest.mark.parametrize("model", list(FULL_PARAMS))
def test_full_architecture_on_meta(model):
    spec = get_spec(model)
    net = create_model(spec.architecture, spec.model_kwargs, meta=True, builder=spec.builder)
    assert count_params(net) == FULL_PARAMS[model]
    out = net(torch.empty(2, 3, spec.input_px, spec.input_px, device="meta"))
    assert tuple(out.shape) == (2, spec.embed_dim)
