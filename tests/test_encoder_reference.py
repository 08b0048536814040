"""Reference equivalence: each model card's own recipe vs pathray's encoder.

For every registered model the test builds the card's recipe as the card writes it (its
``timm.create_model`` / ``VisionTransformer`` kwargs, its PIL/torchvision transforms and its
pooling), gives it the random-initialised weights that ``write_random_weights`` saved in hub
layout (the hub itself is replaced by ``local-dir:``, a ``pytorch_model.bin`` or a
``pretrained_cfg["file"]``), and requires pathray's embedding of real H&E tiles to match to
1e-4 (fp32). Only ``depth`` is reduced, so the CPU test stays fast; widths, heads, registers,
MLP type and pooling are the cards'. Both a tile that needs no resampling and one that does
(256 <-> 224) are checked. Full-size architectures are checked on the meta device.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file
from torchvision import transforms

from pathray.encoders import EncoderConfig, get_spec, load_encoder
from pathray.encoders.build import count_params, create_model

TOL = 1e-4
IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
#: depth used for the CPU comparison (full widths); giant models get 1 block
DEPTH = {
    "uni": 1,
    "uni2-h": 1,
    "prov-gigapath": 1,
    "virchow": 1,
    "virchow2": 1,
    "h-optimus-0": 1,
    "kaiko-vits16": 2,
    "kaiko-vits8": 1,
    "kaiko-vitb16": 1,
    "kaiko-vitb8": 1,
    "kaiko-vitl14": 1,
}
N_TILES = {
    "uni2-h": 2,
    "prov-gigapath": 2,
    "virchow": 2,
    "virchow2": 2,
    "h-optimus-0": 2,
    "kaiko-vitb8": 2,
    "kaiko-vits8": 3,
}


def _pickle_copy(weights_dir: Path, filename: str) -> Path:
    """The same weights as a torch.save'd state dict (how several cards distribute them)."""
    out = weights_dir.parent / (weights_dir.name + "_pickled") / filename
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(load_file(str(weights_dir / "model.safetensors")), out)
    return out


# --------------------------------------------------------------------------------------
# The cards' recipes. Each returns (model, transform on a PIL image, pooling on model(x)).
# --------------------------------------------------------------------------------------
def _identity_pool(out):
    return out


def recipe_uni(wdir: Path, depth: int):
    # UNI README (local checkpoint): vit_large_patch16_224 + Resize(224)/CenterCrop(224)/ImageNet norm
    model = timm.create_model(
        "vit_large_patch16_224",
        img_size=224,
        patch_size=16,
        init_values=1e-5,
        num_classes=0,
        dynamic_img_size=True,
        depth=depth,
    )
    model.load_state_dict(torch.load(_pickle_copy(wdir, "pytorch_model.bin"), map_location="cpu"), strict=True)
    transform = transforms.Compose(
        [transforms.Resize(224), transforms.CenterCrop(224), transforms.ToTensor(), transforms.Normalize(**IMAGENET)]
    )
    return model, transform, _identity_pool


def recipe_uni2_h(wdir: Path, depth: int):
    # UNI2-h card, local-checkpoint recipe (timm_kwargs verbatim, depth reduced)
    timm_kwargs = {
        "model_name": "vit_giant_patch14_224",
        "img_size": 224,
        "patch_size": 14,
        "depth": 24,
        "num_heads": 24,
        "init_values": 1e-5,
        "embed_dim": 1536,
        "mlp_ratio": 2.66667 * 2,
        "num_classes": 0,
        "no_embed_class": True,
        "mlp_layer": timm.layers.SwiGLUPacked,
        "act_layer": torch.nn.SiLU,
        "reg_tokens": 8,
        "dynamic_img_size": True,
    }
    timm_kwargs["depth"] = depth
    model = timm.create_model(**timm_kwargs)
    model.load_state_dict(torch.load(_pickle_copy(wdir, "pytorch_model.bin"), map_location="cpu"), strict=True)
    transform = transforms.Compose(
        [
            transforms.Resize(224),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
        ]
    )
    return model, transform, _identity_pool


