"""CONCH (Mahmood Lab): CONCH v1, a CoCa vision-language model whose vision tower is a ViT-B/16
with an attentional pooler, and CONCH v1.5, TITAN's ViT-L/16 tile encoder. Networks in
:mod:`pathray.encoders.nets.conch`; facts and sources in docs/zoo/conch.md."""

from __future__ import annotations

from ..spec import IMAGENET_MEAN, IMAGENET_STD, EncoderSpec, Preprocess

#: conch/open_clip_custom/constants.py (OPENAI_DATASET_MEAN / _STD), set by factory.create_model
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

_CC_BY_NC_ND = "CC-BY-NC-ND-4.0 (non-commercial, academic research; no redistribution)"
_V1_SOURCE = (
    "github:mahmoodlab/CONCH conch/open_clip_custom: create_model_from_pretrained('conch_ViT-B-16', ...) "
    "(model_configs/conch_ViT-B-16.json, coca_model.py, vision_tower.py, transformer.py, transform.py)"
)
_V1_TILE = (
    "conch_ViT-B-16.json vision_cfg.image_size=448; transform.py image_transform: Resize(448, bicubic) -> "
    "CenterCrop(448), so 448-px tiles are fed unresampled. TRIDENT's README tiles CONCH at 512 px @ 20x "
    "(resized to 448 by the same transform)"
)
#: the release holds the whole CoCa model except the multimodal decoder (CONCH README)
_V1_PREFIX = "visual."
_V1_IGNORE = ("text.", "logit_scale", "visual.proj_contrast", "visual.attn_pool_caption.", "visual.ln_caption.")


SPECS: list[EncoderSpec] = [
    EncoderSpec(
        name="conch-v1",
        family="ViT-B/16 CoCa vision tower, attentional pooler",
        architecture="conch_v1_visual",
        builder="module",
        model_kwargs=dict(depth=12, embed_dim=768, num_heads=12, img_size=448),
        embed_dim=512,
        input_px=448,
        native_mpp=0.5,
        native_tile_px=448,
        tile_source=_V1_TILE,
        preprocess=Preprocess(resize_px=448, crop_px=448, interpolation="bicubic", mean=OPENAI_MEAN, std=OPENAI_STD),
        pooling="model",
        hf_hub_id="MahmoodLab/CONCH",
        gated=True,
        license=_CC_BY_NC_ND,
        checkpoint_prefix=_V1_PREFIX,
        checkpoint_ignore=_V1_IGNORE,
        source=_V1_SOURCE,
        notes="CONCH README 'vision encoder' embedding: encode_image(x, proj_contrast=False, normalize=False), the "
        "attention-pooled 512-d feature before the contrastive projection (also CLAM's and TRIDENT's). The "
        "README's retrieval embedding (CONCH's joint image-text space) is normalize(emb @ visual.proj_contrast)",
    ),
    EncoderSpec(
        name="conch-v1.5",
        family="ViT-L/16 (iBOT), attentional pooler",
        architecture="conch_v15_visual",
        builder="module",
        model_kwargs=dict(depth=24, embed_dim=1024, num_heads=16, img_size=224, init_values=1e-6),
        embed_dim=768,
        input_px=448,
        native_mpp=0.5,
        native_tile_px=512,
        tile_source="TITAN README: patch_size_lv0 is 512 at 20x (1024 at 40x): CONCH v1.5 features of 512-px tiles "
        "at 0.5 µm/px, resized to 448 by conch_v1_5.py's eval transform; TRIDENT README: conch_v15 "
        "--patch_size 512 --mag 20",
        preprocess=Preprocess(
            resize_px=448, crop_px=448, interpolation="bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD
        ),
        pooling="model",
        hf_hub_id="MahmoodLab/conchv1_5",
        gated=True,
        license=_CC_BY_NC_ND,
        source="TITAN's conch_v1_5.py (HF MahmoodLab/TITAN, mirrored in github:clemsgrs/unicorn_baseline "
        "src/unicorn_baseline/vision/pathology/titan/conch_v1_5.py build_conch; conch_config in config.json)",
        notes="TITAN's tile encoder: titan.return_conch(); the release pytorch_model_vision.bin holds trunk.*, "
        "attn_pool_contrast.*, ln_contrast.* (loaded strictly by TRIDENT); its pos_embed is the 14x14 grid "
        "of img_size=224, interpolated at every forward. TRIDENT runs it in fp16",
        extra={"hub_weights_file": "pytorch_model_vision.bin"},
    ),
]
