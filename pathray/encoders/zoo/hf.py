"""Encoders published as ``transformers`` models: Phikon, Phikon-v2 (Owkin), Midnight-12k (kaiko.ai),
Hibou-B and Hibou-L (HistAI).

Each spec builds the ``transformers`` class of the card from the hub ``config.json`` values
(``model_kwargs["config"]``; no ``trust_remote_code``) and loads the published ``model.safetensors``
strictly, in its own key layout (the layout ``save_pretrained`` writes; see
``TransformersBuilder.from_release``). Where a config value could not be read from the hub file
itself, the spec's ``notes`` say so and where it comes from; such a value always changes a
parameter's shape or name, so a wrong one makes loading the real weights fail
(:class:`~pathray.errors.WeightsMismatchError`), never a silently different embedding.
Sources per model: ``docs/zoo/hf.md``.
"""

from __future__ import annotations

from ..spec import IMAGENET_MEAN, IMAGENET_STD, EncoderSpec, Preprocess

_TRIDENT_TILE = "TRIDENT README: --patch_size 224 --mag 20 (224 px at 0.5 µm/px)"
_OWKIN_LICENSE = "other: Owkin licence on the hub card (non-commercial research use)"

# Dinov2Config / Dinov2WithRegistersConfig values shared by the DINOv2-trained cards (their
# hub config.json files; transformers' defaults for these keys are the same)
_DINOV2_COMMON = dict(
    mlp_ratio=4,
    hidden_act="gelu",
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    initializer_range=0.02,
    layer_norm_eps=1e-6,
    num_channels=3,
    qkv_bias=True,
    drop_path_rate=0.0,
    layerscale_value=1.0,
    apply_layernorm=True,
    reshape_hidden_states=True,
)

_HIBOU_MEAN = (0.7068, 0.5755, 0.722)
_HIBOU_STD = (0.195, 0.2316, 0.1816)
#: HistAI/hibou example.ipynb: Resize((224, 224), BICUBIC) -> CenterCrop((224, 224)) -> ToTensor ->
#: Normalize(hibou mean/std) on a PIL image (tiles are square: Resize((224, 224)) == Resize(224))
_HIBOU_PREPROCESS = Preprocess(resize_px=224, crop_px=224, interpolation="bicubic", mean=_HIBOU_MEAN, std=_HIBOU_STD)
_HIBOU_SOURCE = (
    "hub card: AutoModel.from_pretrained(..., trust_remote_code=True), features = pooler_output "
    "(HistAI/hibou example.ipynb; = the CLS token after the final LayerNorm, head(x_norm_clstoken) of "
    "HistAI/hibou hibou/models/vision_transformer.py)"
)


def _hibou(name: str, hub_id: str, width: int, depth: int, heads: int, **extra) -> EncoderSpec:
    return EncoderSpec(
        name=name,
        family=f"ViT-{'B' if width == 768 else 'L'}/14, 4 registers, SwiGLU (DINOv2)",
        architecture="Dinov2WithRegistersModel",
        builder="transformers",
        model_kwargs={
            "config": dict(
                _DINOV2_COMMON,
                hidden_size=width,
                num_hidden_layers=depth,
                num_attention_heads=heads,
                image_size=224,
                patch_size=14,
                use_swiglu_ffn=True,
                num_register_tokens=4,
            )
        },
        embed_dim=width,
        input_px=224,
        native_mpp=0.5,
        native_tile_px=224,
        tile_source=f"HistAI/hibou example.ipynb Resize((224, 224)); {_TRIDENT_TILE}",
        preprocess=_HIBOU_PREPROCESS,
        pooling="pooler",
        hf_hub_id=hub_id,
        license="Apache-2.0",
        source=_HIBOU_SOURCE,
        # the hub's config.json names its trust_remote_code class
        extra={"config_architectures": ("Dinov2ModelWithRegisters",)},
        **extra,
    )