def recipe_prov_gigapath(wdir: Path, depth: int):
    # Prov-GigaPath card: timm.create_model("hf_hub:prov-gigapath/prov-gigapath", pretrained=True);
    # the hub is replaced by the local hub-layout dir (its config.json carries depth)
    model = timm.create_model(f"local-dir:{wdir}", pretrained=True)
    assert len(model.blocks) == depth
    transform = transforms.Compose(
        [
            transforms.Resize(256, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
        ]
    )
    return model, transform, _identity_pool


VIRCHOW_HUB_PRETRAINED_CFG = {
    "input_size": (3, 224, 224),
    "interpolation": "bicubic",
    "crop_pct": 1.0,
    "crop_mode": "center",
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
}


def _virchow_recipe(wdir: Path, depth: int, n_skip: int):
    from timm.data import resolve_data_config
    from timm.data.transforms_factory import create_transform
    from timm.layers import SwiGLUPacked

    model = timm.create_model(f"local-dir:{wdir}", pretrained=True, mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU)
    assert len(model.blocks) == depth
    # the transform fields of paige-ai/Virchow{,2} config.json, so the card's
    # create_transform(...) below is the hub's, not whatever write_random_weights wrote
    for key, value in VIRCHOW_HUB_PRETRAINED_CFG.items():
        got = model.pretrained_cfg[key]
        assert (tuple(got) if isinstance(got, list) else got) == value, key
    tf = create_transform(**resolve_data_config(model.pretrained_cfg, model=model))

    def pool(output):
        class_token = output[:, 0]
        patch_tokens = output[:, n_skip:]
        return torch.cat([class_token, patch_tokens.mean(1)], dim=-1)

    return model, tf, pool


def recipe_virchow(wdir: Path, depth: int):
    return _virchow_recipe(wdir, depth, 1)  # output[:, 1:] are the 256 patch tokens


def recipe_virchow2(wdir: Path, depth: int):
    return _virchow_recipe(wdir, depth, 5)  # output[:, 5:]: 4 register tokens skipped


def recipe_h_optimus_0(wdir: Path, depth: int, tile_px: int = 224):
    params = {
        "patch_size": 14,
        "embed_dim": 1536,
        "depth": 40,
        "num_heads": 24,
        "init_values": 1e-05,
        "mlp_ratio": 5.33334,
        "mlp_layer": functools.partial(
            timm.layers.mlp.GluMlp, act_layer=torch.nn.modules.activation.SiLU, gate_last=False
        ),
        "act_layer": torch.nn.modules.activation.SiLU,
        "reg_tokens": 4,
        "no_embed_class": True,
        "img_size": 224,
        "num_classes": 0,
        "in_chans": 3,
    }
    params["depth"] = depth
    model = timm.models.VisionTransformer(**params)
    model.load_state_dict(torch.load(_pickle_copy(wdir, "checkpoint.pth"), map_location="cpu"))
    norm = transforms.Normalize(mean=(0.707223, 0.578729, 0.703617), std=(0.211883, 0.230117, 0.177517))
    if tile_px == 224:  # the card: 224 px tiles at 0.5 µm/px, no resize
        transform = transforms.Compose([transforms.ToTensor(), norm])
    else:  # other sizes: the hub config's eval transform (bicubic, crop_pct 1.0)
        transform = transforms.Compose(
            [
                transforms.Resize(224, interpolation=transforms.InterpolationMode.BICUBIC),
                transforms.CenterCrop(224),
                transforms.ToTensor(),
                norm,
            ]
        )
    return model, transform, _identity_pool


_KAIKO_ARCH = {
    "vits16": "vit_small_patch16_224",
    "vits8": "vit_small_patch8_224",
    "vitb16": "vit_base_patch16_224",
    "vitb8": "vit_base_patch8_224",
    "vitl14": "vit_large_patch14_reg4_dinov2",
}


def recipe_kaiko(short: str, wdir: Path, depth: int):
    from torchvision.transforms import v2

    # hubconf.py of kaiko-ai/towards_large_pathology_fms, with the release URL replaced by a local file
    out_indices = None
    model = timm.create_model(
        model_name=_KAIKO_ARCH[short],
        dynamic_img_size=True,
        pretrained_cfg={"file": str(_pickle_copy(wdir, f"{short}.pth")), "num_classes": 0},
        pretrained=True,
        out_indices=out_indices,
        features_only=out_indices is not None,
        depth=depth,
    )
    preprocessing = v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(size=224),
            v2.CenterCrop(size=224),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
        ]
    )
    return model, preprocessing, _identity_pool


RECIPES = {
    "uni": recipe_uni,
    "uni2-h": recipe_uni2_h,
    "prov-gigapath": recipe_prov_gigapath,
    "virchow": recipe_virchow,
    "virchow2": recipe_virchow2,
    "h-optimus-0": recipe_h_optimus_0,
    **{f"kaiko-{k}": functools.partial(recipe_kaiko, k) for k in _KAIKO_ARCH},
}


#: the models this module checks against their cards (tests/test_zoo_coverage.py sums them up)
COVERED_MODELS = tuple(RECIPES)


