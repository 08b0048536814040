"""The seed models: UNI, UNI2-h, Prov-GigaPath, Virchow, Virchow2, H-optimus-0 and kaiko's
ViTs. Keyword arguments are the cards' own (``timm.create_model`` / ``VisionTransformer``)."""

from __future__ import annotations

import functools

import torch
from timm.layers import GluMlp, SwiGLUPacked

from ..spec import EncoderSpec, Preprocess

# --------------------------------------------------------------------------------------
_CC_NC_ND = "CC-BY-NC-ND-4.0 (non-commercial, academic research; no redistribution)"
_UNI_TILE = "card: transforms.Resize(224) -> CenterCrop(224) (also timm resolve_data_config of the hub weights)"

SPECS: list[EncoderSpec] = [
    EncoderSpec(
        name="uni",
        family="ViT-L/16",
        architecture="vit_large_patch16_224",
        model_kwargs=dict(img_size=224, patch_size=16, init_values=1e-5, num_classes=0, dynamic_img_size=True),
        embed_dim=1024,
        input_px=224,
        native_mpp=0.5,
        native_tile_px=224,
        tile_source=_UNI_TILE,
        preprocess=Preprocess(resize_px=224, crop_px=224, interpolation="bilinear"),
        pooling="cls",
        hf_hub_id="MahmoodLab/UNI",
        gated=True,
        license=_CC_NC_ND,
    ),
    EncoderSpec(
        name="uni2-h",
        family="ViT-H/14, 8 registers, SwiGLU",
        architecture="vit_giant_patch14_224",
        model_kwargs=dict(
            img_size=224,
            patch_size=14,
            depth=24,
            num_heads=24,
            init_values=1e-5,
            embed_dim=1536,
            mlp_ratio=2.66667 * 2,
            num_classes=0,
            no_embed_class=True,
            mlp_layer=SwiGLUPacked,
            act_layer=torch.nn.SiLU,
            reg_tokens=8,
            dynamic_img_size=True,
        ),
        embed_dim=1536,
        input_px=224,
        native_mpp=0.5,
        native_tile_px=224,
        tile_source=_UNI_TILE,
        preprocess=Preprocess(resize_px=224, crop_px=224, interpolation="bilinear"),
        pooling="cls",
        hf_hub_id="MahmoodLab/UNI2-h",
        gated=True,
        license=_CC_NC_ND,
        card_params_m=681,  # HF model card "Params (M): 681"
    ),
    EncoderSpec(
        name="prov-gigapath",
        family="ViT-g/14 (patch 16) tile encoder",
        architecture="vit_giant_patch14_dinov2",
        model_kwargs=dict(
            img_size=224,
            in_chans=3,
            patch_size=16,
            embed_dim=1536,
            depth=40,
            num_heads=24,
            init_values=1e-5,
            mlp_ratio=5.33334,
            num_classes=0,
        ),
        embed_dim=1536,
        input_px=224,
        native_mpp=0.5,
        native_tile_px=256,
        tile_source="card: Resize(256, bicubic) -> CenterCrop(224); official tiling: 256-px tiles at 0.5 µm/px"
        " (gigapath/pipeline.py tile_one_slide; slide encoder tile_size=256)",
        preprocess=Preprocess(resize_px=256, crop_px=224, interpolation="bicubic"),
        pooling="cls",
        hf_hub_id="prov-gigapath/prov-gigapath",
        gated=True,
        license="Prov-GigaPath model licence: research use only, not for clinical or commercial deployment",
        notes="card preprocessing is Resize(256, bicubic) + CenterCrop(224): 256 px tiles avoid resampling",
    ),
    EncoderSpec(
        name="virchow",
        family="ViT-H/14, SwiGLU",
        architecture="vit_huge_patch14_224",
        model_kwargs=dict(
            img_size=224,
            init_values=1e-5,
            num_classes=0,
            mlp_ratio=5.3375,
            global_pool="",
            dynamic_img_size=True,
            mlp_layer=SwiGLUPacked,
            act_layer=torch.nn.SiLU,
        ),
        embed_dim=2560,
        input_px=224,
        native_mpp=0.5,
        native_tile_px=224,
        tile_source='card: "Image size: 224 x 224", tiles sampled at 0.5 µm/px; transform from the hub pretrained_cfg',
        preprocess=Preprocess(resize_px=224, crop_px=224, interpolation="bicubic"),
        pooling="cls+mean_patch",
        hf_hub_id="paige-ai/Virchow",
        gated=True,
        license="Apache-2.0 with additional terms (institutional e-mail; no clinical use)",
        card_params_m=632,
    ),
    EncoderSpec(
        name="virchow2",
        family="ViT-H/14, 4 registers, SwiGLU",
        architecture="vit_huge_patch14_224",
        model_kwargs=dict(
            img_size=224,
            init_values=1e-5,
            num_classes=0,
            reg_tokens=4,
            mlp_ratio=5.3375,
            global_pool="",
            dynamic_img_size=True,
            mlp_layer=SwiGLUPacked,
            act_layer=torch.nn.SiLU,
        ),
        embed_dim=2560,
        input_px=224,
        native_mpp=0.5,
        native_tile_px=224,
        tile_source="hub pretrained_cfg transform Resize(224) -> CenterCrop(224), input 224 x 224",
        preprocess=Preprocess(resize_px=224, crop_px=224, interpolation="bicubic"),
        pooling="cls+mean_patch",
        hf_hub_id="paige-ai/Virchow2",
        gated=True,
        license=_CC_NC_ND,
        card_params_m=632,
        notes="mixed-magnification pretraining (5x-40x); 0.5 µm/px is the default tiling",
    ),
    EncoderSpec(
        name="h-optimus-0",
        family="ViT-g/14, 4 registers, SwiGLU",
        architecture="vit_giant_patch14_reg4_dinov2",
        model_kwargs=dict(
            patch_size=14,
            embed_dim=1536,
            depth=40,
            num_heads=24,
            init_values=1e-5,
            mlp_ratio=5.33334,
            mlp_layer=functools.partial(GluMlp, act_layer=torch.nn.SiLU, gate_last=False),
            act_layer=torch.nn.SiLU,
            reg_tokens=4,
            no_embed_class=True,
            img_size=224,
            num_classes=0,
            in_chans=3,
        ),
        embed_dim=1536,
        input_px=224,
        native_mpp=0.5,
        native_tile_px=224,
        tile_source='card: "expects images of size 224x224, extracted at 0.5 microns per pixel"',
        preprocess=Preprocess(
            resize_px=224,
            crop_px=224,
            interpolation="bicubic",
            mean=(0.707223, 0.578729, 0.703617),
            std=(0.211883, 0.230117, 0.177517),
        ),
        pooling="cls",
        hf_hub_id="bioptimus/H-optimus-0",
        gated=True,
        weights_url="https://public-bioptimus-eu-west-3.s3.eu-west-3.amazonaws.com/h-optimus-v0/checkpoint.pth",
        license="Apache-2.0",
        notes="card feeds 224x224 tiles at 0.5 µm/px without resizing; other tile sizes are resized (bicubic) to 224",
    ),
]