SPECS: list[EncoderSpec] = [
    EncoderSpec(
        name="phikon",
        family="ViT-B/16 (iBOT)",
        architecture="ViTModel",
        builder="transformers",
        model_kwargs={
            # owkin/phikon config.json
            "config": dict(
                hidden_size=768,
                num_hidden_layers=12,
                num_attention_heads=12,
                intermediate_size=3072,
                hidden_act="gelu",
                hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0,
                initializer_range=0.02,
                layer_norm_eps=1e-12,
                image_size=224,
                patch_size=16,
                num_channels=3,
                qkv_bias=True,
                encoder_stride=16,
            ),
            "init": {"add_pooling_layer": False},
        },
        embed_dim=768,
        input_px=224,
        native_mpp=0.5,
        native_tile_px=224,
        tile_source=f"owkin/phikon preprocessor_config.json size 224; {_TRIDENT_TILE}",
        # preprocessor_config.json: {"do_resize", "size": 224, "do_normalize", ImageNet mean/std}, no
        # processor type -> ViTImageProcessor (config model_type "vit"): resize to 224x224, bilinear
        preprocess=Preprocess(
            resize_px=224, crop_px=224, interpolation="bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD
        ),
        pooling="cls",
        hf_hub_id="owkin/phikon",
        license=_OWKIN_LICENSE,
        source="hub card: ViTModel.from_pretrained('owkin/phikon', add_pooling_layer=False), "
        "features = last_hidden_state[:, 0, :]",
        # a pooler saved with the ViTModel is not part of the card's model (add_pooling_layer=False)
        checkpoint_ignore=("pooler.",),
    ),
    EncoderSpec(
        name="phikon-v2",
        family="ViT-L/16 (DINOv2)",
        architecture="Dinov2Model",
        builder="transformers",
        model_kwargs={
            "config": dict(
                _DINOV2_COMMON,
                hidden_size=1024,
                num_hidden_layers=24,
                num_attention_heads=16,
                image_size=224,
                patch_size=16,
                use_swiglu_ffn=False,
            )
        },
        embed_dim=1024,
        input_px=224,
        native_mpp=0.5,
        native_tile_px=224,
        tile_source=f"preprocessor_config.json shortest_edge 224, crop 224; {_TRIDENT_TILE}",
        # preprocessor_config.json: shortest_edge 224, resample 3 (bicubic), center crop 224, ImageNet
        preprocess=Preprocess(
            resize_px=224, crop_px=224, interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD
        ),
        pooling="cls",
        hf_hub_id="owkin/phikon-v2",
        license=_OWKIN_LICENSE,
        source="hub card: AutoModel.from_pretrained('owkin/phikon-v2'), features = last_hidden_state[:, 0, :]",
        notes="image_size=224 is inferred (DINOv2 global crops of 224 px; 518 is not a multiple of the 16 px "
        "patch); the hub config.json could not be read here",
    ),
    EncoderSpec(
        name="midnight-12k",
        family="ViT-g/14, SwiGLU (DINOv2)",
        architecture="Dinov2Model",
        builder="transformers",
        model_kwargs={
            "config": dict(
                _DINOV2_COMMON,
                hidden_size=1536,
                num_hidden_layers=40,
                num_attention_heads=24,
                image_size=224,
                patch_size=14,
                use_swiglu_ffn=True,
            )
        },
        embed_dim=3072,
        input_px=224,
        native_mpp=0.5,
        native_tile_px=224,
        tile_source=f"card: trained on 224x224 images, v2.Resize(224) -> v2.CenterCrop(224); {_TRIDENT_TILE}",
        # card: v2.Resize(224) -> v2.CenterCrop(224) -> v2.ToTensor() -> Normalize(0.5, 0.5) on a PIL image
        # (torchvision v2 resizes a PIL image with Pillow, bilinear)
        preprocess=Preprocess(
            resize_px=224, crop_px=224, interpolation="bilinear", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)
        ),
        pooling="cls+mean_patch",
        hf_hub_id="kaiko-ai/midnight",
        license="MIT",
        source="hub card / kaiko-ai/Midnight README: AutoModel.from_pretrained('kaiko-ai/midnight'), "
        "extract_classification_embedding = cat(CLS, mean of last_hidden_state[:, 1:])",
        notes="image_size=224 is inferred (card: trained on 224x224 images, 16x16 patch tokens); the hub "
        "config.json could not be read here",
    ),
    _hibou("hibou-b", "histai/hibou-b", 768, 12, 12, card_params_m=85.7),
    _hibou(
        "hibou-l",
        "histai/hibou-L",
        1024,
        24,
        16,
        gated=True,
        card_params_m=304.0,
        notes="config inferred: hibou-b's hub config with ViT-L width/depth/heads; 4 registers (kaiko-ai/Midnight "
        "eval num_reg_tokens: 4), SwiGLU (only it gives the card's 304M parameters; an MLP gives 303.2M)",
    ),
]
