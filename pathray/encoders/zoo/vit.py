"""ViT (and one CNN) tile encoders built on timm or on a plain DINOv2 network: H-optimus-1,
Lunit's DINO ViT-S/8 and ViT-S/16, GPFM, CLAM's truncated ResNet-50 and OpenMidnight.

Sources are given per spec (``source``, ``tile_source``); docs/zoo/vit.md tabulates them.
"""

from __future__ import annotations

from ..spec import EncoderSpec, Preprocess

_HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
_HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)
#: Lunit's ViT-S training statistics (kaiko-ai/eva, backbones/pathology/lunit.py, citing Lunit's release)
_LUNIT_MEAN = (0.70322989, 0.53606487, 0.66096631)
_LUNIT_STD = (0.21716536, 0.26081574, 0.20723464)
_LUNIT_RELEASE = "https://github.com/lunit-io/benchmark-ssl-pathology/releases/download/pretrained-weights/{}"


def _lunit(patch: int) -> EncoderSpec:
    """Lunit's DINO ViT-S/``patch`` (README keys ``DINO_p8``/``DINO_p16``)."""
    return EncoderSpec(
        name=f"lunit-vits{patch}",
        family=f"ViT-S/{patch} (DINO)",
        architecture=f"vit_small_patch{patch}_224",
        # Lunit README: VisionTransformer(img_size=224, patch_size=patch, embed_dim=384, num_heads=6, num_classes=0)
        model_kwargs=dict(img_size=224, num_classes=0),
        embed_dim=384,
        input_px=224,
        native_mpp=0.5,
        native_tile_px=224,
        tile_source="TRIDENT: --patch_encoder lunit-vits8 --patch_size 224 --mag 20 (ViT-S/16: same release, "
        "same statistics in kaiko-ai/eva); slide2vec: 0.5 µm/px",
        preprocess=Preprocess(resize_px=224, crop_px=224, interpolation="bicubic", mean=_LUNIT_MEAN, std=_LUNIT_STD),
        pooling="cls",
        hf_hub_id=f"1aurent/vit_small_patch{patch}_224.lunit_dino",
        weights_url=_LUNIT_RELEASE.format(f"dino_vit_small_patch{patch}_ep200.torch"),
        license="Lunit non-commercial public licence (research use only)",
        source="github:lunit-io/benchmark-ssl-pathology README (timm VisionTransformer); normalisation: "
        "kaiko-ai/eva lunit.py (Lunit's ViT-S training statistics)",
        notes="the 1aurent hub mirror's config.json carries timm's stock DINO transform (ImageNet mean/std, "
        "crop 0.9); pathray uses Lunit's own statistics and feeds 224 px tiles unresized",
    )