def _reference_embeddings(model, transform, pool, tiles: np.ndarray) -> np.ndarray:
    model.eval()
    batch = torch.stack([transform(Image.fromarray(t)) for t in tiles])
    with torch.inference_mode():
        return pool(model(batch)).float().numpy()


@pytest.fixture(scope="module")
def _torch_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(min(2, old))
    yield
    torch.set_num_threads(old)


@pytest.mark.parametrize("name", list(RECIPES))
def test_matches_card_recipe(name, random_weights, he_tiles, _torch_threads):
    depth = DEPTH[name]
    wdir = random_weights(name, depth=depth)
    n = N_TILES.get(name, 4)
    encoder = load_encoder(EncoderConfig(name, weights=str(wdir), device="cpu", batch_size=2))
    spec = get_spec(name)
    for tile_px in (224, 256):  # 224: no resampling for most cards; 256: resize (gigapath: crop only)
        tiles = np.ascontiguousarray(he_tiles[:n, :tile_px, :tile_px])
        tiles.flags.writeable = False
        if name == "h-optimus-0":
            model, transform, pool = recipe_h_optimus_0(wdir, depth, tile_px)
        else:
            model, transform, pool = RECIPES[name](wdir, depth)
        ref = _reference_embeddings(model, transform, pool, tiles)
        got = encoder(tiles)
        assert got.shape == (n, spec.embed_dim) == ref.shape
        assert got.dtype == np.float32
        diff = float(np.abs(got - ref).max())
        assert diff <= TOL, f"{name} @ {tile_px}px: max abs diff {diff:.3g} > {TOL}"
        assert float(np.abs(ref).max()) > 1e-2  # not a degenerate (all-zero) embedding


# --------------------------------------------------------------------------------------
# full-size architectures, on the meta device (no memory, no compute)
# --------------------------------------------------------------------------------------
#: (depth, embed width, heads, patch, prefix tokens incl. registers) from the cards / hub configs
FULL_ARCH = {
    "uni": (24, 1024, 16, 16, 1),
    "uni2-h": (24, 1536, 24, 14, 9),
    "prov-gigapath": (40, 1536, 24, 16, 1),
    "virchow": (32, 1280, 16, 14, 1),
    "virchow2": (32, 1280, 16, 14, 5),
    "h-optimus-0": (40, 1536, 24, 14, 5),
    "kaiko-vits16": (12, 384, 6, 16, 1),
    "kaiko-vits8": (12, 384, 6, 8, 1),
    "kaiko-vitb16": (12, 768, 12, 16, 1),
    "kaiko-vitb8": (12, 768, 12, 8, 1),
    "kaiko-vitl14": (24, 1024, 16, 14, 5),
}


@pytest.mark.parametrize("name", list(FULL_ARCH))
def test_full_architecture_on_meta(name):
    spec = get_spec(name)
    model = create_model(spec.architecture, spec.model_kwargs, meta=True)
    depth, width, heads, patch, prefix = FULL_ARCH[name]
    assert len(model.blocks) == depth
    assert model.embed_dim == width
    assert model.blocks[0].attn.num_heads == heads
    assert model.patch_embed.patch_size == (patch, patch)
    assert model.num_prefix_tokens == prefix
    x = torch.empty(2, 3, spec.input_px, spec.input_px, device="meta")
    tokens = model.forward_features(x)
    n_patches = (spec.input_px // patch) ** 2
    assert tuple(tokens.shape) == (2, prefix + n_patches, width)
    pooled = model(x) if spec.pooling == "cls" else torch.cat([tokens[:, 0], tokens[:, prefix:].mean(1)], -1)
    assert tuple(pooled.shape) == (2, spec.embed_dim)
    if spec.card_params_m:
        millions = count_params(model) / 1e6
        assert abs(millions - spec.card_params_m) / spec.card_params_m < 0.005, millions


def test_known_parameter_counts_on_meta():
    """Exact counts of the full models (regression guard; cards round them: Virchow "632M",
    UNI2-h "681M", GigaPath/H-optimus-0 "1.1B", ViT-L 0.3B, ViT-B 86M, ViT-S 22M)."""
    expected = {
        "uni": 303_350_784,
        "uni2-h": 681_394_176,
        "prov-gigapath": 1_134_953_984,
        "virchow": 631_229_184,
        "virchow2": 631_239_424,
        "h-optimus-0": 1_134_774_272,
        "kaiko-vits16": 21_665_664,
        "kaiko-vitb8": 85_807_872,
        "kaiko-vitl14": 303_230_976,
    }
    for name, count in expected.items():
        spec = get_spec(name)
        assert count_params(create_model(spec.architecture, spec.model_kwargs, meta=True)) == count, name
