"""Models of several families whose networks pathray writes itself (``module`` builder):
CTransPath (also CHIEF's tile encoder), MUSK (two embeddings: the README's multi-scale one and
the single-scale [CLS]), KEEP and GenBio-PathFM."""

from __future__ import annotations

from ..spec import EncoderSpec, Preprocess

_CTRANSPATH_SOURCE = (
    "github.com/Xiyue-Wang/TransPath ctran.py + get_features_CTransPath.py (identical in"
    " github.com/hms-dbmi/CHIEF models/ctran.py, Get_CHIEF_patch_feature.py); modified timm 0.5.4"
    " (PyPI timm-ctp 0.5.4: stock timm 0.5.4 + SwinTransformer(embed_layer=...))"
)

SPECS: list[EncoderSpec] = [
    EncoderSpec(
        name="ctranspath",
        family="Swin-T with convolutional stem (CTransPath)",
        architecture="ctranspath_swin_tiny",
        model_kwargs=dict(
            img_size=224, embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7, mlp_ratio=4.0
        ),
        builder="module",
        pooling="model",
        embed_dim=768,
        input_px=224,
        native_mpp=1.0,
        native_tile_px=224,
        tile_source='TransPath README: "It is recommended to first try to extract features at 1.0mpp";'
        " get_features_CTransPath.py: transforms.Resize(224) (no crop), so 224-px tiles are fed as is",
        preprocess=Preprocess(resize_px=224, crop_px=224, interpolation="bilinear"),
        hf_hub_id=None,
        gated=False,
        weights_url="https://drive.google.com/file/d/1DoDx_70_TLj98gTf6YTXnu4tFhsFocDX/view",
        license="GPL-3.0 (TransPath README: non-commercial academic purposes); CHIEF weights: AGPL-3.0 repo, on request",
        card_params_m=27.5,
        source=_CTRANSPATH_SOURCE,
        notes="weights: ctranspath.pth ({'model': state_dict}, TransPath README Google Drive link) or CHIEF's"
        " CHIEF_CTransPath.pth (same layout; CHIEF README); pass weights=<file>. Embedding: mean of the 7x7"
        " final tokens after LayerNorm (model.head = nn.Identity()). TRIDENT tiles it at 1 µm/px too (README:"
        " --patch_size 256 --mag 10)",
    ),
]

_MUSK_SOURCE = (
    "github.com/lilab-stanford/MUSK musk/modeling.py (musk_large_patch16_384, BEiT-3 on the vendored"
    " torchscale), musk/utils.py (MultiScaleForward, load_model_and_may_interpolate), README usage"
)
_MUSK_TILE = (
    "README transform: Resize(384, interpolation=3 (bicubic), antialias=True) -> CenterCrop((384, 384)),"
    " IMAGENET_INCEPTION mean/std; pretraining mixed magnifications (musk/utils.py); 0.5 µm/px default"
    " tiling as TRIDENT's (--patch_size 384 --mag 20)"
)
# the text tower, the text experts (B) of every multiway module, both heads, the logit scale and the
# masked-image-modelling token of the released MUSK checkpoint are not the image embedding
_MUSK_IGNORE = (
    "beit3.text_embed.",
    "beit3.vision_embed.mask_token",
    "language_head.",
    "vision_head.",
    "logit_scale",
    "*.B.*",
)
for _name, _multiscale, _dim, _what in [
    (
        "musk",
        True,
        2048,
        "README's recommended image embedding for linear probes and MIL: ms_aug=True (scales 1"
        " and 2: the [CLS] token + the mean [CLS] of the 2x upsampled image's four 384-px quarters)",
    ),
    (
        "musk-cls",
        False,
        1024,
        "single-scale [CLS] token, ms_aug=False (TRIDENT's `musk`; the README's setting for"
        " zero-shot tasks, here without the projection head)",
    ),
]:
    SPECS.append(
        EncoderSpec(
            name=_name,
            family="BEiT-3 multiway ViT-L/16 (vision path)",
            architecture="musk_large_patch16_384_vision",
            model_kwargs=dict(
                img_size=384,
                patch_size=16,
                embed_dim=1024,
                depth=24,
                num_heads=16,
                mlp_ratio=4.0,
                multiscale=_multiscale,
            ),
            builder="module",
            pooling="model",
            embed_dim=_dim,
            input_px=384,
            native_mpp=0.5,
            native_tile_px=384,
            tile_source=_MUSK_TILE,
            preprocess=Preprocess(
                resize_px=384, crop_px=384, interpolation="bicubic", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)
            ),
            hf_hub_id="xiangjx/musk",
            gated=True,
            license="CC-BY-NC-ND-4.0 (non-commercial academic research; no redistribution)",
            checkpoint_prefix="beit3.",
            checkpoint_ignore=_MUSK_IGNORE,
            source=_MUSK_SOURCE,
            notes=f"model(image=x, with_head=False, out_norm=False, return_global=True)[0]: {_what}",
        )
    )