_KAIKO_RELEASE = "https://github.com/kaiko-ai/towards_large_pathology_fms/releases/download/0.0.1/{}.pth"
_KAIKO_LICENSE = "Kaiko Non-Commercial Public License v1"
# the ViT-L/14 release is trained at 518 px (37x37 grid); the card's torch.hub loader builds it at
# 224 px and timm's checkpoint filter resamples the grid on load
_KAIKO_RESAMPLE = "kaiko ViT-L/14 release trained at 518 px, used at 224 px by its torch.hub loader"
for _short, _arch, _family, _dim, _extra, _mirror in [
    ("vits16", "vit_small_patch16_224", "ViT-S/16", 384, {}, "vit_small_patch16_224"),
    ("vits8", "vit_small_patch8_224", "ViT-S/8", 384, {}, "vit_small_patch8_224"),
    ("vitb16", "vit_base_patch16_224", "ViT-B/16", 768, {}, "vit_base_patch16_224"),
    ("vitb8", "vit_base_patch8_224", "ViT-B/8", 768, {}, "vit_base_patch8_224"),
    # torch.hub builds vit_large_patch14_reg4_dinov2 with a fresh pretrained_cfg, whose
    # default input size gives img_size=224 (not the DINOv2 default 518): say so explicitly.
    (
        "vitl14",
        "vit_large_patch14_reg4_dinov2",
        "ViT-L/14, 4 registers",
        1024,
        {"img_size": 224},
        "vit_large_patch14_reg4_224",
    ),
]:
    SPECS.append(
        EncoderSpec(
            name=f"kaiko-{_short}",
            family=_family,
            architecture=_arch,
            model_kwargs=dict(dynamic_img_size=True, num_classes=0, **_extra),
            embed_dim=_dim,
            input_px=224,
            native_mpp=0.5,
            native_tile_px=224,
            tile_source="card: v2.Resize(224) -> v2.CenterCrop(224)",
            preprocess=Preprocess(
                resize_px=224,
                crop_px=224,
                interpolation="bilinear",
                mean=(0.5, 0.5, 0.5),
                std=(0.5, 0.5, 0.5),
                resize_backend="torch",
            ),
            pooling="cls",
            hf_hub_id=f"1aurent/{_mirror}.kaiko_ai_towards_large_pathology_fms",
            gated=False,
            weights_url=_KAIKO_RELEASE.format(_short),
            license=_KAIKO_LICENSE,
            notes=f"card: torch.hub.load('kaiko-ai/towards_large_pathology_fms', '{_short}') (weights from the"
            " GitHub release URL); hub id is the community timm mirror; 0.5 µm/px default tiling",
            pos_embed_resample=_KAIKO_RESAMPLE if _short == "vitl14" else "",
        )
    )
