"""CONCH v1 and v1.5 against their official code.

The goldens (``tests/data/conch_v1_golden.npz``, ``conch_v15_golden.npz``) are the official
code's embeddings (``tests/reference/conch_v1_golden.py``: mahmoodlab/CONCH
``create_model_from_pretrained`` + ``encode_image``; ``tests/reference/conch_v15_golden.py``:
TITAN's ``conch_v1_5.build_conch``) of real H&E tiles of CMU-1-Small-Region, 448 px (fed as is)
and 512 px (resized to 448: bicubic for v1, bilinear for v1.5), with the random weights
``write_random_weights`` makes (full widths, reduced depth). Here the same weights are made
again, checked to be the golden's, loaded strictly by pathray, and its embeddings compared.
Full-size architectures are checked on the meta device.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pathray.encoders import EncoderConfig, get_spec, load_encoder
from pathray.encoders.build import count_params, create_model
from pathray.encoders.nets.conch import dino_interpolate_pos_embed
from pathray.errors import WeightsMismatchError

COVERED_MODELS = ("conch-v1", "conch-v1.5")

DATA = Path(__file__).parent / "data"
TOL = 1e-5
#: model -> (golden file, array in it, script that regenerates it)
GOLDENS = {
    "conch-v1": ("conch_v1_golden.npz", "conch_v1", "tests/reference/conch_v1_golden.py"),
    "conch-v1.5": ("conch_v15_golden.npz", "conch_v1_5", "tests/reference/conch_v15_golden.py"),
}


def weights_digest(sd: dict[str, torch.Tensor]) -> str:
    """The golden scripts' hash of the tensors (names, dtypes, shapes, bytes in name order)."""
    h = hashlib.sha256()
    for key in sorted(sd):
        t = sd[key].contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def golden_tiles(slide: Path, rows: np.ndarray) -> list[np.ndarray]:
    import openslide

    with openslide.OpenSlide(str(slide)) as s:
        return [
            np.asarray(s.read_region((int(x), int(y)), 0, (int(side), int(side))).convert("RGB")) for x, y, side in rows
        ]