SPECS.append(
    EncoderSpec(
        name="keep",
        family="ViT-L/16 + 2-layer projection head (KEEP image tower)",
        architecture="keep_vit_large_patch16_224",
        model_kwargs=dict(projection_dim=768, depth=24, embed_dim=1024),
        builder="module",
        pooling="model",
        embed_dim=768,
        input_px=224,
        native_mpp=0.5,
        native_tile_px=224,
        tile_source="README / quick_start/keep_inference.py: Resize(224, bicubic) -> CenterCrop(224), ImageNet mean/std;"
        " 0.5 µm/px default tiling as TRIDENT's (--patch_size 256 --mag 20)",
        preprocess=Preprocess(resize_px=224, crop_px=224, interpolation="bicubic"),
        hf_hub_id="Astaxanthin/KEEP",
        gated=False,
        license="MIT (github.com/MAGIC-AI4Med/KEEP LICENSE)",
        checkpoint_ignore=("text.", "logit_scale"),
        source="github.com/MAGIC-AI4Med/KEEP quick_start/keep_inference.py (KEEPModel, as the hub's remote code) +"
        " README quick start: model.encode_image(transform(img))",
        notes="embedding = KEEPModel.encode_image: L2-normalised projection of the ViT-L/16 [CLS] token (768-d);"
        " the hub's trust_remote_code is never run: pathray builds the same network itself",
    )
)

SPECS.append(
    EncoderSpec(
        name="genbio-pathfm",
        family="ViT-g/16-like per-channel encoder, 4 storage tokens, RoPE, SwiGLU (JEDI: JEPA + DINO)",
        architecture="genbio_pathfm_vit",
        model_kwargs=dict(
            patch_size=16, embed_dim=1536, depth=40, num_heads=24, ffn_ratio=4.0, n_storage_tokens=4, rope_base=100.0
        ),
        builder="module",
        pooling="model",
        embed_dim=4608,
        input_px=224,
        native_mpp=0.5,
        native_tile_px=224,
        tile_source="README / GenBio_PathFM_Inference.transform: Resize((224, 224)) (bilinear, no crop); the README states"
        " no µm/px: 0.5 µm/px as TRIDENT's default (--patch_size 224 --mag 20)",
        preprocess=Preprocess(
            resize_px=224, crop_px=224, interpolation="bilinear", mean=(0.697, 0.575, 0.728), std=(0.188, 0.240, 0.187)
        ),
        hf_hub_id="genbio-ai/genbio-pathfm",
        gated=False,
        extra={"hub_weights_file": "model.pth"},
        license="GenBio AI Community License (non-commercial; no training of similar models on its outputs)",
        source="github.com/genbio-ai/genbio-pathfm genbio_pathfm/model.py (GenBio_PathFM_Inference, VisionTransformer)",
        notes="weights: model.pth of genbio-ai/genbio-pathfm (a plain state dict, loaded strictly by the official code;"
        " the repo's model.safetensors is the trust_remote_code wrapper's). README: \"a 1.1B-parameter FM\" (1,133,686,784 counted). Embedding: the [CLS] tokens of the R, G and B planes, each encoded as a grey"
        " image, concatenated (3 x 1536). RoPE in bfloat16 as in the official code",
    )
)
