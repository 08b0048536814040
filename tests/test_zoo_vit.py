"""Exactness of the ``zoo/vit.py`` encoders against their official code.

* H-optimus-1 and Lunit's ViT-S/8 and ViT-S/16: the official code is a library call (timm), run here with the
  card's arguments on pathray's random weights saved as the release file.
* GPFM, CLAM's truncated ResNet-50 and OpenMidnight: the official code is a repository; the
  ``tests/reference/<model>_golden.py`` scripts ran it (from the fetched mirrors) on the weights
  pathray writes here, and froze its embeddings in ``tests/data/<model>_golden.npz``. The test
  rewrites the same weights (their digest must match the golden's) and compares.

Real H&E tiles (CMU-1-Small-Region) at 224 px (no resampling) and 256 px (the card's resize),
fp32, within 1e-5. Full-size architectures are checked on the meta device.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torchvision import transforms

from pathray.encoders import EncoderConfig, get_spec, load_encoder
from pathray.encoders.build import count_params, create_model
from pathray.encoders.checkpoint import read_state_dict
from pathray.errors import WeightsMismatchError

#: the models this module checks against their official code (tests/test_zoo_coverage.py)
COVERED_MODELS = ("h-optimus-1", "lunit-vits8", "lunit-vits16", "gpfm", "resnet50-trunc", "openmidnight")

TOL = 1e-5
DATA = Path(__file__).parent / "data"
REFERENCE = Path(__file__).parent / "reference"
IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
HOPTIMUS = dict(mean=(0.707223, 0.578729, 0.703617), std=(0.211883, 0.230117, 0.177517))
LUNIT = dict(mean=(0.70322989, 0.53606487, 0.66096631), std=(0.21716536, 0.26081574, 0.20723464))


def _common():
    spec = importlib.util.spec_from_file_location("_vit_golden_common", REFERENCE / "_vit_golden_common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _tiles(he_tiles: np.ndarray, side: int, n: int = 2) -> np.ndarray:
    """The first ``n`` H&E tiles at ``side`` px (top-left crops of the 256-px reads)."""
    tiles = np.ascontiguousarray(he_tiles[:n, :side, :side])
    tiles.flags.writeable = False
    return tiles


def _reference(model, transform, tiles: np.ndarray) -> np.ndarray:
    batch = torch.stack([transform(Image.fromarray(t)) for t in tiles])
    with torch.inference_mode():
        return model.eval()(batch).float().numpy()


def _encode(name: str, weights, tiles: np.ndarray) -> np.ndarray:
    encoder = load_encoder(EncoderConfig(name, weights=str(weights), device="cpu", batch_size=2))
    return encoder(tiles)


def _assert_close(got: np.ndarray, ref: np.ndarray, what: str) -> None:
    assert got.shape == ref.shape and got.dtype == np.float32, (got.shape, ref.shape, got.dtype)
    diff = float(np.abs(got - ref).max())
    assert diff <= TOL, f"{what}: max abs diff {diff:.3g} > {TOL}"
    assert float(np.abs(ref).max()) > 1e-2  # not a degenerate embedding


def _resized(norm: dict) -> transforms.Compose:
    """Tiles other than 224 px: Resize(224, bicubic) + CenterCrop(224), then the card's ToTensor/Normalize."""
    return transforms.Compose(
        [
            transforms.Resize(224, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize(**norm),
        ]
    )


# --------------------------------------------------------------------------------------
# library calls: H-optimus-1 (timm hub) and Lunit ViT-S/8 (timm VisionTransformer)
# --------------------------------------------------------------------------------------
#: bioptimus/H-optimus-1 config.json as the H-optimus-0 hub config lays it out (architecture,
#: global_pool, input size, normalisation); its shapes are fixed by TRIDENT's strict load of the
#: H-optimus-1 checkpoint into vit_giant_patch14_reg4_dinov2 at img_size=224
HOPTIMUS1_HUB_CONFIG = {
    "architecture": "vit_giant_patch14_reg4_dinov2",
    "num_classes": 0,
    "num_features": 1536,
    "global_pool": "token",
    "pretrained_cfg": {
        "custom_load": False,
        "input_size": [3, 224, 224],
        "fixed_input_size": True,
        "mean": list(HOPTIMUS["mean"]),
        "std": list(HOPTIMUS["std"]),
        "num_classes": 0,
    },
}


def _hub_dir(weights_dir: Path, config: dict, depth: int) -> Path:
    """``weights_dir``'s tensors as a hub snapshot: ``config`` (+ the reduced depth) and pytorch_model.bin."""
    out = weights_dir.parent / (weights_dir.name + "_hub")
    out.mkdir(exist_ok=True)
    (out / "config.json").write_text(json.dumps({**config, "model_args": {"depth": depth}}))
    torch.save(load_file(str(weights_dir / "model.safetensors")), out / "pytorch_model.bin")
    return out


@pytest.mark.parametrize("side", [224, 256])
def test_h_optimus_1_matches_card(side, random_weights, he_tiles, _one_thread):
    wdir = random_weights("h-optimus-1", depth=1)
    hub = _hub_dir(wdir, HOPTIMUS1_HUB_CONFIG, depth=1)
    # card: timm.create_model("hf-hub:bioptimus/H-optimus-1", pretrained=True, init_values=1e-5,
    # dynamic_img_size=False); the hub is replaced by the local snapshot
    model = timm.create_model(f"local-dir:{hub}", pretrained=True, init_values=1e-5, dynamic_img_size=False)
    assert len(model.blocks) == 1 and model.patch_embed.img_size == (224, 224) and model.num_prefix_tokens == 5
    card = transforms.Compose([transforms.ToTensor(), transforms.Normalize(**HOPTIMUS)])
    tiles = _tiles(he_tiles, side)
    ref = _reference(model, card if side == 224 else _resized(HOPTIMUS), tiles)
    _assert_close(_encode("h-optimus-1", wdir, tiles), ref, f"h-optimus-1 @ {side}px")


@pytest.mark.parametrize("patch, side", [(8, 224), (8, 256), (16, 224)])
def test_lunit_matches_official(patch, side, random_weights, he_tiles, tmp_path, _one_thread):
    from timm.models.vision_transformer import VisionTransformer

    name = f"lunit-vits{patch}"
    wdir = random_weights(name, depth=2)
    release = tmp_path / f"dino_vit_small_patch{patch}_ep200.torch"
    torch.save(load_file(str(wdir / "model.safetensors")), release)
    # github:lunit-io/benchmark-ssl-pathology README (vit_small, keys "DINO_p8"/"DINO_p16"), depth reduced
    model = VisionTransformer(img_size=224, patch_size=patch, embed_dim=384, num_heads=6, num_classes=0, depth=2)
    model.load_state_dict(torch.load(release, map_location="cpu"))
    card = transforms.Compose([transforms.ToTensor(), transforms.Normalize(**LUNIT)])
    tiles = _tiles(he_tiles, side)
    ref = _reference(model, card if side == 224 else _resized(LUNIT), tiles)
    _assert_close(_encode(name, wdir, tiles), ref, f"{name} @ {side}px")
    assert read_state_dict(release).keys() == model.state_dict().keys()  # Lunit's release file type is read


# --------------------------------------------------------------------------------------
# repositories: goldens from the official code
# --------------------------------------------------------------------------------------
def _golden(name: str, random_weights, he_tiles, **overrides) -> tuple[dict, Path, list[np.ndarray]]:
    """(golden arrays, pathray's weights dir, the golden's tiles) after checking that the weights
    and pixels are those the golden was made from."""
    golden = dict(np.load(DATA / f"{name.replace('-', '_')}_golden.npz"))
    wdir = random_weights(name, seed=int(golden["seed"]), **overrides)
    script = f"tests/reference/{name.replace('-', '_')}_golden.py"
    digest = _common().weights_sha256(load_file(str(wdir / "model.safetensors")))
    assert digest == str(golden["weights_sha256"]), f"{name}: weights changed; regenerate the golden with {script}"
    by_origin = {(x, y): i for i, (x, y) in enumerate(_common().TILE_ORIGINS)}
    tiles = [np.ascontiguousarray(he_tiles[by_origin[(x, y)], :side, :side]) for x, y, side in golden["tiles"]]
    pixels = hashlib.sha256(b"".join(t.tobytes() for t in tiles)).hexdigest()
    assert pixels == str(golden["tile_pixels_sha256"]), f"{name}: tile pixels differ from the golden's"
    return golden, wdir, tiles


def _by_side(tiles: list[np.ndarray], rows: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    keep = rows[:, 2] == side
    out = np.stack([t for t, k in zip(tiles, keep) if k])
    out.flags.writeable = False
    return out, keep


def _check_golden(name: str, wdir, golden: dict, tiles: list[np.ndarray], key: str) -> None:
    for side in (224, 256):
        batch, keep = _by_side(tiles, golden["tiles"], side)
        _assert_close(_encode(name, wdir, batch), golden[key][keep], f"{name} @ {side}px vs {golden['official']}")


def test_gpfm_matches_official_golden(random_weights, he_tiles, tmp_path, _one_thread):
    golden, wdir, tiles = _golden("gpfm", random_weights, he_tiles, depth=4)
    assert int(golden["depth"]) == 4
    _check_golden("gpfm", wdir, golden, tiles, "gpfm")
    # the hub release is this flat state dict pickled as GPFM.pth (majiabo/GPFM), fetched by that name
    sd = load_file(str(wdir / "model.safetensors"))
    torch.save(sd, tmp_path / "GPFM.pth")
    assert read_state_dict(tmp_path / "GPFM.pth").keys() == sd.keys()
    assert get_spec("gpfm").extra["hub_weights_file"] == "GPFM.pth"


def test_openmidnight_matches_official_golden(random_weights, he_tiles, _one_thread):
    golden, wdir, tiles = _golden("openmidnight", random_weights, he_tiles, depth=1)
    _check_golden("openmidnight", wdir, golden, tiles, "openmidnight")
    # an 18x18 grid (252 px): the official antialiased, offset-free interpolate_pos_encoding
    encoder = load_encoder(EncoderConfig("openmidnight", weights=str(wdir), device="cpu"))
    batch, _ = _by_side(tiles, golden["tiles"], 256)
    x = torch.stack(
        [
            transforms.Compose([transforms.CenterCrop(252), transforms.ToTensor(), transforms.Normalize(**IMAGENET)])(
                Image.fromarray(t)
            )
            for t in batch
        ]
    )
    with torch.inference_mode():
        got = encoder.model(x).numpy()
    _assert_close(got, golden["interp_252"], "openmidnight at 252 px (pos-embed interpolation)")


@pytest.mark.slow  # a full ResNet-50 trunk on CPU
def test_resnet50_trunc_matches_official_golden(random_weights, he_tiles, tmp_path, _one_thread):
    golden, wdir, tiles = _golden("resnet50-trunc", random_weights, he_tiles)
    _check_golden("resnet50-trunc", wdir, golden, tiles, "resnet50_trunc")
    # the release is a full ResNet-50 (layer4 and fc set aside), with or without BatchNorm step
    # counters (torchvision's resnet50-19c8e357.pth predates them)
    trunc = load_file(str(wdir / "model.safetensors"))
    torch.manual_seed(5)
    full = {k: trunc.get(k, v) for k, v in timm.create_model("resnet50").state_dict().items()}
    no_counters = {k: v for k, v in full.items() if not k.endswith("num_batches_tracked")}
    batch, keep = _by_side(tiles, golden["tiles"], 256)
    for label, sd in (("full", full), ("legacy", no_counters)):
        save_file(sd, str(tmp_path / f"{label}.safetensors"))
        _assert_close(
            _encode("resnet50-trunc", tmp_path / f"{label}.safetensors", batch),
            golden["resnet50_trunc"][keep],
            f"resnet50-trunc from a {label} ResNet-50 release",
        )
    # the default hub snapshot (timm/resnet50.tv_in1k): its config.json names timm's full resnet50
    snapshot = tmp_path / "tv_in1k"
    snapshot.mkdir()
    save_file(full, str(snapshot / "model.safetensors"))
    (snapshot / "config.json").write_text(json.dumps({"architecture": "resnet50", "num_classes": 1000}))
    _assert_close(
        _encode("resnet50-trunc", snapshot, batch),
        golden["resnet50_trunc"][keep],
        "resnet50-trunc from a timm resnet50 hub snapshot",
    )
    (snapshot / "config.json").write_text(json.dumps({"architecture": "resnet101"}))
    with pytest.raises(WeightsMismatchError, match="architecture 'resnet101'"):
        _encode("resnet50-trunc", snapshot, batch)


# --------------------------------------------------------------------------------------
# wrong checkpoints, full-size architectures
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, other",
    [
        ("openmidnight", "h-optimus-1"),
        ("gpfm", "lunit-vits8"),
        ("resnet50-trunc", "lunit-vits8"),
        ("h-optimus-1", "openmidnight"),
        ("lunit-vits8", "gpfm"),
        ("lunit-vits16", "lunit-vits8"),
    ],
)
def test_checkpoint_of_another_model_is_refused(name, other, random_weights, he_tiles, tmp_path, _one_thread):
    wdir = random_weights(other, depth=1)
    tiles = _tiles(he_tiles, 224, n=1)
    with pytest.raises(WeightsMismatchError, match="architecture"):  # its config.json names another one
        _encode(name, wdir, tiles)
    bare = tmp_path / "weights.safetensors"  # no config.json beside it: only keys and shapes decide
    bare.write_bytes((wdir / "model.safetensors").read_bytes())
    with pytest.raises(WeightsMismatchError, match="keys|shape"):
        _encode(name, bare, tiles)


#: exact parameter counts of the full models (cards: H-optimus-1 "1.1B", GPFM ViT-L "303M" per
#: lazyslide/TRIDENT listings, Lunit ViT-S "21.7M"; OpenMidnight = DINOv2 ViT-g/14-reg with a
#: 224-px position embedding and the mask token)
FULL = {
    # name: (params, output dim, depth, width, heads, patch, prefix tokens)
    "h-optimus-1": (1_134_774_272, 1536, 40, 1536, 24, 14, 5),
    "lunit-vits8": (21_670_272, 384, 12, 384, 6, 8, 1),
    "lunit-vits16": (21_665_664, 384, 12, 384, 6, 16, 1),
    "gpfm": (303_227_904, 1024, 24, 1024, 16, 14, 1),
    "openmidnight": (1_134_777_344, 1536, 40, 1536, 24, 14, 5),
}


@pytest.mark.parametrize("name", list(FULL))
def test_full_size_vit_on_meta(name):
    spec = get_spec(name)
    model = create_model(spec.architecture, spec.model_kwargs, meta=True, builder=spec.builder)
    params, dim, depth, width, heads, patch, prefix = FULL[name]
    assert count_params(model) == params
    assert len(model.blocks) == depth and model.embed_dim == width
    assert model.blocks[0].attn.num_heads == heads
    x = torch.empty(2, 3, 224, 224, device="meta")
    tokens = model.forward_features(x)
    assert tuple(tokens.shape) == (2, prefix + (224 // patch) ** 2, width)
    assert tuple(model(x).shape) == (2, dim) and spec.embed_dim == dim


def test_openmidnight_net_is_the_official_vitg14_reg_layout():
    """DINOv2 ViT-g/14-reg (hub/backbones.py dinov2_vitg14_reg): SwiGLUFFNFused hidden width
    (int(6144 * 2/3) + 7) // 8 * 8 = 4096, four registers, a 16x16 (+CLS) grid for 224 px, and
    the official parameter names (the golden's strict load checks every one)."""
    spec = get_spec("openmidnight")
    sd = create_model(spec.architecture, spec.model_kwargs, meta=True, builder=spec.builder).state_dict()
    assert tuple(sd["pos_embed"].shape) == (1, 257, 1536) and tuple(sd["register_tokens"].shape) == (1, 4, 1536)
    assert tuple(sd["blocks.39.mlp.w12.weight"].shape) == (8192, 1536)
    assert tuple(sd["blocks.39.mlp.w3.weight"].shape) == (1536, 4096)
    assert {"mask_token", "blocks.0.ls1.gamma", "blocks.0.ls2.gamma", "norm.weight"} <= set(sd)


def test_resnet50_trunc_full_size_on_meta():
    spec = get_spec("resnet50-trunc")
    model = create_model(spec.architecture, spec.model_kwargs, meta=True, builder=spec.builder)
    assert count_params(model) == 8_543_296  # ResNet-50 (25.6 M) without layer4 (15.0 M) and fc (2.1 M)
    assert tuple(model(torch.empty(2, 3, 224, 224, device="meta")).shape) == (2, 1024)
    assert not any(k.startswith(("layer4.", "fc.")) for k in model.state_dict())