@pytest.fixture(scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _golden_weights(name: str, random_weights) -> tuple[np.lib.npyio.NpzFile, Path]:
    file, _, script = GOLDENS[name]
    golden = np.load(DATA / file)
    wdir = random_weights(name, seed=int(golden["seed"]), depth=int(golden["depth"]))
    if weights_digest(load_file(str(wdir / "model.safetensors"))) != str(golden["weights_sha256"]):
        pytest.fail(f"{name}: random weights differ from the golden's: regenerate the golden with {script}")
    return golden, wdir


@pytest.mark.parametrize("name", list(GOLDENS))
def test_matches_official_code(name, random_weights, cmu_slide, _one_thread):
    golden, wdir = _golden_weights(name, random_weights)
    tiles = golden_tiles(cmu_slide, golden["tiles"])
    pixels = hashlib.sha256(b"".join(t.tobytes() for t in tiles)).hexdigest()
    assert pixels == str(golden["tile_pixels_sha256"]), "CMU slide tiles differ from those of the golden"
    assert sorted({t.shape[0] for t in tiles}) == [448, 512]  # no resampling, and the resize path
    encoder = load_encoder(EncoderConfig(name, weights=str(wdir), device="cpu", batch_size=4))
    got = np.concatenate([encoder(np.stack([t for t in tiles if t.shape[0] == side])) for side in (448, 512)])
    ref = golden[GOLDENS[name][1]]
    assert got.shape == ref.shape == (len(tiles), get_spec(name).embed_dim)
    diff = float(np.abs(got - ref).max())
    assert diff <= TOL, f"{name}: max abs diff {diff:.3g} > {TOL} vs the official code"
    assert float(np.abs(ref).std()) > 1e-2  # not a degenerate embedding


def _release_copy(wdir: Path, out: Path, extra: dict[str, torch.Tensor], filename: str) -> Path:
    """``wdir``'s weights plus ``extra`` keys as a pickled ``filename`` next to its config.json."""
    sd = load_file(str(wdir / "model.safetensors"))
    out.mkdir(parents=True, exist_ok=True)
    torch.save({**sd, **extra}, out / filename)
    (out / "config.json").write_text((wdir / "config.json").read_text())
    return out / filename


def test_conch_v1_release_layout_loads_vision_part_only(random_weights, cmu_slide, tmp_path, _one_thread):
    """The published pytorch_model.bin is the whole CoCa model minus the decoder: the text tower,
    logit_scale, the contrastive projection and the caption pooler are skipped; any other stray
    key is refused."""
    golden, wdir = _golden_weights("conch-v1", random_weights)
    release_extra = {
        "text.token_embedding.weight": torch.zeros(32007, 8),
        "text.positional_embedding": torch.zeros(128, 8),
        "logit_scale": torch.tensor(2.0),
        "visual.proj_contrast": torch.zeros(512, 512),
        "visual.attn_pool_caption.query": torch.zeros(256, 768),
        "visual.ln_caption.weight": torch.ones(768),
    }
    release = _release_copy(wdir, tmp_path / "release", release_extra, "pytorch_model.bin")
    tile = golden_tiles(cmu_slide, golden["tiles"][:1])
    got = load_encoder(EncoderConfig("conch-v1", weights=str(release.parent), device="cpu"))(np.stack(tile))
    np.testing.assert_allclose(got, golden["conch_v1"][:1], atol=TOL)
    stray = _release_copy(wdir, tmp_path / "stray", {"visual.head.proj.weight": torch.zeros(2, 2)}, "pytorch_model.bin")
    with pytest.raises(WeightsMismatchError, match="unexpected keys: head.proj.weight"):
        load_encoder(EncoderConfig("conch-v1", weights=str(stray), device="cpu"))


def test_conch_v15_release_file_name(random_weights, cmu_slide, tmp_path, _one_thread):
    """MahmoodLab/conchv1_5 publishes pytorch_model_vision.bin (trunk.*, attn_pool_contrast.*,
    ln_contrast.*): a downloaded snapshot directory holding only that file loads as is."""
    golden, wdir = _golden_weights("conch-v1.5", random_weights)
    release = _release_copy(wdir, tmp_path / "conchv1_5", {}, "pytorch_model_vision.bin")
    assert get_spec("conch-v1.5").extra["hub_weights_file"] == release.name
    tile = golden_tiles(cmu_slide, golden["tiles"][-1:])
    got = load_encoder(EncoderConfig("conch-v1.5", weights=str(release.parent), device="cpu"))(np.stack(tile))
    np.testing.assert_allclose(got, golden["conch_v1_5"][-1:], atol=TOL)


def test_conch_v15_from_hub_cache(random_weights, cmu_slide, tmp_path, monkeypatch, _one_thread):
    """The default weights (hub MahmoodLab/conchv1_5) resolve to its pytorch_model_vision.bin,
    here from a pre-populated HF cache, offline."""
    from huggingface_hub import constants

    golden, wdir = _golden_weights("conch-v1.5", random_weights)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--MahmoodLab--conchv1_5"
    _release_copy(wdir, repo / "snapshots" / sha, {}, "pytorch_model_vision.bin")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    encoder = load_encoder(EncoderConfig("conch-v1.5", device="cpu"))
    assert encoder.weights_fingerprint == f"hf:MahmoodLab/conchv1_5@{sha}"
    tile = golden_tiles(cmu_slide, golden["tiles"][:1])
    np.testing.assert_allclose(encoder(np.stack(tile)), golden["conch_v1_5"][:1], atol=TOL)


@pytest.mark.parametrize(
    "name, other", [("conch-v1.5", "conch-v1"), ("conch-v1", "conch-v1.5"), ("conch-v1", "kaiko-vits16")]
)
def test_other_architecture_refused(name, other, random_weights, tmp_path):
    wdir = random_weights(other, depth=1)
    with pytest.raises(WeightsMismatchError, match="config.json says architecture"):
        load_encoder(EncoderConfig(name, weights=str(wdir), device="cpu"))
    bare = tmp_path / "weights.safetensors"  # no config.json: refused by its keys and shapes
    bare.write_bytes((wdir / "model.safetensors").read_bytes())
    with pytest.raises(WeightsMismatchError, match="does not fit"):
        load_encoder(EncoderConfig(name, weights=str(bare), device="cpu"))


def test_pos_embed_interpolation_matches_official_rule():
    """Unchanged on the table's own square grid; else bicubic with scale_factor (grid + 0.1) / 14."""
    table = torch.randn(1, 1 + 14 * 14, 8)
    assert dino_interpolate_pos_embed(table, (224, 224), 16) is table
    out = dino_interpolate_pos_embed(table, (448, 448), 16)
    assert out.shape == (1, 1 + 28 * 28, 8)
    assert torch.equal(out[:, 0], table[:, 0])
    grid = table[:, 1:].reshape(1, 14, 14, 8).permute(0, 3, 1, 2)
    by_size = torch.nn.functional.interpolate(grid, size=(28, 28), mode="bicubic").permute(0, 2, 3, 1).reshape(1, -1, 8)
    assert not torch.allclose(out[:, 1:], by_size, atol=1e-4)  # the +0.1 factor moves the samples


# --------------------------------------------------------------------------------------
# full size, on the meta device
# --------------------------------------------------------------------------------------
#: (depth, width, heads, pos-embed rows, exact parameter count of pathray's network)
FULL = {
    "conch-v1": (12, 768, 12, 1 + 28 * 28, 87_567_104),
    "conch-v1.5": (24, 1024, 16, 1 + 14 * 14, 306_109_184),
}


@pytest.mark.slow  # full-size architectures
@pytest.mark.parametrize("name", list(FULL))
def test_full_architecture_on_meta(name):
    spec = get_spec(name)
    model = create_model(spec.architecture, spec.model_kwargs, meta=True, builder=spec.builder)
    depth, width, heads, pos_rows, params = FULL[name]
    trunk = model.trunk
    assert (len(trunk.blocks), trunk.embed_dim, trunk.blocks[0].attn.num_heads) == (depth, width, heads)
    assert tuple(trunk.pos_embed.shape) == (1, pos_rows, width)
    assert count_params(model) == params
    out = model(torch.empty(2, 3, spec.input_px, spec.input_px, device="meta"))
    assert tuple(out.shape) == (2, spec.embed_dim)


def test_conch_v15_trunk_is_a_vit_large_like_uni():
    """CONCH v1.5 starts from UNI (TITAN paper): its trunk has UNI's exact ViT-L/16 parameter count."""
    v15 = get_spec("conch-v1.5")
    uni = get_spec("uni")
    trunk = create_model(v15.architecture, v15.model_kwargs, meta=True, builder=v15.builder).trunk
    assert count_params(trunk) == count_params(create_model(uni.architecture, uni.model_kwargs, meta=True))


@pytest.mark.slow  # full-size architectures
def test_cost_model_counts_the_full_networks():
    """pathray's GPU-hour planning counts FLOPs on the meta device: the nets must run there under
    FlopCounterMode; at 448 px (785 tokens) they cost more than UNI at 224 px."""
    from pathray.encoders.cost import flops_per_tile

    flops = {name: flops_per_tile(get_spec(name)) for name in ("conch-v1", "conch-v1.5", "uni")}
    assert flops["uni"] < flops["conch-v1"] < flops["conch-v1.5"]