SPECS: list[EncoderSpec] = [
    EncoderSpec(
        name="h-optimus-1",
        family="ViT-g/14, 4 registers, SwiGLU",
        architecture="vit_giant_patch14_reg4_dinov2",
        # card: timm.create_model("hf-hub:bioptimus/H-optimus-1", pretrained=True, init_values=1e-5,
        # dynamic_img_size=False); the hub config's input_size (224) sets img_size
        model_kwargs=dict(img_size=224, init_values=1e-5, dynamic_img_size=False, num_classes=0),
        embed_dim=1536,
        input_px=224,
        native_mpp=0.5,
        native_tile_px=224,
        tile_source="card: 224x224 tiles at 0.5 µm/px, fed without resizing (ToTensor -> Normalize)",
        preprocess=Preprocess(
            resize_px=224, crop_px=224, interpolation="bicubic", mean=_HOPTIMUS_MEAN, std=_HOPTIMUS_STD
        ),
        pooling="cls",
        hf_hub_id="bioptimus/H-optimus-1",
        gated=True,
        license="CC-BY-NC-ND-4.0 (TRIDENT model table; non-commercial, no redistribution)",
        source="card (timm hub id + kwargs); TRIDENT load.py loads pytorch_model.bin strictly into timm "
        "vit_giant_patch14_reg4_dinov2 at img_size=224",
        notes="same architecture and normalisation as H-optimus-0; other tile sizes are resized (bicubic) to 224",
    ),
    _lunit(8),
    _lunit(16),
    EncoderSpec(
        name="gpfm",
        family="ViT-L/14 (DINOv2, knowledge distillation)",
        architecture="vit_large_patch14_dinov2",
        model_kwargs=dict(img_size=224, init_values=1e-5, num_classes=0),
        embed_dim=1024,
        input_px=224,
        native_mpp=0.5,
        native_tile_px=256,
        tile_source='github:birkhoffkiki/GPFM README: "we prefer image with size of 512*512 (extracted from 40X)"'
        " (= 256 px at 0.5 µm/px), transforms.Resize((224, 224), bicubic)",
        preprocess=Preprocess(resize_px=224, crop_px=224, interpolation="bicubic"),
        pooling="cls",
        hf_hub_id="majiabo/GPFM",
        extra={"hub_weights_file": "GPFM.pth"},
        license="MIT (TRIDENT model table)",
        source="github:birkhoffkiki/GPFM models/dinov2 (vit_large, patch 14, img 224, ffn mlp, LayerScale 1e-5); "
        "the hub's GPFM.pth is a flat timm-layout state dict (TRIDENT, slide2vec load it strictly into "
        "timm vit_large_patch14_dinov2 at img_size=224)",
        notes="output: the final-norm CLS token (official forward with head=Identity); the GitHub release "
        "GPFM.pth is the training layout (teacher/backbone, chunked blocks) and is not read",
    ),
    EncoderSpec(
        name="resnet50-trunc",
        family="ResNet-50 through layer3 (ImageNet)",
        architecture="resnet50_trunc",
        builder="module",
        model_kwargs={},
        embed_dim=1024,
        input_px=224,
        native_mpp=0.5,
        native_tile_px=256,
        tile_source="CLAM README: create_patches_fp.py --patch_size 256 at level 0 (20x); extract_features_fp.py "
        "--target_patch_size 224 (Resize(224))",
        preprocess=Preprocess(resize_px=224, crop_px=224, interpolation="bilinear"),
        pooling="model",
        hf_hub_id="timm/resnet50.tv_in1k",
        weights_url="https://download.pytorch.org/models/resnet50-19c8e357.pth",
        checkpoint_ignore=("layer4.", "fc."),
        extra={"release_architecture": "resnet50"},  # timm/resnet50.tv_in1k config.json
        license="BSD-3-Clause (torchvision ImageNet weights)",
        source="github:mahmoodlab/CLAM models/timm_wrapper.py TimmCNNEncoder (resnet50.tv_in1k, features_only, "
        "out_indices=(3,), AdaptiveAvgPool2d(1)); utils/transform_utils.py Resize(224) + ImageNet norm",
        notes="the full ResNet-50 release is read; layer4 and fc are set aside as CLAM's non-strict load does",
    ),
    EncoderSpec(
        name="openmidnight",
        family="ViT-g/14, 4 registers, SwiGLU (DINOv2)",
        architecture="dinov2_vit",
        builder="module",
        # torch.hub dinov2_vitg14_reg (vit_giant2, ffn swiglufused, 4 registers, antialiased offset-free
        # pos-embed interpolation, LayerScale); pos_embed from the checkpoint, trained at 224 px
        # (MedARC-AI/OpenMidnight dinov2/models: img_size = crops.global_crops_size = 224)
        model_kwargs=dict(
            img_size=224,
            patch_size=14,
            embed_dim=1536,
            depth=40,
            num_heads=24,
            mlp_ratio=4.0,
            ffn_layer="swiglufused",
            num_register_tokens=4,
            init_values=1.0,
            interpolate_antialias=True,
            interpolate_offset=0.0,
        ),
        embed_dim=1536,
        input_px=224,
        native_mpp=0.5,
        native_tile_px=224,
        tile_source="TRIDENT: --patch_encoder openmidnight --patch_size 224 --mag 20; Resize((224, 224))",
        preprocess=Preprocess(resize_px=224, crop_px=224, interpolation="bilinear"),
        pooling="model",
        hf_hub_id="SophontAI/OpenMidnight",
        extra={"hub_weights_file": "teacher_checkpoint_load.pt"},
        gated=True,
        license="Apache-2.0 (TRIDENT model table; access request on the hub)",
        source="github:facebookresearch/dinov2 hub/backbones.py dinov2_vitg14_reg + models/vision_transformer.py; "
        "TRIDENT load.py: checkpoint pos_embed replaces the model's, strict load, model(x)",
        notes="output: the final-norm CLS token; ImageNet normalisation",
    ),
]
